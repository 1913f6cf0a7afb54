"""The server process: `trainctl serve`/`down` (serve.py, localray.py), the app's assembly (app.py) and its
start-up (startup.py), the ASGI guards and metrics in front of every route, and the operator commands that
work on the database and storage directly (admin.py, reindex.py, clustercheck.py)."""
