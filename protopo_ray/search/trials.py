"""Running one stage's trials with Ray Tune, and turning Tune's results into the stage record.

What a trial runs is decided in one place, `trial_config`: the stage's base config, the run-config change its
Tune parameters make (`Stage.trial_values`: searched values, a promoted trial's `Continuation`, an ensemble
member's folds), the stage budget and metric, and the trial's own hardware share from its footprint
(`StagePlan.resources_overrides`).

Two kinds of trial, chosen by the plan's worker count:
- one worker (search stages): the Tune trial itself holds the worker's resources (its GPU share through
  `tune.with_resources` as a function of the trial's config) and runs `training.fit` in its own process;
- several workers (final runs): the trial is a 0-CPU driver that fits a Ray Train DDP run named after the
  trial id (so a restored trial continues from its own Train checkpoints) and forwards rank 0's reports.

On the Ray dashboard a trial's actor is of class `Trial_<stage>` and its repr names the trial and its searched values
(`describe_trial`); its live metrics carry the same trial id (`trial_labels`, protopo_ray.monitoring).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray.tune
from ray import tune
from ray.tune.execution.placement_groups import resource_dict_to_pg_factory
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.trainable.function_trainable import wrap_function

from protopo_ray.cluster.sessions import TuneSession
from protopo_ray.cluster.train_run import build_trainer
from protopo_ray.config import Config
from protopo_ray.config.objective import finite
from protopo_ray.data import storage
from protopo_ray.model.footprint import trial_footprint
from protopo_ray.monitoring.metrics import NO_MEMBER, TrialLabels
from protopo_ray.search.guard import BUDGET_KEY
from protopo_ray.search.plan import StagePlan
from protopo_ray.search.results import (
    BudgetStop,
    Continuation,
    StageRecord,
    TrialRecord,
    finite_metrics,
    held_devices,
)
from protopo_ray.search.stages import CONTINUE_KEY, ROTATION_KEY, Stage
from protopo_ray.training.fit import fit

CHECKPOINT_KEY = "checkpoint_path"  # what TuneReportCallback adds to a report that carried a checkpoint
#: Columns Tune adds to every reported row; not metrics of ours.
TUNE_COLUMNS = ("config/", "time_", "timestamp", "pid", "iterations_since", "training_iteration", "done")


@dataclass(frozen=True, kw_only=True)
class StageContext:
    """What every trial of a stage shares (handed to each trial process)."""

    stage: Stage
    base: Config
    plan: StagePlan
    train_storage: str
    longest: int
    """Longest training protein: with the config's batch plan it sets the trial's memory footprint."""
    budget_marker: str = ""
    """Written when the search's budget runs out (protopo_ray.search.guard): a trial starting after it trains
    nothing ("" = no budget)."""
    experiment: str = ""
    """The experiment's name: the `experiment` tag of the trials' live metrics."""


def trial_labels(ctx: StageContext, trial_id: str, params: dict[str, Any]) -> TrialLabels:
    """The tags of a trial's live metrics: experiment, stage, Tune trial id, ensemble member (its validation fold)."""
    member = f"fold {params[ROTATION_KEY]}" if ROTATION_KEY in params else NO_MEMBER
    return TrialLabels(experiment=ctx.experiment or ctx.base.name, stage=ctx.stage.name, trial=trial_id, member=member)


def describe_trial(stage: str, trial_id: str, params: dict[str, Any]) -> str:
    """One line naming a trial and what it tries: the repr of its actor on the dashboard, and its log's first line.
    `architecture 5e1f2_00001 model.lstm_size=16 train.lr=0.003`; a promotion names the trial it continues."""
    parts = [stage, trial_id]
    for key, value in params.items():
        if key == CONTINUE_KEY and isinstance(value, dict):
            parts.append(f"from {value.get('from_stage')}/{value.get('from_trial')} at epoch {value.get('start_epoch')}")
        elif key == ROTATION_KEY:
            parts.append(f"member fold {value}")
        else:
            parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def trial_config(ctx: StageContext, params: dict[str, Any], trial_id: str) -> Config:
    """The one place a trial's run config is assembled (trials, their resources and the stage record use it)."""
    stage = ctx.stage
    values = stage.trial_values(params, ctx.base)
    # The run's own best/ is judged by the stage's metric, so the trial's best epoch is the one the scheduler saw.
    values.update({"train.epochs": stage.max_epochs, "train.metric": stage.metric, "train.mode": stage.mode,
                   "resources.storage": ctx.train_storage, "name": f"{stage.name}_{trial_id}"})
    config = ctx.base.replace(values)
    footprint = trial_footprint(config, ctx.longest, ctx.plan.num_workers).total_bytes
    return config.replace(ctx.plan.resources_overrides(footprint))


