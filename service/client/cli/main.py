"""`trainctl`: run the service (`serve`) and talk to it over HTTP (everything else).

Where to connect and with which token: service/client/config.py (flags, environment, the config file, the
data dir of a running `serve`); --verbose (and every error) says which URL and token source were used.
Human output by default; --json prints the API's JSON for scripts. Each command lives in its own module
beside this one and adds its parser in `register`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from service.client.cli import account, common, compare, completion, jobs, logs, models, server, submit, tokens, watch
from service.client.cli.common import CliError

# The order of `trainctl --help`.
COMMAND_MODULES = (server, account, submit, jobs, watch, logs, compare, models, tokens, completion)


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as JSON on stderr when `--json` is on the command line (every command's
    subparser is of this class too)."""

    json_errors = False  # set by `main` from the command line, before parsing

    def error(self, message: str) -> NoReturn:
        if Parser.json_errors:
            error = common.usage_error(f"{self.prog}: {message}")
            print(json.dumps(common.error_json(error)), file=sys.stderr)
            self.exit(common.EXIT_USAGE)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    common_args = argparse.ArgumentParser(add_help=False)
    common_args.add_argument(
        "--url",
        help="service URL (default: TRAINCTL_URL, the profile's, a running serve's, else http://127.0.0.1:8000)",
    )
    common_args.add_argument(
        "--token", help="API token (default: TRAINCTL_TOKEN, the profile's, <data dir>/admin-token)"
    )
    common_args.add_argument(
        "--profile",
        help="a profile `trainctl login` wrote (default: TRAINCTL_PROFILE, else the config file's default)",
    )
    common_args.add_argument("--data-dir", help="where `serve` keeps its state (default: TRAINCTL_DATA_DIR or ./data)")
    common_args.add_argument(
        "--json", action="store_true", help='print JSON for scripts (errors too, on stderr: {"error": {...}})'
    )
    common_args.add_argument(
        "--retry-for",
        type=common.retry_budget,
        default=common.default_retry_budget(),
        metavar="SECONDS",
        help="retry a refused connection and 429/502/503 answers this long, honouring Retry-After "
        "(default: TRAINCTL_RETRY_FOR or 10; 0: never)",
    )
    common_args.add_argument(
        "-v", "--verbose", action="store_true", help="say which URL and token source are used (on stderr)"
    )
    following = argparse.ArgumentParser(add_help=False)  # `watch` and `submit --follow`
    following.add_argument(
        "--interval", type=float, default=2.0, help="seconds between polls, when polling (default 2)"
    )
    following.add_argument(
        "--poll",
        action="store_true",
        help="poll the job instead of following its event stream (which is used when the service offers it)",
    )
    following.add_argument(
        "--patience",
        type=float,
        default=300.0,
        help="keep retrying an unreachable service this long before exit 4 (default 300 s)",
    )

    p = Parser(prog="trainctl", description="Distributed training jobs on Ray.", epilog=common.EXIT_CODES_TEXT)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub, common_args, following)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("trainctl-ray", "trainctl"):  # trainctl: installs made before the rename
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "unknown (not installed)"


def _ids_as_positionals(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Job ids made before ids stopped starting with '-' (`-Xb3...`) would read as options: a token that
    starts with '-', is not an option of the command and is as long as an id goes after `--`, where argparse
    takes it as the id."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None or not argv or argv[0] not in sub.choices:
        return argv
    command = sub.choices[argv[0]]
    if not any(a.dest == "id" and not a.option_strings for a in command._actions):
        return argv
    takes_value = {o for a in command._actions if a.option_strings and a.nargs != 0 for o in a.option_strings}
    known = {o for a in command._actions for o in a.option_strings}
    rest, ids, skip = [], [], False
    for tok in argv[1:]:
        if skip:
            rest.append(tok)
            skip = False
        elif tok.startswith("-") and len(tok) >= 16 and tok.split("=", 1)[0] not in known and "--" not in rest:
            ids.append(tok)
        else:
            rest.append(tok)
            skip = tok in takes_value
    return [argv[0], *rest, "--", *ids] if ids else argv


def main(argv: list[str] | None = None) -> NoReturn:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    Parser.json_errors = "--json" in arguments
    args = parser.parse_args(_ids_as_positionals(parser, arguments))
    try:
        code = args.fn(args)
        sys.stdout.flush()
    except CliError as exc:
        if getattr(args, "json", False):
            print(json.dumps(common.error_json(exc)), file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
            if hasattr(args, "data_dir") and exc.exit_code != common.EXIT_USAGE:
                print(common.connection_text(args), file=sys.stderr)
        code = common.exit_code_for(exc)
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `trainctl list --json | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
