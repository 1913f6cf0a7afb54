"""`trainctl`: run the service (`serve`) and talk to it over HTTP (everything else).

Where to connect: --url, else TRAINCTL_URL, else the loopback URL in <data dir>/serve.json, else
~/.config/trainctl/config.json {"url", "token"}, else http://127.0.0.1:8000. The token: --token, else
TRAINCTL_TOKEN, else <data dir>/admin-token (data dir from --data-dir / TRAINCTL_DATA_DIR, default ./data),
else the config file. Files in the data dir count only when they are the user's own (service/client.py);
--verbose (and every error) says which URL and token source were used. Human output by default; --json
prints the API's JSON for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from service.client import (
    ClientError,
    TrainctlClient,
    configured_url,
    resolve_token,
    resolve_url,
    token_source,
    url_source,
)
from service.logview import LogView
from trainer import contract

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
# Exit codes (docs/service.md). argparse uses 2 for usage errors, so no job outcome may use it.
WATCH_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 3}
EXIT_LOST_CONTACT = 4  # `watch`/`submit --follow` gave up: the service stayed unreachable for --patience seconds
EXIT_ERROR = 5  # the service refused the request (4xx/5xx) or could not be reached by a one-shot command
CliError = ClientError  # what the CLI prints as `error: ...` with exit status EXIT_ERROR


# --- connection ------------------------------------------------------------------------------------------------


def _url(args: argparse.Namespace) -> str:
    return resolve_url(args.url, args.data_dir)


def _token(args: argparse.Namespace) -> str | None:
    return resolve_token(args.token, args.data_dir)


def _client(args: argparse.Namespace, timeout: float = 30) -> TrainctlClient:
    if getattr(args, "verbose", False):
        print(connection_text(args), file=sys.stderr)
    return TrainctlClient(_url(args), _token(args), timeout=timeout)


def connection_text(args: argparse.Namespace) -> str:
    """Which URL and which token source this command uses (never the token): printed with --verbose and
    after an error, so a surprising server or token is visible."""
    url, url_from = url_source(args.url, args.data_dir)
    _, token_from = token_source(args.token, args.data_dir)
    return f"trainctl: API {url} (from {url_from}); token from {token_from}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _fmt_acc(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def _fmt_eta(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    m, s = divmod(int(v), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt_duration(v: Any) -> str:
    """Seconds as 45s, 12m05s or 3h07m; '?' when unknown."""
    if not isinstance(v, (int, float)):
        return "?"
    total = int(round(v))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _elapsed_s(job: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds since the job was first submitted to Ray, until it ended (what its estimate predicts)."""
    log = job.get("attempt_log") or []
    started = log[0].get("submitted_at") if log and isinstance(log[0], dict) else None
    if not isinstance(started, (int, float)):
        return None
    if job.get("state") in ("SUCCEEDED", "FAILED", "CANCELLED"):
        est = job.get("estimate") or {}
        if isinstance(est.get("actual_wall_seconds"), (int, float)):
            return float(est["actual_wall_seconds"])
    return max(0.0, (now if now is not None else time.time()) - started)


def _estimate_vs_elapsed(job: dict[str, Any]) -> str:
    """'est 12m05s / 3m10s': the wall time estimated at submission and the time so far (or in all)."""
    est = (job.get("estimate") or {}).get("estimated_wall_seconds")
    return f"{_fmt_duration(est)} / {_fmt_duration(_elapsed_s(job))}"


def _print_estimate(est: dict[str, Any]) -> None:
    """An Estimate (POST /v1/estimates), one figure a line with its basis."""
    rows = [
        ("node type", est.get("node_type") or "?", est.get("node_type_basis", "")),
        ("nodes", est["nodes"]["value"], est["nodes"]["basis"]),
        ("workers", est["workers"]["value"], est["workers"]["basis"]),
        ("images/s", est["images_per_s"]["value"], est["images_per_s"]["basis"]),
        ("start-up", _fmt_duration(est["startup_seconds"]["value"]), est["startup_seconds"]["basis"]),
        ("per epoch", _fmt_duration(est["epoch_seconds"]["value"]), est["epoch_seconds"]["basis"]),
        ("finish", _fmt_duration(est["finish_seconds"]["value"]), est["finish_seconds"]["basis"]),
        ("wall time", _fmt_duration(est["wall_seconds"]["value"]), est["wall_seconds"]["basis"]),
        ("GPU hours", est["gpu_hours"]["value"], est["gpu_hours"]["basis"]),
        ("CPU hours", est["cpu_hours"]["value"], est["cpu_hours"]["basis"]),
        ("cost", est["cost"]["value"], est["cost"]["basis"]),
    ]
    for name, value, basis in rows:
        shown = "?" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"# {name:<10} {shown:<10} {basis}")
    for check in est.get("checks") or []:
        print(
            f"# {check['field']}: {check['result']}{' (refused)' if check.get('refuses') else ''}: {check['message']}"
        )
    if est.get("settings"):
        print(f"# settings used: {', '.join(est['settings'])}")


