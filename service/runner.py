"""Runs jobs on Ray: the queue, submission, cancellation, and reconciling the store with what Ray and the
job directory say.

Blocking code (Ray's SDK and storage are synchronous): the reconciler calls `reconcile_once` from a worker
thread, routes call `cancel` etc. from FastAPI's threadpool. One lock serialises everything that submits or
stops Ray jobs, so a cancel never interleaves with a submission of the same job.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import threading
import time
from typing import Any

import objstore
from service import jobdir
from service.rayjobs import RayJobInfo, RayJobs, RayUnavailable
from service.settings import Settings
from service.states import InvalidTransition, JobState
from service.store import Job, Store

log = logging.getLogger(__name__)

# Non-secret settings forwarded to the trainer; credentials (AWS_ACCESS_KEY_ID, ...) must be configured on
# the cluster itself, because a job's runtime_env is visible to anyone who can read the Ray dashboard.
FORWARDED_ENV = ("TRAINCTL_S3_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION", "TRAINCTL_STORAGE_RETRY_SECONDS")

# trainer.run's exit codes (docs/architecture.md).
EXIT_USER, EXIT_STORAGE = 2, 3


class Runner:
    def __init__(self, settings: Settings, store: Store, ray: RayJobs) -> None:
        self.settings, self.store, self.ray = settings, store, ray
        self._lock = threading.RLock()
        store.on_transition = self.save_record
        # Observability (service/metrics.py): the latest training throughput of each active job, and how
        # often Ray refused a submission. Kept by whichever replica reconciles.
        self.images_per_s: dict[str, float] = {}
        self.submission_errors = 0

    def save_record(self, job: Job) -> None:
        """Mirror a job's record into its directory (record.json) for `trainctl reindex`. Best effort: the
        database stays the truth, and the next transition writes it again."""
        record = {k: v for k, v in dataclasses.asdict(job).items() if k not in ("seq", "spec")}
        record["state"] = job.state.value
        try:
            jobdir.write_record(self.job_dir(job.id), record)
        except Exception as exc:  # noqa: BLE001 - never fail a transition over its mirror
            log.warning("job %s: could not write %s: %s", job.id, jobdir.RECORD, exc)
        if job.state.is_terminal():
            self.images_per_s.pop(job.id, None)

    # --- paths and the job directory ---------------------------------------------------------------------

    def job_dir(self, job_id: str) -> str:
        return jobdir.job_uri(self.settings.storage_root, job_id)

    def entrypoint(self, job_id: str) -> str:
        return (f"{shlex.quote(self.settings.python)} -m trainer.run "
                f"--job-dir {shlex.quote(self.job_dir(job_id))}")

    # --- the queue ------------------------------------------------------------------------------------------

    def schedule(self) -> None:
        """Start QUEUED jobs, oldest first, while fewer than max_concurrent_jobs hold a slot."""
        with self._lock:
            free = self.settings.max_concurrent_jobs - len(self.store.active())
            for job in self.store.queued_in_order():
                if free <= 0:
                    return
                try:
                    self._submit(job, attempt=1, reason="submitted")
                except (RayUnavailable, objstore.StorageUnavailable) as exc:
                    if isinstance(exc, RayUnavailable):
                        self.submission_errors += 1
                    log.warning("job %s stays queued: %s", job.id, exc)
                    # Say why on the job itself, so a user polling a job stuck in QUEUED sees the reason.
                    self.store.update(job.id, message=f"waiting to submit, will retry: {str(exc)[:300]}")
                    return  # the next round tries again, in the same order
                except InvalidTransition:
                    continue  # cancelled meanwhile
                except Exception as exc:  # noqa: BLE001 - a broken submission must not block the queue
                    self.submission_errors += 1
                    log.exception("submitting job %s failed", job.id)
                    self._fail(job.id, f"could not submit the job to Ray: {exc}")
                    continue
                free -= 1

    def _submit(self, job: Job, attempt: int, reason: str) -> Job:
        """Write spec.json, submit `<id>-<attempt>` to Ray, then record it (STARTING). The record is written
        after Ray accepted the job, so attempts only count real submissions; if the job was cancelled in the
        meantime the new Ray job is stopped again."""
        job_dir = self.job_dir(job.id)
        jobdir.write_spec(job_dir, job.spec)
        submission_id = f"{job.id}-{attempt}"
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        self.ray.submit(submission_id, self.entrypoint(job.id), num_cpus=self.settings.entrypoint_num_cpus,
                        env_vars=env, metadata={"trainctl_job_id": job.id, "attempt": str(attempt)},
                        resources=self.settings.entrypoint_resources or None)
        entry = {"attempt": attempt, "submission_id": submission_id, "reason": reason, "submitted_at": time.time()}
        try:
            return self.store.transition(job.id, JobState.STARTING, expect={job.state},
                                         ray_submission_id=submission_id, attempts=attempt,
                                         attempt_log=[*job.attempt_log, entry],
                                         message=None if attempt == 1 else f"restarted: {reason}")
        except (InvalidTransition, KeyError):
            self._stop_quietly(submission_id)
            raise InvalidTransition(job.id, job.state, JobState.STARTING) from None

    def _stop_quietly(self, submission_id: str) -> None:
        try:
            self.ray.stop(submission_id)
        except Exception:  # noqa: BLE001
            log.warning("could not stop orphaned Ray job %s", submission_id, exc_info=True)

    # --- cancel ----------------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Cancel a job; idempotent. QUEUED: cancelled at once. STARTING/RUNNING: the Ray job is stopped,
        then the job is CANCELLED. Raises RayUnavailable when Ray cannot be told (the request is kept, and
        the reconciler stops the job once Ray answers)."""
        with self._lock:
            job = self.store.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.state.is_terminal():
                return job
            if job.state is JobState.QUEUED:
                return self.store.transition(job_id, JobState.CANCELLED, expect={JobState.QUEUED},
                                             message="cancelled while queued")
            self.store.update(job_id, cancel_requested=True)
            assert job.ray_submission_id
            if self.ray.stop(job.ray_submission_id):
                return self.store.transition(job_id, JobState.CANCELLED, message="cancelled by user")
            # The Ray job had already ended (or never existed): its outcome decides; a failure or stop
            # counts as our cancel.
            job = self.store.get(job_id)
            assert job is not None
            info = self.ray.info(job.ray_submission_id or "")
            if info is None or info.status != "SUCCEEDED":
                return self.store.transition(job_id, JobState.CANCELLED, message="cancelled by user")
            self._reconcile(job, info)
            return self.store.get(job_id) or job

    # --- reconciling -------------------------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        """One pass: bring every active job up to date with Ray and its job directory, then fill free slots."""
        with self._lock:
            for job in self.store.active():
                try:
                    info = self.ray.info(job.ray_submission_id or "")
                    self._reconcile(job, info)
                except RayUnavailable as exc:
                    log.warning("reconcile: %s", exc)
                    return  # nothing to learn this round; do not start jobs on a cluster we cannot see
                except objstore.StorageUnavailable as exc:
                    log.warning("reconcile job %s: %s", job.id, exc)
                except InvalidTransition as exc:
                    log.info("reconcile job %s: %s (changed meanwhile)", job.id, exc)
                except Exception:  # noqa: BLE001 - one broken job must not stop the others
                    log.exception("reconcile job %s failed", job.id)
            self.schedule()

    def _reconcile(self, job: Job, info: RayJobInfo | None) -> None:
        job_dir = self.job_dir(job.id)
        if info is None:
            # Ray forgot the job (the head restarted) or the submission never landed: the driver is gone.
            self._after_failure(job, job_dir, f"Ray has no record of {job.ray_submission_id} "
                                              "(head restarted?)", exit_code=None)
            return
        if not info.is_terminal:
            if job.cancel_requested:  # an earlier cancel could not reach Ray
                if self.ray.stop(job.ray_submission_id or ""):
                    self.store.transition(job.id, JobState.CANCELLED, message="cancelled by user")
                return
            if info.status == "RUNNING":
                self._record_progress(job, job_dir)
                if job.state is JobState.STARTING:
                    self.store.transition(job.id, JobState.RUNNING, expect={JobState.STARTING})
            return
        # The run is over. Storage may be down (that may be why it ended): the job's fate must not wait for
        # it, so what cannot be read now counts as missing and the exit code decides.
        storage_up = True
        try:
            self._record_progress(job, job_dir)
            summary = jobdir.read_summary(job_dir)
        except objstore.StorageUnavailable as exc:
            log.warning("job %s ended while storage is unreachable: %s", job.id, exc)
            storage_up, summary = False, None
        if job.cancel_requested and info.status != "SUCCEEDED":
            self.store.transition(job.id, JobState.CANCELLED, message="cancelled by user")
            return
        if not storage_up and info.exit_code != EXIT_STORAGE:
            return  # decide once storage answers again: a summary may say more than the exit code
        if info.status == "SUCCEEDED":
            if summary and summary.get("state") == "succeeded":
                self.store.transition(job.id, JobState.SUCCEEDED, message=None,
                                      best_val_acc=summary.get("best_val_acc"),
                                      last_epoch=summary.get("epochs_completed") or job.last_epoch)
            else:
                self._fail(job.id, "the trainer exited 0 but wrote no successful summary.json")
            return
        self._after_failure(job, job_dir, f"Ray job {job.ray_submission_id} {info.status}: "
                                          f"{(info.message or '').strip()[:500]}", exit_code=info.exit_code,
                            summary=summary)

    def _after_failure(self, job: Job, job_dir: str, reason: str, exit_code: int | None,
                       summary: dict[str, Any] | None = None) -> None:
        """A run ended without success and without our cancel: retry infrastructure failures up to
        spec.checkpoint.max_restarts times, never a user error; a storage outage fails the job."""
        if summary is None and exit_code != EXIT_STORAGE:
            summary = jobdir.read_summary(job_dir)
        kind = summary.get("error_kind") if summary and summary.get("state") == "failed" else None
        error = (summary or {}).get("error") or reason
        if kind == "user" or exit_code == EXIT_USER:
            self._fail(job.id, f"the job's spec or data is wrong (not retried): {error}")
            return
        if kind == "storage" or exit_code == EXIT_STORAGE:
            self._fail(job.id, f"storage was unreachable ({objstore.redact(self.settings.storage_root)}): {error}")
            return
        max_restarts = int(job.spec.get("checkpoint", {}).get("max_restarts", 0))
        if job.attempts - 1 < max_restarts:
            log.warning("job %s attempt %d failed (%s); resubmitting", job.id, job.attempts, reason)
            # This attempt's summary (its error is in the attempt log now) must not be mistaken for the next
            # attempt's if that one dies before writing its own.
            objstore.delete_tree(objstore.join(job_dir, jobdir.SUMMARY))
            self._submit(job, attempt=job.attempts + 1, reason=f"attempt {job.attempts} failed: {error}")
        else:
            self._fail(job.id, f"failed after {job.attempts} attempt(s): {error}")

    def _fail(self, job_id: str, message: str) -> None:
        self.store.transition(job_id, JobState.FAILED, message=message)

    def _record_progress(self, job: Job, job_dir: str) -> None:
        metrics = jobdir.read_metrics(job_dir)
        if not metrics:
            return
        accs = [m["val_acc"] for m in metrics if isinstance(m.get("val_acc"), (int, float))]
        best = max(accs) if accs else None
        last = metrics[-1]["epoch"]
        ips = metrics[-1].get("images_per_s")
        if isinstance(ips, (int, float)) and not job.state.is_terminal():
            self.images_per_s[job.id] = float(ips)
        if (best, last) != (job.best_val_acc, job.last_epoch):
            self.store.update(job.id, best_val_acc=best, last_epoch=last)

    # --- logs and deletion -----------------------------------------------------------------------------------

    def logs(self, job: Job, tail: int | None = None) -> str:
        if not job.ray_submission_id:
            return ""
        text = self.ray.logs(job.ray_submission_id)
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:]) if tail > 0 else ""
        return text

    def delete(self, job: Job) -> bool:
        """Delete a terminal job: its storage prefix, its Ray job records (best effort), then its record."""
        if not job.state.is_terminal():
            return False
        objstore.delete_tree(self.job_dir(job.id))
        for entry in job.attempt_log:
            try:
                self.ray.delete(entry["submission_id"])
            except Exception:  # noqa: BLE001 - Ray's records are a convenience, the store is the truth
                log.info("could not delete Ray job %s", entry.get("submission_id"), exc_info=True)
        return self.store.delete(job.id)
