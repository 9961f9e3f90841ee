"""Watching a running stage: the search's budget (`BudgetGuard`) and node types that do not come up (`NodeWatch`).

Both are Ray Tune callbacks of the stage's Tuner (`BudgetGuard` is its stopper too); they print to the search's
console. Spend follows the records' rule (`results.held_devices` x the plan's price x the measured epoch time,
what `TrialRecord.cost` adds up once the stage is over), counted as each epoch is reported. When the budget runs
out the guard writes the stage's stop marker (`ExperimentDir.budget_marker_uri`, on the experiment's storage, which
every node reads): a trial that starts after it trains nothing (`trials.run_trial`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback, Stopper
from rich.console import Console

from protopo_ray.data import storage
from protopo_ray.search.budget import BudgetConfig
from protopo_ray.search.inventory import ACCELERATOR_PREFIX, live_node_types
from protopo_ray.search.plan import StagePlan
from protopo_ray.search.results import BudgetStop

RUNNING, PENDING = "RUNNING", "PENDING"  # Tune's Trial.status values
#: Reported, with the metric as NaN, by a trial that starts after the budget ran out and trains nothing.
BUDGET_KEY = "budget_skipped"


def epoch_seconds(result: dict[str, Any]) -> float:
    """An epoch's measured time: the trainer's `epoch_time_s` (what the records price), else Tune's iteration."""
    return float(result.get("epoch_time_s") or result.get("time_this_iter_s") or 0.0)


class _Printing:
    """Tune pickles its callbacks and stoppers with the run config (tuner.pkl): the terminal stays out."""

    console: Console

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "console"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.console = Console(highlight=False)


class BudgetGuard(_Printing, Callback, Stopper):
    """Stops a stage starting trials once the next epoch would take the search over its [budget].

    Why running trials end their epoch rather than the stage stopping at once (Tune's `stop_all`): a trial stopped
    mid-epoch throws away the part it ran, paid for, and keeps no checkpoint of it, while the epoch it is in costs
    at most one epoch of its pool. So once the spend so far, plus the epoch every running trial is in, plus one
    epoch of a new trial would exceed the budget: each running trial is stopped as it reports its epoch (its
    checkpoint kept, the scheduler's ranking intact), and once those have, `stop_all` ends the search algorithm and
    the pending and paused trials. In between, Tune fills each freed slot with the next trial (the searcher and
    the trial queue are Tune's, out of a callback's reach): the stop marker makes such a trial return before it
    trains. The same holds for wall time (elapsed plus one epoch).
    """

    def __init__(self, budget: BudgetConfig, *, stage: str, rate: Callable[[dict[str, Any]], float | None],
                 spent_usd: float = 0.0, spent_wall_s: float = 0.0, marker: str = "", console: Console | None = None):
        """`rate`: USD per hour a trial of these Tune parameters holds (None: no price); `spent_*`: what the
        search's earlier stages spent; `marker`: the stop marker's URI or path ("" = none)."""
        self.budget, self.stage, self.rate, self.marker = budget, stage, rate, marker
        self.spent_usd, self.spent_wall_s = spent_usd, spent_wall_s
        self.started = time.time()
        self.usd_per_hour: dict[str, float] = {}  # trial id -> its rate (0 when unknown)
        self.usd: dict[str, float] = {}  # trial id -> spent this stage
        self.epoch_s: dict[str, float] = {}  # trial id -> its latest epoch's time
        self.running: set[str] = set()
        self.finishing: set[str] = set()  # trials running when the budget ran out, until Tune has ended them
        self.stop: BudgetStop | None = None
        self.console = console or Console(highlight=False)

    # -- the spend ----------------------------------------------------------------------------------------------
    def spent(self) -> float:
        return self.spent_usd + sum(self.usd.values())

    def wall_s(self, now: float | None = None) -> float:
        return self.spent_wall_s + (now or time.time()) - self.started

    def projected(self, now: float | None = None) -> tuple[float, float]:
        """(dollars, seconds) once the running trials' current epochs and one epoch of a new trial are done."""
        costs = [self.usd_per_hour.get(t, 0.0) * s / 3600 for t, s in self.epoch_s.items()]
        new_usd = sum(costs) / len(costs) if costs else 0.0
        running = sum(self.usd_per_hour.get(t, 0.0) * self.epoch_s.get(t, 0.0) / 3600 for t in self.running)
        times = list(self.epoch_s.values())
        return self.spent() + running + new_usd, self.wall_s(now) + (sum(times) / len(times) if times else 0.0)

    def _check(self, now: float | None = None) -> None:
        if self.stop is not None or not self.budget.bounded:
            return
        usd, wall = self.projected(now)
        limit = self.budget.exceeded(usd, wall)
        if limit is None:
            return
        self.stop = BudgetStop(limit=limit, usd=self.spent(), max_usd=self.budget.max_usd, wall_s=self.wall_s(now),
                               max_wall_s=self.budget.max_wall_s)
        self.finishing = set(self.running)
        if self.marker:
            write_marker(self.marker, self.stop.text())
        projected = f"${usd:.4g} projected" if limit == "usd" else f"{wall / 3600:.2f} h projected"
        self.console.print(f"budget: {self.stop.text()}, {projected} with the epochs under way; stage {self.stage}: "
                           f"{len(self.running)} running trial(s) finish their epoch, no new trial starts",
                           style="bold yellow", highlight=False, soft_wrap=True)

    # -- Tune's stopper ---------------------------------------------------------------------------------------------
    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Every reported epoch: count what it cost; stop the trial when the budget has run out."""
        if result.get(BUDGET_KEY):
            return True  # a trial that started after the stop and trained nothing
        seconds = epoch_seconds(result)
        if seconds:
            self.epoch_s[trial_id] = seconds
            self.usd[trial_id] = self.usd.get(trial_id, 0.0) + self.usd_per_hour.get(trial_id, 0.0) * seconds / 3600
        self._check()
        if self.stop is None:
            return False
        if trial_id not in self.stop.stopped_trials:
            self.stop.stopped_trials.append(trial_id)
        return True

    def stop_all(self) -> bool:
        # Only once the trials that were running have ended: Tune registers the checkpoint a trial reported with its
        # last epoch after the stop decision, and stopping the stage before that would lose it.
        self._check()
        return self.stop is not None and not self.finishing

    # -- Tune's callbacks -----------------------------------------------------------------------------------------
    def setup(self, **info) -> None:
        self.started = time.time()

    def stop_reason(self, trial_id: str) -> str | None:
        """What stopped the trial if this guard did ("the budget"), else None: what the console says."""
        return "the budget" if self.stop is not None and trial_id in self.stop.stopped_trials else None

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        self.running = {t.trial_id for t in trials if t.status == RUNNING}
        self.finishing &= self.running

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if trial.trial_id not in self.usd_per_hour:
            self.usd_per_hour[trial.trial_id] = self.rate(dict(trial.config or {})) or 0.0
        self.running.add(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self.finishing.discard(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self.finishing.discard(trial.trial_id)


def write_marker(uri: str, text: str) -> None:
    """Write the stage's stop marker (local path or object-store URI)."""
    fs, path = storage.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def clear_marker(uri: str) -> None:
    """Remove a stop marker a run before this one left (a --resume, a stage run again)."""
    if storage.exists(uri):
        fs, path = storage.filesystem(uri)
        fs.delete_file(path)


