"""Warm-up + cosine learning-rate schedule (`../shared/METHODS.md` §2.6)."""

import itertools
import math

import pytest
import torch

from semisparse.training.schedule import WarmupCosine, make_scheduler


def test_linear_warmup_then_cosine_to_min_ratio():
    schedule = WarmupCosine(total_steps=11, warmup_steps=4, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == 1.0
    # halfway through the cosine part (steps 4..10): the mean of peak and floor
    assert schedule(7) == pytest.approx(0.55)
    assert schedule(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 6)))
    assert schedule(10) == pytest.approx(0.1)
    decay = [schedule(s) for s in range(4, 11)]
    assert all(a > b for a, b in itertools.pairwise(decay))


def test_without_warmup_starts_at_peak():
    schedule = WarmupCosine(total_steps=3, warmup_steps=0, min_ratio=0.0)
    assert [schedule(s) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])


def test_scheduler_scales_every_group_and_round_trips():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": 1.0}], lr=0.1)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_steps=2, min_ratio=0.1)
    factor = WarmupCosine(10, 2, 0.1)
    for step in range(5):
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * factor(step), factor(step)])
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": 1.0}], lr=0.1)
    fresh = make_scheduler(fresh_optimizer, total_steps=10, warmup_steps=2, min_ratio=0.1)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 5
    assert fresh.get_last_lr() == scheduler.get_last_lr()
