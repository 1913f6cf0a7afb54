"""trainctl's control plane: an HTTP API that runs training jobs on Ray (see docs/service.md).

    settings.py    TRAINCTL_* settings, built by load_settings()
    states.py      job states and the allowed transitions
    store.py       the SQLite job/token store (SQLAlchemy); the only place that changes a job's state
    jobdir.py      reading a job directory (metrics, manifest, summary) through objstore
    rayjobs.py     the narrow Ray Jobs API client (JobSubmissionClient) the runner uses
    runner.py      queue, submission, cancel, reconciliation with Ray and the job directory, restarts
    reconciler.py  the background task that runs the runner's reconciliation
    auth.py        bearer tokens (only hashes stored)
    errors.py      the JSON error shape and exception handlers
    startup.py     the start-up steps every API process runs (data dir, migrations, admin token, auth check)
    app.py         create_app(settings): the FastAPI app and its lifespan
    api/           routes (jobs, tokens, health), request dependencies, request/response schemas
    localray.py    a local Ray head for `trainctl serve`
    cli.py         the `trainctl` command

Import rule: `service` uses `trainer.spec` and `objstore`, nothing else of `trainer` (no torch here).
"""
