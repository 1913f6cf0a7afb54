import math

import pytest
import torch

from trainer.schedule import apply_epoch_settings, build_scheduler, lr_factor, weight_decay_at
from trainer.spec import OptimSpec, ScheduleSpec


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


def test_step_per_epoch_matches_torch_stepped_once_per_epoch():
    # The notebook: CosineAnnealingWarmRestarts(T_0 10, T_mult 2) with scheduler.step() after each epoch.
    spec = ScheduleSpec(kind="cosine_warm_restarts", t0=10, t_mult=2, step_per="epoch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2, eta_min=0)
    steps_per_epoch = 7
    for epoch in range(80):
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            assert lr_factor(spec, step, steps_per_epoch, 80) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        ref.step()


def test_restart_epoch_starts_the_schedule_over():
    spec = ScheduleSpec(kind="cosine_warm_restarts", t0=10, t_mult=2, step_per="epoch", restart_epochs=[85])
    plain = ScheduleSpec(kind="cosine_warm_restarts", t0=10, t_mult=2, step_per="epoch")
    spe = 196
    for epoch in (1, 50, 84):  # before the restart: the same schedule
        step = (epoch - 1) * spe
        assert lr_factor(spec, step, spe, 200) == lr_factor(plain, step, spe, 200)
    for epoch in range(85, 200):  # from epoch 85 on: the schedule of epoch (epoch - 84)
        step = (epoch - 1) * spe + 3
        assert lr_factor(spec, step, spe, 200) == pytest.approx(lr_factor(plain, (epoch - 85) * spe + 3, spe, 200))
    assert lr_factor(spec, 84 * spe, spe, 200) == 1.0  # first epoch after the restart: full lr


def test_weight_decay_milestones_and_fresh_momentum():
    o = OptimSpec(weight_decay=1e-3, weight_decay_milestones={85: 1e-4}, fresh_momentum_at_milestones=True)
    assert [weight_decay_at(o, e) for e in (1, 84, 85, 200)] == [1e-3, 1e-3, 1e-4, 1e-4]
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=o.weight_decay)
    w.grad = torch.ones(2)
    opt.step()
    apply_epoch_settings(opt, o, 84)
    assert opt.param_groups[0]["weight_decay"] == 1e-3 and opt.state  # momentum kept
    apply_epoch_settings(opt, o, 85)
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and not opt.state  # as a freshly built SGD
