"""service/common/estimate.py: the pure estimate and its guard rails (no I/O)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.common.estimate import (
    BENCHMARKS,
    NO_PRICING,
    HistoryRow,
    NodeType,
    Pricing,
    check_limits,
    device_model,
    estimate,
    spec_key,
)
from service.common.settings import Settings
from trainer.spec import JobSpec, resolve

H100 = "NVIDIA H100 80GB HBM3"
PRICED = Pricing(
    node_types={"gpu.1xh100": NodeType(cpus=16, gpus=1, device="H100"), "cpu.big": NodeType(cpus=32)},
    prices={"gpu.1xh100": 4.0, "cpu.big": 1.0},
    sources=("TRAINCTL_NODE_TYPES", "TRAINCTL_PRICES"),
)


def _spec(**overrides: object) -> JobSpec:
    base: dict[str, object] = {"optim.epochs": 10, "data.max_train_images": 4096, "optim.batch_size": 256}
    return resolve("fast", {**base, **overrides})


def _row(
    spec: JobSpec,
    job_id: str,
    ips: float,
    epoch_s: float,
    startup: float | None = 30.0,
    device: str = H100,
    count: int = 1,
    finished_at: float = 1.0,
    finish: float | None = 8.0,
) -> HistoryRow:
    key = spec_key(spec).model_copy(update={"device": device, "device_count": count})
    return HistoryRow(job_id, key, ips, epoch_s, startup, finished_at, finish)


def test_history_basis_is_the_median_of_jobs_with_the_same_key() -> None:
    spec = _spec()
    rows = [_row(spec, "a", 1000.0, 5.0), _row(spec, "b", 2000.0, 3.0), _row(spec, "c", 1500.0, 4.0, startup=40.0)]
    other = _spec(**{"optim.batch_size": 512})  # a different key: ignored
    rows.append(_row(other, "d", 9.0, 900.0))
    est = estimate(spec, rows, pricing=PRICED)
    assert est.images_per_s.value == 1500.0
    assert est.images_per_s.basis == "history: 3 past jobs with the same key"
    assert est.epoch_seconds.value == 4.0
    assert est.startup_seconds.value == 30.0
    assert est.finish_seconds.value == 8.0
    assert est.wall_seconds.value == 30.0 + 10 * 4.0 + 8.0
    assert est.node_type == "gpu.1xh100" and est.nodes.value == 1 and est.workers.value == 1
    assert est.gpu_hours.value == pytest.approx(78.0 / 3600, abs=1e-6)
    assert est.cost.value == pytest.approx(78.0 / 3600 * 4.0, abs=1e-6)
    assert "TRAINCTL_PRICES gpu.1xh100 4/h" in est.cost.basis
    assert est.key.device == H100 and est.settings == ["TRAINCTL_NODE_TYPES", "TRAINCTL_PRICES"]


def test_history_without_node_types_assumes_the_device_of_the_newest_job() -> None:
    spec = _spec()
    rows = [
        _row(spec, "old", 100.0, 50.0, device="cpu (2 threads) X", finished_at=1.0),
        _row(spec, "new", 1000.0, 5.0, finished_at=2.0),
    ]
    est = estimate(spec, rows)
    assert est.images_per_s.value == 1000.0 and est.images_per_s.basis.startswith("history: 1 past job ")
    assert est.key.device == H100 and est.node_type is None and est.nodes.value is None
    assert est.gpu_hours.value == pytest.approx(est.wall_seconds.value / 3600, abs=1e-6)  # one GPU worker
    assert est.cost.value is None and est.cost.basis.startswith("unknown: no prices configured")


def test_benchmark_basis_for_the_project_cpu() -> None:
    spec = _spec(**{"scaling.num_workers": 1, "scaling.use_gpu": False, "precision": "bf16"})
    pricing = Pricing({"cpu2": NodeType(cpus=2, device="AMD EPYC")}, {}, ("TRAINCTL_NODE_TYPES",))
    est = estimate(spec, [], pricing=pricing)
    assert est.images_per_s.value == 158.8
    assert est.images_per_s.basis.startswith("benchmark: bench/RESULTS.md")
    assert est.epoch_seconds.value == pytest.approx(4096 / 158.8 * 1.043, abs=0.01)
    assert est.wall_seconds.value == pytest.approx(59.5 + 10 * est.epoch_seconds.value + 26.6, abs=0.1)
    assert est.gpu_hours.value == 0.0
    fp32 = estimate(spec.model_copy(update={"precision": "fp32"}), [], pricing=pricing)
    assert fp32.images_per_s.value == 106.5
    # The figure was measured on a 2-core node: a 64-core node of the same CPU model is not estimated from it.
    big = Pricing({"cpu64": NodeType(cpus=64, device="AMD EPYC")}, {})
    assert estimate(spec, [], pricing=big).images_per_s.value is None


def test_benchmark_without_images_per_epoch_leaves_the_wall_time_unknown() -> None:
    spec = resolve("fast", {"scaling.num_workers": 1, "scaling.use_gpu": False})
    est = estimate(spec, [], pricing=Pricing({"cpu2": NodeType(cpus=2, device="AMD EPYC")}, {}))
    assert est.images_per_s.value == 158.8
    assert est.wall_seconds.value is None and "data.max_train_images" in est.wall_seconds.basis


def test_unknown_never_invents_a_number() -> None:
    est = estimate(_spec(), [], BENCHMARKS, PRICED)  # an H100: no history, no benchmark
    for fig in (
        est.images_per_s,
        est.epoch_seconds,
        est.startup_seconds,
        est.wall_seconds,
        est.gpu_hours,
        est.cpu_hours,
        est.cost,
    ):
        assert fig.value is None and fig.basis.startswith("unknown: "), fig
    bare = estimate(JobSpec(), [], BENCHMARKS, NO_PRICING)
    assert bare.node_type is None and bare.workers.value is None
    assert bare.wall_seconds.basis.startswith("unknown: no finished job with this key")


def test_a_search_is_not_estimated() -> None:
    spec = _spec(search={"space": {"optim.lr": {"loguniform": [0.01, 0.1]}}})
    est = estimate(spec, [_row(_spec(), "a", 1000.0, 5.0)], pricing=PRICED)
    assert est.wall_seconds.value is None and "search" in est.wall_seconds.basis


def test_placement_picks_the_node_type_that_holds_the_workers() -> None:
    pricing = Pricing(
        {"g1": NodeType(cpus=4, gpus=1, device="A10G"), "g4": NodeType(cpus=48, gpus=4, device="A10G")},
        {"g1": 1.0, "g4": 5.0},
    )
    assert estimate(_spec(**{"scaling.num_workers": 4}), [], pricing=pricing).node_type == "g4"
    eight = estimate(_spec(**{"scaling.num_workers": 8}), [], pricing=pricing)
    assert eight.node_type == "g4" and eight.nodes.value == 2
    auto = estimate(_spec(), [], pricing=pricing)
    assert auto.node_type == "g4" and auto.workers.value == 4
    cpu = estimate(_spec(**{"scaling.use_gpu": False}), [], pricing=pricing)
    assert cpu.node_type is None and cpu.nodes.basis.startswith("unknown: TRAINCTL_NODE_TYPES has no CPU-only")


def test_device_model_drops_the_cuda_index() -> None:
    assert device_model("cuda:3 NVIDIA H100 80GB HBM3") == H100
    assert device_model("cpu (2 threads, no native bf16) Intel") == "cpu (2 threads, no native bf16) Intel"


def test_guard_rails() -> None:
    spec = _spec(**{"limits.max_hours": 0.01, "limits.max_cost": 0.01})
    est = estimate(spec, [_row(spec, "a", 1000.0, 5.0)], pricing=PRICED)  # 88 s, 0.098 $
    checks, refusals = check_limits(spec, est, priced=True)
    assert [r["field"] for r in refusals] == ["limits.max_hours", "limits.max_cost"]
    assert "estimated wall time 0.02 h" in refusals[0]["message"] and "history: 1 past job" in refusals[0]["message"]
    assert "estimated cost 0.10" in refusals[1]["message"]
    ok_spec = _spec(**{"limits.max_cost": 1.0})
    checks, refusals = check_limits(ok_spec, estimate(ok_spec, [_row(ok_spec, "a", 1000.0, 5.0)], pricing=PRICED), True)
    assert refusals == [] and [c.result for c in checks] == ["ok", "ok"]


def test_an_unknown_estimate_never_blocks_but_says_so() -> None:
    spec = _spec(**{"limits.max_hours": 0.001, "limits.max_cost": 0.0})
    checks, refusals = check_limits(spec, estimate(spec, [], pricing=PRICED), priced=True)
    assert refusals == []
    assert [c.result for c in checks] == ["unchecked", "unchecked"]
    assert checks[0].message.startswith("could not check limits.max_hours")


def test_a_budget_without_prices_is_refused() -> None:
    spec = _spec(**{"limits.max_cost": 10.0})
    _, refusals = check_limits(spec, estimate(spec), priced=False)
    assert refusals[0]["field"] == "limits.max_cost" and "TRAINCTL_PRICES" in refusals[0]["message"]


@pytest.mark.parametrize(
    ("node_types", "prices", "says"),
    [
        (
            '{"g": {"cpus": 4}}',
            '{"g": -1}',
            "TRAINCTL_PRICES['g']: a price per node-hour must be a number >= 0, got -1",
        ),
        ('{"g": {"cpus": 4}}', '{"g": "1.0"}', "TRAINCTL_PRICES['g']: a price per node-hour must be a number >= 0"),
        ('{"g": {"cpus": 4}}', '{"h": 1}', "TRAINCTL_PRICES['h']: unknown node type (TRAINCTL_NODE_TYPES defines g)"),
        ("", '{"h": 1}', "TRAINCTL_PRICES['h']: unknown node type (TRAINCTL_NODE_TYPES defines none"),
        ('{"g": {"cpus": 0}}', "", "TRAINCTL_NODE_TYPES['g'].cpus: Input should be greater than 0"),
        ('{"g": {"cpus": 1, "gpu": 1}}', "", "TRAINCTL_NODE_TYPES['g'].gpu: Extra inputs are not permitted"),
        ("[1]", "", "TRAINCTL_NODE_TYPES must be a JSON object"),
        ("/nonexistent/types.json", "", "TRAINCTL_NODE_TYPES: neither JSON nor a readable file"),
    ],
)
def test_bad_pricing_settings_name_the_setting(node_types: str, prices: str, says: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(says)):
        Settings(node_types=node_types, prices=prices)


def test_pricing_settings_from_json_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "prices.json").write_text('{"gpu.1xa10g": 1.01}')
    s = Settings(
        node_types='{"gpu.1xa10g": {"cpus": 4, "gpus": 1, "device": "NVIDIA A10G"}}',
        prices=str(tmp_path / "prices.json"),
    )
    assert s.pricing.prices == {"gpu.1xa10g": 1.01}
    assert s.pricing.node_types["gpu.1xa10g"].device == "NVIDIA A10G"
    assert s.pricing.sources == ("TRAINCTL_NODE_TYPES", "TRAINCTL_PRICES")
    assert Settings().pricing.sources == ()
