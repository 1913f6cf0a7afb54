"""Reading and managing jobs: `list`, `status`, `cancel`, `delete`, `metrics`, `trials`, `checkpoints`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service.client.cli import common, render
from service.client.cli.common import parse_since

SORT_KEYS = ("created", "name", "best_val_acc")  # GET /v1/jobs?sort=


def cmd_list(args: argparse.Namespace) -> int:
    with common.client(args) as api:
        page = api.jobs(
            limit=args.limit,
            offset=args.offset,
            states=args.state,
            owner=args.owner,
            tags=args.tag,
            project=args.project,
            name=args.name,
            since=args.since,
            sort=args.sort,
        )
    if args.json:
        common.print_json(page)
        return 0
    print(
        f"{'ID':<24} {'NAME':<20} {'OWNER':<12} {'STATE':<10} {'EPOCH':>7} {'BEST':>7}  {'EST / ELAPSED':<17}  "
        f"{'CREATED':<20} TAGS / MESSAGE"
    )
    for j in page["jobs"]:
        p = j["progress"]
        tags = " ".join(f"#{t}" for t in j.get("tags") or [])
        print(
            f"{j['id']:<24} {(j.get('name') or '-')[:20]:<20} {j['owner'][:12]:<12} {j['state']:<10} "
            f"{p['epoch']:>3}/{p['epochs'] or '?':<3} {render.fmt_acc(j['best_val_acc']):>7}  "
            f"{render.estimate_vs_elapsed(j):<17}"
            f"  {j['created_at'][:19]:<20} {' '.join(x for x in (tags, (j['message'] or '')[:60]) if x)}"
        )
    if page["total"] > page["offset"] + len(page["jobs"]):
        print(f"... {page['total']} jobs in all; see more with --offset {page['offset'] + len(page['jobs'])}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with common.client(args) as api:
        job = api.job(args.id)
    if args.json:
        common.print_json(job)
        return 0
    print(f"job       {job['id']}  (owner {job['owner']})")
    if job.get("name") or job.get("project") or job.get("tags"):
        tags = " ".join(f"#{t}" for t in job.get("tags") or [])
        print(f"name      {job.get('name') or '-'}  project {job.get('project') or '-'}  {tags}".rstrip())
    if job.get("parent"):
        print(f"parent    {job['parent']}  (resubmitted from it)")
    print(f"state     {render.progress_line(job)}")
    if job.get("search") and job["search"].get("best_trial"):
        s = job["search"]
        config = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (s.get("best_config") or {}).items()
        )
        print(f"best      trial {s['best_trial']}  {s['metric']} {render.fmt_acc(s['best_metric'])}  {config}")
    print(f"attempts  {job['attempts']}  ray submission {job['ray_submission_id'] or '-'}")
    est = job.get("estimate")
    if est:
        estimated, elapsed = (
            render.fmt_duration(est["estimated_wall_seconds"]),
            render.fmt_duration(render.elapsed_s(job)),
        )
        line = f"time      estimated {estimated}, elapsed {elapsed}"
        if est["estimated_wall_seconds"] is None:
            line += f"  ({est['wall_basis']})"
        else:
            line += f"  (estimate: {est['wall_basis']})"
        if isinstance(est.get("estimated_images_per_s"), (int, float)):
            actual = est.get("actual_images_per_s")
            line += f"; images/s estimated {est['estimated_images_per_s']:.0f}" + (
                f", actual {actual:.0f}" if isinstance(actual, (int, float)) else ""
            )
        print(line)
    print(f"created   {job['created_at']}   updated {job['updated_at']}")
    if job["message"]:
        print(f"message   {job['message']}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with common.client(args) as api:
        job = api.cancel(args.id)
    common.print_json(job) if args.json else print(f"job {job['id']}: {job['state']}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with common.client(args) as api:
        api.delete(args.id)
    common.print_json({"deleted": args.id}) if args.json else print(f"deleted job {args.id}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    if args.csv:
        with common.client(args) as api:
            sys.stdout.write(api.metrics_csv(args.id))
        return 0
    with common.client(args) as api:
        data = api.metrics(args.id)
    if args.json:
        common.print_json(data)
        return 0
    print(
        f"{'EPOCH':>5} {'TRAIN_LOSS':>10} {'TRAIN_ACC':>9} {'VAL_LOSS':>9} {'VAL_ACC':>8} {'LR':>9} {'IMG/S':>8} "
        f"{'SEC':>6}"
    )
    for m in data["metrics"]:

        def f(k: str, spec: str, m: dict[str, Any] = m) -> str:
            v = m.get(k)
            return format(v, spec) if isinstance(v, (int, float)) else "-"

        print(
            f"{m['epoch']:>5} {f('train_loss', '10.4f')} {f('train_acc', '9.4f')} {f('val_loss', '9.4f')} "
            f"{f('val_acc', '8.4f')} {f('lr', '9.5f')} {f('images_per_s', '8.1f')} {f('epoch_seconds', '6.1f')}"
        )
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    with common.client(args) as api:
        data = api.trials(args.id)
    if args.json:
        common.print_json(data)
        return 0
    print(f"{'TRIAL':<14} {'STATE':<14} {'EPOCHS':>6} {'BEST ' + data['metric'].upper():>12}  CONFIG")
    for t in data["trials"]:
        config = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["config"].items())
        print(f"{t['trial_id']:<14} {t['state']:<14} {t['epochs']:>6} {render.fmt_acc(t['best_metric']):>12}  {config}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    with common.client(args) as api:
        data = api.checkpoints(args.id)
    if args.json:
        common.print_json(data)
        return 0
    if not data["checkpoints"]:
        print(f"job {args.id} has no checkpoint yet")
        return 0
    print(f"{'EPOCH':>5} {'VAL_ACC':>8} {'SIZE':>12}  SHA256")
    for c in data["checkpoints"]:
        print(
            f"{c['epoch'] if c['epoch'] is not None else '-':>5} {render.fmt_acc(c['val_acc']):>8} "
            f"{c['size'] if c['size'] is not None else '-':>12}  {c['sha256'] or '-'}"
        )
    print(f"download the best with: trainctl best {args.id}")
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser("list", parents=[common_args], help="list your jobs")
    s.add_argument(
        "--state",
        action="append",
        type=common.choice("job state", common.JOB_STATES),
        choices=common.JOB_STATES,
        metavar="STATE",
        help=f"filter (repeatable): {', '.join(common.JOB_STATES)}",
    )
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--owner", help="admin only: one owner's jobs (the admin lists everyone's by default)")
    s.add_argument("--tag", action="append", help="only jobs with this tag (repeatable: jobs with every one)")
    s.add_argument("--project", help="only this project's jobs")
    s.add_argument("--name", help="only jobs whose name contains this (any case)")
    s.add_argument(
        "--since", type=parse_since, help="only jobs created since: a duration back (12h, 7d) or an ISO date"
    )
    s.add_argument(
        "--sort",
        type=common.choice("sort key", SORT_KEYS),
        choices=SORT_KEYS,
        metavar="KEY",
        help="created (newest first; the default), name (A-Z) or best_val_acc (highest first)",
    )
    s.set_defaults(fn=cmd_list)

    for name, fn, text in [
        ("status", cmd_status, "show one job"),
        ("cancel", cmd_cancel, "cancel a job"),
        ("delete", cmd_delete, "delete a finished job and its files"),
    ]:
        s = sub.add_parser(name, parents=[common_args], help=text)
        s.add_argument("id")
        s.set_defaults(fn=fn)

    s = sub.add_parser("metrics", parents=[common_args], help="per-epoch metrics")
    s.add_argument("id")
    s.add_argument("--csv", action="store_true")
    s.set_defaults(fn=cmd_metrics)

    s = sub.add_parser("trials", parents=[common_args], help="a search's trials: state, epochs, best metric, config")
    s.add_argument("id")
    s.set_defaults(fn=cmd_trials)

    s = sub.add_parser("checkpoints", parents=[common_args], help="the kept checkpoints: epoch, val_acc, size, sha256")
    s.add_argument("id")
    s.set_defaults(fn=cmd_checkpoints)
