"""`trainctl completion SHELL`: a completion script for bash, zsh or fish, made by shtab from this very parser
(so it never goes stale: every command, option and choice, e.g. `list --state`, as they are now)."""

from __future__ import annotations

import argparse

from service.client.cli import common

SHELLS = ("bash", "zsh", "fish")


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    from service.client.cli.main import build_parser  # the parser this command is part of

    print(shtab.complete(build_parser(), shell=args.shell).rstrip())
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser(
        "completion",
        help='print a shell completion script: eval "$(trainctl completion bash)" in ~/.bashrc; zsh: '
        "trainctl completion zsh > ~/.zfunc/_trainctl; fish: trainctl completion fish | source",
    )
    s.add_argument("shell", type=common.choice("shell", SHELLS), choices=SHELLS, metavar="{bash,zsh,fish}")
    s.set_defaults(fn=cmd_completion)
