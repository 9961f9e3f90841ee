"""Running one stage of a search with Ray Tune, and turning Tune's results into the stage record.

What a trial runs is decided in one place, `trial_config`: the stage's base config, the trial's searched
values (or, for a promotion, the `Continuation` of the trial it extends), the stage budget and metric, and
the trial's own hardware share from its footprint (`StagePlan.resources_overrides`).

Two kinds of trial, chosen by the plan's worker count:
- one worker (search stages): the Tune trial itself holds the worker's resources (its GPU share through
  `tune.with_resources` as a function of the trial's config) and runs `runner.fit` in its own process;
- several workers (promotion): the trial is a 0-CPU driver that fits a Ray Train DDP run named after the
  trial id (so a restored trial continues from its own Train checkpoints) and forwards rank 0's reports.
ASHA (`time_attr="epoch"`) stops the weak trials; promotion is a second Tuner over the chosen trials.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protopo_ray.config import Config
from protopo_ray.data import storage
from protopo_ray.search.experiment import StageSpec
from protopo_ray.search.plan import StagePlan
from protopo_ray.search.rotation import ROTATION_KEY, EnsembleRecord, member_overrides

CHECKPOINT_KEY = "checkpoint_path"  # what TuneReportCallback adds to a report that carried a checkpoint
CONTINUE_KEY = "continue"  # the Tune parameter that carries a promoted trial's Continuation


@dataclass(frozen=True, kw_only=True)
class Continuation:
    """A promoted trial: the trial it extends, and where that trial's training stopped."""

    from_stage: str
    from_trial: str
    checkpoint: str
    """The trial's latest checkpoint, as a path or a URI with its scheme (s3://, gs://)."""
    start_epoch: int
    params: dict[str, Any]
    """The values that trial searched (shown in the report)."""
    overrides: dict[str, Any]
    """Its full data / model / train config as dotted overrides (resources come from the promotion plan)."""

    def to_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, values: dict[str, Any]) -> Continuation:
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class StageContext:
    """What every trial of a stage shares (handed to each trial process)."""

    name: str
    max_epochs: int
    metric: str
    mode: str
    base: dict[str, Any]
    plan: StagePlan
    train_storage: str
    longest: int
    """Longest training protein: with the config's batch plan it sets the trial's memory footprint."""

    @classmethod
    def of(cls, stage: StageSpec, base: Config, plan: StagePlan, train_storage: str, longest: int) -> StageContext:
        return cls(name=stage.name, max_epochs=stage.max_epochs, metric=stage.metric, mode=stage.mode,
                   base=base.to_dict(), plan=plan, train_storage=train_storage, longest=longest)


def trial_config(ctx: StageContext, params: dict[str, Any], trial_id: str) -> Config:
    """The one place a trial's run config is assembled (trials, their resources and the stage record use it)."""
    from protopo_ray.model.footprint import trial_footprint

    values: dict[str, Any] = {}
    if params.get(ROTATION_KEY):  # an ensemble member: the base config on its own fold rotation
        values.update(member_overrides(Config.from_dict(ctx.base), params[ROTATION_KEY]))
    continuation = params.get(CONTINUE_KEY)
    if continuation:
        spec = Continuation.from_params(continuation)
        values.update(spec.overrides)
        values["train.init_checkpoint"] = spec.checkpoint
    values.update({k: v for k, v in params.items() if k not in (CONTINUE_KEY, ROTATION_KEY)})
    # The run's own best/ is judged by the stage's metric, so the trial's best epoch is the one ASHA saw.
    values.update({"train.epochs": ctx.max_epochs, "train.metric": ctx.metric, "train.mode": ctx.mode,
                   "resources.storage": ctx.train_storage, "name": f"{ctx.name}_{trial_id}"})
    config = Config.from_dict(ctx.base).replace(values)
    footprint = trial_footprint(config, ctx.longest, ctx.plan.num_workers).total_bytes
    return config.replace(ctx.plan.resources_overrides(footprint))


