"""A network partition mid-run on emulated hosts brought up by `ray up` (cluster/onprem.yaml, the `onprem`
fixture of tests/cluster/test_onprem.py): the link of a worker host running a DDP rank goes down for
PARTITION_S, then comes back. The job must neither hang nor double-write: within RECOVERY_BOUND_S of the
cut a new attempt of the worker group (on the head and the spare host the autoscaler starts) finishes an
epoch, the job succeeds, and after the link returns a write as the old attempt, run on the partitioned host,
is refused (trainer/fence.py) and leaves every epoch in metrics.jsonl exactly once.

The bound is cluster/onprem.yaml's: Ray declares the host dead ~30 s after the cut (RAY_health_check_*), the
Train controller restarts the group from the last checkpoint, and the autoscaler starts Ray on the spare
host over SSH (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S gives it 180 s).

Needs root (namespaces): skipped with the reason elsewhere, failed under CI=true.
"""

from __future__ import annotations

import json
import shlex
import time
from collections import Counter

import pytest

from tests.cluster import test_onprem
from tests.cluster.test_onprem import BUCKET, TERMINAL, OnPrem, _job_log
from trainer import contract

# test_onprem's `ray up` cluster (a head and 3 worker hosts, one spare), brought up for this module.
onprem = test_onprem.onprem

# Above Ray's 300 s wait for a host that never joins (pitfall 6), plus the run itself.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

EPOCHS = 8
CUT_AFTER_EPOCH = 2  # a checkpoint exists (checkpoint.every_epochs 1), most of the run is still ahead
PARTITION_S = 60  # as long as the cut in ../shared/notes/ray-2.60.md that hung a run for 7 minutes
RECOVERY_BOUND_S = 240  # cut → an epoch finished by the new attempt; cluster/onprem.yaml's knobs give ~90 s

# Run on the partitioned host after the link is back: the old attempt's rank 0 trying to write its next
# epoch's metrics and its checkpoint, with that attempt's identity.
STALE_WRITER = """
import json, sys
import objstore
from trainer import contract, fence
job_dir, attempt = sys.argv[1], int(sys.argv[2])
uri = objstore.join(job_dir, contract.METRICS)
rows = [r for r in contract.parse_metrics(objstore.read_text(uri)) if r.attempt == attempt]
stale = rows[-1].model_copy(update={"epoch": rows[-1].epoch + 1})
refused = {}
for what, write in (
    ("metrics", lambda: fence.write_metrics(job_dir, uri, attempt, [*rows, stale])),
    ("checkpoint", lambda: fence.check(job_dir, attempt, f"checkpoint epoch_{stale.epoch:04d}")),
):
    try:
        write()
        refused[what] = None
    except fence.StaleAttempt as exc:
        refused[what] = str(exc)
print("STALE-WRITER " + json.dumps(refused))
"""


def _read(onprem: OnPrem, job_dir_key: str, name: str) -> str | None:
    fs = onprem.s3.filesystem()
    path = f"{job_dir_key}/{name}"
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read()).decode()
    except (FileNotFoundError, OSError):
        return None


def _state(onprem: OnPrem, job_dir_key: str) -> tuple[list[contract.EpochMetrics], contract.Attempts]:
    """The raw metrics lines (every line, no filtering) and the run's attempts."""
    text = _read(onprem, job_dir_key, contract.METRICS) or ""
    rows = [r for line in text.splitlines() if (r := contract.parse_metrics_row(_loads(line))) is not None]
    return rows, contract.parse_attempts(_read(onprem, job_dir_key, contract.ATTEMPTS))


def _loads(line: str) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


