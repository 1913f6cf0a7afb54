"""The driver's own check that a job's data lies under the operator's data roots (docs/security.md).

The service checks the same at submission; this second check holds even if the spec in the job dir was
changed afterwards, or the service's check was bypassed. The roots come from TRAINCTL_DATA_ROOTS, which the
service forwards with every job (a non-secret setting). Unset (trainer.run started by hand, by someone who can
already read these files): no restriction.
"""

from __future__ import annotations

import os

import objstore
from trainer.contract import DATA_ROOTS_ENV
from trainer.spec import JobSpec

ENV = DATA_ROOTS_ENV


def allowed_roots() -> list[str] | None:
    """The roots in force, or None when no restriction is configured."""
    raw = os.environ.get(ENV)
    return None if raw is None else objstore.parse_roots(raw)


def outside_roots(spec: JobSpec, roots: list[str] | None = None) -> list[tuple[str, str]]:
    """[(field, uri)] of the spec's data paths that are not under the roots ([] when all are, or no roots)."""
    roots = allowed_roots() if roots is None else roots
    if roots is None:
        return []
    fields = [("data.train", spec.data.train), ("data.test", spec.data.test)]
    return [(f, uri) for f, uri in fields if uri is not None and not objstore.within_any(uri, roots)]
