"""Emulated hosts on this machine: each a network namespace on a bridge plus its own PID and mount namespace,
with `sshd -D` as its init, so Ray's real cluster launcher (`ray up`, on-prem provider) reaches it over SSH
as it would a lab's machine (docs/scaling.md, "Testing on emulated hosts").

    python -m tests.hosts up 3      # prints the addresses, the key and how to ssh in; Ctrl-C or `down` ends it
    python -m tests.hosts down      # removes every host set left by a process that is gone (and only those)

A host has a private tmpfs on /tmp (so on /tmp/ray), on /dev/shm and on HOME (/root): nothing reaches it
through the shared disk by accident (the Ray token, the S3 settings arrive through the cluster file's
file_mounts); the project's install (the venv, the checkout) stays shared, and the sshd passes PYTHONPATH on
to its sessions when the caller has one (a checkout that is not the venv's editable install). Killing the
host's init (`crash()`) ends every process of the host at once; `partition()` / `heal()` put its link down/up.
The launcher (`run()`) gets the same private /tmp/ray and HOME, in the root network namespace.

Everything made carries the marker `tch-<pid>` / `tch<pid>` (the pid of the process that made it): the
stale-state reaper removes only namespaces, links, processes and run dirs whose marker names a process that
is gone. Addresses: the first 10.200.X.0/24 that no address or route of this machine overlaps.
Needs root, iproute2, util-linux (unshare, nsenter), openssh-server/-client and rsync.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MARK = "tch"
RUN_ROOT = Path("/run/trainctl-hosts")  # not /tmp: each host has its own /tmp
SUBNET_LOCK = Path("/run/trainctl-hosts.lock")  # held while a set picks its subnet and takes it
TOOLS = ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "rsync")
SSHD = "/usr/sbin/sshd"
SUBNETS = [ipaddress.ip_network(f"10.200.{x}.0/24") for x in range(0, 256)]
TMPFS_SIZE = "4g"  # an upper bound: a tmpfs takes memory only for what is written


class HostsUnavailable(RuntimeError):
    """This machine cannot run emulated hosts (no root, a tool missing); the message says which."""


def why_unavailable() -> str | None:
    """None if emulated hosts can run here, else the reason."""
    if sys.platform != "linux":
        return "emulated hosts need Linux namespaces"
    if os.geteuid() != 0:
        return "emulated hosts need root (network, PID and mount namespaces)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append("sshd (Debian openssh-server)")
    if missing:
        return f"emulated hosts need {', '.join(missing)} (apt-get install -y openssh-server rsync iproute2)"
    return None


def install_under_home(home: str = "/root") -> list[str]:
    """Directories of this Python installation that lie under HOME (e.g. a pyenv interpreter in
    /root/.pyenv): the hosts share the install, so these stay visible under their private HOME."""
    paths = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)}
    return sorted(p for p in paths if p.startswith(home.rstrip("/") + "/"))


def private_home_script(home: str, staging: Path) -> str:
    """Shell lines: a private tmpfs on `home`, with the install's directories under it bound back in."""
    keep = install_under_home(home)
    lines = []
    for i, path in enumerate(keep):
        lines.append(f"mkdir -p {staging}/{i} && mount --bind {shlex.quote(path)} {staging}/{i}")
    lines.append(f"mount -t tmpfs -o size=1g,mode=0700 tmpfs {home}")
    for i, path in enumerate(keep):
        lines.append(f"mkdir -p {shlex.quote(path)} && mount --move {staging}/{i} {shlex.quote(path)}")
    return " && ".join(lines) + " && "


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{shlex.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- what exists now -----------------------------------------------------------------------------------------


def _netns_names() -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names() -> list[str]:
    out = sh("ip", "-o", "link", "show").stdout
    return [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, flags=re.M)]


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in sh("ip", "-o", "-4", "addr", "show").stdout.splitlines():
        m = re.search(r"\binet (\S+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in sh("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        words = line.split()
        dest = words[1] if words and words[0] in ("local", "broadcast", "unicast") and len(words) > 1 else words[0]
        if dest == "default" or not words:
            continue
        try:
            nets.append(ipaddress.ip_network(dest, strict=False))
        except ValueError:
            continue
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for net in SUBNETS:
        if not any(net.overlaps(u) for u in used):
            return net
    raise HostsUnavailable("no free 10.200.X.0/24 on this machine for emulated hosts")


def _marker_pid(name: str) -> int | None:
    m = re.match(rf"^{MARK}-?(\d+)", name)
    return int(m.group(1)) if m else None


def reap_stale(only_pid: int | None = None) -> list[str]:
    """Remove the host sets of processes that are gone (or, with `only_pid`, that one's even if alive):
    their namespaces (after killing every process in them), links, launcher processes and run dirs. Touches
    nothing without our marker. Returns what it removed."""

    def ours(name: str) -> bool:
        pid = _marker_pid(name)
        if pid is None:
            return False
        return pid == only_pid if only_pid is not None else not _alive(pid)

    removed = []
    for ns in _netns_names():
        if ns.startswith(f"{MARK}-") and ours(ns):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
    for link in _link_names():
        if link.startswith(MARK) and ours(link):
            sh("ip", "link", "del", link, check=False)
            removed.append(f"link {link}")
    for proc_dir in Path("/proc").iterdir():  # launcher holders: argv[0] is "tch-<pid>-launcher"
        if not proc_dir.name.isdigit():
            continue
        try:
            argv0 = (proc_dir / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if argv0.startswith(f"{MARK}-") and argv0.endswith("-launcher") and ours(argv0):
            try:
                os.kill(int(proc_dir.name), signal.SIGKILL)
                removed.append(f"process {proc_dir.name} ({argv0})")
            except ProcessLookupError:
                pass
    if RUN_ROOT.is_dir():
        for run_dir in RUN_ROOT.iterdir():
            if ours(run_dir.name):
                shutil.rmtree(run_dir, ignore_errors=True)
                removed.append(f"dir {run_dir}")
    return removed


# --- one set of hosts ------------------------------------------------------------------------------------------


@dataclass
class Host:
    name: str  # network namespace
    address: str
    outer: str  # the veth end on the bridge (root namespace)
    proc: subprocess.Popen[bytes] | None = None  # `unshare --kill-child`: killing it kills the host's init

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def crash(self) -> None:
        """Every process of the host killed at once (a power cut): SIGKILL to unshare, whose --kill-child
        SIGKILLs the host's init, and the kernel kills the rest of the PID namespace with it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        # The kernel ends the namespace's other processes asynchronously: wait (bounded) until none is left, so a
        # caller sees the host as a power cut leaves it.
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def partition(self) -> None:
        sh("ip", "link", "set", self.outer, "down")

    def heal(self) -> None:
        sh("ip", "link", "set", self.outer, "up")

    def pids(self) -> list[int]:
        """Processes in the host's network namespace (its sshd and everything started from it)."""
        return [int(p) for p in sh("ip", "netns", "pids", self.name, check=False).stdout.split()]


@dataclass
class Hosts:
    tag: str  # tch-<pid>
    subnet: ipaddress.IPv4Network
    bridge: str
    bridge_address: str  # the root namespace's address on the hosts' network (servers for the hosts bind it)
    run_dir: Path
    key: Path  # private key for root@every host
    hosts: list[Host] = field(default_factory=list)
    launcher_pid: int | None = None

    # --- making and removing --------------------------------------------------------------------------

    @classmethod
    def up(cls, n: int, ssh_env: dict[str, str] | None = None, cpus: int | None = None) -> Hosts:
        """N hosts, each answering SSH on its address, and a launcher. `ssh_env`: variables every SSH session
        on the hosts gets; `cpus`: the CPUs each host shows (a cgroup limit, as in a container: Ray's CPU
        detection reads it), else this machine's. Raises HostsUnavailable if this machine cannot, and removes
        whatever it made if starting fails."""
        if reason := why_unavailable():
            raise HostsUnavailable(reason)
        reap_stale()
        pid = os.getpid()
        reap_stale(only_pid=pid)  # an earlier set of this same process that was not taken down
        tag = f"{MARK}-{pid}"
        names = [f"{tag}-h{i}" for i in range(1, n + 1)]
        links = [f"{MARK}{pid}b"] + [f"{MARK}{pid}v{i}" for i in range(1, n + 1)]
        if taken := set(names) & set(_netns_names()) | set(links) & set(_link_names()):
            raise HostsUnavailable(f"names already in use: {sorted(taken)}")
        # Parallel test workers (pytest-xdist) each make their own set: one at a time, so two never pick the
        # same free subnet between looking and taking it.
        with open(SUBNET_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subnet = free_subnet()
            addresses = [str(a) for a in list(subnet.hosts())[: n + 1]]
            run_dir = RUN_ROOT / tag
            run_dir.mkdir(parents=True, mode=0o700)
            hosts = cls(
                tag=tag,
                subnet=subnet,
                bridge=links[0],
                bridge_address=addresses[0],
                run_dir=run_dir,
                key=run_dir / "id_ed25519",
            )
            try:
                hosts._make(names, links[1:], addresses[1:], ssh_env or {}, cpus)
            except BaseException:
                hosts.down()
                raise
        return hosts

    def _make(
        self, names: list[str], outers: list[str], addresses: list[str], ssh_env: dict[str, str], cpus: int | None
    ) -> None:
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.tag, "-f", str(self.key))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.tag, "-f", str(self.run_dir / "host_key"))
        shutil.copy(self.key.with_suffix(".pub"), self.run_dir / "authorized_keys")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.bridge_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for name, outer, address in zip(names, outers, addresses, strict=True):
            sh("ip", "netns", "add", name)
            host = Host(name=name, address=address, outer=outer)
            self.hosts.append(host)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", name)
            sh("ip", "link", "set", outer, "master", self.bridge)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "-n", name, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
            sh("ip", "-n", name, "link", "set", "lo", "up")
            # Like a real host: a default route (to the bridge; this machine does not forward it anywhere), so
            # Ray finds its own address the way it does on a real network.
            sh("ip", "-n", name, "route", "add", "default", "via", self.bridge_address)
            self._start_host(host, ssh_env, cpus)
        self._start_launcher()
        for host in self.hosts:
            self._wait_ssh(host)

    def _start_host(self, host: Host, ssh_env: dict[str, str], cpus: int | None) -> None:
        sshd = [
            SSHD,
            "-D",
            "-e",
            "-f",
            "/dev/null",
            "-h",
            str(self.run_dir / "host_key"),
            "-o",
            f"ListenAddress={host.address}",
            "-o",
            "PermitRootLogin=prohibit-password",
            "-o",
            f"AuthorizedKeysFile={self.run_dir / 'authorized_keys'}",
            "-o",
            "StrictModes=no",
            "-o",
            "UsePAM=no",
            "-o",
            "PidFile=none",
            "-o",
            "MaxStartups=100",
            "-o",
            "MaxSessions=100",
            "-o",
            "Subsystem=sftp internal-sftp",
        ]
        for key, value in ssh_env.items():
            sshd += ["-o", f"SetEnv={key}={value}"]
        script = (
            f"mount -t tmpfs -o size={TMPFS_SIZE},mode=1777 tmpfs /tmp && mkdir -p /tmp/ray && "
            f"mount -t tmpfs -o size={TMPFS_SIZE},mode=1777 tmpfs /dev/shm && "
            + private_home_script("/root", self.run_dir / f"{host.name}.keep")
            + (
                # `ip netns exec` gave the host a fresh /sys without cgroups: a cgroup v2 style CPU limit
                # (cpu.max: quota period) is all Ray's detection needs to see.
                "mount -t tmpfs -o size=1m tmpfs /sys/fs/cgroup && "
                f"echo '{cpus * 100000} 100000' > /sys/fs/cgroup/cpu.max && "
                if cpus
                else ""
            )
            + f"exec {shlex.join(sshd)}"
        )
        log = open(self.run_dir / f"{host.name}.sshd.log", "ab")
        try:
            host.proc = subprocess.Popen(
                ["ip", "netns", "exec", host.name, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
                + ["--propagation", "private", "bash", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def _start_launcher(self) -> None:
        """A process holding a mount namespace with a private /tmp/ray and /root: `run()` enters it."""
        Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point (left as it is outside our namespace)
        script = (
            f"mount -t tmpfs -o size={TMPFS_SIZE},mode=1777 tmpfs /tmp/ray && "
            + private_home_script("/root", self.run_dir / "launcher.keep")
            + f"exec -a {self.tag}-launcher sleep infinity"
        )
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.launcher_pid = proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # mounted once the holder is `sleep`
            try:
                if Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(f"{self.tag}-launcher".encode()):
                    return
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the launcher namespace did not start (exit {proc.returncode})")
            time.sleep(0.05)
        raise RuntimeError("the launcher namespace did not start within 10 s")

    def _wait_ssh(self, host: Host, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            proc = subprocess.run(self.ssh_argv(host, "true", connect_timeout=2), capture_output=True, timeout=20)
            if proc.returncode == 0:
                return
            if not host.up or time.monotonic() > deadline:
                log = (self.run_dir / f"{host.name}.sshd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"host {host.name} ({host.address}) does not answer SSH: {proc.stderr!r}\n{log}")
            time.sleep(0.2)

    def down(self) -> list[str]:
        """Remove every host, link, process and file of this set (also what a crashed host left)."""
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                host.proc.kill()
                host.proc.wait(timeout=30)
        if self.launcher_pid is not None:
            try:
                os.kill(self.launcher_pid, signal.SIGKILL)
                os.waitpid(self.launcher_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        removed = reap_stale(only_pid=_marker_pid(self.tag))
        self.hosts = []
        return removed

    # --- using them -----------------------------------------------------------------------------------

    def ssh_argv(
        self, host: Host | str, command: str, connect_timeout: int = 10, extra: list[str] | None = None
    ) -> list[str]:
        address = host.address if isinstance(host, Host) else host
        return [
            "ssh",
            "-i",
            str(self.key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            *(extra or []),
            f"root@{address}",
            command,
        ]

    def ssh(self, host: Host | str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ssh_argv(host, command), capture_output=True, text=True, timeout=timeout)

    def launcher_argv(self, argv: list[str]) -> list[str]:
        """`argv` inside the launcher's namespace (private /tmp/ray and HOME=/root)."""
        assert self.launcher_pid is not None
        return ["nsenter", f"--target={self.launcher_pid}", "--mount", "--", "env", "HOME=/root", *argv]

    def run(
        self, argv: list[str], timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as the launcher (a laptop that knows only the hosts' addresses and the key)."""
        return subprocess.run(
            self.launcher_argv(argv), capture_output=True, text=True, timeout=timeout, env=env, cwd="/"
        )

    def describe(self) -> str:
        lines = [
            f"{len(self.hosts)} hosts on {self.subnet} (bridge {self.bridge} {self.bridge_address}), key {self.key}"
        ]
        for host in self.hosts:
            lines.append(f"  {host.name}: ssh -i {self.key} root@{host.address}")
        lines.append(f"  launcher shell: {shlex.join(self.launcher_argv(['bash']))}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.hosts", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start N hosts and keep them until Ctrl-C")
    up.add_argument("n", type=int)
    sub.add_parser("down", help="remove host sets whose maker is gone")
    args = parser.parse_args(argv)
    if args.command == "down":
        for what in reap_stale():
            print("removed", what)
        return 0
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    hosts = Hosts.up(args.n, ssh_env=env)
    print(hosts.describe(), flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for what in hosts.down():
            print("removed", what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
