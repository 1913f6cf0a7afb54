"""Scaling requests the cluster can never meet are refused at submission (422 naming the field), before
anything reaches Ray: GPUs per node beyond the largest node type (TRAINCTL_MAX_GPUS_PER_NODE), a
workers-per-node count Ray can't place exactly."""

from __future__ import annotations

import pytest

from tests.service.conftest import Api


def fields(resp) -> list[str]:
    return [d["field"] for d in resp.json()["error"]["details"]]


def submit(api: Api, scaling: dict) -> object:
    overrides = {f"scaling.{k}": v for k, v in scaling.items()}
    return api.post({"preset": "debug", "overrides": {"optim.epochs": 1, **overrides}})


@pytest.mark.parametrize(
    "scaling, field",
    [
        ({"use_gpu": True, "num_workers": 1, "gpus_per_worker": 8}, "scaling.gpus_per_worker"),
        ({"use_gpu": True, "num_workers": 4, "workers_per_node": 4, "gpus_per_worker": 2}, "scaling.workers_per_node"),
        ({"num_workers": 4, "workers_per_node": 2}, "scaling.workers_per_node"),  # neither 1 nor all
        ({"gpus_per_worker": 0}, "scaling.gpus_per_worker"),
    ],
)
def test_gpus_no_node_type_holds_are_422_naming_the_field(make_api, scaling: dict, field: str) -> None:
    api = make_api(max_gpus_per_node=4)
    resp = submit(api, scaling)
    assert resp.status_code == 422, resp.text
    assert fields(resp) == [field], resp.text
    assert api.get("/v1/jobs").json()["total"] == 0  # nothing half-written
    api.reconcile()
    assert api.ray.jobs == {}  # nothing reached Ray


def test_what_the_largest_node_type_holds_is_accepted(make_api) -> None:
    api = make_api(max_gpus_per_node=4)
    for scaling in (
        {"use_gpu": True, "num_workers": 4, "workers_per_node": 4},
        {"use_gpu": True, "num_workers": 1, "gpus_per_worker": 4},
        {"use_gpu": False, "num_workers": 1, "gpus_per_worker": 8},  # CPU workers reserve no GPU
    ):
        assert submit(api, scaling).status_code == 201, scaling
    # Without the setting the service does not know the node types and leaves placement to Ray.
    assert submit(make_api(), {"use_gpu": True, "num_workers": 1, "gpus_per_worker": 8}).status_code == 201
