"""The import rule (docs/architecture.md): `service` uses trainer.spec, trainer.contract and objstore,
nothing else of the trainer — the control plane never loads torch (and loads Ray only when it first talks to
a cluster). trainer.spec and trainer.contract import only pydantic and the standard library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "service"
SERVICE_MAY_IMPORT = {"trainer.spec", "trainer.contract"}


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names += [node.module or ""] if node.module != "trainer" else [f"trainer.{a.name}" for a in node.names]
    return names


def test_service_imports_only_trainer_spec_and_contract() -> None:
    for path in SERVICE.rglob("*.py"):
        for name in _imports(path):
            if name == "trainer" or name.startswith("trainer."):
                assert name in SERVICE_MAY_IMPORT, f"{path.name} imports {name}"
            assert not name.startswith("torch"), f"{path.name} imports {name}"


def test_the_contract_modules_import_only_pydantic_and_the_standard_library() -> None:
    for module in ("spec", "contract"):
        for name in _imports(REPO / "trainer" / f"{module}.py"):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top in ("pydantic", "pydantic_core", "__future__"), (
                f"trainer/{module}.py imports {name}"
            )


@pytest.mark.slow
def test_loading_the_app_and_cli_loads_no_torch_or_ray() -> None:
    code = (
        "import sys, service.server.app, service.cli; from service.common.settings import load_settings; "
        "service.server.app.create_app(load_settings(data_dir='/tmp/unused-trainctl')); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'torchvision')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_names_the_service_and_the_trainer_share_are_written_once() -> None:
    """The forwarded settings, the data-roots variable and the export file names live in trainer/contract.py;
    a second spelling elsewhere in service/ or trainer/ would drift (it did: the runner's allow-list)."""
    from trainer import contract

    shared = [*contract.FORWARDED_ENV, *contract.EXPORT_FILES.values()]
    for path in [*SERVICE.rglob("*.py"), *(REPO / "trainer").rglob("*.py")]:
        if path.name == "contract.py" and path.parent.name == "trainer":
            continue
        strings = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        for name in shared:
            assert name not in strings, f"{path.relative_to(REPO)} spells {name!r}: use trainer.contract's"
