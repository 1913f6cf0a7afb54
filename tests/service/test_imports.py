"""The import rule (docs/architecture.md): `service` uses trainer.spec and objstore, nothing else of the
trainer — the control plane never loads torch (and loads Ray only when it first talks to a cluster)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"


def test_service_imports_only_trainer_spec() -> None:
    for path in SERVICE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name == "trainer" or name.startswith("trainer."):
                    assert name == "trainer.spec", f"{path.name} imports {name}"
                assert not name.startswith("torch"), f"{path.name} imports {name}"


def test_loading_the_app_and_cli_loads_no_torch_or_ray() -> None:
    code = ("import sys, service.app, service.cli; from service.settings import load_settings; "
            "service.app.create_app(load_settings(data_dir='/tmp/unused-trainctl')); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'torchvision')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
