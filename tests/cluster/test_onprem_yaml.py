"""cluster/onprem.yaml, checked offline (no hosts needed): trainctl's own checks of the file
(service/server/clustercheck.py) name the field of each bad input, Ray's schema accepts it, its commands exist and
parse, and the Ray 2.60 on-prem workarounds are in place. tests/cluster/test_onprem.py runs it for real."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.server.clustercheck import LOCAL_NODE_TYPE, check_onprem, main
from tests.cluster.checks import REPO, bash_syntax_ok, check_command, simple_commands

CLUSTER_YAML = REPO / "cluster" / "onprem.yaml"
SECTIONS = ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def local_files(tmp_path: Path) -> Path:
    """The launcher's files the cluster file names, made up in a temp dir (paths are read relative to it)."""
    for name in ("id_cluster", "auth_token", "cluster.env"):
        (tmp_path / name).write_text("x")
    return tmp_path


def usable(raw: dict[str, Any]) -> dict[str, Any]:
    """The file as a lab would have it after editing: its key and mounted files exist."""
    config = copy.deepcopy(raw)
    config["auth"]["ssh_private_key"] = "id_cluster"
    config["file_mounts"] = {
        remote: ("auth_token" if "auth_token" in remote else "cluster.env" if "cluster.env" in remote else local)
        for remote, local in config["file_mounts"].items()
    }
    return config


def test_the_file_passes_trainctls_checks_and_rays_schema(raw: dict[str, Any], local_files: Path) -> None:
    assert check_onprem(usable(raw), local_files) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["provider"].update(worker_ips=["10.0.0.2", "10.0.0.3", "10.0.0.2"]), "provider.worker_ips[2]"),
        (lambda c: c["provider"].update(head_ip="10.0.0.9", worker_ips=["10.0.0.9"]), "provider.worker_ips[0]"),
        (
            lambda c: c["available_node_types"][LOCAL_NODE_TYPE].update(min_workers=3, max_workers=2),
            f"available_node_types.{LOCAL_NODE_TYPE}.min_workers (3) > ",
        ),
        (lambda c: c["auth"].update(ssh_private_key="no/such/key"), "auth.ssh_private_key: no/such/key does not exist"),
        (lambda c: c["provider"].pop("head_ip"), "provider.head_ip: missing"),
        (lambda c: c["provider"].update(worker_ips=["10.0.0.2", "bad host"]), "provider.worker_ips[1]"),
        (lambda c: c["available_node_types"][LOCAL_NODE_TYPE].pop("resources"), "resources: missing"),
        (lambda c: c.update(setup_commands=["true"]), "setup_commands: Ray 2.60 never runs them"),
        (lambda c: c["file_mounts"].update({"~/x": "missing.env"}), "file_mounts['~/x']: missing.env does not exist"),
        (lambda c: c.update(min_workers=1), "min_workers: set it in available_node_types"),
    ],
)
def test_bad_input_names_the_field(raw: dict[str, Any], local_files: Path, edit: Any, expected: str) -> None:
    config = usable(raw)
    edit(config)
    problems = check_onprem(config, local_files)
    assert any(expected in p for p in problems), problems


def test_the_command_line_exits_nonzero_naming_the_field(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = copy.deepcopy(raw)
    config["provider"]["worker_ips"] = [config["provider"]["head_ip"]]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "provider.worker_ips[0]" in err and "is the head" in err, err


def test_every_top_level_key_is_present(raw: dict[str, Any]) -> None:
    """Ray 2.60 fills no defaults once available_node_types is given: a missing key aborts `ray up`."""
    schema = json.loads((Path(__import__("ray").__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    needed = set(schema["properties"]) - {"metadata", "no_restart"}
    assert needed <= set(raw), sorted(needed - set(raw))
    assert set(raw["available_node_types"]) == {LOCAL_NODE_TYPE} and raw["head_node_type"] == LOCAL_NODE_TYPE


def test_the_cluster_state_file_is_mounted_on_the_head(raw: dict[str, Any]) -> None:
    """Pitfall 1: without the launcher's state file the head never starts the last worker host."""
    state = f"/tmp/ray/cluster-{raw['cluster_name']}.state"
    assert raw["file_mounts"].get(state) == state


def test_setup_reaches_head_and_workers_alike(raw: dict[str, Any]) -> None:
    assert raw["setup_commands"] == []
    assert raw["head_setup_commands"] == raw["worker_setup_commands"] and raw["head_setup_commands"]


def test_one_setting_for_the_interface_token_auth_and_venv_on_path(raw: dict[str, Any]) -> None:
    node_sh = raw["head_setup_commands"][0]
    assert node_sh.count("TRAINCTL_IFNAME=") == 1, "the interface is one setting"
    assert "GLOO_SOCKET_IFNAME=$TRAINCTL_IFNAME" in node_sh and "NCCL_SOCKET_IFNAME=$TRAINCTL_IFNAME" in node_sh
    assert "RAY_AUTH_MODE=token" in node_sh and "RAY_USAGE_STATS_ENABLED=0" in node_sh
    assert "export PATH=/opt/trainctl/venv/bin:$PATH" in node_sh
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Every shell Ray opens sources ~/.bashrc, which sources node.sh: the start commands get all of it.
    assert any("trainctl/node.sh" in c and ".bashrc" in c for c in raw["head_setup_commands"])


def test_commands_are_valid_bash_and_exist(raw: dict[str, Any]) -> None:
    kinds = set()
    for section in SECTIONS:
        for cmd in raw[section]:
            ok, err = bash_syntax_ok(cmd)
            assert ok, f"{section}: {cmd!r}: {err}"
            for argv in simple_commands(cmd.replace("$(command -v python)", "python")):
                if kind := check_command(argv):
                    kinds.add(kind)
    assert {"ray", "trainctl", "python"} <= kinds


def test_the_api_runs_on_the_head_on_loopback_with_drivers_pinned_there(raw: dict[str, Any]) -> None:
    start = " ".join(raw["head_start_ray_commands"])
    serve = [a for c in raw["head_start_ray_commands"] for a in simple_commands(c) if a[:2] == ["trainctl", "serve"]]
    assert len(serve) == 1 and serve[0][serve[0].index("--host") + 1] == "127.0.0.1", serve
    assert "--dashboard-host=127.0.0.1" in start
    assert "trainctl_driver" in start and "TRAINCTL_ENTRYPOINT_RESOURCES='{\"trainctl_driver\": 1}'" in start
    assert "setsid nohup trainctl serve" in start, "detached, so `ray up`'s SSH session ends"
