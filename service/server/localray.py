"""A local Ray head for `trainctl serve` when no cluster address is configured: `ray start --head --block`
on 127.0.0.1 in its own process group, with a short temp dir and an explicit RAY_AUTH_MODE (so the head and
our Jobs client agree). Stopped by process group, never by name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRayHead:
    proc: subprocess.Popen[bytes]
    gcs_address: str
    dashboard_url: str
    temp_dir: str

    @classmethod
    def start(
        cls,
        num_cpus: int,
        auth_mode: str,
        timeout_s: float = 120,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        port: int | None = None,
        nice: int = 0,
    ) -> LocalRayHead:
        """`extra_args`/`extra_env`/`port`: for tests that start a special head (e.g. Ray's fake multi-node
        autoscaler, whose config must name the GCS port before the head starts)."""
        # Ray's unix socket paths must stay under 107 characters: a short dir under /tmp.
        temp_dir = tempfile.mkdtemp(prefix="tcray", dir="/tmp")
        port, dash = port or free_port(), free_port()
        env = {
            **os.environ,
            "RAY_AUTH_MODE": auth_mode,
            "RAY_USAGE_STATS_ENABLED": "0",
            # On SIGTERM, Ray 2.60's `ray start --block` first drains its node, for up to this many seconds
            # (default 30), until every worker lease is returned: a pause meant for Ray Serve's replicas. This
            # head runs no Serve, its jobs are stopped before it is (`stop_head_jobs`), and Ray Train's detached
            # autoscaling coordinator never returns its lease, so every stop of a head that had run a job
            # waited out the whole 30 s, past `trainctl down`'s grace. Without it the head stops in ~3 s.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            **(extra_env or {}),
        }
        env.pop("RAY_ADDRESS", None)
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            # Ray's defaults for these are fixed ports (52365, 10001): with another head on the machine our
            # dashboard agent could not listen, and a head without one refuses every job submission.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            *extra_args,
        ]
        log_path = os.path.join(temp_dir, "ray-start.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=(lambda: lower_priority(nice)) if nice else None,
            )
        head = cls(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")[-3000:]
                head.stop()
                raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{tail}")
            # The dashboard answers before the raylet is up, and on a loaded machine the raylet can still time
            # out after that: only `ray start`'s own "started" line says the node is complete.
            started = "Ray runtime started" in Path(log_path).read_text(errors="replace")
            if started and _dashboard_answers(head.dashboard_url, timeout_s=2):
                return head
            time.sleep(0.5)
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        head.stop()
        raise RuntimeError(f"the local Ray head did not come up within {timeout_s:.0f}s:\n{tail}")

    def stop(self, grace_s: float = 30) -> bool:
        """Ray's own shutdown (SIGTERM to `ray start --block` alone, see `end_process_group`), up to `grace_s`,
        then SIGKILL whatever is left of the head's process group. Returns whether it ended within the grace."""
        ended = stop_process_group(self.proc, grace_s=grace_s, leader_first=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return ended


def lower_priority(nice: int) -> None:
    """Run this process and everything it starts `nice` steps lower in CPU priority (os.nice adds to the
    nice value it inherited; the session's group gets `nice` itself). On a kernel with
    autogroup scheduling (most desktop and server distributions) nice values only rank processes of one
    session against each other, while sessions share the CPU equally; so the session's own autogroup is
    niced too (/proc/self/autogroup), or a busy head would keep its equal share whatever its nice value."""
    os.nice(nice)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:  # no autogroup scheduling here: the plain nice above is all there is
        pass


def end_process_group(pgid: int, grace_s: float, *, leader_first: bool = False) -> bool:
    """SIGTERM the process group `pgid`, give its members `grace_s` to exit, then SIGKILL what is left (and
    wait up to 10 s more). Returns whether the group ended within the grace, without the SIGKILL.

    `leader_first`: the SIGTERM goes to the leader alone, for a leader that stops its group in order itself.
    A Ray head needs it: `ray start --block` answers SIGTERM by stopping the raylet, then the GCS and the
    rest (about 3 s here, with the drain `LocalRayHead.start` turns off), while a SIGTERM to the whole group
    at once left the raylet, the GCS and the runtime-env agent hanging until they were killed, so every stop
    took its whole grace.

    The caller makes sure `pgid` still names its group: its leader is the caller's unreaped child, or was
    checked just before. (Signalling a group whose leader is gone can reach a stranger: a suite run starts
    ~30,000 processes, so pids wrap around on a pid_max of 32,768.)"""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            if sig == signal.SIGTERM and leader_first:
                try:
                    os.kill(pgid, sig)
                except ProcessLookupError:  # the leader is gone, the rest of its group may not be
                    os.killpg(pgid, sig)
            else:
                os.killpg(pgid, sig)
        except ProcessLookupError:
            return sig == signal.SIGTERM
        deadline = time.monotonic() + wait
        while (left := _group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not left:
            return sig == signal.SIGTERM
    return False


def stop_process_group(proc: subprocess.Popen[Any], grace_s: float, *, leader_first: bool = False) -> bool:
    """`end_process_group` for the group led by `proc`, our child, which is reaped last: until then its pid,
    the group's id, cannot be given to a new process, so no signal here can reach a stranger."""
    ended = end_process_group(proc.pid, grace_s, leader_first=leader_first)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # unkillable (uninterruptible sleep): leave it to init, say nothing
        pass
    return ended


def _group_members(pgid: int) -> list[int]:
    """The pids of the process group's members that have not exited (a zombie has: it only waits for its
    parent to reap it)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


# --- the detached head of `trainctl serve` ---------------------------------------------------------------
# `serve` starts its head in a session of its own and records it in <data dir>/ray-head.json; the head
# outlives the API process, so restarting or upgrading the control plane never stops a running job. The
# next `serve` re-attaches to the recorded head; `trainctl down` stops it.

HEAD_RECORD = "ray-head.json"


@dataclass(frozen=True)
class HeadRecord:
    pid: int  # `ray start --block`: the leader of the head's process group
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    auth_mode: str
    num_cpus: int
    started_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def write_head_record(data_dir: Path, head: LocalRayHead, auth_mode: str, num_cpus: int) -> HeadRecord:
    rec = HeadRecord(
        pid=head.proc.pid,
        gcs_address=head.gcs_address,
        dashboard_url=head.dashboard_url,
        temp_dir=head.temp_dir,
        auth_mode=auth_mode,
        num_cpus=num_cpus,
        started_at=time.time(),
    )
    tmp = data_dir / (HEAD_RECORD + ".tmp")
    tmp.write_text(rec.to_json())
    os.replace(tmp, data_dir / HEAD_RECORD)
    return rec


def read_head_record(data_dir: Path) -> HeadRecord | None:
    try:
        return HeadRecord(**json.loads((data_dir / HEAD_RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _is_our_head(rec: HeadRecord) -> bool:
    """The recorded pid is still that `ray start` (not a recycled pid): its command line names our temp dir."""
    try:
        cmdline = Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"start") for a in cmdline) and f"--temp-dir={rec.temp_dir}".encode() in cmdline


def _dashboard_answers(url: str, timeout_s: float = 3) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/version", timeout=timeout_s) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # token auth: up, and asking for the token
    except OSError:
        return False


def live_head(data_dir: Path, wait_s: float = 20) -> HeadRecord | None:
    """The recorded head when it is still running and its Jobs API answers (waiting up to `wait_s` for a
    busy dashboard); None when there is none. A record of a head that is gone is removed."""
    rec = read_head_record(data_dir)
    if rec is None:
        return None
    deadline = time.monotonic() + wait_s
    while _is_our_head(rec):
        if _dashboard_answers(rec.dashboard_url):
            return rec
        if time.monotonic() > deadline:
            return None  # running but not answering: leave it (and its record) to `trainctl down`
        time.sleep(0.5)
    forget_head(data_dir, rec)
    return None


def forget_head(data_dir: Path, rec: HeadRecord) -> None:
    shutil.rmtree(rec.temp_dir, ignore_errors=True)
    (data_dir / HEAD_RECORD).unlink(missing_ok=True)


_UNFINISHED = ("PENDING", "RUNNING")


def _jobs_api(rec: HeadRecord, token: str | None, method: str, path: str, timeout_s: float = 10) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(rec.dashboard_url + path, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read() or b"null")


def stop_head_jobs(rec: HeadRecord, token: str | None, wait_s: float, say: Callable[[str], None] = print) -> int:
    """Stop every unfinished Ray job on the head through its Jobs API, and wait up to `wait_s` for them to
    end; returns how many were stopped. Why before the signals: a job's driver runs in a session of its own and
    its Train workers notice a dead raylet only seconds later, so an attempt killed with the head trained on
    for several epochs after `down` returned, writing checkpoints into the job directory that the next
    `serve`'s resubmitted attempt resumes from. Best effort: a head that does not answer is only signalled."""
    try:
        ids = [j["submission_id"] for j in _jobs_api(rec, token, "GET", "/api/jobs/") if j["status"] in _UNFINISHED]
        for submission_id in ids:
            _jobs_api(rec, token, "POST", f"/api/jobs/{submission_id}/stop")
        stopped = len(ids)
        deadline = time.monotonic() + wait_s
        while ids and time.monotonic() < deadline:
            time.sleep(0.5)
            jobs = {j["submission_id"]: j["status"] for j in _jobs_api(rec, token, "GET", "/api/jobs/")}
            ids = [i for i in ids if jobs.get(i) in _UNFINISHED]
        return stopped
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unreachable or not the Jobs API: signals only
        say(f"could not stop the head's jobs through its Jobs API ({exc}); stopping them with the head")
        return 0


def stop_recorded_head(
    data_dir: Path, grace_s: float = 15, token: str | None = None, say: Callable[[str], None] = print
) -> HeadRecord | None:
    """Stop the head recorded in `data_dir` — only that process group, never other Ray clusters on the
    machine: its unfinished jobs through the Jobs API first (`stop_head_jobs`; `token` for a head with token
    auth), then Ray's own shutdown (`end_process_group`), `grace_s` to end, then SIGKILL. Returns the record,
    or None when none was running."""
    rec = read_head_record(data_dir)
    if rec is None:
        return None
    if _is_our_head(rec):
        t0 = time.monotonic()
        if stopped := stop_head_jobs(rec, token, wait_s=max(grace_s, 10), say=say):
            say(f"stopped {stopped} unfinished Ray job(s) on it in {time.monotonic() - t0:.1f} s (serve resubmits)")
        t0 = time.monotonic()
        if end_process_group(rec.pid, grace_s, leader_first=True):
            say(f"the head shut down in {time.monotonic() - t0:.1f} s")
        else:
            say(f"the head had not shut down after {grace_s:g} s (--grace): killed what was left of it")
        running = True
    else:
        running = False
    forget_head(data_dir, rec)
    return rec if running else None
