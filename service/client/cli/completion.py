"""`trainctl completion SHELL`: a shell completion script."""

from __future__ import annotations

import argparse


def cmd_completion(args: argparse.Namespace) -> int:
    """Bash completion generated from this parser, so it can never go stale: commands, then their options."""
    from service.client.cli.main import build_parser  # the parser this command is part of

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    cases = "\n".join(
        f'        {name}) opts="{" ".join(o for a in sp._actions for o in a.option_strings)}" ;;'
        for name, sp in commands.items()
    )
    print(f"""_trainctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} opts
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{" ".join(commands)} --help --version" -- "$cur")); return
    fi
    case "${{COMP_WORDS[1]}}" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -o default -F _trainctl trainctl""")
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser("completion", help='print a shell completion script: eval "$(trainctl completion bash)"')
    s.add_argument("shell", choices=["bash"])
    s.set_defaults(fn=cmd_completion)
