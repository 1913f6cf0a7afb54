"""precision/channels_last `auto` (trainer/precision.py) and the device names (trainer/hardware.py), on CPU."""

from __future__ import annotations

import pytest
import torch

from trainer import hardware, precision
from trainer.model import build_model
from trainer.precision import Numerics, choose_numerics, measure
from trainer.spec import resolve

CPU = torch.device("cpu")
XEON_AVX512_BF16 = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6338\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
SAPPHIRE_RAPIDS = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
OLD_XEON = "model name\t: Intel(R) Xeon(R) CPU E5-2686 v4\nflags\t\t: fpu avx2 fma\n"


def tiny(**overrides):
    return resolve("debug", {"optim.batch_size": 16, **overrides})


def images(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


def test_cpu_bf16_features_from_cpuinfo():
    assert hardware.cpu_bf16_feature(SAPPHIRE_RAPIDS) == "AMX"
    assert hardware.cpu_bf16_feature(XEON_AVX512_BF16) == "AVX512-BF16"
    assert hardware.cpu_bf16_feature(GRAVITON3) == "Arm BF16"
    assert hardware.cpu_bf16_feature(OLD_XEON) is None
    assert hardware.cpu_model(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8480+"


def test_cpu_device_is_named_with_threads_and_bf16_support(monkeypatch):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: SAPPHIRE_RAPIDS)
    threads = torch.get_num_threads()
    assert hardware.describe_device(CPU) == f"cpu ({threads} threads, bf16 AMX) Intel(R) Xeon(R) Platinum 8480+"
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: OLD_XEON)
    assert "no native bf16" in hardware.describe_device(CPU)


def test_explicit_settings_are_not_measured(monkeypatch):
    monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("measured although nothing to choose"))
    model = build_model(tiny().model)
    x, y = images()
    n = choose_numerics(tiny(precision="fp32", channels_last=False), CPU, model, x, y, 16)
    assert (n.precision, n.channels_last, n.chosen_by, n.images_per_s) == ("fp32", False, "spec", {})
    n = choose_numerics(tiny(precision="bf16", channels_last=True), CPU, model, x, y, 16)
    assert (n.precision, n.channels_last, n.amp_dtype) == ("bf16", True, torch.bfloat16)


@pytest.mark.parametrize(
    "rates, expected",
    [
        # issue 15's Xeon with AVX512-BF16 but no AMX: bf16 is the slower path there, so auto must not take it
        ({("bf16", True): 94.0, ("bf16", False): 90.0, ("fp32", True): 125.0, ("fp32", False): 120.0}, ("fp32", True)),
        # AMD EPYC (this project's dev machine): bf16 about 1.7x faster
        (
            {("bf16", True): 174.0, ("bf16", False): 168.0, ("fp32", True): 110.0, ("fp32", False): 102.0},
            ("bf16", True),
        ),
        # a CPU where NCHW wins
        ({("bf16", True): 100.0, ("bf16", False): 130.0, ("fp32", True): 90.0, ("fp32", False): 95.0}, ("bf16", False)),
    ],
)
def test_auto_takes_the_fastest_measured_candidate(monkeypatch, rates, expected):
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: "AVX512-BF16")
    seen = []

    def fake_measure(model, device, imgs, labels, batch, which, rounds=2):
        seen.append((batch, sorted(which)))
        return {k: rates[k] for k in which}

    monkeypatch.setattr(precision, "measure", fake_measure)
    x, y = images()
    n = choose_numerics(tiny(precision="auto"), CPU, build_model(tiny().model), x, y, 16)
    assert (n.precision, n.channels_last, n.chosen_by) == (*expected, "measured")
    assert seen == [(16, sorted(rates))]  # the job's local batch, every candidate
    assert n.images_per_s == {precision.label(p, c): r for (p, c), r in rates.items()}


def test_without_native_bf16_only_fp32_layouts_are_timed(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: None)
    monkeypatch.setattr(
        precision, "measure", lambda model, device, imgs, labels, batch, which, rounds=2: {k: 1.0 + k[1] for k in which}
    )
    x, y = images()
    n = choose_numerics(tiny(precision="auto"), CPU, build_model(tiny().model), x, y, 16)
    assert (n.precision, n.channels_last, set(n.images_per_s)) == ("fp32", True, {"fp32", "fp32+channels_last"})


def test_measuring_times_every_candidate_and_leaves_the_model_alone():
    model = build_model(tiny().model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    x, y = images(5)  # fewer images than the batch: repeated to fill it
    which = [("fp32", False), ("fp32", True), ("bf16", True)]
    rates = measure(model, CPU, x, y, 16, which, rounds=1)
    assert set(rates) == set(which) and all(r > 0 for r in rates.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # the run's dropout draws are not shifted


def test_numerics_round_trip_and_describe():
    n = Numerics("bf16", True, "measured", {"bf16+channels_last": 174.0, "fp32": 102.0})
    assert Numerics.from_dict(n.to_dict()) == n
    assert n.describe() == "bf16 + channels_last (measured: bf16+channels_last 174.0, fp32 102.0 img/s)"


def test_offline_evaluation_uses_the_recorded_numerics():
    from trainer.evaluate import checkpoint_numerics

    spec = tiny(precision="auto")
    recorded = checkpoint_numerics({"numerics": {"precision": "fp32", "channels_last": False}}, spec, CPU)
    assert (recorded.precision, recorded.channels_last) == ("fp32", False)
    old = checkpoint_numerics({}, tiny(precision="fp32"), CPU)  # written before numerics were recorded
    assert (old.precision, old.channels_last, old.chosen_by) == ("fp32", True, "rule")