def trial_usd_per_hour(ctx: StageContext, params: dict[str, Any]) -> float | None:
    """What a trial of these params costs per hour it runs, at the stage plan's price (None: no price); the
    records' rule (`results.TrialRecord.cost`), for the live budget (protopo_ray.search.guard)."""
    price = ctx.plan.usd_per_device_hour
    return None if price is None else held_devices(trial_config(ctx, params, "budget").resources) * price


def trial_retries(ctx: StageContext) -> int:
    """Tune restarts of a failed trial: more on a spot / preemptible pool, where a preemption is a failure."""
    res = ctx.base.resources
    return res.spot_max_failures if ctx.plan.market in ("spot", "mixed") else res.trial_max_failures


def trial_resources(ctx: StageContext, driver_resources: dict[str, float]):
    """Tune's per-trial resource request, as a function of the trial's params (`tune.with_resources`)."""

    def resources(params: dict[str, Any]):
        if ctx.plan.num_workers > 1:  # a Train driver: the worker group reserves its own placement group
            return resource_dict_to_pg_factory(driver_resources)
        res = trial_config(ctx, params, "resources").resources
        request: dict[str, float] = {"CPU": res.cpus_per_worker}
        if res.gpus_per_worker:
            request["GPU"] = res.gpus_per_worker
        if res.accelerator_type:
            request[f"accelerator_type:{res.accelerator_type}"] = 0.001
        return resource_dict_to_pg_factory(request)

    return resources


def run_trial(params: dict[str, Any], *, ctx: StageContext, datasets: dict[str, Any] | None = None) -> None:
    """One Tune trial: in this process for one worker, else a Ray Train DDP run forwarding its reports."""
    entered = time.time()
    if ctx.budget_marker and storage.exists(ctx.budget_marker):
        # Tune filled a slot after the budget ran out: end without an epoch (guard.BudgetGuard). One report, as Tune
        # wants its metric in every trial's results; the guard stops the trial on it.
        ray.tune.report({ctx.stage.metric: float("nan"), "epoch": 0, BUDGET_KEY: 1.0})
        return
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(ctx, params, trial_id)
    labels = trial_labels(ctx, trial_id, params)
    # A reused actor keeps the repr of the first trial it ran (Ray sets it once): its log says which one runs now.
    print(f"trial {describe_trial(ctx.stage.name, trial_id, params)}", flush=True)
    if config.resources.num_workers <= 1:
        session = TuneSession(config, labels)
        session.report = _with_startup_times(session.report, entered)
        fit(config, session)
        return
    build_trainer(config, callbacks=[TuneReportCallback()], datasets=datasets, labels=labels).fit()


def _with_startup_times(report, entered: float):
    """`report` that adds, to the trial's first report, where its start-up went (tools/bench_search.py reads them):
    when the trial's process started (a reused actor: the first trial it ran), when `run_trial` was entered (this
    module, torch and PyG are imported by then: Tune imports them when it unpickles the trainable) and when the
    trial's config was built; the first step's time comes from the loop."""
    times = {"startup_process_unix": psutil.Process().create_time(), "startup_entered_unix": entered,
             "startup_imported_unix": time.time()}

    def first_report(metrics: dict[str, float], *args: Any) -> None:
        nonlocal times
        if times:
            metrics, times = {**metrics, **times}, {}
        report(metrics, *args)

    return first_report


def trial_trainable(ctx: StageContext, datasets: dict[str, Any] | None, driver_resources: dict[str, float]) -> type:
    """The stage's Tune trainable: `run_trial` in a class `Trial_<stage>` whose repr describes its trial, so the
    dashboard's Actors page tells the trials apart (a plain function trainable is `ImplicitFunc`, repr `run_trial`);
    its resources per trial as `tune.with_resources` would set them (whose subclass would rename the class)."""
    stage, resources = ctx.stage.name, trial_resources(ctx, driver_resources)

    class Trial(wrap_function(tune.with_parameters(run_trial, ctx=ctx, datasets=datasets))):
        @classmethod
        def default_resource_request(cls, config: dict[str, Any]):
            return resources(config)

        def __repr__(self) -> str:
            return describe_trial(stage, self.trial_id, self.config)

    Trial.__name__ = Trial.__qualname__ = f"Trial_{stage}"
    return Trial


