"""How the CLI shows a job, an estimate and a few numbers to a person (the `--json` output is the API's own)."""

from __future__ import annotations

import json
import time
from typing import Any


def fmt_acc(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def fmt_num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def fmt_value(v: Any) -> str:
    return "-" if v is None else json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)


def fmt_eta(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    m, s = divmod(int(v), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_duration(v: Any) -> str:
    """Seconds as 45s, 12m05s or 3h07m; '?' when unknown."""
    if not isinstance(v, (int, float)):
        return "?"
    total = int(round(v))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def elapsed_s(job: dict[str, Any], now: float | None = None) -> float | None:
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


def estimate_vs_elapsed(job: dict[str, Any]) -> str:
    """'est 12m05s / 3m10s': the wall time estimated at submission and the time so far (or in all)."""
    est = (job.get("estimate") or {}).get("estimated_wall_seconds")
    return f"{fmt_duration(est)} / {fmt_duration(elapsed_s(job))}"


def print_estimate(est: dict[str, Any]) -> None:
    """An Estimate (POST /v1/estimates), one figure a line with its basis."""
    rows = [
        ("node type", est.get("node_type") or "?", est.get("node_type_basis", "")),
        ("nodes", est["nodes"]["value"], est["nodes"]["basis"]),
        ("workers", est["workers"]["value"], est["workers"]["basis"]),
        ("images/s", est["images_per_s"]["value"], est["images_per_s"]["basis"]),
        ("start-up", fmt_duration(est["startup_seconds"]["value"]), est["startup_seconds"]["basis"]),
        ("per epoch", fmt_duration(est["epoch_seconds"]["value"]), est["epoch_seconds"]["basis"]),
        ("finish", fmt_duration(est["finish_seconds"]["value"]), est["finish_seconds"]["basis"]),
        ("wall time", fmt_duration(est["wall_seconds"]["value"]), est["wall_seconds"]["basis"]),
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


def progress_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    m = job.get("metrics") or {}
    if job.get("search"):
        s = job["search"]
        return (
            f"{job['state']:<9} trials {s['trials_finished']}/{s['trials_total']} done, {s['trials_running']} "
            f"running, {s['stopped_early']} stopped early  best {s['metric']} {fmt_acc(s['best_metric'])}"
            f" ({s['best_trial'] or '-'})"
        )
    line = f"{job['state']:<9} epoch {p.get('epoch', 0)}/{p.get('epochs') or '?'}  val_acc {fmt_acc(m.get('val_acc'))}"
    if isinstance(m.get("test_acc"), (int, float)):
        line += f"  test_acc {fmt_acc(m['test_acc'])}"
    if job.get("best_checkpoint_rule") == "final_epoch":
        line += "  best = final epoch (no val split)"
    else:
        line += f"  best {fmt_acc(job.get('best_val_acc'))}"
    if isinstance(job.get("final_test_acc"), (int, float)):
        line += f"  final test_acc {fmt_acc(job['final_test_acc'])}"
    if isinstance(job.get("best_checkpoint_test_acc"), (int, float)):
        line += f"  best-ckpt test_acc {fmt_acc(job['best_checkpoint_test_acc'])}"
    if isinstance(m.get("images_per_s"), (int, float)):
        line += f"  {m['images_per_s']:.0f} img/s"
    if job.get("workers"):  # the worker count over time, e.g. 2→3 (elastic scaling.num_workers)
        line += "  workers " + "→".join(str(span["workers"]) for span in job["workers"])
    line += f"  eta {fmt_eta(p.get('eta_seconds'))}"
    if job["state"] in ("QUEUED", "STARTING") and job.get("message"):
        line += f"  ({job['message']})"  # what it waits for, e.g. "waiting for resources: needs 8 CPU, 2 free"
    return line


def bar(job: dict[str, Any], width: int = 24) -> str:
    p = job.get("progress") or {}
    done, total = p.get("epoch") or 0, p.get("epochs") or 0
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "] "


def devices_line(job: dict[str, Any]) -> str:
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