def test_partition_of_a_rank_host_resumes_within_the_bound_and_fences_the_old_attempt(onprem: OnPrem) -> None:
    head = onprem.hosts.hosts[0]
    by_address = {h.address: h for h in onprem.hosts.hosts}
    with onprem.client() as c:
        body = {
            "preset": "debug",
            "overrides": {"data.train": f"s3://{BUCKET}/datasets/train.parquet", "optim.epochs": EPOCHS},
        }
        resp = c.post("/v1/jobs", json=body)
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        job_dir_key = f"{BUCKET}/trainctl/jobs/{job_id}"
        submitted = time.monotonic()

        # Wait for epoch CUT_AFTER_EPOCH: then the ranks' hosts are known (each rank's device names it).
        rows: list[contract.EpochMetrics] = []
        while time.monotonic() - submitted < 400:
            rows, attempts = _state(onprem, job_dir_key)
            if rows and rows[-1].epoch >= CUT_AFTER_EPOCH:
                break
            job = c.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] not in TERMINAL, (job, _job_log(c, job_id))
            time.sleep(0.3)
        assert rows and rows[-1].epoch >= CUT_AFTER_EPOCH, ("no epoch before the cut", _job_log(c, job_id))
        assert attempts.current is not None, "rank 0 recorded no attempt in attempts.json"
        old_attempt, cut_epoch = attempts.current.attempt, rows[-1].epoch
        addresses = [d.rsplit(" on ", 1)[1] for d in rows[-1].devices]
        assert len(set(addresses)) == 2, rows[-1].devices
        # Rank 0's host where the placement allows (the head, holding Ray's GCS, is never cut).
        victim = by_address[next(a for a in addresses if a != head.address)]
        victim_is_rank0 = addresses[0] == victim.address

        cut = time.monotonic()
        victim.partition()
        try:
            healed_at = None
            restarted_after = progress_after = None
            while time.monotonic() - cut < RECOVERY_BOUND_S + PARTITION_S:
                if healed_at is None and time.monotonic() - cut >= PARTITION_S:
                    victim.heal()
                    healed_at = time.monotonic() - cut
                rows, attempts = _state(onprem, job_dir_key)
                current = attempts.current
                if restarted_after is None and current is not None and current.attempt > old_attempt:
                    restarted_after = time.monotonic() - cut
                if any(r.attempt is not None and r.attempt > old_attempt for r in rows):
                    progress_after = time.monotonic() - cut
                    break
                time.sleep(0.5)
            # Keep the link down for the whole PARTITION_S even when the job recovered sooner: the old
            # attempt's processes then meet a cluster that has moved on, the case the fence is for.
            while healed_at is None and time.monotonic() - cut < PARTITION_S:
                time.sleep(0.5)
        finally:
            if healed_at is None:
                victim.heal()
                healed_at = time.monotonic() - cut
        assert progress_after is not None and progress_after <= RECOVERY_BOUND_S, (
            f"no epoch from a new attempt within {RECOVERY_BOUND_S} s of the cut",
            attempts,
            onprem.provider_state(),
            onprem.ray_processes(),
            _job_log(c, job_id)[-4000:],
        )
        job = c.get(f"/v1/jobs/{job_id}").json()
        while job["state"] not in TERMINAL and time.monotonic() - submitted < 800:
            time.sleep(1)
            job = c.get(f"/v1/jobs/{job_id}").json()
        finished = time.monotonic() - submitted
        assert job["state"] == "SUCCEEDED", (job.get("message"), _job_log(c, job_id)[-4000:])

    # After the link returned: the old attempt, run on the partitioned host, tries its next writes.
    job_dir = f"s3://{job_dir_key}"
    before = _read(onprem, job_dir_key, contract.METRICS)
    command = f". ~/.trainctl/node.sh && python -c {shlex.quote(STALE_WRITER)} {shlex.quote(job_dir)} {old_attempt}"
    out = onprem.hosts.ssh(victim, command, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("STALE-WRITER ")]
    assert lines, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    refused = json.loads(lines[-1].removeprefix("STALE-WRITER "))
    assert refused["metrics"] and f"attempt {old_attempt}" in refused["metrics"], refused
    assert refused["checkpoint"] and "refused to write checkpoint" in refused["checkpoint"], refused
    assert _read(onprem, job_dir_key, contract.METRICS) == before, "the refused write changed metrics.jsonl"

    # Every epoch exactly once in the stored metrics, the ones after the cut's checkpoint from a new attempt.
    rows, attempts = _state(onprem, job_dir_key)
    counts = Counter(r.epoch for r in rows)
    assert sorted(counts) == list(range(1, EPOCHS + 1)) and set(counts.values()) == {1}, counts
    assert all(r.attempt is not None and r.attempt > old_attempt for r in rows if r.epoch > cut_epoch), rows
    assert contract.parse_metrics(before, attempts) == contract.parse_metrics(before)

    print(
        f"\npartition figures: cut {victim.address} ({'rank 0' if victim_is_rank0 else 'rank 1'}) after epoch "
        f"{cut_epoch}, link up again at {healed_at:.0f} s; new attempt {attempts.current and attempts.current.attempt}"
        f" started {restarted_after if restarted_after is None else round(restarted_after, 1)} s after the cut; "
        f"first epoch of the new attempt done {progress_after:.1f} s after the cut; job SUCCEEDED "
        f"{finished:.1f} s after submit; devices after: {rows[-1].devices}"
    )
