"""The worker-placement rules (trainer/placement.py) over fake cluster resource maps."""

import pytest

from trainer.placement import PlacementError, resolve_placement
from trainer.spec import resolve

CPU_ONLY = [{"CPU": 4.0, "memory": 1e9}]
ONE_GPU = [{"CPU": 2.0}, {"CPU": 16.0, "GPU": 1.0}]  # CPU head + one GPU node
FOUR_GPUS = [{"CPU": 2.0}, {"CPU": 32.0, "GPU": 4.0}]
SIXTEEN_GPUS = [{"CPU": 2.0}] + [{"CPU": 49.0, "GPU": 8.0}] * 2


def place(nodes, batch_size=512, available_cpus=None, **scaling):
    spec = resolve("paper", {"optim.batch_size": batch_size, **{f"scaling.{k}": v for k, v in scaling.items()}})
    return resolve_placement(spec.scaling, spec.optim.batch_size, nodes, available_cpus)


def test_defaults_are_auto():
    spec = resolve("paper")
    assert (spec.scaling.num_workers, spec.scaling.max_workers, spec.scaling.use_gpu, spec.scaling.cpus_per_worker) == (
        "auto",
        8,
        None,
        "auto",
    )


def test_no_gpu_one_cpu_worker_with_the_cpus_it_can_get():
    p = place(CPU_ONLY)
    assert (p.num_workers, p.use_gpu, p.cpus_per_worker) == (1, False, 3.0)  # unknown: one left to the driver
    assert "no GPU" in p.reason
    assert place(CPU_ONLY, available_cpus=4.0).cpus_per_worker == 4.0  # bare trainer.run: every CPU
    assert place(CPU_ONLY, available_cpus=3.5).cpus_per_worker == 3.0  # a Ray Job's driver holds 0.5
    assert place([{"CPU": 4.0}, {"CPU": 8.0}], available_cpus=12.0).cpus_per_worker == 8.0  # one node's worth


def test_one_gpu_the_paper_preset_trains_on_it():
    p = place(ONE_GPU)
    assert (p.num_workers, p.use_gpu, p.cpus_per_worker) == (1, True, 8.0)  # 15 per GPU, capped at 8


def test_four_gpus_one_worker_each():
    p = place(FOUR_GPUS)
    assert (p.num_workers, p.use_gpu, p.cpus_per_worker) == (4, True, 7.0)  # (32 - 1) / 4


def test_auto_is_capped_by_max_workers():
    assert place(SIXTEEN_GPUS).num_workers == 8
    assert place(SIXTEEN_GPUS, max_workers=2).num_workers == 2
    assert place(SIXTEEN_GPUS, max_workers=16).num_workers == 16


def test_auto_keeps_the_global_batch_divisible():
    p = place([{"CPU": 8.0, "GPU": 3.0}], batch_size=512)
    assert p.num_workers == 2 and "divide optim.batch_size=512" in p.reason
    assert place([{"CPU": 8.0, "GPU": 3.0}], batch_size=384).num_workers == 3


def test_fewer_gpus_than_asked_is_an_error_naming_num_workers():
    with pytest.raises(PlacementError) as info:
        place(ONE_GPU, num_workers=2)
    assert info.value.field == "scaling.num_workers"
    assert "2 workers" in str(info.value) and "1 GPU" in str(info.value)
    with pytest.raises(PlacementError):
        place(FOUR_GPUS, num_workers=8)


def test_explicit_workers_within_the_gpus():
    p = place(FOUR_GPUS, num_workers=2)
    assert (p.num_workers, p.use_gpu, p.cpus_per_worker) == (2, True, 7.0)


def test_use_gpu_true_waits_for_the_autoscaler_instead_of_failing():
    p = place(CPU_ONLY, use_gpu=True)
    assert (p.num_workers, p.use_gpu) == (1, True) and "waiting for 1 more GPU" in p.reason
    p = place(ONE_GPU, use_gpu=True, num_workers=4)
    assert (p.num_workers, p.use_gpu) == (4, True) and "waiting for 3 more GPU" in p.reason


def test_use_gpu_false_trains_on_cpus_even_with_gpus():
    p = place(FOUR_GPUS, use_gpu=False)
    assert (p.num_workers, p.use_gpu, p.cpus_per_worker) == (1, False, 31.0)
    p = place(FOUR_GPUS, use_gpu=False, num_workers=2)
    assert (p.num_workers, p.use_gpu, p.cpus_per_worker) == (2, False, 15.0)


def test_explicit_cpus_and_cpu_workers_without_gpus():
    p = place(CPU_ONLY, num_workers=2, cpus_per_worker=1)
    assert (p.num_workers, p.use_gpu, p.cpus_per_worker) == (2, False, 1.0)
    assert place([{"CPU": 1.0}]).cpus_per_worker == 1.0  # never 0


def test_debug_preset_pins_its_small_cpu_run():
    spec = resolve("debug")
    p = resolve_placement(spec.scaling, spec.optim.batch_size, FOUR_GPUS)
    assert (p.num_workers, p.use_gpu, p.cpus_per_worker) == (2, False, 1.0)


def test_auto_values_are_validated_with_one_clear_error():
    from pydantic import ValidationError

    from trainer.spec import error_list

    for field, value in (("num_workers", 0), ("num_workers", "all"), ("cpus_per_worker", 0), ("max_workers", 0)):
        with pytest.raises(ValidationError) as info:
            resolve("paper", {f"scaling.{field}": value})
        assert [e["field"] for e in error_list(info.value)] == [f"scaling.{field}"]
