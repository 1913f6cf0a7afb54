"""Operator commands that work on the database and the storage directly (no running service needed):
`trainctl db upgrade`, `trainctl db current`, `trainctl reindex`. Settings as for `serve`
(TRAINCTL_DATABASE_URL, TRAINCTL_DATA_DIR, TRAINCTL_STORAGE, or the flags)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from service.client import ClientError

if TYPE_CHECKING:
    from service.common.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    from service.common.settings import load_settings

    return load_settings(
        data_dir=args.data_dir, database_url=getattr(args, "database_url", None), storage=getattr(args, "storage", None)
    )


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from service.engine.migrate import upgrade
    from service.engine.store import make_engine, redact_url

    settings = _settings(args)
    engine = make_engine(settings.store_url)
    try:
        before, after = upgrade(engine)
    except SQLAlchemyError as exc:
        raise ClientError(f"cannot upgrade {redact_url(settings.store_url)}: {exc}") from exc
    finally:
        engine.dispose()
    where = redact_url(settings.store_url)
    print(f"{where}: already at {after}" if before == after else f"{where}: upgraded {before or 'empty'} -> {after}")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    """Print the database's revision; exit 1 when it is not the newest (run `trainctl db upgrade`)."""
    from service.engine.migrate import current_revision, head_revision
    from service.engine.store import make_engine, redact_url

    settings = _settings(args)
    engine = make_engine(settings.store_url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    print(f"{redact_url(settings.store_url)}: revision {current or 'none'} (newest {head})")
    return 0 if current == head else 1


def cmd_reindex(args: argparse.Namespace) -> int:
    import objstore
    from service.api.auth import ADMIN
    from service.engine import records
    from service.engine.store import Store
    from service.server.reindex import reindex

    if args.unsigned_owner == ADMIN:
        raise ClientError(f"--unsigned-owner may not be {ADMIN!r}: unsigned files never become admin jobs")
    settings = _settings(args)
    key = records.read_key(settings.record_key_path)
    store = Store(settings.store_url)
    try:
        store.create_schema()
        try:
            report = reindex(store, settings.storage_root, key, settings, unsigned_owner=args.unsigned_owner)
        except objstore.StorageUnavailable as exc:
            raise ClientError(f"storage unreachable: {exc}") from exc
    finally:
        store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "restored": report.restored,
                    "kept": report.kept,
                    "skipped": report.skipped,
                    "unsigned": report.unsigned,
                },
                indent=2,
            )
        )
    else:
        print(
            f"restored {len(report.restored)} job(s), kept {len(report.kept)} already in the database, "
            f"skipped {len(report.skipped)}"
        )
        if key is None:
            print(f"  no record key at {settings.record_key_path}: no record.json can be verified")
        for job_id in report.restored:
            print(f"  restored {job_id}" + (" (unsigned: as a finished job)" if job_id in report.unsigned else ""))
        for job_id, why in report.skipped.items():
            print(f"  skipped  {job_id}: {why}")
    return 0
