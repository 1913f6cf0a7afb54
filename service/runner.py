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
from dataclasses import replace

import objstore
from service import jobdir
from service.decide import Cancel, Facts, Fail, Progress, Resubmit, Stop, Succeed, decide
from service.rayjobs import RayJobInfo, RayJobs, RayUnavailable
from service.settings import Settings
from service.states import InvalidTransition, JobNotFound, JobState
from service.store import Job, Store
from trainer import contract

log = logging.getLogger(__name__)

# Non-secret settings forwarded to the trainer; credentials (AWS_ACCESS_KEY_ID, ...) must be configured on
# the cluster itself, because a job's runtime_env is visible to anyone who can read the Ray dashboard.
FORWARDED_ENV = ("TRAINCTL_S3_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION", "TRAINCTL_STORAGE_RETRY_SECONDS")



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
                except Exception as exc:  # a broken submission must not block the queue
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
        except (InvalidTransition, JobNotFound):
            self._stop_quietly(submission_id)
            raise InvalidTransition(job.id, job.state, JobState.STARTING) from None

    def _stop_quietly(self, submission_id: str) -> None:
        try:
            self.ray.stop(submission_id)
        except Exception:
            log.warning("could not stop orphaned Ray job %s", submission_id, exc_info=True)

    # --- cancel ----------------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Cancel a job; idempotent. QUEUED: cancelled at once. STARTING/RUNNING: the Ray job is stopped,
        then the job is CANCELLED. Raises RayUnavailable when Ray cannot be told (the request is kept, and
        the reconciler stops the job once Ray answers), JobNotFound when there is no such job."""
        with self._lock:
            job = self.store.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.state.is_terminal():
                return job
            if job.state is JobState.QUEUED:
                return self.store.transition(job_id, JobState.CANCELLED, expect={JobState.QUEUED},
                                             message="cancelled while queued")
            self.store.update(job_id, cancel_requested=True)
            assert job.ray_submission_id
            if self.ray.stop(job.ray_submission_id):
                return self.store.transition(job_id, JobState.CANCELLED, message="cancelled by user")
            # The Ray job had already ended (or never existed): its outcome decides (service/decide.py: a
            # failure or stop counts as our cancel, a success stands).
            job = self.store.get(job_id)
            assert job is not None
            self._reconcile(job, self.ray.info(job.ray_submission_id or ""))
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
                except Exception:  # one broken job must not stop the others
                    log.exception("reconcile job %s failed", job.id)
            self.schedule()

    def _reconcile(self, job: Job, info: RayJobInfo | None) -> None:
        """Gather the facts about one active job, let service/decide.py decide, and carry it out."""
        job_dir = self.job_dir(job.id)
        facts = self._facts(job, info, job_dir)
        action = decide(facts)
        if isinstance(action, Progress):
            self._record_progress(job, job_dir)
            if action.start:
                self.store.transition(job.id, JobState.RUNNING, expect={JobState.STARTING})
        elif isinstance(action, Stop):
            if self.ray.stop(job.ray_submission_id or ""):
                self.store.transition(job.id, JobState.CANCELLED, message="cancelled by user")
        elif isinstance(action, Cancel):
            self.store.transition(job.id, JobState.CANCELLED, message=action.message)
        elif isinstance(action, Succeed):
            self.store.transition(job.id, JobState.SUCCEEDED, message=None, best_val_acc=action.best_val_acc,
                                  last_epoch=action.last_epoch or job.last_epoch)
        elif isinstance(action, Fail):
            self._fail(job.id, action.message)
        elif isinstance(action, Resubmit):
            log.warning("job %s attempt %d failed (%s); resubmitting", job.id, job.attempts, action.log_reason)
            # This attempt's summary (its error is in the attempt log now) must not be mistaken for the next
            # attempt's if that one dies before writing its own.
            jobdir.delete_summary(job_dir)
            self._submit(job, attempt=job.attempts + 1, reason=action.reason)

    def _facts(self, job: Job, info: RayJobInfo | None, job_dir: str) -> Facts:
        facts = Facts(state=job.state, cancel_requested=job.cancel_requested,
                      ray_status=info.status if info else None, submission_id=job.ray_submission_id or "",
                      exit_code=info.exit_code if info else None, ray_message=info.message if info else None,
                      attempts=job.attempts,
                      max_restarts=int(job.spec.get("checkpoint", {}).get("max_restarts", 0)),
                      storage_name=objstore.redact(self.settings.storage_root))
        if not facts.run_over:
            return facts
        # The run is over. Storage may be down (that may be why it ended): the job's fate must not wait for
        # it, so what cannot be read now counts as missing and the exit code decides.
        try:
            self._record_progress(job, job_dir)
            return replace(facts, summary=jobdir.read_summary(job_dir))
        except objstore.StorageUnavailable as exc:
            log.warning("job %s ended while storage is unreachable: %s", job.id, exc)
            return replace(facts, storage_up=False)

    def _fail(self, job_id: str, message: str) -> None:
        self.store.transition(job_id, JobState.FAILED, message=message)

    def _record_progress(self, job: Job, job_dir: str) -> None:
        metrics = jobdir.read_metrics(job_dir)
        if not metrics:
            return
        best = contract.best_so_far(metrics)
        last = metrics[-1].epoch
        if not job.state.is_terminal():
            self.images_per_s[job.id] = metrics[-1].images_per_s
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
            except Exception:  # Ray's records are a convenience, the store is the truth
                log.info("could not delete Ray job %s", entry.get("submission_id"), exc_info=True)
        return self.store.delete(job.id)
