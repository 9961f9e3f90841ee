"""What `python -m protopo_ray.tune` prints: a live status per stage, one line per trial event, a summary.

Left to themselves, Ray Tune prints a trial table every 30 s and a config box per trial, Ray forwards every
worker's and actor's output to the driver (each epoch's result line, a traceback from every trial process it
stops), and W&B prints a banner and a run summary per trial: what matters is not findable. Here the console shows
what a user follows (which stage, trials running / done / stopped early / errored, epochs, the best so far, time
left); `protopo_ray.cluster.logs.quiet_output` sends the rest to a log file in the experiment directory or
keeps it in Ray's session logs. `--verbose` keeps Ray's own output instead.

`StageView` is a Ray Tune callback (one per stage). On a terminal it redraws one status panel with rich's
`Live`; elsewhere (CI, `ray job logs`) it prints plain lines and a status line every `status_every_s`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from protopo_ray.config import Objective
from protopo_ray.model.grammar import Decoding
from protopo_ray.model.metrics import TYPE_KEYS
from protopo_ray.search.guard import BUDGET_KEY
from protopo_ray.search.results import StageRecord, WinnerRecord
from protopo_ray.search.stages import CONTINUE_KEY, Stage

#: Test metrics shown in the summary, in this order: (key, label).
SUMMARY_METRICS = (("loss", "loss"), ("residue_acc", "residue acc"), ("type_acc", "type acc"),
                   ("topo_mean", "topology acc (mean)"), ("overlap_acc", "overlap acc"))


def test_rows(test: dict[str, float]) -> list[tuple[str, str]]:
    """The winner's test figures: on the test shards' own graphs, then (keys `fasta_*`, `search.run`) the same
    proteins from sequence alone, as `predict` sees a FASTA (issue 27: a winner can be good on one, not the other)."""
    rows = []
    for prefix, label, graphs in (("", "test", ""), ("fasta_", "test FASTA", " from sequence alone,")):
        values = {key[len(prefix):]: v for key, v in test.items() if key.startswith(prefix)}
        if prefix == "":
            values = {key: v for key, v in values.items() if not key.startswith("fasta_")}
        if not values:
            continue
        parts = [f"{name} {format_value(values[key])}" for key, name in SUMMARY_METRICS if key in values]
        if "n_proteins" in values:
            parts.append(f"on {int(values['n_proteins'])} proteins")
        rows.append((label, ", ".join(parts)))
        per_type = [f"{name} {format_value(values[f'topo_{key}'])} ({int(values.get(f'n_{key}', 0))})"
                    for name, key in TYPE_KEYS.items() if f"topo_{key}" in values]
        if per_type:
            rows.append(("topology", ", ".join(per_type) + f"  (per type,{graphs} test proteins in brackets)"))
    return rows


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def describe_params(params: dict[str, Any]) -> str:
    """A trial's searched values, short: `gc_size=16 lstm_size=32`, or where a promoted trial continues from."""
    continuation = params.get(CONTINUE_KEY)
    if continuation:
        return f"from {continuation['from_trial']} ({continuation['from_stage']}, epoch {continuation['start_epoch']})"
    return " ".join(f"{key.rsplit('.', 1)[-1]}={format_value(value)}" for key, value in params.items())


@dataclass
class TrialProgress:
    trial_id: str
    label: str
    start_epoch: int
    budget: int
    """Epochs this trial runs in this stage if nobody stops it."""
    epoch: int = 0
    best: float = math.nan
    epoch_s: float = 0.0
    """Wall time of its latest epoch (Tune's `time_this_iter_s`: training, validation, checkpoint)."""
    state: str = "running"
    """running, completed, stopped (early, by the scheduler) or errored."""

    @property
    def epochs_run(self) -> int:
        return max(0, self.epoch - self.start_epoch)