def _progress_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    m = job.get("metrics") or {}
    if job.get("search"):
        s = job["search"]
        return (
            f"{job['state']:<9} trials {s['trials_finished']}/{s['trials_total']} done, {s['trials_running']} "
            f"running, {s['stopped_early']} stopped early  best {s['metric']} {_fmt_acc(s['best_metric'])}"
            f" ({s['best_trial'] or '-'})"
        )
    line = f"{job['state']:<9} epoch {p.get('epoch', 0)}/{p.get('epochs') or '?'}  val_acc {_fmt_acc(m.get('val_acc'))}"
    if isinstance(m.get("test_acc"), (int, float)):
        line += f"  test_acc {_fmt_acc(m['test_acc'])}"
    if job.get("best_checkpoint_rule") == "final_epoch":
        line += "  best = final epoch (no val split)"
    else:
        line += f"  best {_fmt_acc(job.get('best_val_acc'))}"
    if isinstance(job.get("final_test_acc"), (int, float)):
        line += f"  final test_acc {_fmt_acc(job['final_test_acc'])}"
    if isinstance(job.get("best_checkpoint_test_acc"), (int, float)):
        line += f"  best-ckpt test_acc {_fmt_acc(job['best_checkpoint_test_acc'])}"
    if isinstance(m.get("images_per_s"), (int, float)):
        line += f"  {m['images_per_s']:.0f} img/s"
    line += f"  eta {_fmt_eta(p.get('eta_seconds'))}"
    if job["state"] in ("QUEUED", "STARTING") and job.get("message"):
        line += f"  ({job['message']})"  # what it waits for, e.g. "waiting for resources: needs 8 CPU, 2 free"
    return line


def _bar(job: dict[str, Any], width: int = 24) -> str:
    p = job.get("progress") or {}
    done, total = p.get("epoch") or 0, p.get("epochs") or 0
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "] "


# --- commands talking to the service ---------------------------------------------------------------------------


def _load_body(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.spec import parse_override, set_path  # pydantic only: no torch

    if args.file:
        import yaml

        from service.common import safeyaml  # no aliases: a shared spec file cannot expand to gigabytes

        path = Path(args.file)
        try:
            text = sys.stdin.read() if args.file == "-" else path.read_text()
            body = json.loads(text) if path.suffix == ".json" else safeyaml.load(text)
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:
            raise CliError(f"cannot read spec file {args.file}: {str(exc)[:300]}") from None
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
    body.update(_labels(args))
    return body


def _labels(args: argparse.Namespace) -> dict[str, Any]:
    """--name/--project/--tag as the API's label fields (only those given; the server validates them)."""
    labels: dict[str, Any] = {}
    if getattr(args, "name", None) is not None:
        labels["name"] = args.name
    if getattr(args, "project", None) is not None:
        labels["project"] = args.project
    if getattr(args, "tag", None):
        labels["tags"] = list(dict.fromkeys(args.tag))
    return labels


def _validate_locally(body: dict[str, Any]) -> dict[str, Any]:
    """The spec the service would store for this body, resolved and validated here (pydantic only, no server);
    field errors are reported exactly as the service's 422 names them."""
    from pydantic import ValidationError

    from trainer.spec import JobSpec, error_list, resolve

    body = {k: v for k, v in body.items() if k not in ("name", "project", "tags")}  # labels: not the spec's
    try:
        if "preset" in body or "overrides" in body:
            spec = resolve(body.get("preset"), body.get("overrides") or {})
        else:
            spec = JobSpec.model_validate(body)
    except ValidationError as exc:
        lines = [f"  {e['field']}: {e['message']}" for e in error_list(exc)]
        raise CliError("invalid_spec (checked locally, nothing was submitted):\n" + "\n".join(lines)) from None
    return spec.model_dump(mode="json")


def cmd_submit(args: argparse.Namespace) -> int:
    body = _load_body(args)
    if args.dry_run:
        spec = _validate_locally(body)
        # With a service configured, it validates the spec too and estimates its time and cost from its
        # finished jobs; without one, the spec is only checked here (no history to estimate from).
        estimate = None
        if configured_url(args.url, args.data_dir) is not None:
            with _client(args) as api:
                estimate = api.estimate(body)
        if args.json:
            _print_json({"spec": spec, "estimate": estimate} if estimate is not None else spec)
        else:
            import yaml

            print(yaml.safe_dump(spec, sort_keys=False).rstrip())
            print("# valid: this is the spec the service would run (nothing was submitted)")
            if estimate is not None:
                print(f"# estimate from {_url(args)}:")
                _print_estimate(estimate)
            else:
                print("# no estimate: no service configured (--url / TRAINCTL_URL), so no history of past jobs")
        return 0
    with _client(args) as api:
        job = api.submit(body, args.idempotency_key)
    if args.json and not args.follow:
        _print_json(job)
    elif args.quiet:
        print(job["id"], flush=True)
    else:
        print(
            f"submitted job {job['id']} ({job['state']})"
            + ("" if args.follow else f"; follow it with: trainctl watch {job['id']}"),
            flush=True,
        )
    if not args.follow:
        return 0
    with _client(args) as api:
        return _follow(api, job["id"], interval=args.interval, patience=args.patience, as_json=args.json)


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as api:
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
        _print_json(page)
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
            f"{p['epoch']:>3}/{p['epochs'] or '?':<3} {_fmt_acc(j['best_val_acc']):>7}  {_estimate_vs_elapsed(j):<17}"
            f"  {j['created_at'][:19]:<20} {' '.join(x for x in (tags, (j['message'] or '')[:60]) if x)}"
        )
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
    if job.get("name") or job.get("project") or job.get("tags"):
        tags = " ".join(f"#{t}" for t in job.get("tags") or [])
        print(f"name      {job.get('name') or '-'}  project {job.get('project') or '-'}  {tags}".rstrip())
    if job.get("parent"):
        print(f"parent    {job['parent']}  (resubmitted from it)")
    print(f"state     {_progress_line(job)}")
    if job.get("search") and job["search"].get("best_trial"):
        s = job["search"]
        config = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (s.get("best_config") or {}).items()
        )
        print(f"best      trial {s['best_trial']}  {s['metric']} {_fmt_acc(s['best_metric'])}  {config}")
    print(f"attempts  {job['attempts']}  ray submission {job['ray_submission_id'] or '-'}")
    est = job.get("estimate")
    if est:
        estimated, elapsed = _fmt_duration(est["estimated_wall_seconds"]), _fmt_duration(_elapsed_s(job))
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


