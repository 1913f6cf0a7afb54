"""cluster/gpu.yaml, checked offline: Ray's own schema, commands that exist, nothing exposed, token auth,
pinned images, S3 storage everywhere."""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path

import pytest
import yaml

import objstore
from tests.cluster.checks import PYPROJECT, REPO, bash_syntax_ok, check_command, image_is_pinned, simple_commands

CLUSTER_YAML = REPO / "cluster" / "gpu.yaml"
SERVICE_UNIT = REPO / "cluster" / "trainctl.service"
PATH_UNIT = REPO / "cluster" / "trainctl.path"
# Ray GCS, dashboard / Jobs API, Ray client, and the trainctl API.
PRIVATE_PORTS = {6379: "Ray GCS", 8265: "Ray dashboard/Jobs API", 10001: "Ray client", 8000: "trainctl API"}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def unit_entries(path: Path) -> dict[str, list[str]]:
    """`Key=value` lines of a systemd unit, by key (a key may repeat, e.g. ExecStartPre)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def serve_argv() -> list[str]:
    """The `trainctl serve ...` that the systemd unit runs in the head container (systemd's `$$` is `$`)."""
    start = unit_entries(SERVICE_UNIT)["ExecStart"]
    assert len(start) == 1
    script = bash_script(start[0])
    found = [argv for argv in simple_commands(script) if argv[:2] == ["trainctl", "serve"]]
    assert len(found) == 1, script
    return found[0]


def bash_script(exec_line: str) -> str:
    """The script of `docker exec ... bash -c SCRIPT` in a unit's Exec line."""
    (argv,) = simple_commands(exec_line.replace("$$", "$"))
    assert argv[:2] == ["/usr/bin/docker", "exec"] and "bash" in argv, argv
    return argv[argv.index("bash") + 2]


def serve_settings(raw: dict) -> str:
    """The head_start_ray_commands entry that writes the API's settings (serve.env)."""
    found = [c for c in raw["head_start_ray_commands"] if "serve.env" in c]
    assert len(found) == 1
    return found[0]


def all_commands(config: dict) -> dict[str, list[str]]:
    sections = [
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ]
    out = {s: list(config.get(s) or []) for s in sections}
    for name, node_type in config["available_node_types"].items():
        for s in ("initialization_commands", "worker_setup_commands"):
            if node_type.get(s):
                out[f"{name}.{s}"] = list(node_type[s])
    return out


# --- Ray's own validation ---------------------------------------------------------------------------------


def test_validates_with_rays_schema(prepared: dict) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_node_types(raw: dict) -> None:
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    by_instance = {t["node_config"]["InstanceType"]: (name, t) for name, t in types.items()}
    assert by_instance["g5.xlarge"][1]["resources"]["GPU"] == 1
    assert by_instance["g5.12xlarge"][1]["resources"]["GPU"] == 4
    for name, t in types.items():
        if name == raw["head_node_type"]:
            continue
        # GPU nodes cost money: none while idle, and a cap on each type and on the total.
        assert t["min_workers"] == 0, name
        assert 1 <= t["max_workers"] <= raw["max_workers"], name
    assert raw["idle_timeout_minutes"] <= 30
    assert raw["provider"].get("cache_stopped_nodes") is False


# --- commands exist and parse ----------------------------------------------------------------------------------


def test_every_command_is_valid_bash(raw: dict) -> None:
    for section, commands in all_commands(raw).items():
        for cmd in commands:
            ok, err = bash_syntax_ok(cmd)
            assert ok, f"{section}: {cmd!r}: {err}"


def test_commands_reference_things_that_exist(raw: dict) -> None:
    """`trainctl ...` parses with the project's CLI (console script in pyproject), `ray start ...` with
    Ray's, and every `python -m X` / `python -c "import X"` names an existing module."""
    checked: dict[str, list[str]] = {}
    for section, commands in all_commands(raw).items():
        for cmd in commands:
            for argv in simple_commands(cmd):
                kind = check_command(argv)
                if kind:
                    checked.setdefault(section, []).append(" ".join(argv[:2]))
    # Not vacuous: the commands that matter were found and checked.
    assert "ray start" in checked["head_start_ray_commands"]
    assert check_command(serve_argv()) == "trainctl"
    assert "ray start" in checked["worker_start_ray_commands"]
    assert any(c.startswith("python") for c in checked["setup_commands"])


def test_trainctl_serve_on_loopback_with_s3_and_the_cluster(raw: dict) -> None:
    argv = serve_argv()
    assert "--no-auth" not in argv, "the API keeps its bearer-token auth"
    # The documented choice (docs/scaling.md): API on the head's loopback, reached through SSH.
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    start = serve_settings(raw)
    assert "TRAINCTL_RAY_ADDRESS=http://127.0.0.1:8265" in start
    assert "TRAINCTL_DATA_DIR=/home/ray/trainctl-data" in start
    assert any("/home/ray/trainctl-data" in o for o in raw["docker"]["head_run_options"]), (
        "the job store must survive container re-creation"
    )


def test_dashboard_listens_on_loopback_only(raw: dict) -> None:
    for cmd in raw["head_start_ray_commands"]:
        for argv in simple_commands(cmd):
            if argv[:2] == ["ray", "start"]:
                hosts = [a.split("=", 1)[1] for a in argv if a.startswith("--dashboard-host=")]
                assert hosts == ["127.0.0.1"], "8265 must only be reachable through `ray dashboard` / SSH"
                assert "--ray-client-server-port" not in " ".join(argv)


# --- nothing exposed --------------------------------------------------------------------------------------------


def _public(rule: dict) -> bool:
    for r in rule.get("IpRanges", []):
        net = ipaddress.ip_network(r.get("CidrIp", "255.255.255.255/32"), strict=False)
        if net.prefixlen == 0:
            return True
    for r in rule.get("Ipv6Ranges", []):
        if ipaddress.ip_network(r.get("CidrIpv6", "::1/128"), strict=False).prefixlen == 0:
            return True
    return bool(rule.get("PrefixListIds"))  # a managed prefix list could be anything: reject too


def exposed_private_ports(rules: list[dict]) -> list[str]:
    problems = []
    for rule in rules:
        if not _public(rule):
            continue
        proto = str(rule.get("IpProtocol", "-1"))
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        for port, what in PRIVATE_PORTS.items():
            if proto in ("-1", "all") or lo in (-1, None) or (proto in ("tcp", "6") and lo <= port <= hi):
                problems.append(f"{what} ({port}) open to the internet by {rule}")
    return problems


def test_security_group_opens_no_ray_or_api_port(raw: dict) -> None:
    rules = raw["provider"].get("security_group", {}).get("IpPermissions", [])
    assert exposed_private_ports(rules) == []
    # Every node uses the security group Ray manages from this file (no hand-made group slipped in).
    for name, t in raw["available_node_types"].items():
        assert "SecurityGroupIds" not in t["node_config"], name


@pytest.mark.parametrize(
    "rule,bad",
    [
        ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 7000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 10000, "ToPort": 10001, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}, True),
        ({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 7999, "ToPort": 8001, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, False),
        ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}, False),
        ({"IpProtocol": "udp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, False),
    ],
)
def test_exposure_check_itself(rule: dict, bad: bool) -> None:
    assert bool(exposed_private_ports([rule])) is bad