def pool_node_types(plan: StagePlan, node_types: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The autoscaler node types a stage's trials may run on: GPU types of the plan's accelerator type (any when
    it pins none) for a GPU plan, CPU-only types for a CPU plan."""
    chosen = {}
    for name, node_type in node_types.items():
        resources = node_type.get("resources", {})
        if plan.device == "gpu":
            fits = resources.get("GPU", 0) >= 1 and (
                not plan.accelerator_type or f"{ACCELERATOR_PREFIX}{plan.accelerator_type}" in resources)
        else:
            fits = resources.get("CPU", 0) >= 1 and not resources.get("GPU", 0)
        if fits:
            chosen[name] = node_type
    return chosen


class NodeWatch(_Printing, Callback):
    """Names on the console, once each, the pool's node types of which no node is up `wait_s` into the stage
    while trials wait (a quota, no capacity in the zone, a launch error: the autoscaler's monitor log says which)."""

    def __init__(self, node_types: dict[str, dict[str, Any]], *, stage: str, wait_s: float,
                 console: Console | None = None, every_s: float = 30.0,
                 count_live: Callable[[dict[str, dict[str, Any]]], dict[str, int]] = live_node_types):
        self.node_types, self.stage, self.wait_s, self.every_s = node_types, stage, wait_s, every_s
        self.count_live = count_live
        self.started = self._checked = time.time()
        self.reported: set[str] = set()
        self.console = console or Console(highlight=False)

    def setup(self, **info) -> None:
        self.started = time.time()
        self._checked = self.started - self.every_s

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.time()
        if not self.node_types or now - self.started < self.wait_s or now - self._checked < self.every_s:
            return
        self._checked = now
        waiting = sum(t.status == PENDING for t in trials)
        if not waiting:
            return
        live = self.count_live(self.node_types)
        missing = sorted(name for name in self.node_types if not live.get(name) and name not in self.reported)
        for name in missing:
            self.reported.add(name)
            self.console.print(f"nodes: no {name} node has come up {(now - self.started) / 60:.0f} min into stage "
                               f"{self.stage} ({waiting} trial(s) waiting); check the autoscaler: `ray status`, "
                               f"/tmp/ray/session_latest/logs/monitor.* on the head (quota, capacity, launch errors)",
                               style="bold yellow", highlight=False, soft_wrap=True)
