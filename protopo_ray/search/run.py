"""The search: its stages one after another, each planned from the cluster it finds, then the winner.

Every stage reads the inventory again (what runs now, what the autoscaler may still start), plans its trials
(`Stage.plan`), runs them as one Ray Tune experiment (`trials.build_tuner`), and leaves its record in the
experiment directory (`results.ExperimentDir`), mirrored to object storage when that is where the experiment
lives. A stage with `inherit = "best"` starts from the previous stage's best config. The winner is the last
stage's best trial (or its ensemble), evaluated once on the held-out test folds.
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.stopper import CombinedStopper

from protopo_ray.cluster.connect import (
    release_leaked_placement_groups,
    require_shared_storage,
    reserved_placement_groups,
)
from protopo_ray.cluster.datasets import load_datasets
from protopo_ray.config import Config
from protopo_ray.data import shards, storage
from protopo_ray.model.footprint import trial_footprint
from protopo_ray.monitoring.progress import StageMonitor
from protopo_ray.search import trials
from protopo_ray.search.console import SearchConsole
from protopo_ray.search.experiment import Experiment
from protopo_ray.search.fatal_errors import FatalTrialErrors
from protopo_ray.search.guard import BudgetGuard, NodeWatch, clear_marker, pool_node_types
from protopo_ray.search.inventory import Inventory, cluster_node_types, read_inventory
from protopo_ray.search.plan import driver_resources, format_plan
from protopo_ray.search.results import (
    BudgetStop,
    ExperimentDir,
    ExperimentRecord,
    StageRecord,
    WinnerRecord,
    held_devices,
)
from protopo_ray.search.stages import PromotionStage, SearchStage, Stage
from protopo_ray.search.tracking import wandb_callbacks
from protopo_ray.training.checkpoint import load_checkpoint
from protopo_ray.training.evaluation import evaluate_checkpoint, evaluate_checkpoint_from_sequence
from protopo_ray.training.predictor import choose_checkpoint_decoding


def longest_protein(config: Config) -> int:
    """Longest protein of the training split: with each config's batch plan it sets the trial footprints."""
    lengths = shards.read_table(config.data.path, folds=config.data.train_folds, columns=["length"]).column("length")
    return int(max(lengths.to_pylist(), default=1))


@dataclass(frozen=True, kw_only=True)
class TrialPlan:
    """One config of a stage's plan (what `--dry-run --json` prints)."""

    params: dict[str, Any]
    footprint_bytes: int
    padded_positions: int
    gpus_per_worker: float
    trials_per_gpu: int
    num_workers: int
    cpus_per_worker: float


@dataclass(frozen=True, kw_only=True)
class StagePlanRow:
    stage: str
    kind: str
    device: str
    accelerator_type: str
    num_trials: int
    usd_per_device_hour: float | None
    market: str
    max_concurrent_trials: int
    notes: list[str]
    trials: list[TrialPlan] = field(default_factory=list)


def plan_rows(experiment: Experiment, inventory: Inventory, longest: int) -> list[StagePlanRow]:
    """Per stage, per config: GPU share, workers, CPUs, footprint, concurrency.

    Stages that inherit the previous stage's best config are planned on the base config, and promotions on the
    base config with the stage's top_k: a dry run knows no results yet."""
    rows = []
    for stage in experiment.stages:
        plan = stage.plan(inventory, experiment.base, longest, experiment.prices)
        configs = stage.planned_configs(experiment.base)
        points = stage.grid_points() if isinstance(stage, SearchStage) and stage.search == "grid" else [{}]
        planned = []
        for point, config in zip(points, configs):
            footprint = trial_footprint(config, longest, plan.num_workers)
            share = plan.resources_overrides(footprint.total_bytes)
            planned.append(TrialPlan(params=point, footprint_bytes=footprint.total_bytes,
                                     padded_positions=footprint.padded_positions,
                                     gpus_per_worker=share["resources.gpus_per_worker"],
                                     trials_per_gpu=plan.trials_per_gpu_for(footprint.total_bytes),
                                     num_workers=plan.num_workers, cpus_per_worker=share["resources.cpus_per_worker"]))
        rows.append(StagePlanRow(stage=stage.name, kind=stage.kind, device=plan.device,
                                 accelerator_type=plan.accelerator_type, num_trials=plan.num_trials,
                                 usd_per_device_hour=plan.usd_per_device_hour, market=plan.market,
                                 max_concurrent_trials=plan.max_concurrent_trials, notes=list(plan.notes),
                                 trials=planned))
    return rows