# --- auth and secrets ---------------------------------------------------------------------------------------


def test_ray_token_auth_everywhere(raw: dict) -> None:
    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[section] if re.search(r"\bray start\b", c)]
        assert starts, section
        for cmd in starts:
            assert re.search(r"export RAY_AUTH_MODE=token\s*;.*\bray start\b", cmd, flags=re.S), cmd
    assert "RAY_AUTH_MODE=token" in serve_settings(raw), "the Jobs client must use token auth too"
    # The token reaches every node as a file from the operator's machine, never as text in this file.
    mounts = raw["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN=" not in text


def test_no_credentials_in_the_file() -> None:
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text
    assert "AWS_ACCESS_KEY_ID" not in text


# --- images and storage ----------------------------------------------------------------------------------------


def test_images_are_pinned(raw: dict) -> None:
    docker = raw["docker"]
    images = [docker["image"], docker.get("head_image"), docker.get("worker_image")]
    images += [t.get("docker", {}).get("worker_image") for t in raw["available_node_types"].values()]
    images = [i for i in images if i]
    assert images
    for image in images:
        assert image_is_pinned(image), image
    # The cluster runs the trainer image built from docker/ (same version as the project).
    version = PYPROJECT["project"]["version"]
    assert docker["image"].rsplit("/", 1)[-1] == f"trainctl-trainer:{version}"


def test_shm_size_for_every_node_type(raw: dict) -> None:
    docker = raw["docker"]
    assert any(o.startswith("--shm-size=") for o in docker["run_options"] + docker.get("head_run_options", []))
    for name, t in raw["available_node_types"].items():
        if name == raw["head_node_type"]:
            continue
        opts = docker["run_options"] + t.get("docker", {}).get("worker_run_options", [])
        assert any(o.startswith("--shm-size=") for o in opts), name


def test_storage_is_s3_and_consistent(raw: dict) -> None:
    text = CLUSTER_YAML.read_text()
    uris = set(re.findall(r"TRAINCTL_STORAGE=(\S+?)['\s]", text))
    assert len(uris) == 1, f"one storage root everywhere, got {uris}"
    uri = uris.pop()
    assert objstore.is_s3(uri), "workers on other machines can only share S3, not a local directory"
    objstore.resolve(uri)  # no credentials/query in it
    region = raw["provider"]["region"]
    assert set(re.findall(r"AWS_REGION=(\S+?)['\s]", text)) == {region}
    assert set(re.findall(r"\.ecr\.([a-z0-9-]+)\.amazonaws\.com", text)) == {region}
    assert set(re.findall(r"--region\s+(\S+)", text)) == {region}


def test_job_drivers_are_pinned_to_the_head(raw: dict) -> None:
    """Drivers ask for a resource only the head has, so the autoscaler never removes a node under one."""
    import json

    head_type = raw["head_node_type"]
    holders = [
        name for name, node in raw["available_node_types"].items() if node.get("resources", {}).get("trainctl_driver")
    ]
    assert holders == [head_type]
    serve = serve_settings(raw)
    match = re.search(r"TRAINCTL_ENTRYPOINT_RESOURCES='([^']*)'", serve)
    assert match and json.loads(match.group(1)) == {"trainctl_driver": 1}


# --- the API under systemd ---------------------------------------------------------------------------------


def test_api_runs_under_systemd_and_is_restarted(raw: dict) -> None:
    unit = unit_entries(SERVICE_UNIT)
    assert unit["Restart"] == ["always"] and unit["StartLimitIntervalSec"] == ["0"]
    assert unit["ExecStart"][0].startswith(
        f"/usr/bin/docker exec --env-file /home/ubuntu/trainctl-data/serve.env {raw['docker']['container_name']} "
    )
    # ExecStop stops exactly the process ExecStart wrote into the PID file (docker exec forwards no signal).
    assert "serve.pid" in unit["ExecStart"][0] and "serve.pid" in unit["ExecStop"][0]
    for cmd in unit["ExecStart"] + unit["ExecStop"]:
        ok, err = bash_syntax_ok(bash_script(cmd))
        assert ok, (cmd, err)
    assert unit_entries(PATH_UNIT)["PathExists"] == ["/home/ubuntu/trainctl-data/serve.env"]
    # Installed on the host from the file mounts by the setup commands, and enabled.
    mounts = raw["file_mounts"]
    for name in ("trainctl.service", "trainctl.path"):
        target = next(t for t, src in mounts.items() if src == f"cluster/{name}")
        staged = f"/tmp/ray_tmp_mount/{raw['cluster_name']}{target}"
        assert any(staged in c and "/etc/systemd/system/" in c for c in raw["initialization_commands"]), name
    assert any("systemctl enable --now trainctl.path" in c for c in raw["initialization_commands"])
    # serve.env lands where the unit reads it (the host side of the data-dir bind mount) and `ray up`
    # restarts the API by the PID the unit wrote.
    settings = serve_settings(raw)
    assert "> /home/ray/trainctl-data/serve.env.tmp" in settings and "serve.pid" in settings
    assert any("/home/ubuntu/trainctl-data:/home/ray/trainctl-data" in o for o in raw["docker"]["head_run_options"])
    assert "nohup" not in " ".join(raw["head_start_ray_commands"])


def test_systemd_accepts_the_units() -> None:
    """systemd's own checker: no error but the absence of docker on this test machine."""
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    out = subprocess.run(
        ["systemd-analyze", "verify", str(SERVICE_UNIT), str(PATH_UNIT)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip() and "docker" not in line]
    assert problems == [], problems