def trial_resources(ctx: StageContext, driver_resources: dict[str, float]):
    """Tune's per-trial resource request, as a function of the trial's params (`tune.with_resources`)."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

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
    import ray.tune

    entered = time.time()
    config = trial_config(ctx, params, ray.tune.get_context().get_trial_id())
    if config.resources.num_workers <= 1:
        from protopo_ray.cluster.sessions import TuneSession
        from protopo_ray.training.fit import fit

        session = TuneSession(config)
        session.report = _with_startup_times(session.report, entered)
        fit(config, session)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from protopo_ray.cluster.train_run import build_trainer

    build_trainer(config, callbacks=[TuneReportCallback()], datasets=datasets).fit()


def _with_startup_times(report, entered: float):
    """`report` that adds, to the trial's first report, where its start-up went (tools/bench_search.py reads them):
    when the trial's process started (a reused actor: the first trial it ran), when `run_trial` was entered and
    when torch / PyG and the training code had been imported; the first step's time comes from the loop."""
    import psutil

    times = {"startup_process_unix": psutil.Process().create_time(), "startup_entered_unix": entered,
             "startup_imported_unix": time.time()}

    def first_report(metrics: dict[str, float], *args: Any) -> None:
        nonlocal times
        if times:
            metrics, times = {**metrics, **times}, {}
        report(metrics, *args)

    return first_report


def grid_points(stage: StageSpec) -> list[dict[str, Any]]:
    keys = list(stage.grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(stage.grid[k] for k in keys))]


def param_space(stage: StageSpec, promoted: list[Continuation] | None = None) -> dict[str, Any]:
    from ray import tune

    if stage.kind == "promotion":
        return {CONTINUE_KEY: tune.grid_search([c.to_params() for c in promoted or []])}
    if stage.kind == "ensemble":
        return {ROTATION_KEY: tune.grid_search(list(stage.folds))}  # filled from the base when the file names none
    if stage.search == "grid":
        return {key: tune.grid_search(values) for key, values in stage.grid.items()}
    space = {}
    for key, spec in stage.space.items():
        dist = spec["dist"]
        if dist == "choice":
            space[key] = tune.choice(spec["values"])
        elif dist == "uniform":
            space[key] = tune.uniform(spec["low"], spec["high"])
        elif dist == "loguniform":
            space[key] = tune.loguniform(spec["low"], spec["high"])
        elif dist == "quniform":
            space[key] = tune.quniform(spec["low"], spec["high"], spec.get("q", 1))
        else:
            space[key] = tune.randint(spec["low"], spec["high"])
    return space


def num_trials(stage: StageSpec, promoted: int = 0) -> int:
    if stage.kind == "promotion":
        return promoted
    if stage.kind == "ensemble":
        return len(stage.folds)
    if stage.search == "grid":
        return math.prod(len(v) for v in stage.grid.values()) * stage.num_samples
    return stage.num_samples


