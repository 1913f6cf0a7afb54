"""trainctl's checks of an on-prem cluster file (cluster/onprem.yaml) before `ray up` runs it.

    python -m service.server.clustercheck cluster/onprem.yaml

Ray's launcher takes a bad host list quietly: a duplicate worker address or the head among the workers
makes it start Ray twice on one machine, and `min_workers > max_workers` or a missing key file only shows
as a host that never joins (the autoscaler then waits 300 s per host). Each problem here names the field
and what to fix; then Ray's own schema (`validate_config(prepare_config(...))`) runs too.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

import yaml

LOCAL_NODE_TYPE = "local.cluster.node"  # the only node type Ray's local provider accepts


def _path(value: str, base: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _address_problem(field: str, value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"{field}: {value!r} is not a host address"
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if any(c.isspace() for c in value) or value.startswith("-"):
            return f"{field}: {value!r} is not a host address or name"
    return None


def _int_field(problems: list[str], config: dict[str, Any], field: str, where: str) -> int | None:
    value = config.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        problems.append(f"{where}{field}: {value!r} must be a whole number >= 0")
        return None
    return value


def check_hosts(config: dict[str, Any]) -> list[str]:
    provider = config.get("provider")
    if not isinstance(provider, dict):
        return ["provider: missing (a mapping with type: local, head_ip and worker_ips)"]
    if provider.get("type") != "local":
        return [f"provider.type: {provider.get('type')!r}, but these checks are for Ray's local provider ('local')"]
    problems: list[str] = []
    head = provider.get("head_ip")
    if head is None:
        problems.append("provider.head_ip: missing (the head's address)")
    elif problem := _address_problem("provider.head_ip", head):
        problems.append(problem)
    workers = provider.get("worker_ips")
    if not isinstance(workers, list):
        problems.append("provider.worker_ips: missing or not a list of worker host addresses")
        return problems
    seen: dict[str, int] = {}
    for i, worker in enumerate(workers):
        field = f"provider.worker_ips[{i}]"
        if problem := _address_problem(field, worker):
            problems.append(problem)
            continue
        if worker == head:
            problems.append(f"{field}: {worker} is the head (provider.head_ip); list only the other hosts")
        elif worker in seen:
            problems.append(f"{field}: {worker} is listed twice (also provider.worker_ips[{seen[worker]}])")
        else:
            seen[worker] = i
    return problems


def check_workers(config: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    total = _int_field(problems, config, "max_workers", "")
    if "min_workers" in config:
        problems.append(
            "min_workers: set it in available_node_types.local.cluster.node (with a node type block Ray ignores "
            "the top-level one)"
        )
    types = config.get("available_node_types")
    if not isinstance(types, dict) or LOCAL_NODE_TYPE not in types:
        problems.append(f"available_node_types: needs the node type {LOCAL_NODE_TYPE!r} (Ray's local provider)")
        return problems
    if set(types) != {LOCAL_NODE_TYPE}:
        others = sorted(set(types) - {LOCAL_NODE_TYPE})
        problems.append(f"available_node_types: Ray's local provider has one node type; remove {others}")
    node_type = types[LOCAL_NODE_TYPE]
    where = f"available_node_types.{LOCAL_NODE_TYPE}."
    if not isinstance(node_type, dict):
        return [*problems, f"{where[:-1]}: not a mapping"]
    low = _int_field(problems, node_type, "min_workers", where)
    high = _int_field(problems, node_type, "max_workers", where)
    if low is not None and high is not None and low > high:
        problems.append(f"{where}min_workers ({low}) > {where}max_workers ({high})")
    if high is not None and total is not None and high > total:
        problems.append(f"{where}max_workers ({high}) > max_workers ({total}), the cluster-wide cap")
    workers = (config.get("provider") or {}).get("worker_ips")
    if isinstance(workers, list) and high is not None and high > len(workers):
        problems.append(f"{where}max_workers ({high}) > the {len(workers)} hosts in provider.worker_ips")
    if not node_type.get("resources"):
        problems.append(
            f"{where}resources: missing; give one host's CPUs (and GPUs), or the autoscaler never starts a worker "
            "host for a waiting job"
        )
    if config.get("setup_commands"):
        problems.append(
            "setup_commands: Ray 2.60 never runs them when available_node_types is given; put them in "
            "head_setup_commands and worker_setup_commands"
        )
    if config.get("head_node_type") != LOCAL_NODE_TYPE:
        problems.append(f"head_node_type: must be {LOCAL_NODE_TYPE!r}")
    return problems


def check_files(config: dict[str, Any], base: Path) -> list[str]:
    """The SSH key and every local file that file_mounts copies to the hosts must exist here."""
    problems: list[str] = []
    auth = config.get("auth") or {}
    key = auth.get("ssh_private_key")
    if not auth.get("ssh_user"):
        problems.append("auth.ssh_user: missing (the account on every host)")
    if not key:
        problems.append("auth.ssh_private_key: missing (the key that logs in to every host)")
    elif not _path(str(key), base).is_file():
        problems.append(f"auth.ssh_private_key: {key} does not exist on this machine")
    mounts = config.get("file_mounts") or {}
    for remote, local in mounts.items():
        if not isinstance(local, str):
            problems.append(f"file_mounts[{remote!r}]: {local!r} is not a path")
            continue
        if str(local).startswith("/tmp/ray/cluster-"):
            continue  # the launcher's cluster state file: `ray up` writes it before it copies file mounts
        if not _path(local, base).exists():
            hint = " (run `ray get-auth-token --generate`)" if local.endswith("auth_token") else ""
            problems.append(f"file_mounts[{remote!r}]: {local} does not exist on this machine{hint}")
    return problems


def check_ray_schema(config: dict[str, Any]) -> list[str]:
    """Ray's own preparation and schema check, as `ray up` runs them."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except SystemExit as exc:  # prepare_config aborts through Ray's CLI logger
        return [f"Ray rejects the file: {exc}"]
    except Exception as exc:  # noqa: BLE001 - jsonschema.ValidationError, ValueError: report, don't crash
        return [f"Ray's schema: {str(exc).splitlines()[0]}"]
    return []


def check_onprem(config: Any, base: Path) -> list[str]:
    """Every problem found, each naming its field; empty when the file is good to `ray up`. `base`: where
    relative local paths are read from (the directory `ray up` runs in)."""
    if not isinstance(config, dict):
        return ["the file is not a YAML mapping"]
    problems = check_hosts(config) + check_workers(config) + check_files(config, base)
    if not problems:
        problems = check_ray_schema(config)
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m service.server.clustercheck CLUSTER_YAML", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    problems = check_onprem(config, Path.cwd())
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{path}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
