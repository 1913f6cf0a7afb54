"""`trainctl`: run the service (`serve`) and talk to it over HTTP (everything else).

Where to connect: --url, else TRAINCTL_URL, else ~/.config/trainctl/config.json {"url", "token"}, else
http://127.0.0.1:8000. The token: --token, else TRAINCTL_TOKEN, else <data dir>/admin-token (data dir from
--data-dir / TRAINCTL_DATA_DIR, default ./data), else the config file. Human output by default; --json
prints the API's JSON for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from service.client import ClientError, TrainctlClient, resolve_token, resolve_url

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
WATCH_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 2}
CliError = ClientError  # what the CLI prints as `error: ...` with exit status 1


# --- connection ------------------------------------------------------------------------------------------------

def _url(args: argparse.Namespace) -> str:
    return resolve_url(args.url)


def _token(args: argparse.Namespace) -> str | None:
    return resolve_token(args.token, args.data_dir)


def _client(args: argparse.Namespace, timeout: float = 30) -> TrainctlClient:
    return TrainctlClient(_url(args), _token(args), timeout=timeout)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _fmt_acc(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def _fmt_eta(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    m, s = divmod(int(v), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _progress_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    m = job.get("metrics") or {}
    if job.get("search"):
        s = job["search"]
        return (f"{job['state']:<9} trials {s['trials_finished']}/{s['trials_total']} done, {s['trials_running']} "
                f"running, {s['stopped_early']} stopped early  best {s['metric']} {_fmt_acc(s['best_metric'])}"
                f" ({s['best_trial'] or '-'})")
    return (f"{job['state']:<9} epoch {p.get('epoch', 0)}/{p.get('epochs') or '?'}  val_acc {_fmt_acc(m.get('val_acc'))}"
            f"  best {_fmt_acc(job.get('best_val_acc'))}  eta {_fmt_eta(p.get('eta_seconds'))}")


# --- commands talking to the service ---------------------------------------------------------------------------

def _load_body(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.spec import set_path, parse_override  # pydantic only: no torch

    if args.file:
        import yaml

        path = Path(args.file)
        try:
            text = sys.stdin.read() if args.file == "-" else path.read_text()
            body = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CliError(f"cannot read spec file {args.file}: {exc}") from exc
        if not isinstance(body, dict):
            raise CliError(f"{args.file} must hold a mapping (a spec, or preset + overrides)")
    else:
        body = {"preset": args.preset, "overrides": {}}
    try:
        sets = [parse_override(s) for s in args.set or []]
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if sets:
        if "preset" in body or "overrides" in body:
            body.setdefault("overrides", {}).update(dict(sets))
        else:
            for p, v in sets:  # a full spec: set the value in place; the server validates it
                set_path(body, p, v)
    return body


def cmd_submit(args: argparse.Namespace) -> int:
    body = _load_body(args)
    with _client(args) as api:
        job = api.submit(body, args.idempotency_key)
    if args.json:
        _print_json(job)
    elif args.quiet:
        print(job["id"])
    else:
        print(f"submitted job {job['id']} ({job['state']}); follow it with: trainctl watch {job['id']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as api:
        page = api.jobs(limit=args.limit, offset=args.offset, states=args.state)
    if args.json:
        _print_json(page)
        return 0
    print(f"{'ID':<24} {'STATE':<10} {'EPOCH':>7} {'BEST':>7}  {'CREATED':<20} MESSAGE")
    for j in page["jobs"]:
        p = j["progress"]
        print(f"{j['id']:<24} {j['state']:<10} {p['epoch']:>3}/{p['epochs'] or '?':<3} {_fmt_acc(j['best_val_acc']):>7}"
              f"  {j['created_at'][:19]:<20} {(j['message'] or '')[:60]}")
    if page["total"] > page["offset"] + len(page["jobs"]):
        print(f"... {page['total']} jobs in all; see more with --offset {page['offset'] + len(page['jobs'])}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as api:
        job = api.job(args.id)
    if args.json:
        _print_json(job)
        return 0
    print(f"job       {job['id']}  (owner {job['owner']})")
    print(f"state     {_progress_line(job)}")
    print(f"attempts  {job['attempts']}  ray submission {job['ray_submission_id'] or '-'}")
    print(f"created   {job['created_at']}   updated {job['updated_at']}")
    if job["message"]:
        print(f"message   {job['message']}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Print progress whenever it changes; exit 0/1/2 for SUCCEEDED/FAILED/CANCELLED."""
    last = None
    api = _client(args)
    while True:
        job = api.job(args.id)
        line = json.dumps(job, sort_keys=True) if args.json else _progress_line(job)
        if line != last:
            print(line, flush=True)
            last = line
        if job["state"] in TERMINAL:
            if job.get("message") and not args.json:
                print(f"{job['state']}: {job['message']}")
            return WATCH_EXIT[job["state"]]
        time.sleep(args.interval)


