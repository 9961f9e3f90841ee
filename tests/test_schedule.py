"""The LR schedule as a function of fractional epochs: by hand, across worker counts, and for a continuation."""

from __future__ import annotations

import pytest
import torch

from protopo_ray.config import TrainConfig
from protopo_ray.training.schedule import EpochSchedule, lr_factor


@pytest.mark.parametrize("schedule,progress,expected", [
    ("constant", 5.0, 1.0), ("linear", 1.0, 1.0), ("linear", 6.0, 0.5), ("linear", 11.0, 0.0),
    ("cosine", 6.0, 0.5), ("cosine", 1.0, 1.0),
])
def test_lr_factor_by_hand(schedule, progress, expected):
    assert lr_factor(progress, start=0, end=11, warmup=1, schedule=schedule) == pytest.approx(expected)


def test_warmup_rises_linearly_from_the_span_start():
    assert lr_factor(30.25, start=30, end=40, warmup=0.5, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(30.0, start=30, end=40, warmup=0.5, schedule="linear") == 0.0


def lrs(cfg: TrainConfig, steps_per_epoch: int, start_epoch: int = 0, first_epoch: int | None = None) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = EpochSchedule(optimizer, cfg, start_epoch=start_epoch)
    seen = []
    for epoch in range(start_epoch if first_epoch is None else first_epoch, cfg.epochs):
        schedule.start_epoch(epoch, steps_per_epoch)
        for _ in range(steps_per_epoch):
            seen.append(optimizer.param_groups[0]["lr"])
            schedule.step()
    return seen


def test_same_curve_for_any_steps_per_epoch():
    cfg = TrainConfig(epochs=4, lr=1.0, schedule="linear", warmup_epochs=1)
    eight, two = lrs(cfg, 8), lrs(cfg, 2)
    # 2 steps per epoch sit at e + 1/4 and e + 3/4: on the 8-step curve (piecewise linear), halfway between
    # the steps at e + 3/16 and e + 5/16 (and at e + 11/16 and e + 13/16)
    assert two == pytest.approx([eight[i * 4 + 1] * 0.5 + eight[i * 4 + 2] * 0.5 for i in range(8)], abs=1e-9)
    assert all(lr > 0 for lr in eight + two)  # no step at LR 0: not the first, not the last


def test_a_continuation_spans_its_own_budget_and_keeps_lr_above_zero():
    cfg = TrainConfig(epochs=150, lr=1e-3, schedule="linear", warmup_epochs=1)
    seen = lrs(cfg, steps_per_epoch=3, start_epoch=30)
    assert len(seen) == 120 * 3 and min(seen) > 0
    assert max(seen) == pytest.approx(1e-3, rel=0.02)  # re-warmed to the peak, then decayed over 30..150
    assert seen[-1] < 1e-5


def test_resume_mid_span_lands_on_the_same_curve():
    cfg = TrainConfig(epochs=10, lr=1.0, schedule="cosine", warmup_epochs=0.5)
    whole = lrs(cfg, 4)
    resumed = lrs(cfg, 4, start_epoch=0, first_epoch=6)
    assert resumed == pytest.approx(whole[6 * 4:])