def format_plans(experiment: Experiment, inventory: Inventory, longest: int) -> str:
    """Every stage's plan table (a promotion planned for its top_k on the base config: no results yet)."""
    return "\n".join(f"{stage.name}:\n" + format_plan(stage.plan(inventory, experiment.base, longest,
                                                                 experiment.prices), inventory)
                     for stage in experiment.stages)


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    cluster_file: str | None = None
    """The autoscaler's cluster YAML (else a `ray up` head's bootstrap config, if any)."""
    resume: bool = False
    """Continue an interrupted experiment: finished stages are loaded, an unfinished one restored."""
    selected: tuple[str, ...] = ()
    """Stages to run (empty: all); the others are loaded where finished."""
    use_wandb: bool = True


def run_stage(stage: Stage, base: Config, *, experiment: Experiment, exp_uri: str, exp: ExperimentDir,
              options: SearchOptions, longest: int, records: dict[str, StageRecord],
              display: SearchConsole) -> StageRecord:
    """Run one stage; Ray writes under `exp_uri` (local or object storage), our records under `exp`.

    It starts no trial that would take the search over its [budget] (`guard.BudgetGuard`; a restored stage runs
    with the guard it was first started with) and names the pool's node types that do not come up."""
    promoted = stage.candidates(records) if isinstance(stage, PromotionStage) else None
    # What the cluster holds now and what its autoscaler may still start: read again for every stage.
    inventory = read_inventory(options.cluster_file)
    require_shared_storage(exp_uri, shared=base.resources.shared_storage, num_nodes=len(inventory.nodes),
                           what=f"stage {stage.name}")
    plan = stage.plan(inventory, base, longest, experiment.prices, promoted)
    print(format_plan(plan, inventory), flush=True)
    tune_dir = ExperimentDir.tune_uri(exp_uri, stage.name)
    restore = options.resume and tune.Tuner.can_restore(tune_dir)
    callbacks = wandb_callbacks(enabled=options.use_wandb, project=experiment.settings.wandb_project,
                                experiment=experiment.name, stage=stage.name, log_dir=exp.wandb_dir,
                                verbose=display.verbose)
    fatal = FatalTrialErrors()  # a GPU node without CUDA: stop the stage at once, end the search with its error
    view = display.stage_view(stage, num_trials=stage.num_trials(promoted),
                              start_epochs=[c.start_epoch for c in promoted or []])
    budget = experiment.budget
    marker = ExperimentDir.budget_marker_uri(exp_uri, stage.name) if budget.bounded else ""
    if marker:
        clear_marker(marker)
    ctx = trials.StageContext(stage=stage, base=base, plan=plan, train_storage=ExperimentDir.train_uri(exp_uri),
                              longest=longest, budget_marker=marker, experiment=experiment.name)
    if budget.max_usd is not None and plan.usd_per_device_hour is None:
        display.console.print(f"budget: stage {stage.name}'s pool has no price ([prices]): its trials count $0 "
                              f"against max_usd", soft_wrap=True)
    spent_usd, spent_wall_s = spent(records)
    guard = BudgetGuard(budget, stage=stage.name, rate=functools.partial(trials.trial_usd_per_hour, ctx),
                        spent_usd=spent_usd, spent_wall_s=spent_wall_s, marker=marker, console=display.console)
    view.stop_reason = guard.stop_reason
    monitor = StageMonitor(experiment=experiment.name, stage=stage.name, max_epochs=stage.max_epochs,
                           labels=functools.partial(trials.trial_labels, ctx),
                           held_devices=lambda params: held_devices(trials.trial_config(ctx, params, "cost").resources),
                           usd_per_device_hour=plan.usd_per_device_hour, spent_usd=guard.spent, max_usd=budget.max_usd)
    watch = NodeWatch(pool_node_types(plan, cluster_node_types(options.cluster_file)), stage=stage.name,
                      wait_s=budget.node_wait_s, console=display.console)
    started = time.time()
    # Ray Train DDP trials reading the same splits: Ray Data datasets loaded once per stage (an ensemble's members
    # differ in their folds: each Train run loads its own).
    shared_data = plan.num_workers > 1 and all(_datasets_of(c) == _datasets_of(base)
                                               for c in stage.planned_configs(base, promoted))
    tuner = trials.build_tuner(ctx, tune_dir=tune_dir, driver_resources=driver_resources(inventory),
                               callbacks=[*callbacks, view, fatal, guard, watch, monitor],
                               stop=CombinedStopper(guard, fatal), seed=experiment.settings.seed,
                               datasets=load_datasets(base) if shared_data else None,
                               keep_checkpoints=base.train.keep_checkpoints, promoted=promoted, restore=restore,
                               verbose=None if display.verbose else 0, halving_file=exp.halving_file(stage.name))
    with view:
        results = tuner.fit()
    # Placement groups of finished or failed trials (Train worker groups may outlive their trial) hold GPUs.
    released = release_leaked_placement_groups()
    print(f"placement groups after stage {stage.name}: {released} left by its trials released, "
          f"{len(reserved_placement_groups())} reserved on the cluster (any job)", flush=True)
    fatal.raise_if_any(results)
    record = trials.collect_stage(results, ctx, wall_time_s=time.time() - started, budget_stop=guard.stop,
                                  num_trials=stage.num_trials(promoted))
    if record.budget_stop is None or not record.budget_stop.unstarted_trials:
        stage.finish(record, exp)  # an ensemble the budget left without all its members: its best member wins
    exp.save_stage(record)
    storage.upload(exp.root, exp_uri)
    display.stage_done(record)
    return record


