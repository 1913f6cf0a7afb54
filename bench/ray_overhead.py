"""What a Ray head and one small Ray Train run cost in CPU, with Ray's defaults and with leaner settings.

    .venv/bin/python bench/ray_overhead.py [--rounds 2] [--idle 20] [--configs default,lean]
    .venv/bin/python bench/ray_overhead.py --configs session,one-worker   # 2 DDP workers vs 1 on a session head

The suite's time (issue 22 item 7) goes to CPU, not waiting: most of its tests start Ray heads and Ray
Train runs on 2 cores. This measures, for each configuration of Ray's own settings (environment variables
given to the head and the driver), in alternating rounds on this machine:
  - start: `ray start --head` until the node is up (service/server/localray.py, as tests and serve start it);
  - run:   one `python -m trainer.run` of the debug preset (2 DDP workers, 2 epochs, 512 small images; one
           worker for the configurations in RUN_OVERRIDES);
  - idle:  `--idle` seconds of the head with nothing to do afterwards;
as machine-wide CPU seconds (/proc/stat: everything on the machine, so run it on a quiet one) and wall time.
Prints each figure and its ratio to the first configuration's mean.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.server.localray import LocalRayHead  # noqa: E402
from tests.plugins.ray_cluster import LEAN_RAY_ENV, SESSION_HEAD_ENV  # noqa: E402
from tests.trainer.cifar_files import write_cifar_python  # noqa: E402
from trainer.spec import resolve  # noqa: E402

# Each configuration is what its head and driver get in their environment; "lean" is exactly what
# tests/plugins/ray_cluster.py gives every head and driver of the suite.
CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "no-prestart": {"RAY_prestart_worker_first_driver": "0"},
    "no-metrics": {"RAY_enable_metrics_collection": "0"},
    "lean": dict(LEAN_RAY_ENV),
    # what the suite's session heads get on top (no Ray Train preemption watcher; tests/plugins/ray_cluster.py)
    "session": {**LEAN_RAY_ENV, **SESSION_HEAD_ENV},
}
# Configurations that change the run's spec rather than Ray's settings: "one-worker" is how the tests whose subject
# is not DDP run their jobs (tests/trainer/jobs.py's ONE_WORKER).
CONFIGS["one-worker"] = CONFIGS["session"]
RUN_OVERRIDES: dict[str, dict[str, object]] = {"one-worker": {"scaling.num_workers": 1}}
SETTINGS = {key for config in CONFIGS.values() for key in config}
# Importing tests/plugins/ray_cluster.py put LEAN_RAY_ENV into os.environ, and LocalRayHead starts every head
# from os.environ: without this, every configuration's head (raylet, GCS) ran with the lean settings and only
# the drivers differed, which hid what the raylet-side settings do.
for _key in SETTINGS:
    os.environ.pop(_key, None)


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy so far (every core: user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Phase:
    def __enter__(self) -> Phase:
        self.cpu, self.wall = machine_cpu_s(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu, self.wall = machine_cpu_s() - self.cpu, time.monotonic() - self.wall


def one_round(name: str, env_extra: dict[str, str], data: Path, work: Path, idle_s: float) -> dict[str, Phase]:
    base = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env_extra}  # a configuration sets exactly its own
    phases: dict[str, Phase] = {}
    with Phase() as phases["start"]:
        head = LocalRayHead.start(num_cpus=6, auth_mode="disabled", extra_env=env_extra)
    try:
        job_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
        spec = resolve("debug", {"data.train": str(data), "optim.epochs": 2, **RUN_OVERRIDES.get(name, {})})
        (job_dir / "spec.json").write_text(spec.to_json())
        env = {**base, "RAY_ADDRESS": head.gcs_address, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
        with Phase() as phases["run"]:
            done = subprocess.run(
                [sys.executable, "-m", "trainer.run", "--job-dir", str(job_dir)],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
        if done.returncode != 0:
            raise SystemExit(f"{name}: the run failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        with Phase() as phases["idle"]:
            time.sleep(idle_s)
    finally:
        head.stop(grace_s=5)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--configs", default="default,lean", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}: choose from {', '.join(CONFIGS)}")
    results: dict[str, list[dict[str, Phase]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        work = Path(tmp)
        data = write_cifar_python(work / "cifar", per_batch=103)  # 515 training images: the debug preset's 512
        for r in range(args.rounds):
            for name in names:  # alternating, so drift in the machine's load spreads over every configuration
                phases = one_round(name, CONFIGS[name], data, work, args.idle)
                results[name].append(phases)
                figures = ", ".join(f"{k} {p.cpu:.1f} CPU-s / {p.wall:.1f} s" for k, p in phases.items())
                print(f"round {r + 1} {name}: {figures}", flush=True)
    print(f"\nmean CPU seconds (machine-wide) and wall seconds per phase; × = CPU ratio to {names[0]!r}")
    base = {k: statistics.mean(p[k].cpu for p in results[names[0]]) for k in ("start", "run", "idle")}
    for name in names:
        cells = []
        for k in ("start", "run", "idle"):
            cpu = statistics.mean(p[k].cpu for p in results[name])
            wall = statistics.mean(p[k].wall for p in results[name])
            cells.append(f"{k} {cpu:6.1f} CPU-s ({cpu / base[k]:.2f}×) {wall:5.1f} s")
        print(f"{name:>12}: " + " | ".join(cells))
    print(f"idle is {args.idle:.0f} s: divide its CPU-s by it for the share of a core an idle head keeps busy")


if __name__ == "__main__":
    main()