def shuffled_grid(stage: StageSpec, seed: int, max_concurrent: int):
    """Every grid point (times num_samples) as a preset in seeded random order, at most `max_concurrent` at once.

    Returns Tune's variant generator and the number of samples (each preset is one sample).
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = grid_points(stage) * stage.num_samples
    random.Random(seed).shuffle(points)
    return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent), len(points)


def build_tuner(stage: StageSpec, ctx: StageContext, *, tune_dir: str, driver_resources: dict[str, float],
                callbacks: list, seed: int, datasets: dict[str, Any] | None, keep_checkpoints: int,
                promoted: list[Continuation] | None = None, restore: bool = False, verbose: int | None = 0,
                halving_state: str | Path | None = None):
    """The stage's Tuner. `verbose` is Tune's own console output: 0 (none: protopo_ray.search.console shows the stage
    through a callback), None for Tune's default trial tables (`--verbose`)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx, datasets=datasets),
                                    trial_resources(ctx, driver_resources))
    if restore:
        # Tune unpickles the stage's scheduler; SynchronousHalving then reads its rung decisions back from its file.
        return tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    plan = ctx.plan
    scheduler, limit = None, plan.max_concurrent_trials
    if stage.kind == "search" and stage.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=stage.max_epochs, grace_period=stage.grace_epochs,
                                  reduction_factor=stage.reduction_factor)
    elif stage.kind == "search" and stage.scheduler == "sha":
        from protopo_ray.search.halving import SynchronousHalving

        scheduler = SynchronousHalving(time_attr="epoch", metric=stage.metric, mode=stage.mode,
                                       grace=stage.grace_epochs, reduction_factor=stage.reduction_factor,
                                       max_t=stage.max_epochs, num_trials=num_trials(stage), state_file=halving_state)
        # Paused trials count as live for Tune's concurrency limits, and a rung waits for its whole cohort: with
        # a limit the stage would wait forever. The trials' own resource requests bound what runs at once.
        limit = 0
    search_alg, samples = None, stage.num_samples if stage.kind == "search" else 1
    shuffled = stage.kind == "search" and stage.search == "grid" and stage.order == "shuffled"
    if stage.kind == "search" and stage.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        search_alg = HyperOptSearch(random_state_seed=seed)
    elif shuffled:
        search_alg, samples = shuffled_grid(stage, seed, limit)
    parent, name = tune_dir.rstrip("/").rsplit("/", 1)
    return tune.Tuner(
        trainable,
        param_space=param_space(stage, promoted),
        tune_config=tune.TuneConfig(metric=stage.metric, mode=stage.mode, scheduler=scheduler, search_alg=search_alg,
                                    num_samples=samples,
                                    # The shuffled grid's generator enforces its own limit (Tune ignores this one for
                                    # generators); HyperOpt, a Searcher, gets Tune's ConcurrencyLimiter from it.
                                    max_concurrent_trials=None if shuffled or not limit else limit,
                                    # One-worker trials run in the trial's actor: a stopped or paused trial's process
                                    # runs the next trial of the same resources, its torch / PyG imports already paid
                                    # (docs/benchmarks.md, "Trial start-up"). A DDP driver starts its own workers anyway.
                                    reuse_actors=plan.num_workers <= 1),
        run_config=tune.RunConfig(name=name, storage_path=parent, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints),
                                  verbose=verbose),
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_row(history: list[dict[str, float]], metric: str, mode: str) -> dict[str, float]:
    scored = [row for row in history if _finite(row.get(metric))]
    if not scored:
        return history[-1] if history else {}
    pick = max if mode == "max" else min
    return pick(scored, key=lambda row: row[metric])


@dataclass(kw_only=True)
class TrialRecord:
    """One trial in `stages/<name>.json`: what it ran, how far it got, its metrics and its latest checkpoint."""

    trial_id: str
    params: dict[str, Any]
    """Searched values (a promoted trial: those of the trial it extends, plus `promoted_from`)."""
    config: dict[str, Any]
    status: str
    """completed, stopped (early, by the scheduler) or error."""
    error: str | None
    epochs: int
    start_epoch: int
    resumed_from: str | None
    best: dict[str, float]
    last: dict[str, float]
    history: list[dict[str, float]]
    checkpoint: str | None
    """Latest checkpoint: a local path or a URI with its scheme."""
    accelerator_hours: float
    running_unix: list[float] | None

    @property
    def run_uri(self) -> str:
        """The trial's run directory (metrics.jsonl, workers.json, best/)."""
        return storage.join(self.config["resources"]["storage"], self.config["name"])


@dataclass(kw_only=True)
class StageRecord:
    stage: str
    kind: str
    search: str
    scheduler: str
    metric: str
    mode: str
    max_epochs: int
    grace_epochs: int
    reduction_factor: int
    plan: dict[str, Any]
    wall_time_s: float
    epochs_run: int
    epochs_full: int
    best_trial: str | None
    trials: list[TrialRecord] = field(default_factory=list)
    finished_at: str = ""
    ensemble: EnsembleRecord | None = None
    """ensemble stages: the predictor its members make (protopo_ray.search.rotation.build_ensemble)."""

    def best(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.trial_id == self.best_trial), None)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> StageRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        trial_names = {f.name for f in dataclasses.fields(TrialRecord)}
        trials = [TrialRecord(**{k: v for k, v in t.items() if k in trial_names}) for t in values.get("trials", [])]
        return cls(**{**{k: v for k, v in values.items() if k in names}, "trials": trials,
                      "ensemble": EnsembleRecord.from_json(values.get("ensemble"))})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=str))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> StageRecord:
        return cls.from_json(json.loads(Path(path).read_text()))


