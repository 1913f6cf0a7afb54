"""The import rules (docs/architecture.md): `service` uses trainer.spec, trainer.contract and objstore,
nothing else of the trainer — the control plane never loads torch (and loads Ray only when it first talks to
a cluster). trainer.spec and trainer.contract import only pydantic and the standard library. Inside
`service`, each package imports only the layers below it (LAYERS)."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
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
                assert name in SERVICE_MAY_IMPORT, f"{path.relative_to(REPO)} imports {name}"
            assert not name.startswith("torch"), f"{path.relative_to(REPO)} imports {name}"


# service/'s packages, and the others each may import. The client is what `pip install trainctl-ray` installs
# (no FastAPI, SQLAlchemy or Ray): the service/client/ package (the HTTP client, the CLI, the log view).
# It runs the server's commands (`serve`, `db`, `reindex`), so it may import
# service.server, but only inside the function that runs one.
LAYERS: dict[str, set[str]] = {
    "common": set(),  # configuration and pure helpers
    "engine": {"common"},  # runs jobs: knows nothing of HTTP
    "api": {"common", "engine", "ui"},  # the HTTP layer (api/ uses ui's browser sessions; ui renders api's views)
    "ui": {"common", "engine", "api"},
    "server": {"common", "engine", "api", "ui"},  # the process: assembles everything
    "client": {"common"},
}
CLIENT_MODULES = {"client"}
# serve.py and admin.py raise the CLI's ClientError, so `trainctl serve` / `trainctl db` print what to do.
SERVER_MAY_IMPORT_FROM_CLIENT = {"ClientError"}


def _layer(module: str) -> str | None:
    """The layer of a module under service ("engine" for service.engine.store), None for service itself."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    return "client" if parts[0] in CLIENT_MODULES else parts[0]


@dataclass(frozen=True)
class ServiceImport:
    module: str  # the service module imported (service.engine.store; service.engine for `from service import engine`)
    names: tuple[str, ...]  # the names taken from it (empty for `import x`)
    in_function: bool
    type_only: bool  # under `if TYPE_CHECKING:`: never imported at run time


def _service_imports(path: Path) -> list[ServiceImport]:
    found: list[ServiceImport] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(
                    ServiceImport(a.name, (), in_function, type_only)
                    for a in child.names
                    if a.name.split(".")[0] == "service"
                )
            elif isinstance(child, ast.ImportFrom) and (child.module or "").split(".")[0] == "service":
                assert child.level == 0, f"{path.relative_to(REPO)}: relative import"
                names = tuple(a.name for a in child.names)
                if child.module == "service":  # from service import engine, cli
                    found.extend(ServiceImport(f"service.{n}", (), in_function, type_only) for n in names)
                else:
                    found.append(ServiceImport(child.module or "", names, in_function, type_only))
            else:
                is_type_check = isinstance(child, ast.If) and ast.unparse(child.test) in (
                    "TYPE_CHECKING",
                    "typing.TYPE_CHECKING",
                )
                is_function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                visit(child, in_function or is_function, type_only or is_type_check)

    visit(ast.parse(path.read_text()), False, False)
    return found


def _service_modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in SERVICE.rglob("*.py")
    }


def test_every_service_module_lies_in_a_package() -> None:
    """The layout shows the architecture: no module at service/'s top level except the client's."""
    for module in _service_modules():
        layer = _layer(module)
        assert layer is None or layer in LAYERS, f"{module}: put it in one of service/{{{','.join(LAYERS)}}}"
    sizes = {layer: sum(_layer(m) == layer for m in _service_modules()) for layer in LAYERS}
    assert all(n >= 2 for n in sizes.values()), f"a layer went missing or was renamed: {sizes}"


def test_each_service_package_imports_only_the_layers_below_it() -> None:
    for module, path in _service_modules().items():
        layer = _layer(module)
        if layer is None:
            continue
        for imp in _service_imports(path):
            target = _layer(imp.module)
            if target is None:
                raise AssertionError(f"{module} imports the service package itself; import the module")
            if target == layer or imp.type_only or target in LAYERS[layer]:
                continue
            if layer == "client" and target == "server" and imp.in_function:
                continue
            if layer == "server" and target == "client" and set(imp.names) <= SERVER_MAY_IMPORT_FROM_CLIENT:
                continue
            raise AssertionError(f"{module} ({layer}) imports {imp.module} ({target}): see LAYERS")


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
        "import sys, service.server.app, service.client.cli.main; from service.common.settings import load_settings; "
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
