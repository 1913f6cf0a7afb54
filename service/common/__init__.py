"""What every part of the service shares: its configuration (settings.py) and pure helpers (estimate.py,
lru.py, safeyaml.py). Nothing here imports another part of `service` (tests/service/test_imports.py)."""
