"""Offline checks shared by the cluster-YAML and Docker tests: shell command splitting, "does this command
exist in the project" and "is this image reference pinned"."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import tomllib
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSOLE_SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]

_SEPARATORS = {";", "&&", "||", "|", "&", "\n", "(", ")"}
_REDIRECTS = {">", ">>", "<", ">&", "<&", "&>", ">|"}
_PREFIXES = {"nohup", "setsid", "exec", "time", "sudo", "env"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def simple_commands(script: str) -> list[list[str]]:
    """Split a shell command line into simple commands (argv lists): separators and redirections removed,
    leading `VAR=value` assignments and wrappers like `nohup` dropped. Good enough for the commands in
    our YAML files; not a shell parser."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = []
    current: list[str] = []
    tokens = list(lexer)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _SEPARATORS or (tok and set(tok) <= set(";&|()\n")):  # also ");" and friends
            if current:
                commands.append(current)
            current = []
        elif tok in _REDIRECTS or (tok and set(tok) <= set("<>&|")):
            if current and current[-1].isdigit():  # the "2" of 2>&1
                current.pop()
            i += 1  # skip the target
        else:
            current.append(tok)
        i += 1
    if current:
        commands.append(current)
    cleaned = []
    for argv in commands:
        while argv and (_ASSIGNMENT.match(argv[0]) or argv[0] in _PREFIXES):
            argv = argv[1:]
        if argv:
            cleaned.append(argv)
    return cleaned


def bash_syntax_ok(script: str) -> tuple[bool, str]:
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=10)
    return proc.returncode == 0, proc.stderr


def module_exists(name: str) -> bool:
    """A project module (file in the repo) or an installed one."""
    parts = name.split(".")
    if (REPO.joinpath(*parts).with_suffix(".py")).is_file() or (REPO.joinpath(*parts) / "__init__.py").is_file():
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_trainctl(argv: list[str]) -> None:
    """`trainctl ...` must be a console script of this project and parse with its real argument parser."""
    assert argv[0] in CONSOLE_SCRIPTS, f"{argv[0]} is not a console script in pyproject.toml"
    from service.client.cli.main import build_parser

    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on unknown commands/flags
        raise AssertionError(f"`{shlex.join(argv)}` does not parse with trainctl's CLI") from exc


def check_ray(argv: list[str]) -> None:
    """`ray start ...` (the only ray subcommand with options we rely on) must parse with Ray's own CLI."""
    with warnings.catch_warnings():  # ray.scripts imports Serve: noisy
        warnings.simplefilter("ignore")
        from ray.scripts.scripts import cli
    assert len(argv) >= 2 and argv[1] in cli.commands, f"`{shlex.join(argv)}`: no such ray subcommand"
    command = cli.commands[argv[1]]
    try:
        command.make_context(argv[1], list(argv[2:]), resilient_parsing=False)
    except Exception as exc:  # click.UsageError and friends
        raise AssertionError(f"`{shlex.join(argv)}` does not parse with ray {argv[1]}: {exc}") from exc


def check_python(argv: list[str]) -> None:
    """`python -m X` must name an existing module; `python -c "import a, b"` must import existing ones."""
    if "-m" in argv:
        module = argv[argv.index("-m") + 1]
        assert module_exists(module), f"`{shlex.join(argv)}`: module {module} does not exist"
    if "-c" in argv:
        code = argv[argv.index("-c") + 1]
        for names in re.findall(r"^\s*import\s+([\w., ]+)", code, flags=re.M):
            for name in (n.strip() for n in names.split(",")):
                assert module_exists(name), f"`{shlex.join(argv)}`: module {name} does not exist"


def check_command(argv: list[str]) -> str | None:
    """Check a simple command we know how to check; return its kind, or None if not ours to check."""
    prog = argv[0].rsplit("/", 1)[-1]
    if prog in CONSOLE_SCRIPTS:
        check_trainctl([prog, *argv[1:]])
        return prog
    if prog == "ray":
        check_ray(argv)
        return "ray"
    if re.fullmatch(r"python(3(\.\d+)?)?", prog):
        check_python(argv)
        return "python"
    return None


# --- images ------------------------------------------------------------------------------------------------


def image_is_pinned(ref: str) -> bool:
    """`name:tag` with a real tag (not `latest`), or a digest."""
    if "@sha256:" in ref:
        return True
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.split(":", 1)[1]
    return bool(tag) and tag != "latest" and "$" not in tag


def dockerfile_from_images(text: str) -> list[str]:
    stages: set[str] = set()
    images = []
    for line in text.splitlines():
        m = re.match(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", line, flags=re.I)
        if m:
            if m.group(1) not in stages:  # FROM <earlier stage> is not an image
                images.append(m.group(1))
            if m.group(2):
                stages.add(m.group(2))
    return images


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes. Patterns match the path or any of
    its parent directories."""
    from fnmatch import fnmatchcase

    def matches(pattern: str, p: str) -> bool:
        pattern = pattern.strip("/")
        parts = p.split("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            tail = pattern[3:]
            return any(fnmatchcase(c.rsplit("/", 1)[-1], tail) or fnmatchcase(c, tail) for c in candidates)
        return any(fnmatchcase(c, pattern) for c in candidates)

    excluded = False
    for raw in patterns:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if matches(line.lstrip("!"), path):
            excluded = not negate
    return excluded
