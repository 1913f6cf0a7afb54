"""Elastic workers (`scaling.num_workers: {min, max}`): the spec's checks, the placement and Ray mapping, and
the rule that keeps the recipe's meaning when the worker count changes (docs/scaling.md, "Elastic workers"):
the global batch is fixed, so the images of each optimizer step, the steps per epoch and with them the lr
schedule's position are the same at every world size in [min, max]. Pure unit tests: no Ray cluster."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from trainer import step
from trainer.contract import EpochMetrics
from trainer.data import Dataset, DeviceData
from trainer.placement import PlacementError, resolve_placement
from trainer.spec import JobSpec, WorkerRange, resolve

CPU = torch.device("cpu")


def elastic(low: int, high: int, **overrides: object) -> JobSpec:
    return resolve("debug", {"scaling.num_workers": {"min": low, "max": high}, **overrides})


def fields_of(exc: ValidationError) -> dict[str, str]:
    return {".".join(map(str, e["loc"])): e["msg"] for e in exc.errors()}


def test_elastic_range_round_trips_beside_the_int_form() -> None:
    spec = elastic(1, 2, **{"scaling.resize_interval_s": 2})
    assert spec.scaling.num_workers == WorkerRange(min=1, max=2)
    assert spec.model_dump(mode="json")["scaling"]["num_workers"] == {"min": 1, "max": 2}
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec  # what crosses into Ray
    assert resolve("debug").scaling.num_workers == 2  # the int form is unchanged
    assert resolve("debug", {"scaling.num_workers": "auto"}).scaling.num_workers == "auto"


@pytest.mark.parametrize(
    "workers,overrides,field,words",
    [
        ({"min": 0, "max": 2}, {}, "scaling.num_workers", "greater than or equal to 1"),
        ({"min": 3, "max": 2}, {"optim.batch_size": 6}, "scaling.num_workers", "min (3) must not exceed max (2)"),
        ({"min": 1}, {}, "scaling.num_workers", "max: Field required"),
        ({"min": 1, "max": 2, "step": 1}, {}, "scaling.num_workers", "step"),
        ({"min": 1, "max": 16}, {}, "scaling.num_workers.max", "scaling.max_workers=8"),
        ({"min": 1, "max": 3}, {}, "optim.batch_size", "use a multiple of 6"),  # debug's batch 64: 3 does not divide
        ({"min": 2, "max": 4}, {"optim.batch_size": 128}, "optim.batch_size", "[3] do not"),
        ({"min": 1, "max": 2}, {"scaling.workers_per_node": 2}, "scaling.workers_per_node", "must be 1"),
    ],
)
def test_bad_elastic_ranges_are_refused_naming_the_field(
    workers: dict[str, int], overrides: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(ValidationError) as info:
        resolve("debug", {"scaling.num_workers": workers, **overrides})
    errors = fields_of(info.value)
    assert field in errors and words in errors[field], errors


def test_resize_interval_is_bounded() -> None:
    with pytest.raises(ValidationError) as info:
        elastic(1, 2, **{"scaling.resize_interval_s": 0.1})
    assert "scaling.resize_interval_s" in fields_of(info.value)


def test_placement_and_ray_scaling_config_of_an_elastic_range() -> None:
    spec = elastic(1, 4, **{"optim.batch_size": 48, "scaling.cpus_per_worker": "auto", "scaling.resize_interval_s": 3})
    where = resolve_placement(spec.scaling, spec.optim.batch_size, [{"CPU": 4.0}], available_cpus=3.0)
    assert (where.min_workers, where.num_workers, where.use_gpu, where.cpus_per_worker) == (1, 4, False, 1.0)
    assert "elastic" in where.reason

    from trainer.fit import scaling_config  # imports ray.train, starts nothing

    config = scaling_config(spec, where)
    assert config.num_workers == (1, 4) and config.elasticity_enabled
    assert config.elastic_resize_monitor_interval_s == 3.0
    fixed = resolve("debug")
    assert scaling_config(fixed, resolve_placement(fixed.scaling, 64, [{"CPU": 4.0}])).num_workers == 2


def test_elastic_gpu_minimum_must_fit_the_cluster_unless_use_gpu_waits() -> None:
    spec = elastic(2, 4, **{"optim.batch_size": 48, "scaling.use_gpu": None})
    with pytest.raises(PlacementError) as info:
        resolve_placement(spec.scaling, 48, [{"CPU": 8.0, "GPU": 1.0}])
    assert info.value.field == "scaling.num_workers" and "at least 2" in str(info.value)
    where = resolve_placement(spec.scaling, 48, [{"CPU": 8.0, "GPU": 2.0}])
    assert (where.min_workers, where.num_workers, where.use_gpu) == (2, 4, True)


def _steps(data: DeviceData, batch: int, world: int, epoch: int = 1) -> list[set[int]]:
    """The images (their labels are their indices) of each optimizer step over all ranks of `world`."""
    per_rank = [
        [set(labels.tolist()) for _, labels in data.train_batches(epoch, 0, rank, world, batch // world)]
        for rank in range(world)
    ]
    assert len({len(steps) for steps in per_rank}) == 1  # every rank takes the same number of steps (DDP)
    return [set().union(*(steps[i] for steps in per_rank)) for i in range(len(per_rank[0]))]


@pytest.mark.parametrize("images", [36, 37, 48, 100, 121])
def test_each_step_sees_the_same_images_and_an_epoch_the_same_steps_at_every_world_size(images: int) -> None:
    batch = 12  # divided by 1, 2, 3, 4 and 6
    dataset = Dataset(torch.zeros(images, 3, 32, 32, dtype=torch.uint8), torch.arange(images))
    data = DeviceData(dataset, CPU, channels_last=False)
    alone = _steps(data, batch, 1)
    assert len(alone) == math.ceil(images / batch)
    for world in (2, 3, 4, 6):
        assert data.steps_per_epoch(batch // world, world) == len(alone)  # the schedule's steps per epoch
        grouped = _steps(data, batch, world)
        assert grouped[:-1] == alone[:-1], world  # the global batch of each full step: the very same images
        assert grouped[-1] >= alone[-1]  # the last one, padded to a multiple of the world size as DDP does


def _train_steps(trainee: step.Trainee, steps: int) -> None:
    for _ in range(steps):
        trainee.optimizer.step()
        trainee.scheduler.step()


def test_lr_and_schedule_position_after_a_resize_equal_a_fixed_run() -> None:
    """A run that trains 2 epochs on 1 worker, checkpoints, and resumes on 3 (an elastic resize) has, epoch
    by epoch, the lr and step count of a run that stayed on 1 worker."""
    spec = resolve(
        "debug",
        {
            "scaling.num_workers": {"min": 1, "max": 3},
            "optim.batch_size": 48,
            "optim.epochs": 5,
            "schedule.kind": "cosine_warm_restarts",
            "schedule.t0": 2,
        },
    )
    images, batch = 500, spec.optim.batch_size
    data = DeviceData(Dataset(torch.zeros(images, 3, 32, 32, dtype=torch.uint8), torch.arange(images)), CPU, False)

    def per_epoch(world: int) -> int:
        return data.steps_per_epoch(batch // world, world)

    fixed = step.build(spec, CPU, per_epoch(1))
    fixed_lrs = []
    for _ in range(spec.optim.epochs):
        _train_steps(fixed, per_epoch(1))
        fixed_lrs.append((fixed.lr, fixed.scheduler.last_epoch))

    before = step.build(spec, CPU, per_epoch(1))
    lrs = []
    for _ in range(2):
        _train_steps(before, per_epoch(1))
        lrs.append((before.lr, before.scheduler.last_epoch))
    metrics = EpochMetrics(
        epoch=2, train_loss=1, train_acc=0, val_loss=1, val_acc=0, lr=before.lr, images_per_s=1, epoch_seconds=1, time=0
    )
    state = step.checkpoint_state(before, spec, 2, metrics)
    after = step.build(spec, CPU, per_epoch(3))  # the new worker group: 3 ranks, a third of the batch each
    assert step.restore(after, state) == 3
    for _ in range(3, spec.optim.epochs + 1):
        _train_steps(after, per_epoch(3))
        lrs.append((after.lr, after.scheduler.last_epoch))
    assert lrs == fixed_lrs  # the same arithmetic on the same step counts: exactly equal
    assert len({lr for lr, _ in fixed_lrs}) > 1  # the schedule moves: a jump would show


def test_epoch_metrics_record_workers_global_batch_and_step() -> None:
    spec = resolve("debug", {"optim.batch_size": 48})
    trainee = step.build(spec, CPU, 4)
    _train_steps(trainee, 4)
    sums = step.EpochSums(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 2.0]))
    ctx = step.RankContext(0, 3, 16, ("a", "b", "c"))
    m = step.epoch_metrics(trainee, sums, ctx, epoch=1, resumed=False, train_seconds=1.0, epoch_seconds=1.0)
    assert (m.workers, m.global_batch, m.global_step) == (3, 48, 4)