def cmd_resubmit(args: argparse.Namespace) -> int:
    """A new job from a stored job's spec with --set overrides applied; labels not given are the parent's."""
    from trainer.spec import parse_override

    try:
        overrides = dict(parse_override(s) for s in args.set or [])
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    with _client(args) as api:
        job = api.resubmit(args.id, {"overrides": overrides, **_labels(args)})
    if args.json:
        _print_json(job)
    elif args.quiet:
        print(job["id"])
    else:
        print(f"submitted job {job['id']} ({job['state']}) from {args.id}; follow it with: trainctl watch {job['id']}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """2-5 jobs side by side: final and best metrics, the spec paths that differ; --plot: their curves (PNG)."""
    if not 2 <= len(dict.fromkeys(args.ids)) <= 5:
        raise CliError("compare takes 2 to 5 distinct job ids")
    ids = list(dict.fromkeys(args.ids))
    with _client(args, timeout=120) as api:
        result = api.compare(ids)
        png = api.compare_png(ids) if args.plot else None
    if png is not None:
        target = Path(args.plot)
        part = target.with_name(target.name + ".part")
        part.write_bytes(png)
        os.replace(part, target)
    if args.json:
        _print_json(result)
        return 0
    jobs = result["jobs"]
    width = max(12, *(len(_column_title(j)) for j in jobs))
    rows: list[tuple[str, list[str]]] = [
        ("state", [j["state"] for j in jobs]),
        ("epochs done", [str(j["epochs_done"]) for j in jobs]),
        *(
            (f"final {k}", [_fmt_num(j["final"].get(k)) for j in jobs])
            for k in ("val_acc", "test_acc", "train_loss", "val_loss")
        ),
        (
            "best val_acc",
            [
                _fmt_num(j["best"].get("val_acc"))
                + (f" (epoch {j['best']['val_acc_epoch']})" if j["best"].get("val_acc_epoch") is not None else "")
                for j in jobs
            ],
        ),
        ("best test_acc", [_fmt_num(j["best"].get("test_acc")) for j in jobs]),
        ("best-ckpt test_acc", [_fmt_num(j["best"].get("checkpoint_test_acc")) for j in jobs]),
    ]
    print(f"{'':<20} " + " ".join(f"{_column_title(j):<{width}}" for j in jobs))
    for title, values in rows:
        print(f"{title:<20} " + " ".join(f"{v:<{width}}" for v in values))
    diffs = result["spec_differences"]
    print(f"\nspec differences ({len(diffs)}):" if diffs else "\nspec differences: none (the same spec)")
    for d in diffs:
        print(f"  {d['path']:<18} " + " ".join(f"{_fmt_value(v):<{width}}" for v in d["values"]))
    if png is not None:
        print(f"\nwrote {args.plot}")
    return 0


def _column_title(job: dict[str, Any]) -> str:
    return f"{job['name'][:24]} ({job['id'][:6]})" if job.get("name") else job["id"]


def _fmt_num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def _fmt_value(v: Any) -> str:
    return "-" if v is None else json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)


def parse_since(text: str) -> str:
    """`--since`: a duration back from now (`90m`, `7d`) or an ISO 8601 date/time, as the ISO time the API takes."""
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(text).isoformat()
    except ValueError:
        pass
    try:
        seconds = parse_duration(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (90m, 12h, 7d) nor an ISO date (2026-12-01, 2026-12-01T08:00Z)"
        ) from None
    return (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)).isoformat()


def _follow(api: TrainctlClient, job_id: str, *, interval: float, patience: float, as_json: bool) -> int:
    """Print progress whenever it changes until the job ends; return its exit code (WATCH_EXIT).

    A refused connection, a time-out or a 502/503/504 (an API restart, say) is waited out with backoff for up
    to `patience` seconds, saying so on stderr; then EXIT_LOST_CONTACT. Other errors (404, 401) raise."""
    tty = sys.stdout.isatty() and not as_json
    last, lost_since, backoff = None, None, 1.0
    devices_shown = False
    while True:
        try:
            job = api.job(job_id)
        except ClientError as exc:
            if not exc.transient:
                raise
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                reason = str(exc).splitlines()[0]
                print(
                    f"\nlost contact with the service ({reason}); retrying for up to {patience:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
            elif now - lost_since > patience:
                print(
                    f"gave up: no answer from the service for {patience:.0f}s (job {job_id} may still be running; "
                    f"`trainctl watch {job_id}` resumes following it)",
                    file=sys.stderr,
                )
                return EXIT_LOST_CONTACT
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            continue
        if lost_since is not None:
            print(f"contact restored after {time.monotonic() - lost_since:.0f}s", file=sys.stderr, flush=True)
            lost_since, backoff = None, 1.0
        if job.get("devices") and not devices_shown and not as_json:
            print(("\r\033[K" if tty else "") + _devices_line(job), flush=True)  # once: it never changes in a run
            devices_shown, last = True, None
        line = json.dumps(job, sort_keys=True) if as_json else _progress_line(job)
        if line != last:
            if tty:  # one live line with a bar, rewritten in place
                print("\r\033[K" + _bar(job) + line, end="", flush=True)
            else:
                print(line, flush=True)
            last = line
        if job["state"] in TERMINAL:
            if tty:
                print()
            if job.get("message") and not as_json:
                print(f"{job['state']}: {job['message']}")
            return WATCH_EXIT[job["state"]]
        time.sleep(interval)


def _devices_line(job: dict[str, Any]) -> str:
    """`devices: cuda:0 NVIDIA H100 80GB HBM3, cuda:1 ... · bf16 + channels_last (rule)`."""
    text = "devices: " + ", ".join(job["devices"])
    numerics = job.get("numerics") or {}
    if numerics.get("precision"):
        text += f" · {numerics['precision']}{' + channels_last' if numerics.get('channels_last') else ''}"
        rates = numerics.get("images_per_s") or {}
        text += (
            f" ({numerics.get('chosen_by', '?')}"
            + (": " + ", ".join(f"{k} {v} img/s" for k, v in rates.items()) if rates else "")
            + ")"
        )
    return text


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow a job to its end; exit 0 SUCCEEDED, 1 FAILED, 3 CANCELLED, 4 lost contact."""
    with _client(args) as api:
        return _follow(api, args.id, interval=args.interval, patience=args.patience, as_json=args.json)


def cmd_logs(args: argparse.Namespace) -> int:
    """Every attempt's log (each under a header when there were several); with -f, then the current attempt's
    new lines until the job ends. No log is an error saying why, except while -f waits for a queued job.

    By default only the trainer's own lines, rank 0's (service/logview.py); --all-ranks every rank's, each
    marked; --raw Ray's whole output as the server keeps it."""
    api = _client(args)
    view = None if args.raw else LogView(all_ranks=args.all_ranks)

    def show(text: str) -> None:
        sys.stdout.write(text if view is None else view.feed(text))

    if not args.follow:
        if view is None:
            sys.stdout.write(api.logs(args.id, tail=args.tail))
            return 0
        # --tail counts the lines shown, so it is applied after filtering, to the whole log.
        lines = (view.feed(api.logs(args.id)) + view.flush()).splitlines(keepends=True)
        if args.tail is not None:
            lines = lines[len(lines) - args.tail :] if args.tail < len(lines) else lines
        sys.stdout.write("".join(lines))
        return 0
    # Follow the current attempt; each poll asks only for the bytes added after those already printed
    # (X-Log-Size / ?since=). A server that does not say its log's size gets whole logs compared instead.
    seen, attempt = 0, None
    while True:
        job = api.job(args.id)
        if job["attempts"] and job["attempts"] != attempt:
            if attempt is None and job["attempts"] > 1:  # first look: the earlier attempts in full ...
                show(_logs_or_empty(api, args.id, None))
                _, size = _logs_since_or_empty(api, args.id, job["attempts"], 0, tail=0)
                seen = size or len(_logs_or_empty(api, args.id, job["attempts"]))
            elif attempt is None:  # ... or the only attempt, followed from its start below
                seen = 0
            else:
                show(f"=== attempt {job['attempts']} ===\n")
                seen = 0
            attempt = job["attempts"]
        if attempt is not None:
            text, size = _logs_since_or_empty(api, args.id, attempt, seen)
            if size is None:  # an older server sent the whole log
                text, size = text[seen:], len(text)
            show(text)
            seen = size
        sys.stdout.flush()
        if job["state"] in TERMINAL:
            if view is not None:
                sys.stdout.write(view.flush())
            return 0
        time.sleep(2)


def _logs_since_or_empty(
    api: TrainctlClient, job_id: str, attempt: int, since: int, tail: int | None = None
) -> tuple[str, int | None]:
    try:
        return api.logs_since(job_id, since, tail=tail, attempt=attempt)
    except ClientError as exc:
        if str(exc).startswith("no_log:"):
            return "", since
        raise


def _logs_or_empty(api: TrainctlClient, job_id: str, attempt: int | None) -> str:
    try:
        return api.logs(job_id, attempt=attempt)
    except ClientError as exc:
        if str(exc).startswith("no_log:"):
            return ""
        raise


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


def cmd_checkpoints(args: argparse.Namespace) -> int:
    with _client(args) as api:
        data = api.checkpoints(args.id)
    if args.json:
        _print_json(data)
        return 0
    if not data["checkpoints"]:
        print(f"job {args.id} has no checkpoint yet")
        return 0
    print(f"{'EPOCH':>5} {'VAL_ACC':>8} {'SIZE':>12}  SHA256")
    for c in data["checkpoints"]:
        print(
            f"{c['epoch'] if c['epoch'] is not None else '-':>5} {_fmt_acc(c['val_acc']):>8} "
            f"{c['size'] if c['size'] is not None else '-':>12}  {c['sha256'] or '-'}"
        )
    print(f"download the best with: trainctl best {args.id}")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    """Download the best checkpoint; written only once its sha256 matches what the server announced."""
    with _client(args, timeout=300) as api:
        sha256, size, out = api.download_best(args.id, Path(args.output) if args.output else None)
    if args.json:
        _print_json({"path": str(out), "sha256": sha256, "size": size})
    else:
        print(f"wrote {out} ({size} bytes, sha256 {sha256}, verified)")
    return 0


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `12h`, `7d`, `2w` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 3600, 30m, 12h, 7d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


EXPORT_NAMES = contract.EXPORT_FILES  # format → file name under the job's artifacts/


def cmd_export(args: argparse.Namespace) -> int:
    """Download the job's best model as exported at the end of its run, sha256-verified; for a job whose run
    did not export that format, build it here from the best checkpoint (see `_fetch_export`)."""
    name = EXPORT_NAMES[args.format]
    out = Path(args.output or f"{args.id}-{name}")
    with _client(args, timeout=300) as api:
        sha256, size, how = _fetch_export(api, args.id, args.format, out)
    if args.json:
        _print_json({"path": str(out), "format": args.format, "sha256": sha256, "size": size, "source": how})
    else:
        detail = "verified" if how == "run" else "built here from the verified best checkpoint"
        print(f"wrote {out} ({args.format}, {size} bytes, sha256 {sha256}, {detail})")
    return 0


def _fetch_export(api: TrainctlClient, job_id: str, fmt: str, out: Path) -> tuple[str, int, str]:
    """The job's `fmt` export at `out`: (sha256, size, "run") as its run exported it; or, when the run did
    not (the spec's `exports` left it out, as the debug preset does), (sha256, size, "here"): exported on
    this machine from the job's best checkpoint (downloaded sha256-verified) by `python -m trainer export`,
    in a child process (the CLI itself never imports torch). Without the trainer installed here: an error
    that says how to get the model."""
    import hashlib
    import importlib.util
    import shutil
    import subprocess
    import tempfile

    name = EXPORT_NAMES[fmt]
    try:
        sha256, size = api.download_artifact(job_id, name, out)
        return sha256, size, "run"
    except ClientError as exc:
        # Another 404 (no such job) is raised by the listing; a listed artifact that 404s is the server's.
        if exc.status != 404 or any(a["name"] == name for a in api.artifacts(job_id)["artifacts"]):
            raise
    exports = (api.job(job_id).get("spec") or {}).get("exports")
    why = f"job {job_id} has no {fmt} export: its spec's `exports` is {json.dumps(exports)}"
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("trainer.export") is None:
        raise CliError(
            f"{why}. To build it from the job's best checkpoint on this machine, install the trainer "
            f"(pip install 'trainctl[train]') and run `trainctl export {job_id} --format {fmt}` again; or "
            f"submit the job again with `--set 'exports=[\"{fmt}\"]'` so its run exports it"
        )
    print(f"{why}; building it here from the job's best checkpoint", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="trainctl-export-") as tmp:
        checkpoint = Path(tmp) / "best.pt"
        api.download_best(job_id, checkpoint)  # sha256-verified; a job without one: the server's 409
        child = subprocess.run(
            [
                *(sys.executable, "-m", "trainer", "export"),
                *("--checkpoint", str(checkpoint), "--format", fmt, "--out-dir", str(Path(tmp) / "out")),
            ],
            capture_output=True,
            text=True,
        )
        if child.returncode:
            raise CliError(f"exporting job {job_id}'s best checkpoint here failed: {child.stderr.strip()[-2000:]}")
        shutil.move(Path(tmp) / "out" / name, out)
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest(), out.stat().st_size, "here"


def cmd_predict(args: argparse.Namespace) -> int:
    """Run the job's model here on images: plain torch, no cluster. The model runs in a `python -m trainer
    predict` child (the CLI itself never imports the trainer or torch). It is the job's model.safetensors (or,
    for a job that exported none, its best checkpoint): both load without unpickling code, unlike model.pt2,
    which torch.export.load unpickles (docs/security.md)."""
    import importlib.util
    import subprocess
    import tempfile

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("trainer.evaluate") is None:
        raise CliError(
            "`trainctl predict` runs the model on this machine and needs torch and torchvision: "
            "pip install 'trainctl-ray[train]'"
        )
    with tempfile.TemporaryDirectory(prefix="trainctl-predict-") as tmp, _client(args, timeout=300) as api:
        model = Path(tmp) / EXPORT_NAMES["safetensors"]
        try:
            api.download_artifact(args.id, EXPORT_NAMES["safetensors"], model)
        except ClientError as exc:
            if exc.status != 404:
                raise
            model = Path(tmp) / "best.pt"  # loaded weights-only (trainer/checkpoint.py)
            api.download_best(args.id, model)
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "trainer",
                "predict",
                "--checkpoint",
                str(model),
                "--input",
                args.input,
                "--out",
                args.output,
            ]
        )
    return EXIT_ERROR if child.returncode else 0


