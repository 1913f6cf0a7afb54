"""No host sync per training step (issue 23): the training loop, the evaluation pass and the batched
augmentation read the device a fixed number of times per epoch, whatever the number of steps. Counted on a
CPU with tests/trainer/syncs.py; a tiny model and batches of 8, so each test takes about a second."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.syncs import HostSyncCounter
from trainer import step
from trainer.augment import BatchedAutoAugment
from trainer.data import Dataset, DeviceData
from trainer.spec import JobSpec, resolve

CPU = torch.device("cpu")
BATCH = 8
TINY = {"model.widths": [4, 8], "model.blocks": [1, 1], "model.se_reduction": 2, "optim.batch_size": BATCH}


def spec(**overrides: object) -> JobSpec:
    return resolve("debug", {"optim.epochs": 1, "scaling.num_workers": 1, **TINY, **overrides})


def dataset(n: int) -> Dataset:
    g = torch.Generator().manual_seed(n)
    return Dataset(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.arange(6.0)
    with HostSyncCounter() as c:
        t.sum().item()
        float(t[0])
        bool(t[1] > 0)
        t.tolist()
        t.cpu()
        t.nonzero()
        t[t > 2]
        torch.unique(t)
        t.repeat_interleave(torch.tensor([1, 1, 1, 1, 1, 1]))
        t.repeat_interleave(torch.tensor([1, 1, 1, 1, 1, 1]), output_size=6)  # shape given: no read
    assert c.total == 9, c.seen
    assert "cpu" in dir(torch.Tensor) and "tolist" not in torch.Tensor.__dict__  # restored


def train_reads(s: JobSpec, steps: int) -> HostSyncCounter:
    train = DeviceData(dataset(steps * BATCH), CPU, False, s.data.augment)
    trainee = step.build(s, CPU, train.steps_per_epoch(BATCH, 1))
    with HostSyncCounter() as c:
        step.train_epoch(trainee, train, s.optim, step.RankContext.single(BATCH), epoch=1, seed=0)
    return c


@pytest.mark.parametrize(
    ("augment", "per_epoch"),
    [({}, 0), ({"data.augment.autoaugment": True, "data.augment.random_erasing": True}, 1)],
    ids=["crop-flip", "autoaugment-erasing"],
)
def test_training_steps_never_read_the_device(augment, per_epoch):
    s = spec(**{"optim.label_smoothing": 0.2, **augment})
    two, six = train_reads(s, 2), train_reads(s, 6)
    assert two.seen == six.seen, (two.seen, six.seen)  # nothing per step
    assert two.total == per_epoch, two.seen  # AutoAugment: its epoch plan's one read of the group sizes


def test_evaluation_batches_never_read_the_device(monkeypatch):
    monkeypatch.setattr(step, "EVAL_BATCH", BATCH)
    s = spec()
    trainee = step.build(s, CPU, 1)
    counts = []
    for batches in (2, 6):
        data = DeviceData(dataset(batches * BATCH), CPU, False)
        with HostSyncCounter() as c:
            sums = step.evaluate(trainee, data, step.RankContext.single(BATCH), label_smoothing=0.1)
        counts.append(c.seen)
        assert sums.shape == (3,) and float(sums[2]) == batches * BATCH
    assert counts == [{}, {}], counts


def test_an_epoch_reads_the_device_once_for_its_metrics(monkeypatch):
    monkeypatch.setattr(step, "EVAL_BATCH", BATCH)
    s = spec(**{"data.augment.autoaugment": True})
    counts = []
    for steps in (2, 6):
        splits = step.Splits(
            DeviceData(dataset(steps * BATCH), CPU, False, s.data.augment),
            DeviceData(dataset(steps * BATCH), CPU, False),
        )
        trainee = step.build(s, CPU, splits.train.steps_per_epoch(BATCH, 1))
        with HostSyncCounter() as c:
            metrics = step.run_epoch(trainee, s, splits, step.RankContext.single(BATCH), epoch=1, start_epoch=1)
        counts.append(c.seen)
        assert metrics.val_loss is not None
    # the AutoAugment plan's group sizes, and epoch_metrics' one read of every split's sums
    assert counts[0] == counts[1] == {"Tensor.tolist": 2}, counts


def test_augmentation_reads_the_device_once_an_epoch_not_once_a_batch():
    s = spec(**{"data.augment.autoaugment": True, "data.augment.random_erasing": True, "data.augment.erasing_p": 1.0})
    counts = []
    for batches in (2, 6):
        data = DeviceData(dataset(batches * BATCH), CPU, False, s.data.augment)
        with HostSyncCounter() as c:
            out = list(data.train_batches(1, 0, 0, 1, BATCH))
        counts.append(c.seen)
        assert len(out) == batches
    assert counts == [{"Tensor.tolist": 1}] * 2, counts
    # Without an epoch's plan (one batch on its own) the grouping reads once per call: why the loop plans.
    aa = BatchedAutoAugment(CPU)
    gen = torch.Generator().manual_seed(0)
    with HostSyncCounter() as c:
        aa(dataset(BATCH).images, gen)
    assert c.total == 1, c.seen
