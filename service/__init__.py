"""trainctl's control plane: an HTTP API that runs training jobs on Ray (see docs/service.md), and its client.

    client/            the pip-installed client: the `trainctl` command (cli/, one module per command or group),
                       the HTTP client (http.py), where to connect (config.py: flags, env, login profiles),
                       the trainer's lines out of a Ray driver log (logview.py, `trainctl logs`)
    server/            the server process: `trainctl serve`/`down` (serve.py, localray.py), the app's assembly
                       (app.py) and start-up (startup.py), ASGI guards, Prometheus metrics, and the operator
                       commands on the database and storage (admin.py, reindex.py, clustercheck.py)
    api/               the HTTP layer: routes under /v1 and /healthz, their schemas and dependencies, job views,
                       authentication, the submission policy, request limits, the error shape
    ui/                the dashboard under /ui/ (pages, browser sessions)
    engine/            the job engine: the store (SQLAlchemy; the only place that changes a job's state) and its
                       migrations, job states, the runner and reconciler (Ray Jobs), decide (what to do with an
                       active job), the job directories, signed records, webhook alerts
    common/            settings (TRAINCTL_*, load_settings()) and pure helpers every part may use

Layers, each importing only those below it: common < engine < api, ui < server; the client imports the
server only inside the command that runs it (tests/service/test_imports.py). Of `trainer`, `service` uses only
`trainer.spec` and `trainer.contract` (no torch here), and `objstore`.
"""
