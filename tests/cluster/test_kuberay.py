"""Offline checks of the Kubernetes manifests (cluster/kuberay/): the RayCluster against KubeRay's own CRD
schema (tests/cluster/data/kuberay/, validated with jsonschema), the core objects (Deployment, Service,
ConfigMap, Secret, PersistentVolumeClaim) against the fields Kubernetes requires, and the whole against
cluster/gpu.yaml and the service's settings: the same head/worker split, token auth, drivers on the head."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.cluster.checks import REPO, image_is_pinned

KUBERAY = REPO / "cluster" / "kuberay"
CRD = Path(__file__).parent / "data" / "kuberay" / "ray.io_rayclusters.yaml"
GPU_YAML = REPO / "cluster" / "gpu.yaml"
APPLIED = ("settings.yaml", "raycluster.yaml", "trainctl-api.yaml")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def closed(schema: Any) -> Any:
    """The schema with unknown fields forbidden wherever the API server would prune them (an object schema
    with `properties` and no x-kubernetes-preserve-unknown-fields): a misspelt field is an error here,
    where Kubernetes would silently drop it."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if "properties" in schema and "metadata" in schema["properties"] and "apiVersion" in schema["properties"]:
        out["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: not in the CRD, checked by hand
    return out


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the CRD's storage version (ray.io/v1), closed to unknown fields."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: 1 MB of YAML in a fraction of the time
    crd = yaml.load(CRD.read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "ray.io"
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["name"] == "v1"
    return closed(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    """Every object `kubectl apply -k cluster/kuberay/` applies, plus the example Secrets."""
    docs: list[dict[str, Any]] = []
    for name in (*APPLIED, "secrets.example.yaml"):
        docs += load_all(KUBERAY / name)
    return docs


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def the(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = by_kind(objects, kind)
    return found


# --- the RayCluster against KubeRay's CRD ---------------------------------------------------------------------


def raycluster_errors(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Schema violations of a RayCluster (apiVersion/kind checked too: the CRD schema leaves them free)."""
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(obj)
    ]
    if obj.get("apiVersion") != "ray.io/v1" or obj.get("kind") != "RayCluster":
        errors.append(f"apiVersion/kind: want ray.io/v1 RayCluster, got {obj.get('apiVersion')} {obj.get('kind')}")
    if not obj.get("metadata", {}).get("name"):
        errors.append("metadata.name: required")
    return errors


def test_raycluster_matches_the_kuberay_crd(objects: list[dict[str, Any]], crd_schema: dict[str, Any]) -> None:
    assert raycluster_errors(the(objects, "RayCluster"), crd_schema) == []


BROKEN_RAYCLUSTERS = {
    "max replicas not an integer": lambda rc: rc["spec"]["workerGroupSpecs"][0].update(maxReplicas="four"),
    "worker group without template": lambda rc: rc["spec"]["workerGroupSpecs"][0].pop("template"),
    "no head group": lambda rc: rc["spec"].pop("headGroupSpec"),
    "rayStartParams value not a string": lambda rc: rc["spec"]["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 2}
    ),
    "unknown auth mode": lambda rc: rc["spec"]["authOptions"].update(mode="password"),
    "container without name": lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
    "wrong kind": lambda rc: rc.update(kind="RayClusters"),
    "misspelt field": lambda rc: rc["spec"]["workerGroupSpecs"][0].update(maxReplica=4),
    "misspelt pod field": lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"].update(nodeSelecter={}),
}


@pytest.mark.parametrize("breakage", BROKEN_RAYCLUSTERS, ids=list(BROKEN_RAYCLUSTERS))
def test_a_broken_raycluster_fails_the_check(
    breakage: str, objects: list[dict[str, Any]], crd_schema: dict[str, Any]
) -> None:
    broken = copy.deepcopy(the(objects, "RayCluster"))
    BROKEN_RAYCLUSTERS[breakage](broken)
    assert raycluster_errors(broken, crd_schema) != []


# --- core objects ---------------------------------------------------------------------------------------------

API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "PersistentVolumeClaim": "v1",
    "RayCluster": "ray.io/v1",
}


def pod_spec_errors(where: str, spec: Any) -> list[str]:
    if not isinstance(spec, dict) or not spec.get("containers"):
        return [f"{where}.containers: required"]
    errors = []
    for i, c in enumerate(spec.get("initContainers", []) + spec["containers"]):
        if not c.get("name") or not c.get("image"):
            errors.append(f"{where}.containers[{i}]: name and image are required")
    return errors


def core_errors(obj: dict[str, Any]) -> list[str]:
    """The fields the API server requires of the core objects we use (a subset of its validation: enough to
    catch a missing or misplaced field in these manifests)."""
    kind, spec = obj.get("kind"), obj.get("spec")
    errors = []
    if API_VERSIONS.get(str(kind)) != obj.get("apiVersion"):
        errors.append(f"{kind}: apiVersion {obj.get('apiVersion')!r}, want {API_VERSIONS.get(str(kind))!r}")
    if not obj.get("metadata", {}).get("name"):
        errors.append(f"{kind}: metadata.name is required")
    if kind == "Deployment":
        selector = (spec or {}).get("selector", {}).get("matchLabels")
        template = (spec or {}).get("template", {})
        if not selector:
            errors.append("Deployment: spec.selector.matchLabels is required")
        elif any(template.get("metadata", {}).get("labels", {}).get(k) != v for k, v in selector.items()):
            errors.append("Deployment: spec.template's labels must match spec.selector")
        errors += pod_spec_errors("Deployment.spec.template.spec", template.get("spec"))
    elif kind == "Service":
        ports = (spec or {}).get("ports")
        if not ports or any("port" not in p for p in ports):
            errors.append("Service: spec.ports[].port is required")
    elif kind in ("ConfigMap", "Secret"):
        for section in ("data", "stringData"):
            values = obj.get(section) or {}
            if not isinstance(values, dict) or any(not isinstance(v, str) for v in values.values()):
                errors.append(f"{kind} {obj.get('metadata', {}).get('name')}: {section} values must be strings")
    elif kind == "PersistentVolumeClaim":
        if not (spec or {}).get("accessModes") or not (spec or {}).get("resources", {}).get("requests", {}).get(
            "storage"
        ):
            errors.append("PersistentVolumeClaim: spec.accessModes and spec.resources.requests.storage are required")
    elif kind != "RayCluster":
        errors.append(f"{kind}: not a kind these manifests should contain")
    return errors


def test_core_objects_have_their_required_fields(objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "RayCluster"} <= kinds
    assert [e for o in objects for e in core_errors(o)] == []


BROKEN_CORE = {
    "deployment without selector": ("Deployment", lambda d: d["spec"].pop("selector")),
    "deployment selector not matching": (
        "Deployment",
        lambda d: d["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "other"}),
    ),
    "container without image": ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("image")),
    "deployment in the wrong API group": ("Deployment", lambda d: d.update(apiVersion="v1")),
    "service without port": ("Service", lambda s: s["spec"]["ports"][0].pop("port")),
    "configmap with a number": ("ConfigMap", lambda c: c["data"].update({"TRAINCTL_CHECK_LOCAL_DATA": False})),
    "secret without name": ("Secret", lambda s: s["metadata"].pop("name")),
}


@pytest.mark.parametrize("breakage", BROKEN_CORE, ids=list(BROKEN_CORE))
def test_a_broken_core_object_fails_the_check(breakage: str, objects: list[dict[str, Any]]) -> None:
    kind, mutate = BROKEN_CORE[breakage]
    broken = copy.deepcopy(by_kind(objects, kind)[0])
    mutate(broken)
    assert core_errors(broken) != []


# --- the pieces fit together ------------------------------------------------------------------------------------


def containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(pod template path, container) for every container of a Deployment or RayCluster."""
    if obj["kind"] == "Deployment":
        spec = obj["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield "api", c
    elif obj["kind"] == "RayCluster":
        yield "head", obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        for group in obj["spec"]["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                yield group["groupName"], c


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for o in objects:
        if o["kind"] == "Deployment":
            yield o["spec"]["template"]["spec"]
        elif o["kind"] == "RayCluster":
            yield o["spec"]["headGroupSpec"]["template"]["spec"]
            yield from (g["template"]["spec"] for g in o["spec"]["workerGroupSpecs"])


def test_every_referenced_configmap_secret_and_volume_exists(objects: list[dict[str, Any]]) -> None:
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in by_kind(objects, "ConfigMap")}
    secrets = {o["metadata"]["name"]: o.get("stringData", {}) for o in by_kind(objects, "Secret")}
    claims = {o["metadata"]["name"] for o in by_kind(objects, "PersistentVolumeClaim")}
    rc = the(objects, "RayCluster")
    token_secret = rc["spec"]["authOptions"]["secretName"]
    assert "auth_token" in secrets[token_secret], "KubeRay reads the token from the key auth_token"
    for o in objects:
        for _, c in containers(o):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], ref
    for spec in pod_specs(objects):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_kustomization_applies_everything_but_the_example_secrets() -> None:
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == list(APPLIED)
    assert "secrets.example.yaml" not in kustomization["resources"]
    for doc in load_all(KUBERAY / "secrets.example.yaml"):
        assert all(v.startswith("REPLACE") for v in doc["stringData"].values()), "placeholders only"


def test_same_node_types_and_idle_timeout_as_gpu_yaml(objects: list[dict[str, Any]]) -> None:
    """Each worker group is one of gpu.yaml's GPU node types: same GPU count and maximum, same idle timeout."""
    gpu = yaml.safe_load(GPU_YAML.read_text())
    rc = the(objects, "RayCluster")["spec"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["idleTimeoutSeconds"] == gpu["idle_timeout_minutes"] * 60
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    for name, node in gpu["available_node_types"].items():
        if name == gpu["head_node_type"] or node.get("node_config", {}).get("InstanceMarketOptions"):
            continue  # the head; spot types are a variant of an on-demand one (the same GPUs)
        group = groups[name.replace(".", "-")]
        gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) == node["resources"]["GPU"], name
        assert (group["minReplicas"], group["maxReplicas"]) == (node["min_workers"], node["max_workers"]), name
    head = rc["headGroupSpec"]["rayStartParams"]
    head_type = gpu["available_node_types"][gpu["head_node_type"]]["resources"]
    assert json.loads(json.loads(head["resources"])) == {"trainctl_driver": head_type["trainctl_driver"]}
    assert float(head["num-cpus"]) == head_type["CPU"] and float(head["num-gpus"]) == 0


def test_token_auth_pinned_images_and_no_usage_stats(objects: list[dict[str, Any]]) -> None:
    rc = the(objects, "RayCluster")
    assert rc["spec"]["authOptions"]["mode"] == "token"
    assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in rc["spec"]["autoscalerOptions"]["env"]
    for o in objects:
        for where, c in containers(o):
            assert image_is_pinned(c["image"]), (where, c["image"])
            if c["name"] != "admin-token":
                env = {v["name"]: v.get("value") for v in c.get("env", [])}
                assert env.get("RAY_USAGE_STATS_ENABLED") == "0" or any(
                    "configMapRef" in s for s in c.get("envFrom", [])
                ), where
    settings = the(objects, "ConfigMap")["data"]
    assert settings["RAY_USAGE_STATS_ENABLED"] == "0"
    api = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {v["name"]: v for v in api["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == rc["spec"]["authOptions"]["secretName"]
    # No credentials outside the Secrets.
    for name in APPLIED:
        text = (KUBERAY / name).read_text()
        assert "AWS_SECRET_ACCESS_KEY" not in text and "auth_token:" not in text, name


def test_the_service_accepts_the_configmap_and_pins_drivers_to_the_head(
    objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap is the service's environment: it must load as Settings, point at the RayCluster's head
    service and give every driver the head-only resource."""
    from service.common.settings import load_settings

    data = the(objects, "ConfigMap")["data"]
    for key in [k for k in __import__("os").environ if k.startswith("TRAINCTL_")]:
        monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    rc = the(objects, "RayCluster")
    assert settings.ray_address == f"http://{rc['metadata']['name']}-head-svc:8265"
    assert settings.entrypoint_resources == {"trainctl_driver": 1}
    assert settings.storage.startswith("s3://") and settings.check_local_data is False
    api = the(objects, "Deployment")
    assert api["spec"]["replicas"] == 1 and api["spec"]["strategy"]["type"] == "Recreate"  # one SQLite writer
    service = the(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP", "the API is reached through port-forward, never a public IP"


def test_the_api_adopts_an_admin_token_it_is_given(tmp_path: Path) -> None:
    """The Secret's admin token (copied into the data dir by the init container) becomes the admin token on a
    start that finds none in the store; a placeholder-sized file is replaced as before."""
    from service.api import auth
    from service.engine.store import Store

    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    store.create_schema()
    given = "tc_" + "ab" * 32
    path = tmp_path / "admin-token"
    path.write_text(given + "\n")
    assert auth.ensure_admin_token(store, path) is None
    admin = auth.authenticate(store, f"Bearer {given}")
    assert (admin.name, admin.is_admin) == ("admin", True)
    assert path.read_text().strip() == given

    other = Store(f"sqlite:///{tmp_path / 'b.db'}")
    other.create_schema()
    path.write_text("REPLACE\n")
    new = auth.ensure_admin_token(other, path)
    assert new and new != "REPLACE" and path.read_text().strip() == new