class StageView(Callback):
    """A Ray Tune callback that shows one stage: a live status panel (or plain lines) and its trial events."""

    def __init__(self, *, stage: str, metric: str, mode: str, max_epochs: int, num_trials: int,
                 scheduler: str | None = None, start_epoch: float = 0, console: Console | None = None,
                 live: bool | None = None, status_every_s: float = 60.0):
        """`start_epoch`: where the stage's trials start on average (promoted trials continue), for the budget
        of those not started yet; `live`: redraw a panel (default: when the console is a terminal)."""
        self.stage, self.metric, self.mode = stage, metric, mode
        self.max_epochs, self.num_trials, self.scheduler = max_epochs, num_trials, scheduler
        self.start_epoch = start_epoch
        self.status_every_s = status_every_s
        self._attach(console, live)

    def _attach(self, console: Console | None, live: bool | None) -> None:
        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.trials: dict[str, TrialProgress] = {}
        self.started = time.time()
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._last_status = self.started
        self._slots = 1  # the most trials seen running at once
        self.stop_reason: Callable[[str], str | None] | None = None
        """What stopped a trial besides the scheduler (`guard.BudgetGuard.stop_reason`), if anything."""

    # Tune pickles the run config with its callbacks (tuner.pkl, what --resume restores): leave the terminal out.
    def __getstate__(self) -> dict[str, Any]:
        keep = ("stage", "metric", "mode", "max_epochs", "num_trials", "scheduler", "start_epoch", "status_every_s")
        return {key: self.__dict__[key] for key in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._attach(None, None)

    # -- Tune's hooks ----------------------------------------------------------------------------------------
    def setup(self, total_num_samples: int | None = None, **info) -> None:
        self.started = self._last_status = time.time()
        if total_num_samples and total_num_samples > 0:
            self.num_trials = max(self.num_trials, total_num_samples)
        if self.live and self._live is None:
            self._live = Live(self, console=self.console, refresh_per_second=2, transient=True)
            self._live.start()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        known = trial.trial_id in self.trials  # a paused (halving) or failed trial starting again
        progress = self._track(trial)
        progress.state = "running"
        self._slots = max(self._slots, self.counts()["running"])
        self._event(trial.trial_id, "resumed" if known else "started", f"at epoch {progress.epoch}" if known else "")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        progress = self._track(trial)
        with self._lock:
            progress.epoch = int(result.get("epoch", progress.epoch) or 0)
            progress.epoch_s = float(result.get("time_this_iter_s") or progress.epoch_s)
            value = self.objective.value(result)
            if self.objective.better(value, progress.best):
                progress.best = value

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        progress = self._track(trial)
        if trial.last_result.get(BUDGET_KEY):
            progress.state = "skipped"
            self._event(trial.trial_id, "skipped", "the budget ran out before it trained")
            return
        epoch = int(trial.last_result.get("epoch", progress.epoch) or 0)
        progress.epoch = max(progress.epoch, epoch)
        best = f"best {self.metric} {format_value(progress.best)}"
        if progress.epochs_run < progress.budget:
            progress.state = "stopped"
            reason = self.stop_reason(trial.trial_id) if self.stop_reason else None
            by = f" by {reason or self.scheduler}" if reason or self.scheduler else ""
            self._event(trial.trial_id, "stopped", f"early{by} at epoch {progress.epoch}, {best}")
        else:
            progress.state = "completed"
            self._event(trial.trial_id, "completed", f"{progress.epoch} epochs, {best}")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._event(trial.trial_id, "failed", f"at epoch {self._track(trial).epoch}, retrying: {_error_line(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        progress = self._track(trial)
        progress.state = "errored"
        where = f" ({_error_file(trial)})" if _error_file(trial) else ""
        self._event(trial.trial_id, "errored", f"at epoch {progress.epoch}: {_error_line(trial)}{where}")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.time()
        if not self.live and now - self._last_status >= self.status_every_s:
            self._last_status = now
            self.console.print(self.status_line(now), highlight=False, soft_wrap=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.close()

    def close(self) -> None:
        """Take the live panel down (also when the stage raised; `with view:` does it)."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> StageView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def objective(self) -> Objective:
        return Objective(self.metric, self.mode)

    def _track(self, trial) -> TrialProgress:
        progress = self.trials.get(trial.trial_id)
        if progress is None:
            params = dict(trial.config or {})
            start = int((params.get(CONTINUE_KEY) or {}).get("start_epoch", 0))
            progress = TrialProgress(trial_id=trial.trial_id, label=describe_params(params), start_epoch=start,
                                     budget=max(0, self.max_epochs - start), epoch=start)
            # A trial restored by --resume brings the results it reported before the interruption: its best so
            # far and its epoch come from Tune's record of them, not only from the results seen from now on.
            seen = (getattr(trial, "metric_analysis", None) or {}).get(self.metric, {}).get(self.mode)
            if seen is not None:
                progress.best = float(seen)
                progress.epoch = max(start, int((trial.last_result or {}).get("epoch", start) or start))
            with self._lock:
                self.trials[trial.trial_id] = progress
        return progress

    def counts(self) -> dict[str, int]:
        with self._lock:
            states = [t.state for t in self.trials.values()]
        return {state: states.count(state) for state in ("running", "completed", "stopped", "errored")}

    def best(self) -> TrialProgress | None:
        with self._lock:
            trials = list(self.trials.values())
        return self.objective.best(trials, lambda t: t.best)

    def epochs(self) -> tuple[int, int]:
        """(epochs run, epochs the stage runs at most): a stopped trial's unrun epochs leave the budget."""
        with self._lock:
            trials = list(self.trials.values())
        done = sum(t.epochs_run for t in trials)
        budget = sum(t.budget if t.state == "running" else t.epochs_run for t in trials)
        return done, budget + round(self._unstarted(trials) * (self.max_epochs - self.start_epoch))

    def remaining_s(self) -> float | None:
        """Time left if every trial runs its budget: an upper bound when a scheduler stops trials early.

        The epochs left, each at its trial's latest epoch time (unstarted trials at the mean), shared among
        as many trials as have run at once; None before the first epoch.
        """
        with self._lock:
            trials = list(self.trials.values())
        times = [t.epoch_s for t in trials if t.epoch_s > 0]
        if not times:
            return None
        mean = sum(times) / len(times)
        work = sum((t.budget - t.epochs_run) * (t.epoch_s or mean) for t in trials if t.state == "running")
        work += self._unstarted(trials) * (self.max_epochs - self.start_epoch) * mean
        return work / self._slots

    def _unstarted(self, trials: list[TrialProgress]) -> int:
        return max(0, self.num_trials - len(trials))

    # -- rendering -------------------------------------------------------------------------------------------
    def _event(self, trial_id: str, what: str, detail: str) -> None:
        label = self.trials[trial_id].label if trial_id in self.trials else ""
        elapsed = format_duration(time.time() - self.started)
        line = Text.assemble((f"{elapsed:>7} ", "dim"), (f"{self.stage} ", "cyan"),
                             (f"{what:<9} ", _STYLES.get(what, "")), f"{trial_id} ", (label, "dim"))
        if detail:
            line.append(f"  {detail}")
        self.console.print(line, highlight=False, soft_wrap=True)

    def _summary_parts(self, now: float) -> tuple[str, str, str]:
        counts = self.counts()
        done, total = self.epochs()
        left = self.remaining_s()
        bound = "≤ " if self.scheduler else "~"
        timing = format_duration(now - self.started) + (f", {bound}{format_duration(left)} left" if left is not None
                                                        else "")
        trials = (f"{counts['running']} running, {counts['completed']} done, {counts['stopped']} stopped early, "
                  f"{counts['errored']} errored of {self.num_trials}")
        best = self.best()
        best_text = (f"best {self.metric} {format_value(best.best)} ({best.trial_id})" if best
                     else f"best {self.metric} -")
        return f"epochs {done}/{total}", f"{trials}; {best_text}", timing

    def status_line(self, now: float | None = None) -> str:
        epochs, trials, timing = self._summary_parts(now or time.time())
        return f"{self.stage}: {epochs}; {trials}; {timing}"

    def __rich__(self) -> Group:
        now = time.time()
        epochs, trials, timing = self._summary_parts(now)
        done, total = self.epochs()
        head = Table.grid(padding=(0, 1))
        head.add_row(Text(self.stage, style="bold cyan"), ProgressBar(total=max(total, 1), completed=done, width=30),
                     Text(epochs), Text(timing, style="dim"))
        return Group(head, Text("  " + trials))


_STYLES = {"started": "blue", "resumed": "blue", "completed": "green", "stopped": "yellow", "skipped": "yellow",
           "failed": "red", "errored": "bold red"}


def _error_line(trial) -> str:
    """The last line of a trial's error file (the exception and its message), which Tune writes before the hook."""
    try:
        path = _error_file(trial)
        local = Path(path) if path else None
        text = local.read_text() if local and local.exists() else str(trial.get_error() or "")
    except Exception:  # storage gone or unreadable: the event still gets its line
        text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "see the trial's error file"


def _error_file(trial) -> str | None:
    try:
        return trial.error_file
    except Exception:  # a trial without storage (Tune always gives one)
        return None


def describe_decoding(decoding: Decoding) -> str:
    """'entry penalty 4, strand penalty 2, helix loops >= 3, beta offset 0, length priors x1, rule mean' (no
    strand penalty when strands pay the entry penalty)."""
    strand = "" if decoding.strand_penalty is None else f", strand penalty {decoding.strand_penalty:g}"
    return (f"entry penalty {decoding.entry_penalty:g}{strand}, helix loops >= {decoding.min_loop}, beta offset "
            f"{decoding.beta_offset:g}, length priors x{decoding.duration_weight:g}, rule {decoding.rule}")


class SearchConsole:
    """The search's console: stage headers, a `StageView` per stage, stage results and the final summary."""

    def __init__(self, *, verbose: bool = False, log_path: Path | None = None, console: Console | None = None):
        self.verbose = verbose
        self.log_path = log_path
        self.console = console or Console(highlight=False)
        self.started = time.time()

    def stage_view(self, stage: Stage, *, num_trials: int, start_epochs: list[int] | None = None) -> StageView:
        """The callback for one stage; prints the stage's header.

        `start_epochs`: where a promotion's trials continue from (their epoch budgets are shorter)."""
        self.console.print(Text.assemble(("── stage ", "cyan"), (stage.name, "bold cyan"),
                                         f": {num_trials} trials, {stage.describe()}, up to epoch {stage.max_epochs}, "
                                         f"{stage.metric} ({stage.mode})"), soft_wrap=True)
        # With --verbose Tune's reporter draws its own tables: events as plain lines, no live panel among them.
        return StageView(stage=stage.name, metric=stage.metric, mode=stage.mode, max_epochs=stage.max_epochs,
                         num_trials=num_trials, scheduler=stage.stopper, console=self.console,
                         start_epoch=sum(start_epochs) / len(start_epochs) if start_epochs else 0,
                         live=False if self.verbose else None)

    def stage_done(self, record: StageRecord) -> None:
        """One line for a finished stage."""
        states = [t.status for t in record.trials]
        best = record.best()
        value = format_value(best.best.get(record.metric, math.nan)) if best else "-"
        budget = f", {states.count('budget')} stopped by the budget" if "budget" in states else ""
        self.console.print(
            f"stage {record.stage} done in {format_duration(record.wall_time_s)}: {len(states)} trials "
            f"({states.count('completed')} completed, {states.count('stopped')} stopped early, "
            f"{states.count('error')} errored{budget}), epochs {record.epochs_run}/{record.epochs_full}; "
            f"best {record.best_trial or '-'} {record.metric} {value}", soft_wrap=True)
        stop = record.budget_stop
        if stop is not None:
            self.console.print(f"budget: stage {record.stage} {stop.text()}; {len(stop.stopped_trials)} trial(s) "
                               f"stopped at the end of their epoch, {stop.unstarted_trials} not started",
                               style="bold yellow", soft_wrap=True)

    def stage_skipped(self, name: str, why: str) -> None:
        """A stage the search's budget leaves unstarted."""
        self.console.print(f"budget: stage {name} not started: {why}", style="bold yellow", soft_wrap=True)

    def stage_loaded(self, name: str, path: Path) -> None:
        self.console.print(f"stage {name}: already finished, loaded {path}", soft_wrap=True)

    def summary(self, *, winner: WinnerRecord | None, report: Path, metric: str | None = None) -> None:
        """The search's last lines: the winner, its test metrics, where the report, checkpoint and logs are.

        `metric`: the one the winner's stage ranked by.
        """
        self.console.print(Text.assemble(("── search finished", "bold green"),
                                         f" in {format_duration(time.time() - self.started)}"))
        rows: list[tuple[str, str]] = []
        if winner:
            val = winner.val
            shown = (f"{metric} {format_value(val[metric])} at epoch {format_value(val.get('epoch', '?'))}"
                     if metric in val else "")
            origin = f", from {winner.promoted_from}" if winner.promoted_from else ""
            rows.append(("winner", f"{winner.trial_id} ({winner.stage}{origin})  {describe_params(winner.params)}"))
            if shown:
                rows.append(("validation", shown))
            if winner.test:
                rows += test_rows(winner.test)
            decoding = winner.ensemble.decoding if winner.ensemble else winner.decoding
            if decoding is not None:
                rows.append(("decoding", describe_decoding(decoding) + "  (grammar Viterbi, chosen on validation)"))
            rows.append(("checkpoint", winner.checkpoint))
        else:
            rows.append(("winner", "none (no trial finished with a checkpoint)"))
        rows.append(("report", str(report)))
        if self.log_path:
            rows.append(("logs", f"{self.log_path} (Ray's and W&B's driver output; the trials' own output is in "
                                 "Ray's session logs, /tmp/ray/session_latest/logs on each node)"))
        for label, text in rows:
            self.console.print(Text.assemble((f"{label:<11}", "bold"), text), soft_wrap=True)
