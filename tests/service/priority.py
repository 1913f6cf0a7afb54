"""Reading a process's CPU priority from /proc, for the tests of TRAINCTL_RAY_NICE (service/server/localray.py
`lower_priority`): its own nice value, and whether the kernel schedules sessions as groups (autogroup), where
the session's group has a nice value of its own."""

from __future__ import annotations

from pathlib import Path


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def autogroup_scheduling() -> bool:
    flag = Path("/proc/sys/kernel/sched_autogroup_enabled")
    return Path("/proc/self/autogroup").exists() and flag.exists() and flag.read_text().strip() == "1"
