"""The record of `trainctl serve`'s detached local head (service/server/localray.py), without Ray: a stand-in process
with the head's command line shape; `trainctl down` stops only the recorded process group."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.server.localray import HEAD_RECORD, HeadRecord, live_head, read_head_record, stop_recorded_head
from tests.service.priority import autogroup_scheduling


def _record(data: Path, pid: int, temp_dir: Path) -> HeadRecord:
    rec = HeadRecord(
        pid=pid,
        gcs_address="127.0.0.1:1",
        dashboard_url="http://127.0.0.1:1",
        temp_dir=str(temp_dir),
        auth_mode="disabled",
        num_cpus=4,
        started_at=time.time(),
    )
    (data / HEAD_RECORD).write_text(rec.to_json())
    return rec


def _started(argv: list[str]) -> subprocess.Popen[bytes]:
    """Popen returns once the child has begun to exec, but the kernel sets up the new program's argv a moment
    later: read at once, /proc/<pid>/cmdline is empty about one time in three here. A real head's record is
    written seconds after it starts, once its dashboard answers; wait as long as it takes to be that head."""
    proc = subprocess.Popen(argv, start_new_session=True)
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 10
    while argv[-1].encode() not in cmdline.read_bytes().split(b"\0") and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


@contextmanager
def _group_leader(code: str) -> Iterator[subprocess.Popen[str]]:
    """A process running `code` as the leader of a process group of its own (stdout piped, for it to say when
    it is ready), killed at the end if the test left it running."""
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield leader
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_a_record_of_a_head_that_is_gone_is_forgotten(tmp_path: Path) -> None:
    temp = tmp_path / "tcray"
    temp.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _record(tmp_path, gone.pid, temp)
    assert live_head(tmp_path, wait_s=0) is None
    assert read_head_record(tmp_path) is None and not temp.exists()
    assert stop_recorded_head(tmp_path) is None  # nothing recorded: nothing stopped


def test_down_stops_the_recorded_group_only(tmp_path: Path) -> None:
    temp = tmp_path / "tcray"
    temp.mkdir()
    argv = [sys.executable, "-c", "import time; time.sleep(120)", "start", f"--temp-dir={temp}"]
    head = _started(argv)
    bystander = _started([sys.executable, "-c", "import time; time.sleep(120)"])
    # The fake head is pytest's child: once SIGTERM ends it, it stays a zombie (still in its process group) until
    # reaped, and `down` would wait out its whole grace and the SIGKILL wait (15 s). A real head is not the
    # child of the `down` process, so reap ours as soon as it exits, as its real parent would.
    threading.Thread(target=head.wait, daemon=True).start()
    try:
        rec = _record(tmp_path, head.pid, temp)
        # running, but its "dashboard" does not answer: not live, and the record is kept (never a second head)
        assert live_head(tmp_path, wait_s=0) is None and read_head_record(tmp_path) == rec
        assert stop_recorded_head(tmp_path, grace_s=5) == rec
        assert head.wait(timeout=10) is not None
        assert read_head_record(tmp_path) is None and not temp.exists()
        assert bystander.poll() is None  # another process group is left alone
        # a recycled pid (not our head's command line) is never signalled
        _record(tmp_path, bystander.pid, temp)
        assert stop_recorded_head(tmp_path) is None and bystander.poll() is None
    finally:
        for p in (head, bystander):
            p.kill()
            p.wait()


def test_down_stops_the_heads_unfinished_jobs_through_the_jobs_api_first(tmp_path: Path) -> None:
    """A stand-in Jobs API over real HTTP: the running job (only it) is stopped with the head's token, and
    `stop_head_jobs` waits until Ray reports it ended."""
    import json
    from dataclasses import replace
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from service.server.localray import stop_head_jobs

    jobs = {"a-1": "RUNNING", "b-1": "SUCCEEDED"}
    calls: list[tuple[str, str, str | None]] = []

    class JobsApi(BaseHTTPRequestHandler):
        def _answer(self, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            calls.append(("GET", self.path, self.headers.get("Authorization")))
            self._answer([{"submission_id": k, "status": v} for k, v in jobs.items()])

        def do_POST(self) -> None:
            calls.append(("POST", self.path, self.headers.get("Authorization")))
            jobs[self.path.split("/")[3]] = "STOPPED"
            self._answer({"stopped": True})

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), JobsApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rec = replace(_record(tmp_path, 1, tmp_path), dashboard_url=f"http://127.0.0.1:{server.server_address[1]}")
        said: list[str] = []
        assert stop_head_jobs(rec, "tok", wait_s=5, say=said.append) == 1 and said == []
        assert ("POST", "/api/jobs/a-1/stop", "Bearer tok") in calls
        assert all(path != "/api/jobs/b-1/stop" for _, path, _ in calls) and jobs["a-1"] == "STOPPED"
    finally:
        server.shutdown()
    # a head whose Jobs API does not answer is only signalled, and `down` says so
    said.clear()
    assert stop_head_jobs(replace(rec, dashboard_url="http://127.0.0.1:1"), None, wait_s=1, say=said.append) == 0
    assert len(said) == 1 and "could not stop the head's jobs" in said[0]


def test_a_group_is_stopped_whole_and_never_signalled_after_its_leader_is_reaped(monkeypatch) -> None:
    """`stop_process_group`: a member that ignores SIGTERM is killed after the grace, even though the leader
    exited at once; and every signal goes out while the leader is still unreaped, so that its pid (the
    group's id) cannot belong to a new process yet (pids wrap around during a suite run)."""
    import os
    import signal

    from service.server import localray

    member = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    leader_code = (
        "import subprocess, sys, time; "
        f"m = subprocess.Popen([sys.executable, '-c', {member!r}], stdout=subprocess.PIPE, text=True); "
        "m.stdout.readline(); print(m.pid, flush=True); time.sleep(60)"
    )
    with _group_leader(leader_code) as leader:
        member_pid = int(leader.stdout.readline())
        assert localray._group_members(leader.pid) == sorted([leader.pid, member_pid])
        sent: list[tuple[int, int | None]] = []
        real_killpg = os.killpg

        def killpg(pgid: int, sig: int) -> None:
            sent.append((sig, leader.returncode))
            real_killpg(pgid, sig)

        monkeypatch.setattr(localray.os, "killpg", killpg)
        assert localray.stop_process_group(leader, grace_s=1) is False  # it took the SIGKILL
        assert [sig for sig, _ in sent] == [signal.SIGTERM, signal.SIGKILL]  # the member outlived SIGTERM
        assert all(returncode is None for _, returncode in sent), sent  # the leader was not reaped yet
        assert leader.returncode == -signal.SIGTERM and localray._group_members(leader.pid) == []


def test_a_ray_head_is_stopped_by_its_leader_alone(monkeypatch) -> None:
    """`leader_first` (every Ray head: `LocalRayHead.stop`, `trainctl down`): SIGTERM goes to the leader alone,
    which stops its group itself, as `ray start --block` does (a SIGTERM to the whole group left a real head's
    raylet and GCS hanging for the whole grace). A stand-in leader that ends its member on SIGTERM: the group
    ends long before the grace, nothing else is signalled, and the leader exits by its own handler."""
    import os
    import signal

    from service.server import localray

    leader_code = (
        "import signal, subprocess, sys, time; "
        "m = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "signal.signal(signal.SIGTERM, lambda *_: (m.terminate(), m.wait(), sys.exit(0))); "
        "print(m.pid, flush=True); time.sleep(60)"
    )
    with _group_leader(leader_code) as leader:
        member_pid = int(leader.stdout.readline())
        assert localray._group_members(leader.pid) == sorted([leader.pid, member_pid])
        sent: list[tuple[str, int, int]] = []
        real_kill, real_killpg = os.kill, os.killpg

        def kill(pid: int, sig: int) -> None:
            sent.append(("kill", pid, sig))
            real_kill(pid, sig)

        def killpg(pgid: int, sig: int) -> None:
            sent.append(("killpg", pgid, sig))
            real_killpg(pgid, sig)

        monkeypatch.setattr(localray.os, "kill", kill)
        monkeypatch.setattr(localray.os, "killpg", killpg)
        t0 = time.monotonic()
        assert localray.stop_process_group(leader, grace_s=60, leader_first=True) is True
        assert time.monotonic() - t0 < 30  # the leader's own shutdown, not the grace
        assert sent == [("kill", leader.pid, signal.SIGTERM)]
        assert leader.returncode == 0 and localray._group_members(leader.pid) == []


def test_a_leader_that_does_not_stop_is_killed_with_its_group_after_the_grace() -> None:
    """`leader_first` with a leader that ignores SIGTERM (a head stuck in its shutdown): after the grace the
    whole group gets SIGKILL, and the caller is told the head did not end by itself."""
    from service.server import localray

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
    with _group_leader(code) as leader:
        leader.stdout.readline()  # its handler is in place
        assert localray.stop_process_group(leader, grace_s=0.5, leader_first=True) is False
        assert leader.returncode == -9 and localray._group_members(leader.pid) == []


# What a grandchild of the niced process reports: its nice value, then its session's autogroup line.
REPORT = "import os; print(os.nice(0)); print(open('/proc/self/autogroup').read() if os.path.exists('/proc/self/autogroup') else '')"  # noqa: E501


def test_a_lowered_priority_holds_for_the_process_its_children_and_its_session() -> None:
    """What `trainctl serve` does to its local head (TRAINCTL_RAY_NICE): the nice value, inherited by what the
    head starts, and the session's autogroup (where the kernel has autogroup scheduling), whose own nice is
    what ranks a session against the API's."""
    from service.server.localray import lower_priority

    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {REPORT!r}])"
    done = subprocess.run(
        [sys.executable, "-c", parent],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        preexec_fn=lambda: lower_priority(7),
    )
    nice, autogroup = (done.stdout.splitlines() + ["", ""])[:2]
    assert nice == "7", (done.stdout, done.stderr)  # the grandchild inherited it
    if autogroup_scheduling():
        assert autogroup.endswith("nice 7"), autogroup
        # Its own session's group, not ours. The kernel prints nothing for the root group (a process in init's
        # session, as a CI runner's may be), which is another group too.
        ours = Path("/proc/self/autogroup").read_text().split()
        assert autogroup.startswith("/autogroup-") and autogroup.split()[0] not in ours[:1], (autogroup, ours)
