"""`trainctl token create|list|revoke`: the admin's API tokens."""

from __future__ import annotations

import argparse

from service.client.cli import common
from service.client.cli.common import parse_duration


def cmd_token_create(args: argparse.Namespace) -> int:
    with common.client(args) as api:
        data = api.create_token(args.name, args.expires_in)
    if args.json:
        common.print_json(data)
    else:
        expiry = f", expires {data['expires_at']}" if data.get("expires_at") else ""
        print(f"token for {data['name']} (shown once; store it safely{expiry}):\n{data['token']}")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    with common.client(args) as api:
        data = api.tokens()
    if args.json:
        common.print_json(data)
        return 0
    print(f"{'NAME':<24} {'ROLE':<6} {'CREATED':<20} EXPIRES")
    for t in data["tokens"]:
        expires = (t["expires_at"] or "never")[:19] + (" (expired)" if t["expired"] else "")
        print(f"{t['name']:<24} {'admin' if t['is_admin'] else 'user':<6} {t['created_at'][:19]:<20} {expires}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    with common.client(args) as api:
        api.revoke_token(args.name)
    print(f"revoked the token {args.name!r}")
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser("token", help="manage API tokens")
    tsub = s.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser("create", parents=[common_args], help="create a token for a new user (admin only)")
    t.add_argument("name")
    t.add_argument(
        "--expires-in",
        type=parse_duration,
        metavar="DURATION",
        help="the token stops working after this long: seconds, or 30m, 12h, 7d, 2w (default: never)",
    )
    t.set_defaults(fn=cmd_token_create)
    t = tsub.add_parser("list", parents=[common_args], help="list tokens: name, role, expiry (admin only)")
    t.set_defaults(fn=cmd_token_list)
    t = tsub.add_parser("revoke", parents=[common_args], help="revoke a token at once (admin only)")
    t.add_argument("name")
    t.set_defaults(fn=cmd_token_revoke)
