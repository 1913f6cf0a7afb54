"""Where the CPU of one small Ray Train run goes, process by process.

    .venv/bin/python bench/run_processes.py [--epochs 2] [--rounds 1]

Starts a Ray head as the test suite does (tests/plugins/ray_cluster.py's settings), runs one
`python -m trainer.run` of the debug preset on it (2 DDP workers, 512 small images), and samples every process
of the head's session and of the driver's every 0.3 s, keeping each one's last CPU time (user + system, its
reaped children included). Prints the CPU seconds each kind of process spent from the driver's start until 2 s
after it ended, by process title (`ray::TrainController`, `raylet`, ...). A process that starts and exits
between two samples is missed, and one sampled only once counts from its first sample, so the total is a
floor; run it on a quiet machine. The figures for issue 22 item 7 ("Where the suite's CPU goes") are in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import tests.plugins.ray_cluster  # noqa: E402,F401 - puts the suite's Ray settings into os.environ, as in the tests
from service.server.localray import LocalRayHead  # noqa: E402
from tests.trainer.cifar_files import write_cifar_python  # noqa: E402
from trainer.spec import resolve  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def title(pid: int) -> str | None:
    """A process's kind: its title where Ray sets one (`ray::TrainController`), else its program or script."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return None
    if argv[0].startswith(("ray::", "ray-dashboard-")):
        return argv[0].split()[0]
    if Path(argv[0]).name in ("raylet", "gcs_server"):
        return Path(argv[0]).name
    script = next((Path(a).name for a in argv[1:] if a.endswith(".py")), None)
    if script:
        return script
    return f"python -m {argv[argv.index('-m') + 1]}" if "-m" in argv[:-1] else " ".join(argv)[:60]


def sample(sessions: set[int], cpu: dict[int, int], names: dict[int, str]) -> None:
    """Each live process of `sessions`: its CPU ticks so far into `cpu`, its title into `names`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) not in sessions:
            continue
        pid = int(entry)
        cpu[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        names[pid] = title(pid) or names.get(pid, "?")  # the latest: a worker is retitled once it runs


def one_run(epochs: int, work: Path, data: Path) -> tuple[collections.Counter[str], collections.Counter[str], float]:
    head = LocalRayHead.start(num_cpus=6, auth_mode="disabled")
    try:
        session = os.getsid(head.proc.pid)
        time.sleep(5)  # past the head's own start-up
        cpu: dict[int, int] = {}
        names: dict[int, str] = {}
        sample({session}, cpu, names)
        before = dict(cpu)
        job_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
        spec = resolve("debug", {"data.train": str(data), "optim.epochs": epochs})
        (job_dir / "spec.json").write_text(spec.to_json())
        env = {**os.environ, "RAY_ADDRESS": head.gcs_address, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        driver = subprocess.Popen(
            [sys.executable, "-m", "trainer.run", "--job-dir", str(job_dir)],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while driver.poll() is None:
            sample({session, driver.pid}, cpu, names)
            time.sleep(0.3)
        wall = time.monotonic() - started
        time.sleep(2)
        sample({session}, cpu, names)
        if driver.returncode != 0:
            raise SystemExit(f"the run failed ({driver.returncode}): see {job_dir}")
    finally:
        head.stop(grace_s=5)
    seconds: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for pid, ticks in cpu.items():
        spent = (ticks - before.get(pid, 0)) / TICK
        if spent > 0:
            seconds[names[pid]] += spent
            count[names[pid]] += 1
    return seconds, count, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="run-processes-") as tmp:
        work = Path(tmp)
        data = write_cifar_python(work / "cifar", per_batch=103)  # 515 training images: the debug preset's 512
        for r in range(args.rounds):
            seconds, count, wall = one_run(args.epochs, work, data)
            print(f"round {r + 1}: {sum(seconds.values()):.1f} CPU-s sampled, the driver ran {wall:.1f} s")
            for name, spent in seconds.most_common():
                print(f"  {spent:6.2f} CPU-s  {count[name]} × {name}")


if __name__ == "__main__":
    main()
