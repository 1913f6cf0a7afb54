"""The suite's xdist scheduling (tests/plugins/schedule.py): the files whose module fixture is a live cluster
run on one worker, every other test goes out one at a time; and no file with a module fixture is missed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.plugins.schedule import BUILT_ONCE_OR_CHEAP, TAIL_DIR, WHOLE_FILES, heavy_first_in_the_tail, scope_of


def test_whole_files_are_one_unit_and_other_tests_their_own() -> None:
    assert scope_of("tests/cluster/test_onprem.py::test_documented_teardown_leaves_nothing_on_any_host") == (
        "tests/cluster/test_onprem.py"
    )
    one = "tests/service/test_api.py::test_malformed_specs_are_422_naming_the_field[sqlite-optim.lr0]"
    assert scope_of(one) == one


def _module_fixtures(tree: ast.Module) -> list[str]:
    """Module-scoped fixtures a file defines, or takes from another test module (`onprem = test_onprem.onprem`)."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and any(
                    k.arg == "scope" and isinstance(k.value, ast.Constant) and k.value.value == "module"
                    for k in dec.keywords
                ):
                    found.append(node.name)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
            base = node.value.value
            if isinstance(base, ast.Name) and base.id.startswith("test_"):
                found.append(node.value.attr)
    return found


def test_every_file_with_a_module_fixture_is_placed() -> None:
    """A module fixture is built on every worker that runs one of its tests unless its file is a whole unit or
    the fixture goes through tests/once.py: each such file is one or the other, on purpose."""
    listed = WHOLE_FILES | set(BUILT_ONCE_OR_CHEAP)
    assert not WHOLE_FILES & set(BUILT_ONCE_OR_CHEAP)
    assert [p for p in listed if not (REPO / p).is_file()] == []
    with_fixtures = {
        str(path.relative_to(REPO))
        for path in (REPO / "tests").rglob("*.py")
        if _module_fixtures(ast.parse(path.read_text()))
    }
    assert with_fixtures - listed == set(), "add each to WHOLE_FILES or BUILT_ONCE_OR_CHEAP (tests/plugins/schedule.py)"
    assert listed - with_fixtures == set(), "listed but no module fixture any more"


CONFTEST = """
import tests.plugins.schedule as schedule
pytest_plugins = ["tests.plugins.schedule"]
schedule.WHOLE_FILES = frozenset({"test_whole.py"})
"""

# Each test records which worker ran it; the short sleep keeps one worker from taking every singleton.
TESTS = """
import json, os, time
def _record(name):
    time.sleep(0.3)
    with open("ran.jsonl", "a") as f:
        f.write(json.dumps([name, os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")
""" + "".join(f"def test_{i}():\n    _record(__name__ + '{i}')\n" for i in range(4))


def test_three_real_workers_run_a_whole_file_on_one_and_spread_the_rest(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_whole.py").write_text(TESTS)
    (tmp_path / "test_spread.py").write_text(TESTS)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "3", "--dist", "load", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    ran = [json.loads(line) for line in (tmp_path / "ran.jsonl").read_text().splitlines()]
    workers = {module: {w for name, w in ran if name.startswith(module)} for module in ("test_whole", "test_spread")}
    assert len(ran) == 8
    assert len(workers["test_whole"]) == 1, ran
    assert len(workers["test_spread"]) >= 2, ran


class _Item:
    """What `heavy_first_in_the_tail` reads of a pytest item: its id and its markers."""

    def __init__(self, nodeid: str, *markers: str) -> None:
        self.nodeid, self._markers = nodeid, markers

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self._markers else None


def test_only_the_last_directorys_heavy_tests_move_ahead_of_its_unit_tests() -> None:
    items = [
        _Item("tests/cluster/test_a.py::test_hosts", "cluster"),
        _Item("tests/service/test_b.py::test_unit"),
        _Item("tests/service/test_c.py::test_e2e", "ray"),
        _Item(f"{TAIL_DIR}test_d.py::test_unit"),
        _Item(f"{TAIL_DIR}test_e.py::test_tune", "ray"),
        _Item(f"{TAIL_DIR}test_f.py::test_unit"),
        _Item(f"{TAIL_DIR}test_g.py::test_torch_process", "slow"),
    ]
    order = [item.nodeid.split("/")[-1] for item in items]
    heavy_first_in_the_tail(items)  # type: ignore[arg-type]
    assert [item.nodeid.split("/")[-1] for item in items] == [
        *order[:3],  # elsewhere: collection order, heavy or not
        "test_e.py::test_tune",
        "test_g.py::test_torch_process",
        "test_d.py::test_unit",
        "test_f.py::test_unit",
    ]