PLOTS = ("curves", "lr", "confusion")


def cmd_plot(args: argparse.Namespace) -> int:
    """Save the job's pictures as DIR/<id>-<name>.png; one that has nothing to draw yet is skipped with a note
    (the confusion matrix exists only once the run has ended)."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(PLOTS)
    unknown = [n for n in names if n not in PLOTS]
    if unknown:
        raise CliError(f"--only: unknown plot(s) {', '.join(unknown)}; choose from {', '.join(PLOTS)}")
    written: dict[str, str] = {}
    skipped: list[str] = []
    with _client(args, timeout=120) as api:
        for name in names:
            png = api.plot(args.id, name)
            if png is None:
                skipped.append(name)
                continue
            target = out / f"{args.id}-{name}.png"
            part = target.with_name(target.name + ".part")
            part.write_bytes(png)
            os.replace(part, target)
            written[name] = str(target)
    if args.json:
        _print_json({"written": written, "skipped": skipped})
    else:
        for path in written.values():
            print(f"wrote {path}")
        for name in skipped:
            print(
                f"skipped {name}: nothing to draw yet"
                + (" (written when the run ends)" if name == "confusion" else ""),
                file=sys.stderr,
            )
    return 0 if written else EXIT_ERROR


def cmd_token_create(args: argparse.Namespace) -> int:
    with _client(args) as api:
        data = api.create_token(args.name, args.expires_in)
    if args.json:
        _print_json(data)
    else:
        expiry = f", expires {data['expires_at']}" if data.get("expires_at") else ""
        print(f"token for {data['name']} (shown once; store it safely{expiry}):\n{data['token']}")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    with _client(args) as api:
        data = api.tokens()
    if args.json:
        _print_json(data)
        return 0
    print(f"{'NAME':<24} {'ROLE':<6} {'CREATED':<20} EXPIRES")
    for t in data["tokens"]:
        expires = (t["expires_at"] or "never")[:19] + (" (expired)" if t["expired"] else "")
        print(f"{t['name']:<24} {'admin' if t['is_admin'] else 'user':<6} {t['created_at'][:19]:<20} {expires}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    with _client(args) as api:
        api.revoke_token(args.name)
    print(f"revoked the token {args.name!r}")
    return 0


# --- argument parsing ------------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from service.server.serve import cmd_serve  # uvicorn, the app and Ray: only for `serve`

    return cmd_serve(args)


def _down(args: argparse.Namespace) -> int:
    from service.server.serve import cmd_down

    return cmd_down(args)


def _admin(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from service.server import admin  # SQLAlchemy/Alembic: only for these commands

        command: Callable[[argparse.Namespace], int] = getattr(admin, name)
        return command(args)

    return run


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("trainctl-ray", "trainctl"):  # trainctl: installs made before the rename
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "unknown (not installed)"


def cmd_completion(args: argparse.Namespace) -> int:
    """Bash completion generated from this parser, so it can never go stale: commands, then their options."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    cases = "\n".join(
        f'        {name}) opts="{" ".join(o for a in sp._actions for o in a.option_strings)}" ;;'
        for name, sp in commands.items()
    )
    print(f"""_trainctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} opts
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{" ".join(commands)} --help --version" -- "$cur")); return
    fi
    case "${{COMP_WORDS[1]}}" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -o default -F _trainctl trainctl""")
    return 0


