"""The CUDA-only code paths, tested where a CPU can (issue 23): what they decide (trainer/device_settings.py)
and that every tensor a step creates is on the model's device, not on whatever torch defaults to."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer import device_settings as ds
from trainer import step
from trainer.data import Dataset, DeviceData
from trainer.precision import Numerics
from trainer.spec import COMPILE_MODES, JobSpec, resolve

CPU = torch.device("cpu")
TINY = {"model.widths": [4, 8], "model.blocks": [1, 1], "model.se_reduction": 2, "optim.batch_size": 8}


def spec(**overrides: object) -> JobSpec:
    return resolve("debug", {"optim.epochs": 1, "scaling.num_workers": 1, **TINY, **overrides})


def dataset(n: int) -> Dataset:
    g = torch.Generator().manual_seed(n)
    return Dataset(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10)


def test_compile_modes_and_what_runs_on_each_device():
    assert COMPILE_MODES == ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead")
    assert ds.compile_plan("off", "cuda").kwargs is None
    for mode in COMPILE_MODES[1:]:
        plan = ds.compile_plan(mode, "cuda")
        assert plan.mode == mode and plan.kwargs == {"mode": mode} and plan.note == ""
    # reduce-overhead is CUDA graphs: off CUDA the run compiles as default, and says so
    cpu = ds.compile_plan("reduce-overhead", "cpu")
    assert cpu.kwargs == {"mode": "default"} and "no CUDA graphs on cpu" in cpu.note
    assert ds.compile_plan("max-autotune-no-cudagraphs", "cpu").kwargs == {"mode": "max-autotune-no-cudagraphs"}


def test_old_boolean_compile_specs_still_load():
    assert JobSpec(compile=True).compile == "default" and JobSpec(compile=False).compile == "off"
    assert JobSpec.model_validate_json('{"compile": true}').compile == "default"
    with pytest.raises(ValueError, match="reduce-overhead"):
        JobSpec(compile="fastest")


def test_cudnn_autotuning_and_tf32_only_on_cuda():
    assert ds.backend_flags("cuda") == ds.BackendFlags(cudnn_benchmark=True, matmul_precision="high")
    assert ds.backend_flags("cpu") == ds.BackendFlags(cudnn_benchmark=False, matmul_precision="highest")


def test_apply_backend_flags_sets_torch_and_build_leaves_a_cpu_process_alone(monkeypatch):
    before = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    try:
        ds.apply_backend_flags(ds.backend_flags("cuda"))
        assert torch.backends.cudnn.benchmark is True and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.set_float32_matmul_precision(before[1])
    applied = []
    monkeypatch.setattr(step, "apply_backend_flags", applied.append)
    step.build(spec(), CPU, 1)
    assert applied == []  # a CPU run (tests, offline evaluation) keeps torch's defaults


def test_nccl_between_gpus_gloo_between_cpus():
    assert ds.process_group_backend(use_gpu=True) == "nccl"
    assert ds.process_group_backend(use_gpu=False) == "gloo"


def test_pinned_copies_only_towards_a_gpu():
    assert ds.pin_host_memory("cuda") and not ds.pin_host_memory("cpu")
    t = torch.arange(4)
    assert ds.to_device(t, CPU) is t  # nothing to copy, nothing pinned


def test_ddp_options_are_accepted_by_ddp():
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    options = ds.ddp_options()
    assert options == {"gradient_as_bucket_view": True}
    assert set(options) <= set(inspect.signature(DistributedDataParallel).parameters)
    # the two-rank test of tests/trainer/test_step.py trains through DDP with these options


def test_bf16_autocast_trains_fp32_weights_without_a_grad_scaler(monkeypatch):
    def no_scaler(*args: object, **kwargs: object) -> None:
        raise AssertionError("bf16 has fp32's exponent range: no loss scaling")

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", no_scaler)
    s = spec()
    train = DeviceData(dataset(16), CPU, False)
    trainee = step.build(s, CPU, 2, numerics=Numerics("bf16", False))
    assert trainee.amp_dtype == torch.bfloat16
    conv_out = []
    conv = next(m for m in trainee.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: conv_out.append(o.dtype))
    sums = step.train_epoch(trainee, train, s.optim, step.RankContext.single(8), epoch=1, seed=0)
    assert conv_out and set(conv_out) == {torch.bfloat16}  # the convolutions ran in bf16
    assert sums.dtype == torch.float32 and torch.isfinite(sums).all()
    for p in trainee.model.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32


class OffDevice(TorchDispatchMode):
    """Records every op that touches a tensor off `device` (with torch's default device set to `meta`, a
    tensor created without an explicit device lands there, so this is every such creation and its uses)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.off = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        devices = {t.device for t in flat if isinstance(t, torch.Tensor)}
        if devices - {self.device}:
            self.off.append((str(func), sorted(map(str, devices))))
        return out


@pytest.mark.parametrize("augment", [False, True], ids=["crop-flip", "autoaugment-erasing"])
def test_every_tensor_a_step_creates_is_on_the_models_device(augment):
    s = spec(
        **{"data.augment.autoaugment": augment, "data.augment.random_erasing": augment, "data.test_every_epochs": 1}
    )
    splits = step.Splits(
        DeviceData(dataset(16), CPU, False, s.data.augment), *(DeviceData(dataset(8), CPU, False),) * 2
    )
    trainee = step.build(s, CPU, 2)
    # the check can fail: a factory call without a device is caught
    with torch.device("meta"), OffDevice(CPU) as probe:
        torch.zeros(3) + torch.ones(3, device=CPU).sum()
    assert probe.off, "the probe must see a tensor created without a device"
    with torch.device("meta"), OffDevice(CPU) as check:
        metrics = step.run_epoch(trainee, s, splits, step.RankContext.single(8), epoch=1, start_epoch=1)
    assert check.off == [] and metrics.test_acc is not None


@pytest.mark.slow  # inductor compiles C++ for the CPU: about a minute on the 2-core dev machine
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_tiny_model_trains_and_records_the_mode_that_ran(mode):
    s = spec(**{"compile": mode})
    splits = step.Splits(DeviceData(dataset(16), CPU, False), DeviceData(dataset(8), CPU, False))
    trainee = step.build(s, CPU, 2, numerics=Numerics("fp32", False))
    assert trainee.forward is not trainee.model  # compiled
    metrics = step.run_epoch(trainee, s, splits, step.RankContext.single(8), epoch=1, start_epoch=1)
    assert metrics.numerics is not None and metrics.numerics.compile == "default"  # no CUDA graphs on a CPU
    assert torch.isfinite(torch.tensor(metrics.train_loss))