_NOT_METRICS = ("config/", "time_", "timestamp", "pid", "iterations_since", "training_iteration", "done")


def trial_record(result, ctx: StageContext) -> TrialRecord:
    """A Tune `Result` as a TrialRecord (its config rebuilt by `trial_config`, as the trial built it)."""
    frame = result.metrics_dataframe
    rows = frame.to_dict(orient="records") if frame is not None and len(frame) else []
    history = [{k: float(v) for k, v in row.items() if _finite(v) and not k.startswith(_NOT_METRICS)} for row in rows]
    params = dict(result.config or {})
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    config = trial_config(ctx, params, trial_id)
    continuation = Continuation.from_params(params[CONTINUE_KEY]) if params.get(CONTINUE_KEY) else None
    epochs = int(max((row.get("epoch", 0) for row in history), default=0))
    status = "error" if result.error else ("completed" if epochs >= ctx.max_epochs else "stopped")
    res = config.resources
    devices = max(1, res.num_workers) * (res.gpus_per_worker if res.gpus_per_worker else res.cpus_per_worker)
    # When Tune ran the trial (1 s resolution): its start is the first result's timestamp less the time
    # the trainable had run by then (start-up included), its end the last result's timestamp.
    running = ([rows[0]["timestamp"] - rows[0].get("time_total_s", 0.0), rows[-1]["timestamp"]]
               if rows and _finite(rows[0].get("timestamp")) else None)
    return TrialRecord(
        trial_id=trial_id,
        params={**continuation.params, "promoted_from": continuation.from_trial} if continuation else params,
        config=config.to_dict(), status=status, error=str(result.error)[:500] if result.error else None,
        epochs=epochs, start_epoch=continuation.start_epoch if continuation else 0,
        resumed_from=continuation.checkpoint if continuation else None,
        best=best_row(history, ctx.metric, ctx.mode), last=history[-1] if history else {}, history=history,
        checkpoint=latest_checkpoint(result, rows, ctx.train_storage),
        accelerator_hours=devices * sum(row.get("epoch_time_s", 0.0) for row in history) / 3600,
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


def collect_stage(results, stage: StageSpec, ctx: StageContext, *, wall_time_s: float) -> StageRecord:
    """The stage record (`stages/<name>.json`): every trial, its history, best/last metrics, why it ended."""
    trials = [trial_record(result, ctx) for result in results]
    ranked = sorted((t for t in trials if _finite(t.best.get(stage.metric))),
                    key=lambda t: t.best[stage.metric], reverse=stage.mode == "max")
    return StageRecord(
        stage=stage.name, kind=stage.kind, search=stage.search, scheduler=stage.scheduler, metric=stage.metric,
        mode=stage.mode, max_epochs=stage.max_epochs, grace_epochs=stage.grace_epochs,
        reduction_factor=stage.reduction_factor, plan=dataclasses.asdict(ctx.plan), wall_time_s=wall_time_s,
        epochs_run=sum(t.epochs - t.start_epoch for t in trials),
        epochs_full=sum(stage.max_epochs - t.start_epoch for t in trials),
        best_trial=ranked[0].trial_id if ranked else None, trials=trials,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def promotion_candidates(records: list[StageRecord], stage: StageSpec) -> list[Continuation]:
    """Top-k trials over the given stage records (by `stage.metric`), each as the Continuation that extends it."""
    pool = [(record.stage, t) for record in records for t in record.trials
            if t.checkpoint and _finite(t.best.get(stage.metric))]
    pool.sort(key=lambda item: item[1].best[stage.metric], reverse=stage.mode == "max")
    return [Continuation(from_stage=name, from_trial=t.trial_id, checkpoint=t.checkpoint, start_epoch=t.epochs,
                         params=dict(t.params), overrides=_config_overrides(t.config))
            for name, t in pool[: stage.top_k]]


def _config_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys for a trial's full model/train/data config (resources come from the promotion plan)."""
    out = {}
    for section in ("data", "model", "train"):
        for key, value in config.get(section, {}).items():
            if key not in ("epochs", "init_checkpoint"):
                out[f"{section}.{key}"] = value
    return out
