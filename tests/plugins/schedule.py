"""How pytest-xdist shares the tests out: one test at a time, except the files in WHOLE_FILES, which go to one
worker each, all their tests in a row.

One test at a time keeps the 3 workers busy to the end (whole files for everything made the heavy files meet
at the end: bench/RESULTS.md). But a module fixture is built on every worker that runs one of its file's
tests, and some are whole clusters: before this, test_onprem's `ray up` cluster of 4 emulated hosts came up
twice in one run, test_multinode's cluster twice, test_faults's S3 Ray head twice. A fixture that tests only
read is better built once with tests/once.py, which works whatever the scheduling; a fixture that is a live
cluster the tests act on (a host killed, a job submitted) belongs to one worker, so its file is listed here.

Under xdist the heavy tests of the last directory in collection order (TAIL_DIR) go out before its unit
tests: in collection order a Tune test and a storage-outage test came last and kept one worker busy for a
minute or two after the others had finished (bench/RESULTS.md). Only there: putting every heavy test first
made the emulated-host tests meet each other at the start, and the suite slower.

`--dist loadgroup`'s `xdist_group` marks cannot do this: pytest-xdist 3.8 puts the group in `item._nodeid`,
which pytest 9.2 no longer reads, so no test was ever grouped.
"""

from __future__ import annotations

import os

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling

# Files whose module fixture is a live cluster or Ray head (tests/test_schedule.py checks that every file with
# a module-scoped fixture is here or in BUILT_ONCE_OR_CHEAP, so a new one is a decision, not an accident).
WHOLE_FILES = frozenset(
    {
        "tests/cluster/test_multinode.py",  # a Ray head and 2 emulated worker hosts
        "tests/cluster/test_onprem.py",  # `ray up` of a head and 3 worker hosts
        "tests/trainer/test_faults.py",  # a Ray head holding the S3 credentials
    }
)

# Files with a module-scoped fixture that is left to one test at a time, and why.
BUILT_ONCE_OR_CHEAP = {
    "tests/cluster/test_cluster_yaml.py": "a parsed YAML file",
    "tests/cluster/test_docker.py": "a parsed YAML file",
    "tests/cluster/test_kuberay.py": "parsed YAML and JSON files",
    "tests/cluster/test_onprem_yaml.py": "a parsed YAML file",
    "tests/cluster/test_partition.py": "one test (test_onprem's cluster, brought up for this module)",
    "tests/cluster/test_host_loss.py": "one test",
    "tests/cluster/test_node_types.py": "its cluster serves one test; the other fixture is a parsed YAML",
    "tests/cluster/test_spot_loss.py": "one test",
    "tests/service/test_browser.py": "one test",
    "tests/service/test_client_install.py": "the venv is built once (tests/once.py)",
    "tests/service/test_replicas_e2e.py": "a small CIFAR folder written in well under a second",
    "tests/trainer/test_export.py": "the checkpoint is trained once (tests/once.py); the images take seconds",
    "tests/trainer/test_gpu.py": "skipped without CUDA; a GPU machine runs it on its own",
    "tests/trainer/test_run.py": "the trained job is built once (tests/once.py)",
    "tests/service/conftest.py": "`service` starts in seconds; test_e2e.py in a row would be an 11-minute chain",
}


# The last directory in collection order, and the markers of tests that take seconds to minutes (pyproject.toml:
# each starts Ray, a server, hosts or a process that imports torch).
TAIL_DIR = "tests/trainer/"
HEAVY_MARKERS = ("cluster", "ray", "s3", "install", "browser", "slow")


def heavy_first_in_the_tail(items: list[pytest.Item]) -> None:
    """TAIL_DIR's heavy tests before its unit tests, the rest in collection order: a stable sort, the same on
    every worker, as xdist requires. (TAIL_DIR's tests stay after every other test.)"""

    def key(item: pytest.Item) -> tuple[bool, bool]:
        if not item.nodeid.startswith(TAIL_DIR):
            return (False, False)
        return (True, not any(item.get_closest_marker(m) for m in HEAVY_MARKERS))

    items.sort(key=key)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one process runs everything anyway: leave its order alone
        heavy_first_in_the_tail(items)


def scope_of(nodeid: str) -> str:
    """The unit a worker takes: the file for WHOLE_FILES, else the test itself."""
    path = nodeid.split("::", 1)[0]
    return path if path in WHOLE_FILES else nodeid


class WholeFilesOrOneTest(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        return scope_of(nodeid)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> WholeFilesOrOneTest | None:
    if config.getvalue("dist") not in ("load", "loadgroup", "loadscope"):
        return None  # the caller asked for something else (each, loadfile, worksteal): theirs
    # In collection order, a whole file where its first test stands. Not LoadScopeScheduling's default of the
    # largest units first: that started the 3 cluster files together with every other emulated-host test
    # (tests/cluster/ comes first), and one of those then timed out (bench/RESULTS.md).
    config.option.loadscopereorder = False
    return WholeFilesOrOneTest(config, log)
