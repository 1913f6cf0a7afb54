"""Signed job records: what `trainctl reindex` may believe of a job directory.

The service mirrors each job's record (owner, state, attempts, ...) into `record.json` in its job directory.
Anyone who can write the storage root can also write that file, so the service signs it: an HMAC-SHA256,
under a key only the service holds (`<data dir>/record-key`, 0600), over the job id, the record and the
sha256 of the job's spec. A record whose signature verifies was written by this service for this job and
this spec; anything else (no record, no signature, another key, a spec changed or planted) is unsigned data.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

SIGNATURE = "signature"  # the record's field holding the HMAC (hex)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def spec_digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(spec)).hexdigest()


def _mac(key: bytes, job_id: str, record: dict[str, Any], spec: dict[str, Any]) -> str:
    unsigned = {k: v for k, v in record.items() if k != SIGNATURE}
    # JSON round trip first: the verifier sees the record as read back from record.json
    payload = {"job_id": job_id, "record": json.loads(json.dumps(unsigned)), "spec_sha256": spec_digest(spec)}
    return hmac.new(key, b"trainctl-record-v1|" + _canonical(payload), hashlib.sha256).hexdigest()


def sign(key: bytes, job_id: str, record: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """`record` with its signature added."""
    return {**record, SIGNATURE: _mac(key, job_id, record, spec)}


def verified(key: bytes | None, job_id: str, record: dict[str, Any], spec: dict[str, Any]) -> bool:
    """True when `record` carries a signature this key made for this job id and this spec."""
    presented = record.get(SIGNATURE)
    if key is None or not isinstance(presented, str):
        return False
    return hmac.compare_digest(presented, _mac(key, job_id, record, spec))


def read_key(path: Path) -> bytes | None:
    """The record key in `path`, or None when there is none (then nothing verifies). Never creates one: a
    command that only verifies must not invent a key that signed nothing."""
    try:
        raw = path.read_text().strip()
    except FileNotFoundError:
        return None
    return raw.encode() if len(raw) >= 32 else None
