"""The job engine: the job store and its migrations, job states, running jobs on Ray (runner, reconciler,
decide, rayjobs, leader), the job directories (jobdir, records) and webhook alerts (notify). It knows
nothing of HTTP: it imports no `service.api`, `service.ui`, `service.server` or the client."""
