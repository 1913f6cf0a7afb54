"""Checkpoints (one plain dict in one file) and the job's manifest of checkpoints with their checksums.

The checkpoint file holds `{model, optimizer, scheduler, epoch, spec, rng, metrics}` with `spec` as JSON
text, so it loads with `torch.load(weights_only=True)`: opening a checkpoint never runs pickled code.
The manifest (`manifest.json`, trainer/contract.py's `Manifest`) lists a checkpoint only after its upload
finished, with its sha256 and size; readers verify against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import torch

import objstore
from trainer import contract
from trainer.contract import CheckpointEntry, Manifest

FILENAME = "checkpoint.pt"


class CheckpointCorrupt(RuntimeError):
    """A checkpoint's bytes do not match the checksum recorded when it was written."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(state: dict[str, Any], directory: str) -> tuple[str, int]:
    """Write `state` to directory/checkpoint.pt; returns (sha256, size)."""
    path = os.path.join(directory, FILENAME)
    torch.save(state, path)
    return sha256_file(path), os.path.getsize(path)


def load(uri: str, expected_sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint file (or a directory holding checkpoint.pt) from any storage URI."""
    if not uri.endswith(".pt"):
        uri = objstore.join(uri, FILENAME)
    data = objstore.read_bytes(uri)
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise CheckpointCorrupt(f"{uri}: sha256 {actual} does not match the recorded {expected_sha256}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# --- the manifest ------------------------------------------------------------------------------------


def read_manifest(job_dir: str) -> Manifest:
    """The run's manifest; an empty one before the first checkpoint (or if it cannot be parsed)."""
    uri = objstore.join(job_dir, contract.MANIFEST)
    if not objstore.exists(uri):
        return Manifest()
    return contract.parse_manifest(objstore.read_text(uri)) or Manifest()


def write_manifest(job_dir: str, manifest: Manifest) -> None:
    objstore.write_text(objstore.join(job_dir, contract.MANIFEST), manifest.to_json())


def kept(entries: list[CheckpointEntry], keep_best: int) -> list[CheckpointEntry]:
    """Retention: the best `keep_best` by val_acc, plus the latest (for resume) — Ray Train's own rule
    for CheckpointConfig(num_to_keep, score val_acc, max)."""
    if not entries:
        return []
    latest = max(entries, key=lambda e: e.epoch)
    best = sorted(entries, key=lambda e: (e.val_acc, e.epoch), reverse=True)[:keep_best]
    chosen = {e.epoch for e in best} | {latest.epoch}
    return sorted((e for e in entries if e.epoch in chosen), key=lambda e: e.epoch)


def record(job_dir: str, entry: CheckpointEntry, keep_best: int) -> Manifest:
    """Add a fully uploaded checkpoint to the manifest, applying retention; returns the new manifest."""
    manifest = read_manifest(job_dir)
    entries = [e for e in manifest.checkpoints if e.epoch < entry.epoch] + [entry]
    manifest = Manifest(checkpoints=kept(entries, keep_best), latest_epoch=entry.epoch)
    write_manifest(job_dir, manifest)
    return manifest


def remove_orphans(run_dir: str, manifest: Manifest) -> list[str]:
    """Delete `epoch_*` checkpoint folders that neither our manifest nor Ray Train's run snapshot
    references: uploads cut off by a crash, which Ray's num_to_keep never deletes. Call it only while no run
    is active in `run_dir` (Ray deletes folders of its own meanwhile). Returns their names."""
    keep = {e.uri.rstrip("/").split("/")[-2] for e in manifest.checkpoints}
    snapshot_uri = objstore.join(run_dir, "checkpoint_manager_snapshot.json")
    try:
        if objstore.exists(snapshot_uri):
            snapshot = json.loads(objstore.read_text(snapshot_uri))
            keep |= {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    except (json.JSONDecodeError, KeyError, TypeError):
        return []  # Ray is rewriting its snapshot right now; try again at the next checkpoint
    removed = []
    for name in objstore.list_dir(run_dir):
        if name.startswith("epoch_") and name not in keep:
            objstore.delete_tree(objstore.join(run_dir, name))
            removed.append(name)
    return removed
