"""`trainctl submit` (and `--dry-run`, `--follow`) and `trainctl resubmit`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.client.cli import common, render, watch
from service.client.cli.common import EXIT_INVALID, CliError


def _load_body(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.spec import PRESETS, set_path  # pydantic only: no torch

    if args.file:
        import yaml

        from service.common import safeyaml  # no aliases: a shared spec file cannot expand to gigabytes

        path = Path(args.file)
        try:
            text = sys.stdin.read() if args.file == "-" else path.read_text()
            body = json.loads(text) if path.suffix == ".json" else safeyaml.load(text)
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:
            raise CliError(
                f"cannot read spec file {args.file}: {str(exc)[:300]}", code="invalid_spec_file", exit_code=EXIT_INVALID
            ) from None
        if not isinstance(body, dict):
            raise CliError(
                f"{args.file} must hold a mapping (a spec, or preset + overrides)",
                code="invalid_spec_file",
                exit_code=EXIT_INVALID,
            )
    else:
        if args.preset not in PRESETS:  # checked here: a usage error, no request
            names = sorted(PRESETS)
            raise common.usage_error(
                f"--preset: {args.preset!r} is not a preset: choose from {', '.join(names)}"
                + common.suggest(args.preset, names)
            )
        body = {"preset": args.preset, "overrides": {}}
    sets: list[tuple[str, Any]] = args.set or []  # (path, value), read by common.override
    if sets:
        if "preset" in body or "overrides" in body:
            body.setdefault("overrides", {}).update(dict(sets))
        else:
            for p, v in sets:  # a full spec: set the value in place; the server validates it
                set_path(body, p, v)
    body.update(_labels(args))
    return body


def _labels(args: argparse.Namespace) -> dict[str, Any]:
    """--name/--project/--tag as the API's label fields (only those given; the server validates them)."""
    labels: dict[str, Any] = {}
    if getattr(args, "name", None) is not None:
        labels["name"] = args.name
    if getattr(args, "project", None) is not None:
        labels["project"] = args.project
    if getattr(args, "tag", None):
        labels["tags"] = list(dict.fromkeys(args.tag))
    return labels


def _validate_locally(body: dict[str, Any]) -> dict[str, Any]:
    """The spec the service would store for this body, resolved and validated here (pydantic only, no server);
    field errors are reported exactly as the service's 422 names them."""
    from pydantic import ValidationError

    from trainer.spec import JobSpec, error_list, resolve

    body = {k: v for k, v in body.items() if k not in ("name", "project", "tags")}  # labels: not the spec's
    try:
        if "preset" in body or "overrides" in body:
            spec = resolve(body.get("preset"), body.get("overrides") or {})
        else:
            spec = JobSpec.model_validate(body)
    except ValidationError as exc:
        fields = [{"field": str(e["field"]), "message": str(e["message"])} for e in error_list(exc)]
        lines = [f"  {f['field']}: {f['message']}" for f in fields]
        raise CliError(
            "invalid_spec (checked locally, nothing was submitted):\n" + "\n".join(lines),
            code="invalid_spec",
            reason=f"{len(fields)} invalid field(s), checked locally; nothing was submitted",
            fields=fields,
            exit_code=EXIT_INVALID,
        ) from None
    return spec.model_dump(mode="json")


def cmd_submit(args: argparse.Namespace) -> int:
    body = _load_body(args)
    if args.dry_run:
        spec = _validate_locally(body)
        # With a service configured, it validates the spec too and estimates its time and cost from its
        # finished jobs; without one, the spec is only checked here (no history to estimate from).
        estimate = None
        if not common.url_and_source(args)[1].startswith("the default"):
            with common.client(args) as api:
                estimate = api.estimate(body)
        if args.json:
            common.print_json({"spec": spec, "estimate": estimate} if estimate is not None else spec)
        else:
            import yaml

            print(yaml.safe_dump(spec, sort_keys=False).rstrip())
            print("# valid: this is the spec the service would run (nothing was submitted)")
            if estimate is not None:
                print(f"# estimate from {common.url(args)}:")
                render.print_estimate(estimate)
            else:
                print("# no estimate: no service configured (--url / TRAINCTL_URL), so no history of past jobs")
        return 0
    with common.client(args) as api:
        job = api.submit(body, args.idempotency_key)
    if args.json and not args.follow:
        common.print_json(job)
    elif args.quiet:
        print(job["id"], flush=True)
    else:
        print(
            f"submitted job {job['id']} ({job['state']})"
            + ("" if args.follow else f"; follow it with: trainctl watch {job['id']}"),
            flush=True,
        )
    if not args.follow:
        return 0
    with common.client(args, retry=False) as api:  # `follow` rides out outages itself (--patience)
        return watch.follow(
            api,
            job["id"],
            interval=args.interval,
            patience=args.patience,
            as_json=args.json,
            stream=not args.poll,
            verbose=args.verbose,
        )


def cmd_resubmit(args: argparse.Namespace) -> int:
    """A new job from a stored job's spec with --set overrides applied; labels not given are the parent's."""
    overrides = dict(args.set or [])  # (path, value) pairs, read by common.override
    with common.client(args) as api:
        job = api.resubmit(args.id, {"overrides": overrides, **_labels(args)})
    if args.json:
        common.print_json(job)
    elif args.quiet:
        print(job["id"])
    else:
        print(f"submitted job {job['id']} ({job['state']}) from {args.id}; follow it with: trainctl watch {job['id']}")
    return 0


def _label_arguments(parser: argparse.ArgumentParser, inherited: bool = False) -> None:
    note = " (default: the parent's)" if inherited else ""
    parser.add_argument("--name", help="a name for people (not unique)" + note)
    parser.add_argument("--project", help="the project the job belongs to" + note)
    parser.add_argument(
        "--tag",
        action="append",
        help="a tag (repeatable; at most 32, 64 characters each)" + ("; replaces the parent's" if inherited else ""),
    )


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser("submit", parents=[common_args, following], help="submit a job from a spec file or a preset")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="spec file (.yaml/.json; '-' = stdin)")
    src.add_argument("--preset", help="a preset name, e.g. debug or paper")
    s.add_argument(
        "--set",
        action="append",
        type=common.override,
        metavar="PATH=VALUE",
        help="override, e.g. --set optim.epochs=3",
    )
    _label_arguments(s)
    s.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the job id")
    s.add_argument("-f", "--follow", action="store_true", help="then follow the job like `watch` (same exit codes)")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the resolved spec; with a service configured, also its time and cost estimate "
        "(POST /v1/estimates); submit nothing",
    )
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser(
        "resubmit",
        parents=[common_args],
        help="a new job from a job's stored spec, with overrides (records its parent)",
    )
    s.add_argument("id")
    s.add_argument(
        "--set", action="append", type=common.override, metavar="PATH=VALUE", help="override, e.g. --set optim.lr=0.01"
    )
    _label_arguments(s, inherited=True)
    s.add_argument("-q", "--quiet", action="store_true", help="print only the new job's id")
    s.set_defaults(fn=cmd_resubmit)