def _label_arguments(parser: argparse.ArgumentParser, inherited: bool = False) -> None:
    note = " (default: the parent's)" if inherited else ""
    parser.add_argument("--name", help="a name for people (not unique)" + note)
    parser.add_argument("--project", help="the project the job belongs to" + note)
    parser.add_argument(
        "--tag",
        action="append",
        help="a tag (repeatable; at most 32, 64 characters each)" + ("; replaces the parent's" if inherited else ""),
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="service URL (default: TRAINCTL_URL or http://127.0.0.1:8000)")
    common.add_argument("--token", help="API token (default: TRAINCTL_TOKEN or <data dir>/admin-token)")
    common.add_argument("--data-dir", help="where `serve` keeps its state (default: TRAINCTL_DATA_DIR or ./data)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument(
        "-v", "--verbose", action="store_true", help="say which URL and token source are used (on stderr)"
    )
    following = argparse.ArgumentParser(add_help=False)  # `watch` and `submit --follow`
    following.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    following.add_argument(
        "--patience",
        type=float,
        default=300.0,
        help="keep retrying an unreachable service this long before exit 4 (default 300 s)",
    )

    p = argparse.ArgumentParser(
        prog="trainctl",
        description="Distributed training jobs on Ray.",
        epilog="exit codes: 0 success (watch: SUCCEEDED), 1 FAILED, 2 usage error, 3 CANCELLED, "
        "4 lost contact with the service, 5 the request failed",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        parents=[common],
        help="run the API (with this data dir's local Ray head, "
        "started or re-attached, which outlives serve; unless "
        "TRAINCTL_RAY_ADDRESS / RAY_ADDRESS is set)",
    )
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--storage", help="storage root URI (default <data dir>/storage; s3://bucket/prefix)")
    s.add_argument("--max-concurrent", type=int, help="jobs running at once (default 2)")
    s.add_argument("--ray-num-cpus", type=int, help="logical CPUs of a local head (default max(cores, 4))")
    s.add_argument(
        "--database-url",
        help="job store (default: TRAINCTL_DATABASE_URL or SQLite <data dir>/trainctl.db;"
        " postgresql+psycopg://user:password@host:5432/db for several replicas)",
    )
    s.add_argument("--no-auth", action="store_true", help="DANGER: disable authentication (local experiments)")
    s.set_defaults(fn=_serve)

    s = sub.add_parser("submit", parents=[common, following], help="submit a job from a spec file or a preset")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="spec file (.yaml/.json; '-' = stdin)")
    src.add_argument("--preset", help="a preset name, e.g. debug or paper")
    s.add_argument("--set", action="append", metavar="PATH=VALUE", help="override, e.g. --set optim.epochs=3")
    _label_arguments(s)
    s.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the job id")
    s.add_argument("-f", "--follow", action="store_true", help="then follow the job like `watch` (same exit codes)")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the resolved spec; with a service configured, also its time and cost estimate "
        "(POST /v1/estimates); submit nothing",
    )
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("list", parents=[common], help="list your jobs")
    s.add_argument("--state", action="append", help="filter (repeatable): queued, running, succeeded, ...")
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
        choices=["created", "name", "best_val_acc"],
        help="created (newest first; the default), name (A-Z) or best_val_acc (highest first)",
    )
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser(
        "compare", parents=[common], help="2-5 jobs side by side: final/best metrics, spec differences, curves"
    )
    s.add_argument("ids", nargs="+", metavar="ID", help="2 to 5 job ids")
    s.add_argument("--plot", metavar="OUT.png", help="also write their accuracy and loss curves overlaid")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser(
        "resubmit", parents=[common], help="a new job from a job's stored spec, with overrides (records its parent)"
    )
    s.add_argument("id")
    s.add_argument("--set", action="append", metavar="PATH=VALUE", help="override, e.g. --set optim.lr=0.01")
    _label_arguments(s, inherited=True)
    s.add_argument("-q", "--quiet", action="store_true", help="print only the new job's id")
    s.set_defaults(fn=cmd_resubmit)

    for name, fn, text in [
        ("status", cmd_status, "show one job"),
        ("cancel", cmd_cancel, "cancel a job"),
        ("delete", cmd_delete, "delete a finished job and its files"),
    ]:
        s = sub.add_parser(name, parents=[common], help=text)
        s.add_argument("id")
        s.set_defaults(fn=fn)

    s = sub.add_parser(
        "watch",
        parents=[common, following],
        help="follow progress; exit 0 SUCCEEDED, 1 FAILED, 3 CANCELLED, 4 lost contact",
    )
    s.add_argument("id")
    s.set_defaults(fn=cmd_watch)

    s = sub.add_parser("logs", parents=[common], help="the trainer's log lines (rank 0; --raw: Ray's whole log)")
    s.add_argument("id")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    s.add_argument("--tail", type=int, help="only the last N lines")
    s.add_argument("--all-ranks", action="store_true", help="every worker's lines, each marked [rank N]")
    s.add_argument("--raw", action="store_true", help="Ray's whole driver log, unfiltered")
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
    s.add_argument("-o", "--output", help="where to write the checkpoint (default <id>-epochN.pt here)")
    s.set_defaults(fn=cmd_best)

    s = sub.add_parser("checkpoints", parents=[common], help="the kept checkpoints: epoch, val_acc, size, sha256")
    s.add_argument("id")
    s.set_defaults(fn=cmd_checkpoints)

    s = sub.add_parser(
        "down",
        parents=[common],
        help="stop this data dir's `serve` and its local Ray head (which otherwise outlives `serve`)",
    )
    s.add_argument(
        "--grace",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how long the head gets to stop its workers after SIGTERM before SIGKILL (default 15; Ray's own "
        "`ray start --block` never exits on SIGTERM, so the head always takes this long)",
    )
    s.set_defaults(fn=_down)
    s = sub.add_parser("db", help="the job database: schema migrations")
    dsub = s.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for action, admin_fn, text in [
        ("upgrade", "cmd_db_upgrade", "apply pending migrations (serve also does at start)"),
        ("current", "cmd_db_current", "show the revision; exit 1 when not the newest"),
    ]:
        d = dsub.add_parser(action, parents=[common], help=text)
        d.add_argument("--database-url", help="default: TRAINCTL_DATABASE_URL or <data dir>/trainctl.db")
        d.set_defaults(fn=_admin(admin_fn))

    s = sub.add_parser(
        "reindex", parents=[common], help="rebuild lost job records from the storage root's job directories"
    )
    s.add_argument("--database-url", help="default: TRAINCTL_DATABASE_URL or <data dir>/trainctl.db")
    s.add_argument("--storage", help="storage root URI (default: TRAINCTL_STORAGE or <data dir>/storage)")
    s.add_argument(
        "--unsigned-owner",
        metavar="NAME",
        help="restore job directories whose record.json is missing or not signed by this service's record key "
        "as finished jobs of NAME (never the admin); default: skip them",
    )
    s.set_defaults(fn=_admin("cmd_reindex"))

    s = sub.add_parser(
        "export",
        parents=[common],
        help="download the best model exported for use outside trainctl (a job whose run did not export it: "
        "built here from its best checkpoint, where the trainer is installed)",
    )
    s.add_argument("id")
    s.add_argument(
        "--format",
        choices=sorted(EXPORT_NAMES),
        default="pt2",
        help="pt2: a torch.export program (normalisation inside); safetensors: weights only; "
        "onnx: the pt2 program as ONNX (only if the job's spec asked for it: exports: [onnx])",
    )
    s.add_argument("-o", "--output", help="where to write it (default <id>-model.<format>)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("predict", parents=[common], help="predict labels with the job's exported model, here")
    s.add_argument("id")
    s.add_argument("--input", required=True, help="a folder of 32×32 PNG/JPEG images, a parquet, or the Kaggle pickle")
    s.add_argument("-o", "--output", required=True, help="CSV to write (ID,Labels)")
    s.set_defaults(fn=cmd_predict)
    s = sub.add_parser(
        "plot",
        parents=[common],
        help="save the job's PNGs: curves (loss and accuracy per epoch), "
        "lr, confusion (the best checkpoint's, once the run ended)",
    )
    s.add_argument("id")
    s.add_argument("-o", "--output", required=True, help="directory to write <id>-<name>.png into")
    s.add_argument("--only", help="comma-separated subset of curves,lr,confusion")
    s.set_defaults(fn=cmd_plot)

    s = sub.add_parser("token", help="manage API tokens")
    tsub = s.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser("create", parents=[common], help="create a token for a new user (admin only)")
    t.add_argument("name")
    t.add_argument(
        "--expires-in",
        type=parse_duration,
        metavar="DURATION",
        help="the token stops working after this long: seconds, or 30m, 12h, 7d, 2w (default: never)",
    )
    t.set_defaults(fn=cmd_token_create)
    t = tsub.add_parser("list", parents=[common], help="list tokens: name, role, expiry (admin only)")
    t.set_defaults(fn=cmd_token_list)
    t = tsub.add_parser("revoke", parents=[common], help="revoke a token at once (admin only)")
    t.add_argument("name")
    t.set_defaults(fn=cmd_token_revoke)

    s = sub.add_parser("completion", help='print a shell completion script: eval "$(trainctl completion bash)"')
    s.add_argument("shell", choices=["bash"])
    s.set_defaults(fn=cmd_completion)
    return p


def _ids_as_positionals(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Job ids made before ids stopped starting with '-' (`-Xb3...`) would read as options: a token that
    starts with '-', is not an option of the command and is as long as an id goes after `--`, where argparse
    takes it as the id."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None or not argv or argv[0] not in sub.choices:
        return argv
    command = sub.choices[argv[0]]
    if not any(a.dest == "id" and not a.option_strings for a in command._actions):
        return argv
    takes_value = {o for a in command._actions if a.option_strings and a.nargs != 0 for o in a.option_strings}
    known = {o for a in command._actions for o in a.option_strings}
    rest, ids, skip = [], [], False
    for tok in argv[1:]:
        if skip:
            rest.append(tok)
            skip = False
        elif tok.startswith("-") and len(tok) >= 16 and tok.split("=", 1)[0] not in known and "--" not in rest:
            ids.append(tok)
        else:
            rest.append(tok)
            skip = tok in takes_value
    return [argv[0], *rest, "--", *ids] if ids else argv


def main(argv: list[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(_ids_as_positionals(parser, list(sys.argv[1:] if argv is None else argv)))
    try:
        code = args.fn(args)
        sys.stdout.flush()
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if hasattr(args, "url") and hasattr(args, "token"):
            print(connection_text(args), file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `trainctl list --json | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
