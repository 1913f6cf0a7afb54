"""The record of `trainctl serve`'s detached local head (service/server/localray.py), without Ray: a stand-in process
with the head's command line shape; `trainctl down` stops only the recorded process group."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from service.server.localray import HEAD_RECORD, HeadRecord, live_head, read_head_record, stop_recorded_head


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
    head = subprocess.Popen(argv, start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
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
