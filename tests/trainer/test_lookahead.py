"""Lookahead (trainer/lookahead.py): the pull-back's arithmetic alone, then inside training and across a resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.trainer.test_step import CPU, fit, one_thread, spec  # noqa: F401 - one_thread is an autouse fixture
from trainer import checkpoint as ckpt
from trainer import step
from trainer.lookahead import DECAY_PER_STEP, Lookahead


def test_the_pull_grows_from_nothing_to_airbench_decay():
    la = Lookahead(every=5, total_steps=100)
    assert la.decay_at(0) == 0.0
    assert la.decay_at(50) == pytest.approx(DECAY_PER_STEP**5 * 0.5**3)
    assert la.decay_at(100) == la.decay_at(250) == pytest.approx(DECAY_PER_STEP**5)
    with pytest.raises(ValueError, match="at least 1"):
        Lookahead(every=0, total_steps=10)


def test_live_weights_are_pulled_back_every_k_steps_and_at_the_epoch_end():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    la = Lookahead(every=2, total_steps=4)
    la.begin_epoch(model)  # slow = 1
    with torch.no_grad():
        model.weight.fill_(3.0)
    la.after_step(step=1, step_in_epoch=1, steps_in_epoch=3)  # not a k-th step: nothing moves
    assert model.weight.eq(3.0).all()
    la.after_step(step=2, step_in_epoch=2, steps_in_epoch=3)  # d = 0.95² × (2/4)³
    d = DECAY_PER_STEP**2 / 8
    assert torch.allclose(model.weight, torch.full((1, 2), d * 1.0 + (1 - d) * 3.0))
    pulled = model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    la.after_step(step=3, step_in_epoch=3, steps_in_epoch=3)  # the epoch's last step syncs too
    d = DECAY_PER_STEP**2 * (3 / 4) ** 3
    assert torch.allclose(model.weight, d * pulled + (1 - d) * (pulled + 1.0))


def test_a_lookahead_run_learns_differs_from_plain_sgd_and_resumes_exactly(tmp_path):
    s = spec(**{"optim.lookahead_steps": 2, "optim.lr": 0.1})
    straight, straight_metrics = fit(s, range(1, 4))
    assert straight.lookahead is not None
    assert straight_metrics[-1].train_loss < straight_metrics[0].train_loss
    plain, _ = fit(spec(**{"optim.lr": 0.1}), range(1, 4))
    assert not torch.equal(plain.raw_model.classifier.weight, straight.raw_model.classifier.weight)

    first, first_metrics = fit(s, range(1, 2))
    sha, _ = ckpt.save(step.checkpoint_state(first, s, 1, first_metrics[-1]), str(tmp_path))
    fresh = step.build(s, CPU, 6)
    start = step.restore(fresh, ckpt.load(str(tmp_path), sha))
    resumed, resumed_metrics = fit(s, range(start, 4), trainee=fresh, start_epoch=start)
    mine, theirs = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # the epoch-end sync left no state behind
    assert [m.val_acc for m in straight_metrics[1:]] == [m.val_acc for m in resumed_metrics]
