"""`trainctl login`, `logout` and `profiles`: named profiles (a URL and its token) in the config file
(service/client/config.py), chosen with `--profile` / TRAINCTL_PROFILE, else the file's default."""

from __future__ import annotations

import argparse
import getpass
import sys

from service.client import config
from service.client.cli import common
from service.client.http import Retry, TrainctlClient


def _read_token(args: argparse.Namespace) -> str:
    """--token, else typed at a prompt (not echoed), else the first line of stdin: a token never has to be
    on the command line, where the shell history and `ps` would show it."""
    if args.token and args.token != "-":
        return str(args.token)
    if args.token is None and sys.stdin.isatty():
        return getpass.getpass(f"token for {args.url}: ").strip()
    return sys.stdin.readline().strip()


def cmd_login(args: argparse.Namespace) -> int:
    """Save URL and token as a profile (mode 0600); by default only after the service accepted the token."""
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise common.usage_error(f"{args.url!r} is not a service URL: it starts with http:// or https://")
    name = args.profile or config.DEFAULT_PROFILE
    token = _read_token(args)
    if not token:
        raise common.usage_error("no token given (--token TOKEN, '-' to read it from stdin, or type it)")
    if not args.no_verify:  # any authenticated read: a wrong token is a 401 here, not a surprise later
        with TrainctlClient(url, token, retry=Retry(total_s=args.retry_for) if args.retry_for else None) as api:
            api.jobs(limit=1)
    current = config.load_config()
    profiles = dict(current["profiles"])
    profiles[name] = {"url": url, "token": token}
    default = current["default"] if current["default"] in profiles and not args.default else name
    path = config.save_config({"default": default, "profiles": profiles})
    if args.json:
        common.print_json({"profile": name, "url": url, "default": default == name, "config": str(path)})
    else:
        note = " (the default)" if default == name else f" (the default stays {default!r}: use --profile {name})"
        print(f"logged in to {url} as profile {name!r}{note}; saved in {path}")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    """Forget a profile's token here. The token itself stays valid on the service (as the dashboard's sign-out
    ends only its own session): `trainctl token revoke NAME` (admin) ends it everywhere."""
    current = config.load_config()
    name = args.profile or config.selected_profile_name()
    if not name or name not in current["profiles"]:
        known = ", ".join(sorted(current["profiles"])) or "none"
        raise common.usage_error(
            f"no profile {name!r} to log out of (profiles: {known})" if name else "not logged in: no default profile"
        )
    profiles = dict(current["profiles"])
    url = profiles.pop(name).get("url")
    default = current["default"] if current["default"] != name else None
    path = config.save_config({"default": default, "profiles": profiles})
    if args.json:
        common.print_json({"profile": name, "url": url, "config": str(path)})
    else:
        print(
            f"logged out: forgot profile {name!r} ({url}) in {path}. The token itself still works until revoked "
            "(`trainctl token revoke NAME`, admin)"
        )
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    """The profiles (never their tokens), the default marked."""
    current = config.load_config()
    rows = [
        {"profile": name, "url": p.get("url"), "default": name == current["default"], "token": bool(p.get("token"))}
        for name, p in sorted(current["profiles"].items())
    ]
    if args.json:
        common.print_json({"config": str(config.config_path()), "profiles": rows})
        return 0
    if not rows:
        print(f"no profiles in {config.config_path()}; add one with `trainctl login URL`")
    for r in rows:
        print(
            f"{'*' if r['default'] else ' '} {r['profile']:<16} {r['url'] or '-'}{'' if r['token'] else '  (no token)'}"
        )
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON for scripts")
    s = sub.add_parser(
        "login",
        parents=[output],
        help="save a service URL and token as a profile (config file, mode 0600), after checking the token",
    )
    s.add_argument("url", metavar="URL", help="the service, e.g. https://trainctl.example.com")
    s.add_argument("--token", help="the API token ('-': read it from stdin; default: prompt for it)")
    s.add_argument("--profile", help=f"the profile's name (default {config.DEFAULT_PROFILE!r})")
    s.add_argument("--default", action="store_true", help="make it the default profile (the first profile always is)")
    s.add_argument("--no-verify", action="store_true", help="save it without asking the service first")
    s.add_argument(
        "--retry-for", type=common.retry_budget, default=common.default_retry_budget(), help=argparse.SUPPRESS
    )
    s.set_defaults(fn=cmd_login)

    s = sub.add_parser("logout", parents=[output], help="forget a profile's token here (it stays valid until revoked)")
    s.add_argument("--profile", help="which (default: TRAINCTL_PROFILE, else the default profile)")
    s.set_defaults(fn=cmd_logout)

    s = sub.add_parser("profiles", parents=[output], help="list the saved profiles (never their tokens)")
    s.set_defaults(fn=cmd_profiles)
