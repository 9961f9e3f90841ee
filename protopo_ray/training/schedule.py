"""The learning-rate schedule, as a function of fractional epochs.

The LR at an optimiser step depends only on where the run is in epochs (`epoch + step / steps_per_epoch`)
and on the run's own span `[start_epoch, epochs)`, never on a step count. So a run that continues on another
number of DDP workers (fewer or more steps per epoch), or that resumes after a preemption, lands on the same
point of the same curve. A promoted run (one that starts from another run's checkpoint at epoch `start_epoch`)
gets a schedule of its own over its new budget: warm-up again from its first epoch, then decay to its last.
"""

from __future__ import annotations

import math

import torch

from protopo_ray.config import TrainConfig


def lr_factor(progress: float, *, start: float, end: float, warmup: float, schedule: str) -> float:
    """Multiplier of the peak LR at `progress` epochs, for a run spanning epochs [start, end).

    `progress` is the middle of the step being taken (epoch + (step + 0.5) / steps_per_epoch), so neither the
    first warm-up step nor the last decay step is taken at LR 0; warm-up rises linearly over the first
    `warmup` epochs of the span, then constant / linear / cosine decay reaches 0 at `end`.
    """
    into = max(0.0, progress - start)
    if warmup > 0 and into < warmup:
        return into / warmup
    if schedule == "constant":
        return 1.0
    span = max(1e-12, end - start - warmup)
    done = min(1.0, (into - warmup) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - done)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown schedule {schedule!r}; expected constant, linear or cosine")


class EpochSchedule:
    """Sets the optimiser's LR before every step from fractional epochs; `step()` advances one step.

    Call `start_epoch(epoch, steps_per_epoch)` at the top of every epoch. The step within the epoch is the only
    state and it is reset each epoch, so there is nothing to save in a checkpoint beyond the epoch itself.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, start_epoch: int = 0) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.start = float(start_epoch)
        self.end = float(cfg.epochs)
        self.epoch, self.steps_per_epoch, self.step_in_epoch = start_epoch, 1, 0
        self._apply()

    def factor_at(self, progress: float) -> float:
        return lr_factor(progress, start=self.start, end=self.end, warmup=self.cfg.warmup_epochs,
                         schedule=self.cfg.schedule)

    @property
    def progress(self) -> float:
        """Fractional epochs at the middle of the step about to be taken."""
        return self.epoch + (self.step_in_epoch + 0.5) / self.steps_per_epoch

    def start_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        self.epoch, self.steps_per_epoch, self.step_in_epoch = epoch, max(1, steps_per_epoch), 0
        self._apply()

    def step(self) -> None:
        """Called after each optimiser step: the next step's LR (after an epoch's last step the LR stays the one
        that step used, so what an epoch reports as its LR is one it trained with; `start_epoch` moves on)."""
        if self.step_in_epoch + 1 < self.steps_per_epoch:
            self.step_in_epoch += 1
            self._apply()

    def _apply(self) -> None:
        factor = self.factor_at(self.progress)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * factor