def spent(records: dict[str, StageRecord]) -> tuple[float, float]:
    """Dollars and wall seconds the search's finished stages spent (a stage whose pool has no price: $0)."""
    usd = [record.cost().usd for record in records.values()]
    return sum(u for u in usd if not math.isnan(u)), sum(record.wall_time_s for record in records.values())


def budget_left(experiment: Experiment, records: dict[str, StageRecord]) -> str | None:
    """Why the search starts no further stage (a stage stopped on the budget, or a limit is reached), else None."""
    budget = experiment.budget
    # A stage stopped on this same budget (a --resume with a raised one goes on)
    stopped = next((r for r in records.values() if r.budget_stop is not None
                    and (r.budget_stop.max_usd, r.budget_stop.max_wall_s) == (budget.max_usd, budget.max_wall_s)), None)
    if stopped is not None:
        return f"stage {stopped.stage} {stopped.budget_stop.text()}"
    usd, wall_s = spent(records)
    limit = budget.exceeded(usd, wall_s)
    if limit is None:
        return None
    return BudgetStop(limit=limit, usd=usd, max_usd=budget.max_usd, wall_s=wall_s, max_wall_s=budget.max_wall_s).text()


def _datasets_of(config: Config) -> tuple:
    """What `cluster.datasets.load_datasets` reads for a config."""
    data = config.data
    return data.path, data.train_folds, data.val_folds, data.loading, data.stream_above_gib, data.max_proteins


