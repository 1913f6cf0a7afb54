import math

import pytest
import torch

from trainer.schedule import build_scheduler, lr_factor
from trainer.spec import ScheduleSpec


def test_warm_restarts_match_torch():
    spec = ScheduleSpec(kind="cosine_warm_restarts", t0=2, t_mult=2)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2)
    steps_per_epoch = 5
    for step in range(steps_per_epoch * 14):
        ref.step(step / steps_per_epoch)
        assert lr_factor(spec, step, steps_per_epoch, 14) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)


def test_shapes_of_other_schedules():
    assert lr_factor(ScheduleSpec(kind="constant"), 50, 10, 10) == 1.0
    cos = ScheduleSpec(kind="cosine")
    assert lr_factor(cos, 0, 10, 10) == 1.0 and lr_factor(cos, 100, 10, 10) == pytest.approx(0.0)
    one = ScheduleSpec(kind="onecycle", warmup_fraction=0.2)
    assert lr_factor(one, 0, 10, 10) == pytest.approx(1 / 25)
    assert lr_factor(one, 20, 10, 10) == pytest.approx(1.0)
    assert lr_factor(one, 100, 10, 10) == pytest.approx(0.0, abs=1e-9)


def test_scheduler_state_resumes_in_place():
    spec = ScheduleSpec(kind="cosine")
    make = lambda: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    a_opt = make()
    a = build_scheduler(a_opt, spec, 10, 5)
    for _ in range(23):
        a_opt.step()
        a.step()
    b_opt = make()
    b = build_scheduler(b_opt, spec, 10, 5)
    b.load_state_dict(a.state_dict())
    b_opt.param_groups[0]["lr"] = a_opt.param_groups[0]["lr"]
    for opt, sched in ((a_opt, a), (b_opt, b)):
        opt.step()
        sched.step()
    expected = pytest.approx(0.05 * (1 + math.cos(math.pi * 24 / 50)))
    assert b_opt.param_groups[0]["lr"] == a_opt.param_groups[0]["lr"] == expected
