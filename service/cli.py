"""`trainctl`: run the service (`serve`) and talk to it over HTTP (everything else).

Where to connect: --url, else TRAINCTL_URL, else ~/.config/trainctl/config.json {"url", "token"}, else
http://127.0.0.1:8000. The token: --token, else TRAINCTL_TOKEN, else <data dir>/admin-token (data dir from
--data-dir / TRAINCTL_DATA_DIR, default ./data), else the config file. Human output by default; --json
prints the API's JSON for scripts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import httpx

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
WATCH_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 2}
CONFIG_PATH = Path("~/.config/trainctl/config.json").expanduser()


class CliError(Exception):
    """Printed as `error: ...` with exit status 1."""


# --- connection ------------------------------------------------------------------------------------------------

def _config() -> dict[str, Any]:
    try:
        data = json.loads(CONFIG_PATH.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _url(args: argparse.Namespace) -> str:
    return (args.url or os.environ.get("TRAINCTL_URL") or _config().get("url") or "http://127.0.0.1:8000").rstrip("/")


def _token(args: argparse.Namespace) -> str | None:
    if args.token or os.environ.get("TRAINCTL_TOKEN"):
        return args.token or os.environ["TRAINCTL_TOKEN"]
    data_dir = Path(args.data_dir or os.environ.get("TRAINCTL_DATA_DIR") or "data").expanduser()
    try:
        return (data_dir / "admin-token").read_text().strip()
    except OSError:
        return _config().get("token")


def _client(args: argparse.Namespace, timeout: float = 30) -> httpx.Client:
    token = _token(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=_url(args), headers=headers, timeout=timeout)


def _check(resp: httpx.Response) -> httpx.Response:
    if resp.is_success:
        return resp
    try:
        err = resp.json()["error"]
        lines = [f"{err['code']}: {err['message']}" if not err.get("details") or not isinstance(err["details"], list)
                 else f"{err['code']}:"]
        if isinstance(err.get("details"), list):
            lines += [f"  {d.get('field')}: {d.get('message')}" for d in err["details"] if isinstance(d, dict)]
        elif err.get("details"):
            lines.append(f"  {json.dumps(err['details'])}")
    except (ValueError, KeyError, TypeError):
        lines = [f"HTTP {resp.status_code}: {resp.text[:500]}"]
    if resp.status_code == 401:
        lines.append("  (set TRAINCTL_TOKEN, or run where <data dir>/admin-token is readable)")
    raise CliError("\n".join(lines))


def _request(args: argparse.Namespace, method: str, path: str, **kw: Any) -> httpx.Response:
    try:
        with _client(args) as c:
            return _check(c.request(method, path, **kw))
    except httpx.TransportError as exc:
        raise CliError(f"cannot reach trainctl at {_url(args)} ({exc}); is `trainctl serve` running? "
                       "(set TRAINCTL_URL)") from exc


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
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    job = _request(args, "POST", "/v1/jobs", json=_load_body(args), headers=headers).json()
    if args.json:
        _print_json(job)
    elif args.quiet:
        print(job["id"])
    else:
        print(f"submitted job {job['id']} ({job['state']}); follow it with: trainctl watch {job['id']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    params: list[tuple[str, Any]] = [("limit", args.limit), ("offset", args.offset)]
    params += [("state", s.upper()) for s in args.state or []]
    page = _request(args, "GET", "/v1/jobs", params=params).json()
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
    job = _request(args, "GET", f"/v1/jobs/{args.id}").json()
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
    while True:
        job = _request(args, "GET", f"/v1/jobs/{args.id}").json()
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
    params = {"tail": args.tail} if args.tail is not None and not args.follow else {}
    text = _request(args, "GET", f"/v1/jobs/{args.id}/logs", params=params).text
    sys.stdout.write(text)
    if not args.follow:
        return 0
    seen, submission = len(text), None
    while True:
        job = _request(args, "GET", f"/v1/jobs/{args.id}").json()
        if submission is not None and job["ray_submission_id"] != submission:
            seen = 0  # a new attempt: its log starts afresh
            print(f"--- attempt {job['attempts']} ---")
        submission = job["ray_submission_id"]
        text = _request(args, "GET", f"/v1/jobs/{args.id}/logs").text
        sys.stdout.write(text[seen:])
        sys.stdout.flush()
        seen = len(text)
        if job["state"] in TERMINAL:
            return 0
        time.sleep(2)


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _request(args, "POST", f"/v1/jobs/{args.id}/cancel").json()
    _print_json(job) if args.json else print(f"job {job['id']}: {job['state']}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _request(args, "DELETE", f"/v1/jobs/{args.id}")
    _print_json({"deleted": args.id}) if args.json else print(f"deleted job {args.id}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    if args.csv:
        sys.stdout.write(_request(args, "GET", f"/v1/jobs/{args.id}/metrics", params={"format": "csv"}).text)
        return 0
    data = _request(args, "GET", f"/v1/jobs/{args.id}/metrics").json()
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
    data = _request(args, "GET", f"/v1/jobs/{args.id}/trials").json()
    if args.json:
        _print_json(data)
        return 0
    print(f"{'TRIAL':<14} {'STATE':<14} {'EPOCHS':>6} {'BEST ' + data['metric'].upper():>12}  CONFIG")
    for t in data["trials"]:
        config = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["config"].items())
        print(f"{t['trial_id']:<14} {t['state']:<14} {t['epochs']:>6} {_fmt_acc(t['best_metric']):>12}  {config}")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    """Download the best checkpoint to a temporary name, check its sha256 against X-Checkpoint-SHA256, and
    only then move it to the requested path; a mismatch deletes it and fails."""
    out = Path(args.output)
    part = out.with_name(out.name + ".part")
    digest, size = hashlib.sha256(), 0
    try:
        with _client(args, timeout=300) as c, c.stream("GET", f"/v1/jobs/{args.id}/checkpoints/best") as resp:
            if not resp.is_success:
                resp.read()
                _check(resp)
            expected = resp.headers.get("X-Checkpoint-SHA256")
            with open(part, "wb") as f:
                for chunk in resp.iter_bytes(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
    except httpx.TransportError as exc:
        part.unlink(missing_ok=True)
        raise CliError(f"download from {_url(args)} failed: {exc}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if not expected or actual != expected:
        part.unlink(missing_ok=True)
        raise CliError(f"CHECKSUM MISMATCH: the server announced sha256 {expected}, the download has {actual}; "
                       f"{out} was NOT written. Try again; if it persists the stored checkpoint is damaged.")
    os.replace(part, out)
    if args.json:
        _print_json({"path": str(out), "sha256": actual, "size": size})
    else:
        print(f"wrote {out} ({size} bytes, sha256 {actual}, verified)")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    data = _request(args, "POST", "/v1/tokens", json={"name": args.name}).json()
    if args.json:
        _print_json(data)
    else:
        print(f"token for {data['name']} (shown once; store it safely):\n{data['token']}")
    return 0


# --- serve -----------------------------------------------------------------------------------------------------

def _ray_token_file(path: Path) -> Path:
    """A Ray auth token for a local head, created once (mode 0600) and reused across restarts."""
    import secrets

    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service import auth
    from service.app import create_app
    from service.localray import LocalRayHead
    from service.settings import load_settings
    from service.store import Store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(data_dir=args.data_dir, host=args.host, port=args.port, storage=args.storage,
                             auth=False if args.no_auth else None, max_concurrent_jobs=args.max_concurrent)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.auth:
        store = Store(settings.db_path)
        store.create_schema()
        token = auth.ensure_admin_token(store, settings.admin_token_path)
        store.close()
        if token:
            print(f"Created the admin token (shown once; also in {settings.admin_token_path}, mode 0600):\n"
                  f"  {token}\nUse it as: export TRAINCTL_TOKEN={token}", flush=True)
        else:
            print(f"auth on; the admin token is in {settings.admin_token_path}", flush=True)
    else:
        bar = "!" * 78
        print(f"{bar}\n!! WARNING: --no-auth: NO AUTHENTICATION. Anyone who can reach "
              f"{settings.host}:{settings.port}\n!! can submit, read and delete jobs. Local experiments only.\n{bar}",
              file=sys.stderr, flush=True)
        if settings.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"!! and it listens on {settings.host}, not only on this machine.", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _on_sigterm)  # so `finally` below stops what we started
    head: LocalRayHead | None = None
    try:
        if not settings.ray_address and os.environ.get("RAY_ADDRESS"):
            settings = settings.model_copy(update={"ray_address": os.environ["RAY_ADDRESS"]})
        if not settings.ray_address:
            num_cpus = args.ray_num_cpus or max(os.cpu_count() or 1, 4)
            print(f"starting a local Ray head (127.0.0.1, {num_cpus} logical CPUs, "
                  f"RAY_AUTH_MODE={settings.ray_auth_mode}) ...", flush=True)
            # The same auth mode (and token) for the head and for our own Jobs client.
            os.environ["RAY_AUTH_MODE"] = settings.ray_auth_mode
            if settings.ray_auth_mode == "token" and not (os.environ.get("RAY_AUTH_TOKEN")
                                                          or os.environ.get("RAY_AUTH_TOKEN_PATH")):
                # Our own token file, not ~/.ray/auth_token: that one would switch on token auth for every
                # other Ray head started by this user on this machine.
                os.environ["RAY_AUTH_TOKEN_PATH"] = str(_ray_token_file(settings.ray_token_path))
            try:
                head = LocalRayHead.start(num_cpus=num_cpus, auth_mode=settings.ray_auth_mode)
            except (RuntimeError, OSError) as exc:
                raise CliError(f"could not start a local Ray head: {exc}\n(or point the service at a running "
                               "cluster with TRAINCTL_RAY_ADDRESS)") from exc
            print(f"Ray head up: {head.gcs_address}, dashboard {head.dashboard_url} (pid {head.proc.pid})",
                  flush=True)
            settings = settings.model_copy(update={"ray_address": head.dashboard_url})
        print(f"trainctl API on http://{settings.host}:{settings.port} (docs at /docs), "
              f"storage {settings.storage_root}", flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                                               log_level="info", timeout_graceful_shutdown=10))
        server.run()
        return 0 if server.started else 1
    except (KeyboardInterrupt, _Terminated):
        return 0
    finally:
        if head is not None:
            print("stopping the local Ray head ...", flush=True)
            head.stop()


# --- argument parsing ------------------------------------------------------------------------------------------

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
    s.add_argument("--no-auth", action="store_true", help="DANGER: disable authentication (local experiments)")
    s.set_defaults(fn=cmd_serve)

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
