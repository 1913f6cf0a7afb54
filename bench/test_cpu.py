"""CPU seconds of pytest targets, each run alone in its own cgroup (issue 22 item 7: the suite's time is CPU).

    .venv/bin/python bench/test_cpu.py tests/cluster/test_multinode.py tests/trainer/test_tune.py
    .venv/bin/python bench/test_cpu.py --rounds 2 tests/service/test_s3_e2e.py

Every process a target starts (pytest, the session's Ray head, Ray's workers, `trainctl serve`, SeaweedFS, the
emulated hosts' sshd and everything under them) inherits the cgroup, so its CPU time counts even when it runs
in another process group or network namespace. The figure includes pytest's start and the session fixtures a
target uses (a Ray head: ~7 CPU-s), the same in every round, so compare targets, or one target before and after
a change, never a figure with the suite's share. CPU seconds hardly move with the machine's load; wall seconds do.

Needs root and a cgroup v1 `cpuacct` hierarchy or cgroup v2 mounted at /sys/fs/cgroup.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
V1 = Path("/sys/fs/cgroup/cpuacct")
V2 = Path("/sys/fs/cgroup")


class CpuGroup:
    """A fresh cgroup whose CPU time is read in seconds."""

    def __init__(self) -> None:
        name = f"trainctl-bench-{uuid.uuid4().hex[:8]}"
        if (V1 / "cpuacct.usage").exists():
            self.path, self.v2 = V1 / name, False
        elif (V2 / "cgroup.controllers").exists():
            self.path, self.v2 = V2 / name, True
        else:
            raise SystemExit("no cgroup v1 cpuacct or cgroup v2 hierarchy: cannot count a target's CPU")
        self.path.mkdir()

    def enter_argv(self, argv: list[str]) -> list[str]:
        """argv run from a shell that first moves itself into this cgroup (its children follow)."""
        procs = self.path / ("cgroup.procs" if self.v2 else "tasks")
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]

    def cpu_s(self) -> float:
        if self.v2:
            stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
            return int(stat["usage_usec"]) / 1e6
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass  # a straggler is still in it: left for the next boot, named as ours


def measure(target: str) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, pytest's exit code) of one target."""
    group = CpuGroup()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINCTL_")}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target]
    start = time.monotonic()
    done = subprocess.run(group.enter_argv(argv), cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    time.sleep(3)  # processes reaped after pytest returned (a Ray head's last workers) still count
    cpu = group.cpu_s()
    group.remove()
    if done.returncode not in (0, 5):
        print(done.stdout[-2000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
    return cpu, wall, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="+", help="pytest targets (files or node ids)")
    parser.add_argument("--rounds", type=int, default=1, help="measure each target this many times, in turn")
    args = parser.parse_args()
    failed = False
    print(f"{'CPU s':>8} {'wall s':>8}  rc  target")
    for _ in range(args.rounds):
        for target in args.targets:
            cpu, wall, rc = measure(target)
            failed |= rc != 0
            print(f"{cpu:8.1f} {wall:8.1f} {rc:3d}  {target}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
