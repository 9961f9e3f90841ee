"""Running one stage of a search with Ray Tune, and turning Tune's results into the stage record.

Each Tune trial is a small driver function (0 CPU, or the cluster's `driver` resource) that launches the
Ray Train run of `protopo_ray.train` and forwards rank 0's per-epoch report to Tune (`TuneReportCallback`).
The Train run is named from the trial id, so a trial restored by `Tuner.restore` picks up its own Train
checkpoints instead of starting at epoch 0. ASHA (`time_attr="epoch"`) stops the weak trials; promotion is
a second Tuner over the chosen trials, each continuing from its latest checkpoint with a longer budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from protopo_ray.config import Config
from protopo_ray.experiment import StageSpec
from protopo_ray.hardware import StagePlan

CHECKPOINT_KEY = "checkpoint_path"  # what TuneReportCallback adds to a report that carried a checkpoint


def trial_driver(params: dict[str, Any], *, base: dict[str, Any], stage: dict[str, Any], train_storage: str,
                 overrides: dict[str, Any], datasets: dict[str, Any]) -> None:
    """One Tune trial: build the trial's run config and fit its TorchTrainer, reporting through Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from protopo_ray.trainer import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    values = {k: v for k, v in params.items() if k != "promote"}
    values.update(_public(params.get("promote", {})))
    values.update(overrides)
    values.update({"train.epochs": stage["max_epochs"], "resources.storage": train_storage,
                   "name": f"{stage['name']}_{trial_id}"})
    config = Config.from_dict(base).replace(values)
    build_trainer(config, callbacks=[TuneReportCallback()], datasets=datasets).fit()


def _public(values: dict[str, Any]) -> dict[str, Any]:
    """Run-config overrides only: keys starting with '_' are bookkeeping (e.g. the epoch a promotion starts at)."""
    return {k: v for k, v in values.items() if not k.startswith("_")}


def grid_points(stage: StageSpec) -> list[dict[str, Any]]:
    keys = list(stage.grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(stage.grid[k] for k in keys))]


def param_space(stage: StageSpec, promoted: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from ray import tune

    if stage.kind == "promotion":
        return {"promote": tune.grid_search(promoted or [])}
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


def build_tuner(stage: StageSpec, *, base: Config, plan: StagePlan, tune_dir: str, train_storage: str,
                driver_resources: dict[str, float], callbacks: list, seed: int, datasets: dict[str, Any],
                promoted: list[dict[str, Any]] | None = None, restore: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=base.to_dict(), stage={"name": stage.name, "max_epochs": stage.max_epochs},
                             train_storage=train_storage, overrides=plan.resources_overrides(), datasets=datasets),
        driver_resources,
    )
    if restore:
        return tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if stage.kind == "search" and stage.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=stage.max_epochs, grace_period=stage.grace_epochs,
                                  reduction_factor=stage.reduction_factor)
    search_alg, num_samples = None, stage.num_samples if stage.kind == "search" else 1
    shuffled = stage.kind == "search" and stage.search == "grid" and stage.order == "shuffled"
    if stage.kind == "search" and stage.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        search_alg = HyperOptSearch(random_state_seed=seed)
    elif shuffled:
        search_alg, num_samples = shuffled_grid(stage, seed, plan.max_concurrent_trials)
    return tune.Tuner(
        trainable,
        param_space=param_space(stage, promoted),
        tune_config=tune.TuneConfig(metric=stage.metric, mode=stage.mode, scheduler=scheduler, search_alg=search_alg,
                                    num_samples=num_samples,
                                    # The shuffled grid's generator enforces its own limit (Tune ignores this one for
                                    # generators); HyperOpt, a Searcher, gets Tune's ConcurrencyLimiter from it.
                                    max_concurrent_trials=None if shuffled else plan.max_concurrent_trials),
        run_config=tune.RunConfig(name=tune_dir.rstrip("/").rsplit("/", 1)[1], storage_path=tune_dir.rstrip("/").rsplit("/", 1)[0],
                                  callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  progress_reporter=progress_reporter(stage)),
    )


def progress_reporter(stage: StageSpec):
    """A compact status table: the searched values and a handful of metrics, not all forty."""
    from ray import tune

    metrics = {"epoch": "epoch", stage.metric: stage.metric, "val_loss": "val loss", "train_loss": "train loss"}
    return tune.CLIReporter(metric_columns=metrics, parameter_columns=list(stage.searched_keys) or None,
                            max_report_frequency=30, sort_by_metric=True, metric=stage.metric, mode=stage.mode)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_row(history: list[dict[str, float]], metric: str, mode: str) -> dict[str, float]:
    scored = [row for row in history if _finite(row.get(metric))]
    if not scored:
        return history[-1] if history else {}
    pick = max if mode == "max" else min
    return pick(scored, key=lambda row: row[metric])


