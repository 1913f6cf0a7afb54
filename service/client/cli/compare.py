"""`trainctl compare`: 2-5 jobs side by side (the API's GET /v1/compare, shared with the dashboard)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from service.client.cli import common, render


def cmd_compare(args: argparse.Namespace) -> int:
    """2-5 jobs side by side: final and best metrics, the spec paths that differ; --plot: their curves (PNG)."""
    if not 2 <= len(dict.fromkeys(args.ids)) <= 5:
        raise common.usage_error("compare takes 2 to 5 distinct job ids")
    ids = list(dict.fromkeys(args.ids))
    with common.client(args, timeout=120) as api:
        result = api.compare(ids)
        png = api.compare_png(ids) if args.plot else None
    if png is not None:
        target = Path(args.plot)
        part = target.with_name(target.name + ".part")
        part.write_bytes(png)
        os.replace(part, target)
    if args.json:
        common.print_json(result)
        return 0
    jobs = result["jobs"]
    width = max(12, *(len(_column_title(j)) for j in jobs))
    rows: list[tuple[str, list[str]]] = [
        ("state", [j["state"] for j in jobs]),
        ("epochs done", [str(j["epochs_done"]) for j in jobs]),
        *(
            (f"final {k}", [render.fmt_num(j["final"].get(k)) for j in jobs])
            for k in ("val_acc", "test_acc", "train_loss", "val_loss")
        ),
        (
            "best val_acc",
            [
                render.fmt_num(j["best"].get("val_acc"))
                + (f" (epoch {j['best']['val_acc_epoch']})" if j["best"].get("val_acc_epoch") is not None else "")
                for j in jobs
            ],
        ),
        ("best test_acc", [render.fmt_num(j["best"].get("test_acc")) for j in jobs]),
        ("best-ckpt test_acc", [render.fmt_num(j["best"].get("checkpoint_test_acc")) for j in jobs]),
    ]
    print(f"{'':<20} " + " ".join(f"{_column_title(j):<{width}}" for j in jobs))
    for title, values in rows:
        print(f"{title:<20} " + " ".join(f"{v:<{width}}" for v in values))
    diffs = result["spec_differences"]
    print(f"\nspec differences ({len(diffs)}):" if diffs else "\nspec differences: none (the same spec)")
    for d in diffs:
        print(f"  {d['path']:<18} " + " ".join(f"{render.fmt_value(v):<{width}}" for v in d["values"]))
    if png is not None:
        print(f"\nwrote {args.plot}")
    return 0


def _column_title(job: dict[str, Any]) -> str:
    return f"{job['name'][:24]} ({job['id'][:6]})" if job.get("name") else job["id"]


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser(
        "compare", parents=[common_args], help="2-5 jobs side by side: final/best metrics, spec differences, curves"
    )
    s.add_argument("ids", nargs="+", metavar="ID", help="2 to 5 job ids")
    s.add_argument("--plot", metavar="OUT.png", help="also write their accuracy and loss curves overlaid")
    s.set_defaults(fn=cmd_compare)