def build_tuner(ctx: StageContext, *, tune_dir: str, driver_resources: dict[str, float], callbacks: list, seed: int,
                datasets: dict[str, Any] | None, keep_checkpoints: int, halving_file: Path,
                promoted: list[Continuation] | None = None, restore: bool = False, verbose: int | None = 0,
                stop: tune.Stopper | None = None):
    """The stage's Tuner. `verbose` is Tune's own console output: 0 (none: protopo_ray.search.console shows the
    stage through a callback), None for Tune's default trial tables (`--verbose`)."""
    trainable = trial_trainable(ctx, datasets, driver_resources)
    if restore:
        # Tune unpickles the stage's scheduler; SynchronousHalving then reads its rung decisions back from its file.
        return tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    stage, plan = ctx.stage, ctx.plan
    options = stage.tune_options(plan, seed, halving_file)
    parent, name = tune_dir.rstrip("/").rsplit("/", 1)
    return tune.Tuner(
        trainable,
        param_space=stage.param_space(promoted),
        tune_config=tune.TuneConfig(metric=stage.metric, mode=stage.mode, scheduler=options.scheduler,
                                    search_alg=options.search_alg, num_samples=options.num_samples,
                                    max_concurrent_trials=options.max_concurrent_trials,
                                    # One-worker trials run in the trial's actor: a stopped or paused trial's process
                                    # runs the next trial of the same resources, its torch / PyG imports already paid
                                    # (docs/benchmarks.md, "Trial start-up"). A DDP driver starts its own workers anyway.
                                    reuse_actors=plan.num_workers <= 1),
        run_config=tune.RunConfig(name=name, storage_path=parent, callbacks=callbacks, stop=stop,
                                  failure_config=tune.FailureConfig(max_failures=trial_retries(ctx)),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints),
                                  verbose=verbose),
    )


def trial_record(result, ctx: StageContext) -> TrialRecord:
    """A Tune `Result` as a TrialRecord (its config rebuilt by `trial_config`, as the trial built it)."""
    frame = result.metrics_dataframe
    rows = frame.to_dict(orient="records") if frame is not None and len(frame) else []
    history = [finite_metrics(row, skip=TUNE_COLUMNS) for row in rows]
    params = dict(result.config or {})
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    config = trial_config(ctx, params, trial_id)
    continuation = Continuation.from_params(params[CONTINUE_KEY]) if params.get(CONTINUE_KEY) else None
    epochs = int(max((row.get("epoch", 0) for row in history), default=0))
    status = "error" if result.error else ("completed" if epochs >= ctx.stage.max_epochs else "stopped")
    # When Tune ran the trial (1 s resolution): its start is the first result's timestamp less the time
    # the trainable had run by then (start-up included), its end the last result's timestamp.
    running = ([rows[0]["timestamp"] - rows[0].get("time_total_s", 0.0), rows[-1]["timestamp"]]
               if rows and finite(rows[0].get("timestamp")) else None)
    return TrialRecord(
        trial_id=trial_id, params=dict(continuation.params) if continuation else params, config=config,
        status=status, error=str(result.error)[:500] if result.error else None, epochs=epochs,
        start_epoch=continuation.start_epoch if continuation else 0,
        resumed_from=continuation.checkpoint if continuation else None,
        promoted_from=continuation.from_trial if continuation else None,
        best=ctx.stage.objective.best(history) or (history[-1] if history else {}),
        last=history[-1] if history else {}, history=history,
        checkpoint=latest_checkpoint(result, rows, ctx.train_storage),
        accelerator_hours=held_devices(config.resources) * sum(row.get("epoch_time_s", 0.0) for row in history) / 3600,
        running_unix=running,
    )


def latest_checkpoint(result, rows: list[dict[str, Any]], storage_uri: str) -> str | None:
    """The trial's latest checkpoint with its scheme: Ray reports paths inside its filesystem ("bucket/key")."""
    if result.checkpoint is not None:  # in-process trials report to Tune directly
        path = result.checkpoint.path
    else:  # Train runs: TuneReportCallback's column
        paths = [row[CHECKPOINT_KEY] for row in rows if isinstance(row.get(CHECKPOINT_KEY), str)]
        path = paths[-1] if paths else None
    return storage.with_scheme(path, like=storage_uri) if path else None


def collect_stage(results, ctx: StageContext, *, wall_time_s: float, budget_stop: BudgetStop | None = None,
                  num_trials: int = 0) -> StageRecord:
    """The stage record (`stages/<name>.json`): every trial, its history, best/last metrics, why it ended.

    When the budget stopped the stage (`budget_stop`), the trials that never reported an epoch are left out and
    counted as not started, of the stage's `num_trials`."""
    stage = ctx.stage
    trials = [trial_record(result, ctx) for result in results]
    if budget_stop is not None:
        trials = [t for t in trials if t.error or (t.history and not any(BUDGET_KEY in row for row in t.history))]
        budget_stop.unstarted_trials = max(0, num_trials - len(trials))
        for t in trials:
            if t.status == "stopped" and t.trial_id in budget_stop.stopped_trials:
                t.status = "budget"
    best = stage.objective.best(trials, lambda t: t.best.get(stage.metric))
    return StageRecord(
        stage=stage.name, kind=stage.kind, metric=stage.metric, mode=stage.mode, max_epochs=stage.max_epochs,
        **stage.record_fields(), plan=ctx.plan, wall_time_s=wall_time_s,
        epochs_run=sum(t.epochs - t.start_epoch for t in trials),
        epochs_full=sum(stage.max_epochs - t.start_epoch for t in trials),
        best_trial=best.trial_id if best else None, trials=trials,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), budget_stop=budget_stop,
    )