def collect_stage(results, stage: StageSpec, *, base: Config, plan: StagePlan, wall_time_s: float,
                  train_storage: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The stage record (`stages/<name>.json`): every trial, its history, best/last metrics, why it ended."""
    trials = []
    for result in results:
        frame = result.metrics_dataframe
        rows = frame.to_dict(orient="records") if frame is not None and len(frame) else []
        history = [{k: float(v) for k, v in row.items() if _finite(v) and not k.startswith(("config/", "time_", "timestamp",
                    "pid", "iterations_since", "training_iteration", "done"))} for row in rows]
        checkpoints = [row[CHECKPOINT_KEY] for row in rows if isinstance(row.get(CHECKPOINT_KEY), str)]
        params = dict(result.config or {})
        promote = params.pop("promote", None)
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        values = {**_public(promote or {}), **params, **overrides, "train.epochs": stage.max_epochs,
                  "resources.storage": train_storage}
        config = base.replace(values).to_dict()
        config["name"] = f"{stage.name}_{trial_id}"
        epochs = int(max((row.get("epoch", 0) for row in history), default=0))
        start_epoch = int(promote.get("_start_epoch", 0)) if promote else 0
        status = "error" if result.error else ("completed" if epochs >= stage.max_epochs else "stopped")
        devices = plan.num_workers * (plan.gpus_per_worker if plan.device == "gpu" else plan.cpus_per_worker)
        # When Tune ran the trial (1 s resolution): its start is the first result's timestamp less the time
        # the trainable had run by then (start-up included), its end the last result's timestamp.
        running = ([rows[0]["timestamp"] - rows[0].get("time_total_s", 0.0), rows[-1]["timestamp"]]
                   if rows and _finite(rows[0].get("timestamp")) else None)
        trials.append({
            "trial_id": trial_id,
            "params": {**params, **promote["_params"], "promoted_from": promote["_from_trial"]} if promote else params,
            "config": config,
            "status": status,
            "error": str(result.error)[:500] if result.error else None,
            "epochs": epochs,
            "start_epoch": start_epoch,
            "resumed_from": promote.get("train.init_checkpoint") if promote else None,
            "best": best_row(history, stage.metric, stage.mode),
            "last": history[-1] if history else {},
            "history": history,
            "checkpoint": checkpoints[-1] if checkpoints else None,
            "accelerator_hours": devices * sum(row.get("epoch_time_s", 0.0) for row in history) / 3600,
            "running_unix": running,
        })
    ranked = sorted((t for t in trials if _finite(t["best"].get(stage.metric))),
                    key=lambda t: t["best"][stage.metric], reverse=stage.mode == "max")
    return {
        "stage": stage.name, "kind": stage.kind, "search": stage.search, "scheduler": stage.scheduler,
        "metric": stage.metric, "mode": stage.mode, "max_epochs": stage.max_epochs, "grace_epochs": stage.grace_epochs,
        "reduction_factor": stage.reduction_factor,
        "plan": dataclasses.asdict(plan),
        "wall_time_s": wall_time_s,
        "epochs_run": sum(t["epochs"] - t["start_epoch"] for t in trials),
        "epochs_full": sum(stage.max_epochs - t["start_epoch"] for t in trials),
        "best_trial": ranked[0]["trial_id"] if ranked else None,
        "trials": trials,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def promotion_candidates(records: list[dict[str, Any]], stage: StageSpec) -> list[dict[str, Any]]:
    """Top-k trials over the given stage records (by `stage.metric`), as overrides that continue them."""
    pool = [t for record in records for t in record["trials"] if t.get("checkpoint") and _finite(t["best"].get(stage.metric))]
    pool.sort(key=lambda t: t["best"][stage.metric], reverse=stage.mode == "max")
    chosen = []
    for trial in pool[: stage.top_k]:
        overrides = dict(trial["params"])
        overrides.update(_config_overrides(trial["config"]))
        overrides["train.init_checkpoint"] = trial["checkpoint"]
        overrides["_start_epoch"] = trial["epochs"]
        overrides["_from_trial"] = trial["trial_id"]
        overrides["_params"] = dict(trial["params"])
        chosen.append(overrides)
    return chosen


def _config_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys for a trial's full model/train/data config (resources come from the promotion plan)."""
    out = {}
    for section in ("data", "model", "train"):
        for key, value in config.get(section, {}).items():
            if key not in ("epochs", "init_checkpoint"):
                out[f"{section}.{key}"] = value
    return out


def save_stage(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
