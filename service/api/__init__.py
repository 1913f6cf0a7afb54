"""HTTP routes under /v1 (jobs, tokens) and /healthz; dependencies in deps.py, shapes in schemas.py."""
