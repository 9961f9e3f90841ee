"""Synchronous successive halving for a stage's trials, pausing the ones that wait for their rung.

Ray's ASHA is asynchronous: a trial is judged against whoever reached its rung before it, so early trials pass
on little competition (0.61-0.70 of the grid's epochs on the benchmark grid, docs/benchmarks.md). Here every
trial of the stage runs to the first rung; a trial that reaches a rung before its cohort is PAUSED (its process
ends, its GPU share is free for a trial still on its way) until the whole cohort has a score there; then the
best 1/reduction_factor continue from their checkpoints and the rest stop. Rungs are at grace x rf^k epochs.

Rung scores and decisions are written to a JSON file after every change and read back when the stage is
restored after a killed driver (Tune's restore does not keep a scheduler's state), so no trial is judged twice
and a decision once made stands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from protopo_ray.config import Objective


def rungs(grace: int, reduction_factor: int, max_t: int) -> list[int]:
    """Decision points in epochs: grace, grace x rf, ... below max_t."""
    points, t = [], grace
    while t < max_t:
        points.append(t)
        t *= reduction_factor
    return points


def survivors(count: int, reduction_factor: int) -> int:
    """How many of a rung's `count` scored trials continue: the best 1/rf, rounded up, at least one."""
    return max(1, math.ceil(count / reduction_factor))


class SynchronousHalving(TrialScheduler):
    # Every result is judged as it comes: a buffered batch of results could carry a trial past its rung.
    _supports_buffered_results = False

    def __init__(self, *, time_attr: str, objective: Objective, grace: int, reduction_factor: int, max_t: int,
                 num_trials: int, state_file: str | Path) -> None:
        super().__init__()
        self._time_attr, self._objective = time_attr, objective
        self._rf, self._num_trials = reduction_factor, num_trials
        self._rungs = rungs(grace, reduction_factor, max_t)
        self._state_file = Path(state_file)
        self._trials: dict[str, Trial] = {}
        # rung -> trial id -> metric at that rung; rung -> ids allowed past it; ids stopped; ids that errored
        self.scores: dict[int, dict[str, float]] = {r: {} for r in self._rungs}
        self.promoted: dict[int, list[str]] = {}
        self.stopped: set[str] = set()
        self.failed: set[str] = set()
        self._load()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the scheduler as it was when the stage started: the decisions since are in the file.
        self.__dict__.update(state)
        self._trials = {}
        self._load()

    def _load(self) -> None:
        if self._state_file.exists():
            saved = json.loads(self._state_file.read_text())
            self.scores.update({int(r): v for r, v in saved["scores"].items()})
            self.promoted = {int(r): v for r, v in saved["promoted"].items()}
            self.stopped, self.failed = set(saved["stopped"]), set(saved["failed"])

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._objective = Objective(metric or self._objective.metric, mode or self._objective.mode)
        return True

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _save(self) -> None:
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rungs": self._rungs, "scores": self.scores, "promoted": self.promoted,
                                   "stopped": sorted(self.stopped), "failed": sorted(self.failed)}, indent=1))
        tmp.replace(self._state_file)

    def cohort(self, index: int) -> list[str]:
        """Trial ids that must be scored at rung `index` before it is decided."""
        if index == 0:
            members = list(self._trials) if len(self._trials) >= self._num_trials else None
            return [] if members is None else [t for t in members if t not in self.failed]
        previous = self._rungs[index - 1]
        return [t for t in self.promoted.get(previous, []) if t not in self.failed]

    def waiting_rung(self, trial_id: str) -> int | None:
        """The rung a trial has a score at but no decision yet (it must not train on)."""
        for rung in self._rungs:
            if trial_id in self.scores[rung] and rung not in self.promoted:
                return rung
        return None

    def _decide(self, tune_controller) -> None:
        """Decide every rung whose whole cohort has a score; stop the losers that are not running."""
        for index, rung in enumerate(self._rungs):
            if rung in self.promoted:
                continue
            cohort = self.cohort(index)
            if not cohort or any(t not in self.scores[rung] for t in cohort):
                return
            ranked = self._objective.ranked(cohort, self.scores[rung].get)
            keep = ranked[: survivors(len(ranked), self._rf)]
            self.promoted[rung] = keep
            self.stopped.update(t for t in ranked if t not in keep)
            self._save()
            for trial_id in ranked[len(keep):]:
                trial = self._trials.get(trial_id)
                if trial is not None and trial.status in (Trial.PAUSED, Trial.PENDING):
                    tune_controller.stop_trial(trial)

    # -- Tune's hooks ----------------------------------------------------------------------------------------
    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._trials[trial.trial_id] = trial

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        trial_id, t = trial.trial_id, int(result.get(self._time_attr, 0))
        if trial_id in self.stopped:
            return TrialScheduler.STOP
        if t not in self.scores:
            return TrialScheduler.CONTINUE
        value = self._objective.value(result)
        if not math.isfinite(value):
            value = self._objective.worst  # a diverged trial ranks last
        if trial_id not in self.scores[t]:
            self.scores[t][trial_id] = float(value)
            self._save()
        self._decide(tune_controller)
        if trial_id in self.stopped:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE if trial_id in self.promoted.get(t, []) else TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._decide(tune_controller)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.failed.add(trial.trial_id)
        self._save()
        self._decide(tune_controller)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._decide(tune_controller)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """First every trial that has not reached its next rung (new ones first), then nothing that waits."""
        for trial in list(self._trials.values()):
            # A loser whose stop the killed driver never carried out comes back PENDING from a restore.
            if trial.trial_id in self.stopped and trial.status in (Trial.PENDING, Trial.PAUSED):
                tune_controller.stop_trial(trial)
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in self._trials.values():
                if trial.status != status or trial.trial_id in self.stopped:
                    continue
                if self.waiting_rung(trial.trial_id) is not None:
                    continue  # scored at a rung not yet decided: it waits (after a restore it is PENDING)
                return trial
        return None

    def debug_string(self) -> str:
        decided = ", ".join(f"{r}: {len(v)} on" for r, v in self.promoted.items())
        return f"SynchronousHalving: rungs {self._rungs}; decided {decided or 'none'}; stopped {len(self.stopped)}"
