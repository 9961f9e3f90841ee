"""A stage's progress as live metrics, from the search's driver: a Ray Tune callback that counts the stage's trials
by state and sets each trial's device-hours and dollars as its reports arrive (the numbers the stage record keeps
when it ends: `search.results.TrialRecord`, `BudgetGuard.spent`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from protopo_ray.monitoring.metrics import TrialLabels, emit_stage, emit_trial_cost


class StageMonitor(Callback):
    """Sets the per-stage metrics (trials by state, spend) and per-trial cost while a stage runs."""

    def __init__(self, *, experiment: str, stage: str, max_epochs: int,
                 labels: Callable[[str, dict[str, Any]], TrialLabels], held_devices: Callable[[dict[str, Any]], float],
                 usd_per_device_hour: float | None, spent_usd: Callable[[], float], max_usd: float | None = None):
        """`labels(trial_id, params)`: a trial's tags; `held_devices(params)`: devices a trial holds; `spent_usd()`:
        the search's spend so far (the budget guard's figure)."""
        self.experiment, self.stage, self.max_epochs = experiment, stage, max_epochs
        self.labels, self.held_devices, self.price = labels, held_devices, usd_per_device_hour
        self.spent_usd, self.max_usd = spent_usd, max_usd
        self.state: dict[str, str] = {}  # trial id -> running / finished / stopped / errored
        self.epochs: dict[str, int] = {}
        self.epoch_s: dict[str, float] = {}  # trial id -> seconds of its epochs so far
        self.emit_s = 0.0
        """Seconds this callback has spent setting metrics (the driver's cost of them)."""

    def _emit(self) -> None:
        counts: dict[str, int] = {}
        for state in self.state.values():
            counts[state] = counts.get(state, 0) + 1
        emit_stage(self.experiment, self.stage, counts, spent_usd=self.spent_usd(), max_usd=self.max_usd)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.state[trial.trial_id] = "running"
        self._emit()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        began = time.perf_counter()
        trial_id = trial.trial_id
        self.state[trial_id] = "running"
        if "epoch" in result and "epoch_time_s" in result:
            if int(result["epoch"]) > self.epochs.get(trial_id, 0):
                self.epochs[trial_id] = int(result["epoch"])
                self.epoch_s[trial_id] = self.epoch_s.get(trial_id, 0.0) + float(result["epoch_time_s"])
            hours = self.held_devices(trial.config) * self.epoch_s[trial_id] / 3600
            emit_trial_cost(self.labels(trial_id, trial.config), device_hours=hours,
                            usd=None if self.price is None else hours * self.price)
        self._emit()
        self.emit_s += time.perf_counter() - began

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = self.epochs.get(trial.trial_id, 0) >= self.max_epochs
        self.state[trial.trial_id] = "finished" if done else "stopped"
        self._emit()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.state[trial.trial_id] = "errored"
        self._emit()
