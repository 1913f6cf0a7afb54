"""The emulated hosts harness (tests/hosts.py) itself: private /tmp and HOME, one CPU, SSH only on the host's
address, a crash that ends every process of a host, a partition, and a cleanup that leaves nothing behind and
touches nothing it did not make. A few seconds; needs root (skipped with the reason, failed under CI)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.hosts import (
    Hosts,
    HostsUnavailable,
    _link_names,
    _marker_pid,
    _netns_names,
    install_under_home,
    reap_stale,
    why_unavailable,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the cluster tests: {reason}")
    pytest.skip(reason)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if reason := why_unavailable():
        _unavailable(reason)
    try:
        made = Hosts.up(2, cpus=1)
    except HostsUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield made
    finally:
        made.down()


def test_marker_names_only_ours() -> None:
    assert _marker_pid("tch-123-h1") == 123 and _marker_pid("tch123v2") == 123
    assert _marker_pid("eth0") is None and _marker_pid("docker0") is None and _marker_pid("tchx") is None


def test_hosts_are_separate_machines_and_cleanup_leaves_nothing(hosts: Hosts) -> None:
    h1, h2 = hosts.hosts
    script = "echo $HOME; ls -A /tmp/ray | wc -l; ls -A /root; cat /sys/fs/cgroup/cpu.max; ps -e -o pid= | wc -l"
    out = hosts.ssh(h1, script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "/root" and lines[1] == "0", out.stdout  # a private, empty /tmp/ray
    # A private HOME: nothing but the shared install's interpreter (a pyenv under /root here), bound back in.
    assert set(lines[2:-2]) <= {p.removeprefix("/root/").split("/")[0] for p in install_under_home()}, out.stdout
    assert lines[-2] == "100000 100000", "one CPU"
    assert int(lines[-1]) < 10, "a PID namespace of its own: sshd, this session, ps"
    # A file on one host's /tmp is not on the other's, nor on this machine's.
    assert hosts.ssh(h1, "echo x > /tmp/only-here && test -f /tmp/only-here").returncode == 0
    assert hosts.ssh(h2, "test -e /tmp/only-here").returncode != 0
    assert not os.path.exists("/tmp/only-here")
    # SSH answers on the host's own address only.
    assert hosts.ssh(h2, f"timeout 3 bash -c 'echo > /dev/tcp/{h1.address}/22'").returncode == 0
    assert hosts.ssh(h1, "timeout 3 bash -c 'echo > /dev/tcp/127.0.0.1/22'").returncode != 0

    # A partition: h1 unreachable from h2 until healed.
    h1.partition()
    assert hosts.ssh(h2, f"timeout 3 bash -c 'echo > /dev/tcp/{h1.address}/22'").returncode != 0
    h1.heal()
    assert hosts.ssh(h1, "true").returncode == 0

    # A crash: every process of h1 gone at once, h2 untouched.
    sleeper = subprocess.run(hosts.ssh_argv(h1, "nohup sleep 300 > /dev/null 2>&1 & echo started"), timeout=30)
    assert sleeper.returncode == 0 and len(h1.pids()) >= 2
    h1.crash()
    assert h1.pids() == [] and hosts.ssh(h2, "true").returncode == 0

    tag = hosts.tag
    removed = hosts.down()
    assert any("netns" in r for r in removed), removed
    assert not [n for n in _netns_names() if n.startswith(tag + "-")]
    assert not [link for link in _link_names() if _marker_pid(link) == _marker_pid(tag)]
    assert not hosts.run_dir.exists()


def test_the_reaper_spares_host_sets_of_live_processes(hosts: Hosts) -> None:
    """A second session's sweep (reap_stale with no pid) removes only sets whose maker is gone: ours is alive."""
    before = set(_netns_names())
    reap_stale()
    assert {h.name for h in hosts.hosts} <= set(_netns_names()) and before <= set(_netns_names())
    assert hosts.ssh(hosts.hosts[0], "true").returncode == 0