def pick_winner(record: StageRecord, exp: ExperimentDir) -> WinnerRecord | None:
    """Copy the stage's result to winner/ and evaluate it once on the held-out test folds: its ensemble when it
    made one, else its best trial's best epoch (that run's best/, else its latest checkpoint), whose decoding
    (decoder = viterbi) is first chosen on the validation folds."""
    target = exp.winner_checkpoint
    shutil.rmtree(target, ignore_errors=True)
    if record.ensemble is not None:
        trial, source = record.trials[0], record.ensemble.path
        shutil.copytree(source, target)
        val = record.ensemble.out_of_fold
        winner_id, params = "ensemble", {"members": record.ensemble.members, **record.ensemble.decoding.to_json()}
    else:
        trial = record.best()
        source = trial.best_checkpoint() if trial is not None else None
        if source is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(storage.fetch_dir(source, Path(tmp) / "checkpoint"), target)
        val, winner_id, params = trial.best, trial.trial_id, trial.params
    run_config, decoding = trial.config, None
    if record.ensemble is None and run_config.model.decoder == "viterbi":
        decoding = choose_checkpoint_decoding(target).decoding
        run_config = load_checkpoint(target).config
    # Every ensemble member has the same test folds; the whole test split, never the capped quick-run one.
    config = run_config.replace({"data.max_proteins": 0})
    test = evaluate_checkpoint(target, config, split="test") if config.data.test_folds else {}
    if test:  # the same proteins from sequence alone, as predict builds a FASTA's (console: "test FASTA")
        test.update({f"fasta_{k}": v for k, v in evaluate_checkpoint_from_sequence(target, config, "test").items()})
    winner = WinnerRecord(stage=record.stage, trial_id=winner_id, params=params, config=run_config, val=val,
                          test=test, checkpoint=str(target), source=source,
                          promoted_from=trial.promoted_from if record.ensemble is None else None,
                          ensemble=record.ensemble, decoding=decoding)
    exp.save_winner(winner)
    return winner


def run_search(experiment: Experiment, *, exp_uri: str, exp: ExperimentDir, options: SearchOptions, longest: int,
               display: SearchConsole) -> tuple[dict[str, StageRecord], WinnerRecord | None]:
    """Every selected stage in order (finished ones loaded on --resume or when not selected), then the winner."""
    exp.root.mkdir(parents=True, exist_ok=True)
    if options.resume or options.selected:
        storage.download(storage.join(exp_uri, exp.stages_dir.name), exp.stages_dir)  # a remote run's stages
    summary = ExperimentRecord(name=experiment.name, source=experiment.source,
                               stages=[s.name for s in experiment.stages], base=experiment.base,
                               budget=experiment.budget)
    exp.save_experiment(summary)
    selected = options.selected or tuple(s.name for s in experiment.stages)
    records: dict[str, StageRecord] = {}
    base = experiment.base
    for stage in experiment.stages:
        if stage.inherit == "best" and records:
            previous = list(records.values())[-1].best()
            if previous:
                base = previous.config.replace({"resources.storage": experiment.base.resources.storage,
                                                "train.init_checkpoint": ""})
        if exp.stage_file(stage.name).exists() and (options.resume or stage.name not in selected):
            records[stage.name] = exp.load_stage(stage.name)
            display.stage_loaded(stage.name, exp.stage_file(stage.name))
            continue
        if stage.name not in selected:
            continue
        stop = budget_left(experiment, records)
        if stop is not None:
            summary.skipped[stage.name] = stop
            exp.save_experiment(summary)
            display.stage_skipped(stage.name, stop)
            continue
        records[stage.name] = run_stage(stage, base, experiment=experiment, exp_uri=exp_uri, exp=exp,
                                        options=options, longest=longest, records=records, display=display)
    # The winner comes from what finished: a stage the budget stopped before any trial reported an epoch is passed.
    finished = [r for r in records.values() if r.budget_stop is None or r.best_trial]
    winner = pick_winner(finished[-1], exp) if finished else None
    return records, winner