def cmd_logs(args: argparse.Namespace) -> int:
    api = _client(args)
    text = api.logs(args.id, tail=None if args.follow else args.tail)
    sys.stdout.write(text)
    if not args.follow:
        return 0
    seen, submission = len(text), None
    while True:
        job = api.job(args.id)
        if submission is not None and job["ray_submission_id"] != submission:
            seen = 0  # a new attempt: its log starts afresh
            print(f"--- attempt {job['attempts']} ---")
        submission = job["ray_submission_id"]
        text = api.logs(args.id)
        sys.stdout.write(text[seen:])
        sys.stdout.flush()
        seen = len(text)
        if job["state"] in TERMINAL:
            return 0
        time.sleep(2)


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as api:
        job = api.cancel(args.id)
    _print_json(job) if args.json else print(f"job {job['id']}: {job['state']}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as api:
        api.delete(args.id)
    _print_json({"deleted": args.id}) if args.json else print(f"deleted job {args.id}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    if args.csv:
        with _client(args) as api:
            sys.stdout.write(api.metrics_csv(args.id))
        return 0
    with _client(args) as api:
        data = api.metrics(args.id)
    if args.json:
        _print_json(data)
        return 0
    print(f"{'EPOCH':>5} {'TRAIN_LOSS':>10} {'TRAIN_ACC':>9} {'VAL_LOSS':>9} {'VAL_ACC':>8} {'LR':>9} {'IMG/S':>8} {'SEC':>6}")
    for m in data["metrics"]:
        def f(k: str, spec: str) -> str:
            v = m.get(k)
            return format(v, spec) if isinstance(v, (int, float)) else "-"
        print(f"{m['epoch']:>5} {f('train_loss', '10.4f')} {f('train_acc', '9.4f')} {f('val_loss', '9.4f')} "
              f"{f('val_acc', '8.4f')} {f('lr', '9.5f')} {f('images_per_s', '8.1f')} {f('epoch_seconds', '6.1f')}")
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    with _client(args) as api:
        data = api.trials(args.id)
    if args.json:
        _print_json(data)
        return 0
    print(f"{'TRIAL':<14} {'STATE':<14} {'EPOCHS':>6} {'BEST ' + data['metric'].upper():>12}  CONFIG")
    for t in data["trials"]:
        config = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["config"].items())
        print(f"{t['trial_id']:<14} {t['state']:<14} {t['epochs']:>6} {_fmt_acc(t['best_metric']):>12}  {config}")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    """Download the best checkpoint; written only once its sha256 matches what the server announced."""
    out = Path(args.output)
    with _client(args, timeout=300) as api:
        sha256, size = api.download_best(args.id, out)
    if args.json:
        _print_json({"path": str(out), "sha256": sha256, "size": size})
    else:
        print(f"wrote {out} ({size} bytes, sha256 {sha256}, verified)")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    with _client(args) as api:
        data = api.create_token(args.name)
    if args.json:
        _print_json(data)
    else:
        print(f"token for {data['name']} (shown once; store it safely):\n{data['token']}")
    return 0


# --- argument parsing ------------------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> int:
    from service.serve import cmd_serve  # uvicorn, the app and Ray: only for `serve`

    return cmd_serve(args)


def _admin(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from service import admin  # SQLAlchemy/Alembic: only for these commands

        return getattr(admin, name)(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="service URL (default: TRAINCTL_URL or http://127.0.0.1:8000)")
    common.add_argument("--token", help="API token (default: TRAINCTL_TOKEN or <data dir>/admin-token)")
    common.add_argument("--data-dir", help="where `serve` keeps its state (default: TRAINCTL_DATA_DIR or ./data)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = argparse.ArgumentParser(prog="trainctl", description="Distributed training jobs on Ray.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the API (starts a local Ray head unless "
                                                       "TRAINCTL_RAY_ADDRESS / RAY_ADDRESS is set)")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--storage", help="storage root URI (default <data dir>/storage; s3://bucket/prefix)")
    s.add_argument("--max-concurrent", type=int, help="jobs running at once (default 2)")
    s.add_argument("--ray-num-cpus", type=int, help="logical CPUs of a local head (default max(cores, 4))")
    s.add_argument("--database-url", help="job store (default: TRAINCTL_DATABASE_URL or SQLite <data dir>/trainctl.db;"
                                          " postgresql+psycopg://user:password@host:5432/db for several replicas)")
    s.add_argument("--no-auth", action="store_true", help="DANGER: disable authentication (local experiments)")
    s.set_defaults(fn=_serve)

    s = sub.add_parser("submit", parents=[common], help="submit a job from a spec file or a preset")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="spec file (.yaml/.json; '-' = stdin)")
    src.add_argument("--preset", help="a preset name, e.g. debug or paper")
    s.add_argument("--set", action="append", metavar="PATH=VALUE", help="override, e.g. --set optim.epochs=3")
    s.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the job id")
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("list", parents=[common], help="list your jobs")
    s.add_argument("--state", action="append", help="filter (repeatable): queued, running, succeeded, ...")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--offset", type=int, default=0)
    s.set_defaults(fn=cmd_list)

    for name, fn, text in [("status", cmd_status, "show one job"), ("cancel", cmd_cancel, "cancel a job"),
                           ("delete", cmd_delete, "delete a finished job and its files")]:
        s = sub.add_parser(name, parents=[common], help=text)
        s.add_argument("id")
        s.set_defaults(fn=fn)

    s = sub.add_parser("watch", parents=[common], help="follow progress; exit 0 SUCCEEDED, 1 FAILED, 2 CANCELLED")
    s.add_argument("id")
    s.add_argument("--interval", type=float, default=2.0)
    s.set_defaults(fn=cmd_watch)

    s = sub.add_parser("logs", parents=[common], help="the job's Ray driver log")
    s.add_argument("id")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    s.add_argument("--tail", type=int, help="only the last N lines")
    s.set_defaults(fn=cmd_logs)

    s = sub.add_parser("metrics", parents=[common], help="per-epoch metrics")
    s.add_argument("id")
    s.add_argument("--csv", action="store_true")
    s.set_defaults(fn=cmd_metrics)

    s = sub.add_parser("trials", parents=[common], help="a search's trials: state, epochs, best metric, config")
    s.add_argument("id")
    s.set_defaults(fn=cmd_trials)

    s = sub.add_parser("best", parents=[common], help="download the best checkpoint (sha256-verified)")
    s.add_argument("id")
    s.add_argument("-o", "--output", required=True, help="where to write the checkpoint")
    s.set_defaults(fn=cmd_best)

    s = sub.add_parser("db", help="the job database: schema migrations")
    dsub = s.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, fn, text in [("upgrade", "cmd_db_upgrade", "apply pending migrations (serve also does at start)"),
                           ("current", "cmd_db_current", "show the revision; exit 1 when not the newest")]:
        d = dsub.add_parser(name, parents=[common], help=text)
        d.add_argument("--database-url", help="default: TRAINCTL_DATABASE_URL or <data dir>/trainctl.db")
        d.set_defaults(fn=_admin(fn))

    s = sub.add_parser("reindex", parents=[common], help="rebuild lost job records from the storage root's "
                                                         "job directories")
    s.add_argument("--database-url", help="default: TRAINCTL_DATABASE_URL or <data dir>/trainctl.db")
    s.add_argument("--storage", help="storage root URI (default: TRAINCTL_STORAGE or <data dir>/storage)")
    s.add_argument("--default-owner", default="admin", help="owner of a job directory without record.json")
    s.set_defaults(fn=_admin("cmd_reindex"))

    s = sub.add_parser("token", help="manage API tokens")
    tsub = s.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser("create", parents=[common], help="create a token for a new user (admin only)")
    t.add_argument("name")
    t.set_defaults(fn=cmd_token_create)
    return p


def main(argv: list[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
