"""Read a W&B offline run back from its own files (tests only): the `.wandb` transaction log of each
`offline-run-*` folder, which `wandb sync` uploads. Its format is LevelDB's log: a 7-byte header (`:W&B`, magic,
version), then 32 KiB blocks of records (crc32, length, type: full/first/middle/last) holding protobuf `Record`s
of wandb's own schema (wandb.proto.wandb_internal_pb2)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@dataclass
class OfflineRun:
    run_ids: set[str] = field(default_factory=set)
    projects: set[str] = field(default_factory=set)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged row, in order
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_runs(folders: list[Path]) -> OfflineRun:
    """What the offline-run folders hold together (a resumed run has one folder per attempt), oldest first."""
    run = OfflineRun()
    for folder in sorted(folders):
        (log,) = folder.glob("run-*.wandb")
        for record in records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_ids.add(record.run.run_id)
                run.projects.add(record.run.project)
                run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update if _key(i)})
            elif kind == "artifact":
                run.artifacts.append(record.artifact.name)
            elif kind == "exit":
                run.exit_codes.append(record.exit.exit_code)
    return run
