"""The training step without Ray: one rank (and two, over gloo) on CPU, in seconds."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer import contract, step
from trainer.contract import CheckpointEntry, EpochMetrics
from trainer.data import Dataset, DeviceData
from trainer.device_settings import ddp_options
from trainer.spec import JobSpec, resolve

CPU = torch.device("cpu")
METRICS = EpochMetrics(
    epoch=1,
    train_loss=2.0,
    train_acc=0.1,
    val_loss=2.0,
    val_acc=0.1,
    lr=0.05,
    images_per_s=1.0,
    epoch_seconds=1.0,
    time=0.0,
)


def spec(**overrides: object) -> JobSpec:
    return resolve("debug", {"optim.batch_size": 32, "optim.epochs": 3, "scaling.num_workers": 1, **overrides})


def dataset(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    # a learnable signal: each class brightens its own band of rows
    images = torch.randint(0, 100, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        images[i, :, 3 * c : 3 * c + 3, :] = 250
    return Dataset(images, labels)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical results between runs
    yield
    torch.set_num_threads(threads)


def fit(
    s: JobSpec, epochs: range, trainee: step.Trainee | None = None, start_epoch: int = 1
) -> tuple[step.Trainee, list[EpochMetrics]]:
    train, val = DeviceData(dataset(192, 1), CPU, False), DeviceData(dataset(64, 2), CPU, False)
    trainee = trainee or step.build(s, CPU, train.steps_per_epoch(s.optim.batch_size, 1))
    ctx = step.RankContext.single(s.optim.batch_size, "n")
    out = [step.run_epoch(trainee, s, step.Splits(train, val), ctx, epoch=e, start_epoch=start_epoch) for e in epochs]
    return trainee, out


def test_an_epoch_trains_and_reports_every_metric():
    s = spec(**{"optim.lr": 0.1})
    trainee, metrics = fit(s, range(1, 4))
    assert [m.epoch for m in metrics] == [1, 2, 3]
    last = metrics[-1]
    assert metrics[-1].train_loss < metrics[0].train_loss  # it learns the row bands
    assert 0.0 <= last.val_acc <= 1.0 and last.val_loss is not None and math.isfinite(last.val_loss)
    assert last.lr == pytest.approx(0.1) and last.images_per_s > 0 and last.node_ids == ["n"]
    assert last.epoch_seconds > 0 and 0.0 <= last.train_acc <= 1.0
    assert not any(m.resumed for m in metrics)
    assert trainee.scheduler.last_epoch == 3 * 6  # one scheduler step per batch: 192 images / 32


def test_no_validation_split_gives_null_loss_and_zero_accuracy():
    s = spec()
    train, empty = DeviceData(dataset(64, 1), CPU, False), DeviceData(dataset(0, 2), CPU, False)
    trainee = step.build(s, CPU, train.steps_per_epoch(32, 1))
    m = step.run_epoch(trainee, s, step.Splits(train, empty), step.RankContext.single(32, "n"), epoch=1, start_epoch=1)
    assert m.val_loss is None and m.val_acc == 0.0
    assert '"val_loss":null' in contract.metrics_jsonl([m])  # JSON has no NaN


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    s = spec()
    straight, straight_metrics = fit(s, range(1, 4))
    first, first_metrics = fit(s, range(1, 2))
    sha, _ = ckpt.save(step.checkpoint_state(first, s, 1, first_metrics[-1]), str(tmp_path))
    state = ckpt.load(str(tmp_path), sha)
    assert state["epoch"] == 1 and JobSpec.model_validate_json(state["spec"]) == s
    assert state["metrics"] == first_metrics[-1].scalars() and "node_ids" not in state["metrics"]

    fresh = step.build(s, CPU, 6)
    start = step.restore(fresh, state)
    assert start == 2
    resumed, resumed_metrics = fit(s, range(start, 4), trainee=fresh, start_epoch=start)
    assert [m.resumed for m in resumed_metrics] == [True, False]
    for a, b in zip(straight.raw_model.state_dict().values(), resumed.raw_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight_metrics[1:], resumed_metrics, strict=True):
        assert (a.train_loss, a.val_acc, a.lr) == (b.train_loss, b.val_acc, b.lr)


def test_a_weight_average_is_evaluated_checkpointed_and_resumes_exactly(tmp_path):
    s = spec(**{"optim.ema_decay": 0.9, "optim.lr": 0.1})
    straight, straight_metrics = fit(s, range(1, 4))
    assert straight.average is not None and straight.eval_model is straight.average.model
    live, averaged = straight.raw_model.state_dict(), straight.average.model.state_dict()
    assert not torch.equal(live["classifier.weight"], averaged["classifier.weight"])  # an average, not a copy
    assert torch.equal(live["stem.1.num_batches_tracked"], averaged["stem.1.num_batches_tracked"])
    # the metrics are the average's: evaluating it again gives the last epoch's validation accuracy
    val = DeviceData(dataset(64, 2), CPU, False)
    correct = step.evaluate(straight, val, step.RankContext.single(32))[1].item()
    assert correct / 64 == straight_metrics[-1].val_acc

    first, first_metrics = fit(s, range(1, 2))
    state = step.checkpoint_state(first, s, 1, first_metrics[-1])
    # "model" is what was evaluated (evaluate/export/serving load it alone); the live weights resume
    assert torch.equal(state["model"]["classifier.weight"], first.average.model.state_dict()["classifier.weight"])
    assert torch.equal(state["train_model"]["classifier.weight"], first.raw_model.state_dict()["classifier.weight"])
    sha, _ = ckpt.save(state, str(tmp_path))
    fresh = step.build(s, CPU, 6)
    start = step.restore(fresh, ckpt.load(str(tmp_path), sha))
    resumed, resumed_metrics = fit(s, range(start, 4), trainee=fresh, start_epoch=start)
    for model in ("raw_model", "eval_model"):
        mine, theirs = getattr(straight, model).state_dict(), getattr(resumed, model).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), model
    assert [m.val_acc for m in straight_metrics[1:]] == [m.val_acc for m in resumed_metrics]


def test_the_weight_average_ramps_up_its_decay():
    average = step.build(spec(**{"optim.ema_decay": 0.99}), CPU, 1).average
    assert average is not None
    assert average.decay_at(0) == pytest.approx(0.1) and average.decay_at(90) == pytest.approx(0.91)
    assert average.decay_at(10_000) == 0.99
    assert step.build(spec(), CPU, 1).average is None  # off by default


def test_norm_and_bias_can_be_left_out_of_weight_decay():
    s = spec(**{"optim.decay_norm_and_bias": False, "optim.weight_decay": 5e-4})
    trainee = step.build(s, CPU, 1)
    decayed, plain = trainee.optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(trainee.raw_model.parameters()))
    fit(s, range(1, 2), trainee=trainee)  # each epoch sets the epoch's decay: the plain group keeps none
    assert [g["weight_decay"] for g in trainee.optimizer.param_groups] == [5e-4, 0.0]
    (group,) = step.build(spec(), CPU, 1).optimizer.param_groups  # the default: one group, all decayed
    assert group["weight_decay"] == spec().optim.weight_decay


def test_restore_without_a_checkpoint_starts_at_epoch_one():
    assert step.restore(step.build(spec(), CPU, 1), None) == 1


def test_newest_state_prefers_a_newer_verified_manifest_entry(tmp_path):
    s = spec()
    trainee = step.build(s, CPU, 1)
    run = tmp_path / "run"
    entries = {}
    for epoch in (1, 2):
        d = run / f"epoch_{epoch:04d}"
        d.mkdir(parents=True)
        sha, size = ckpt.save(step.checkpoint_state(trainee, s, epoch, METRICS), str(d))
        entries[epoch] = CheckpointEntry(epoch=epoch, val_acc=0.1, uri=str(d / ckpt.FILENAME), sha256=sha, size=size)
        ckpt.record(str(tmp_path), entries[epoch], keep_best=5)
    ray_state = ckpt.load(entries[1].uri)
    assert step.newest_state(ray_state, str(tmp_path))["epoch"] == 2  # Ray's snapshot lagged one epoch
    assert step.newest_state(None, str(tmp_path))["epoch"] == 2
    (run / "epoch_0002" / ckpt.FILENAME).write_bytes(b"torn upload")
    assert step.newest_state(ray_state, str(tmp_path))["epoch"] == 1  # checksum mismatch: not trusted
    assert step.newest_state(None, str(tmp_path / "nothing-here")) is None


def _two_ranks(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from torch.nn.parallel import DistributedDataParallel

        s = spec(**{"optim.batch_size": 64})
        train, val = DeviceData(dataset(192, 1), CPU, False), DeviceData(dataset(64, 2), CPU, False)
        ddp = functools.partial(DistributedDataParallel, **ddp_options())  # as loop.py wraps through Ray
        trainee = step.build(s, CPU, train.steps_per_epoch(32, 2), wrap=ddp)
        ctx = step.RankContext(rank, 2, 32, ("a", "b"))
        m = step.run_epoch(trainee, s, step.Splits(train, val), ctx, epoch=1, start_epoch=1)
        buffers = [b.clone() for b in trainee.raw_model.buffers()]
        torch.save({"metrics": m.model_dump(), "buffers": buffers}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned Pythons importing torch
def test_two_ranks_agree_on_metrics_and_batchnorm_stats(tmp_path):
    # spawn, not fork: once autograd has run in this process (any earlier test that trained), a forked child
    # cannot run backward ("Unable to handle autograd's threading in combination with fork"). Costs ~20 s.
    torch.multiprocessing.start_processes(
        _two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [r0["metrics"][k] for k in keys] == [r1["metrics"][k] for k in keys]
    # each rank saw half the images: the all-reduced counts cover all of them
    assert r0["metrics"]["images_per_s"] > 0
    assert all(torch.equal(a, b) for a, b in zip(r0["buffers"], r1["buffers"], strict=True))


def test_the_test_split_is_evaluated_every_n_epochs_with_the_training_criterion():
    s = spec(**{"data.test_every_epochs": 2, "optim.epochs": 3, "optim.label_smoothing": 0.1})
    train, val, test = (DeviceData(dataset(n, seed), CPU, False) for n, seed in ((192, 1), (64, 2), (48, 3)))
    trainee = step.build(s, CPU, train.steps_per_epoch(32, 1))
    ctx = step.RankContext.single(32, "n")
    metrics = [
        step.run_epoch(trainee, s, step.Splits(train, val, test), ctx, epoch=e, start_epoch=1) for e in range(1, 4)
    ]
    # every 2nd epoch, and the last (the figure the paper reports)
    assert [m.test_acc is not None for m in metrics] == [False, True, True]
    assert metrics[0].test_loss is None
    last = metrics[-1]
    # test_loss is the label-smoothed criterion train_loss uses (Figure 1 compares the two)
    plain = step.evaluate(trainee, test, ctx)
    smoothed = step.evaluate(trainee, test, ctx, label_smoothing=0.1)
    assert last.test_loss == pytest.approx(float(smoothed[0] / smoothed[2]))
    assert last.test_loss != pytest.approx(float(plain[0] / plain[2]))
    assert last.test_acc == pytest.approx(float(plain[1] / plain[2]))
    never = spec(**{"data.test_every_epochs": 0})
    assert not step.tests_this_epoch(never.data, never.optim, 3)  # 0: never


def test_weight_decay_milestone_applies_from_its_epoch():
    s = spec(
        **{
            "optim.weight_decay": 1e-3,
            "optim.weight_decay_milestones": {"2": 1e-4},
            "optim.fresh_momentum_at_milestones": True,
            "optim.momentum": 0.9,
        }
    )
    train, val = DeviceData(dataset(64, 1), CPU, False), DeviceData(dataset(32, 2), CPU, False)
    trainee = step.build(s, CPU, train.steps_per_epoch(32, 1))
    seen = []
    for e in (1, 2):
        step.run_epoch(trainee, s, step.Splits(train, val), step.RankContext.single(32), epoch=e, start_epoch=1)
        seen.append(trainee.optimizer.param_groups[0]["weight_decay"])
    assert seen == [1e-3, 1e-4]


def test_an_epoch_trains_under_autoaugment_and_erasing():
    s = spec(**{"data.augment.autoaugment": True, "data.augment.random_erasing": True, "optim.epochs": 1})
    train = DeviceData(dataset(96, 1), CPU, False, s.data.augment)
    val = DeviceData(dataset(32, 2), CPU, False)
    trainee = step.build(s, CPU, train.steps_per_epoch(32, 1))
    m = step.run_epoch(trainee, s, step.Splits(train, val), step.RankContext.single(32), epoch=1, start_epoch=1)
    assert math.isfinite(m.train_loss) and m.images_per_s > 0


def test_a_paced_rank_sleeps_after_every_optimizer_step(monkeypatch):
    """contract.STEP_PAUSE_ENV (tests only): a pause after each of the epoch's 6 steps, and none unpaced."""
    s = spec()
    train = DeviceData(dataset(192, 1), CPU, False)
    trainee = step.build(s, CPU, train.steps_per_epoch(s.optim.batch_size, 1))
    pauses: list[float] = []
    monkeypatch.setattr(step.time, "sleep", pauses.append)
    unpaced = step.RankContext.single(s.optim.batch_size)
    step.train_epoch(trainee, train, s.optim, unpaced, epoch=1, seed=0)
    assert pauses == []
    paced = step.RankContext(0, 1, s.optim.batch_size, step_pause_s=0.25)
    step.train_epoch(trainee, train, s.optim, paced, epoch=2, seed=0)
    assert pauses == [0.25] * 6 and trainee.scheduler.last_epoch == 12


@pytest.mark.parametrize("value", ["", " ", "0", "0.25", "10"])
def test_the_step_pause_reads_seconds(value):
    expected = float(value) if value.strip() else 0.0
    assert contract.step_pause_s({contract.STEP_PAUSE_ENV: value}) == expected
    assert contract.step_pause_s({}) == 0.0


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "10.5"])
def test_a_bad_step_pause_is_refused_naming_the_variable(value):
    with pytest.raises(ValueError, match=f"{contract.STEP_PAUSE_ENV}=.*seconds between 0 and 10"):
        contract.step_pause_s({contract.STEP_PAUSE_ENV: value})
