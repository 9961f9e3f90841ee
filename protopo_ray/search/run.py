"""The search: its stages one after another, each planned from the cluster it finds, then the winner.

Every stage reads the inventory again (what runs now, what the autoscaler may still start), plans its trials
(`Stage.plan`), runs them as one Ray Tune experiment (`trials.build_tuner`), and leaves its record in the
experiment directory (`results.ExperimentDir`), mirrored to object storage when that is where the experiment
lives. A stage with `inherit = "best"` starts from the previous stage's best config. The winner is the last
stage's best trial (or its ensemble), evaluated once on the held-out test folds.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from protopo_ray.cluster.connect import release_leaked_placement_groups
from protopo_ray.cluster.datasets import load_datasets
from protopo_ray.config import Config
from protopo_ray.data import shards, storage
from protopo_ray.model.footprint import trial_footprint
from protopo_ray.search import trials
from protopo_ray.search.console import SearchConsole
from protopo_ray.search.experiment import Experiment
from protopo_ray.search.inventory import Inventory, read_inventory
from protopo_ray.search.plan import driver_resources, format_plan
from protopo_ray.search.results import ExperimentDir, ExperimentRecord, StageRecord, WinnerRecord
from protopo_ray.search.stages import PromotionStage, SearchStage, Stage
from protopo_ray.search.tracking import wandb_callbacks
from protopo_ray.training.checkpoint import load_checkpoint
from protopo_ray.training.evaluation import evaluate_checkpoint
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
    """Run one stage; Ray writes under `exp_uri` (local or object storage), our records under `exp`."""
    promoted = stage.candidates(records) if isinstance(stage, PromotionStage) else None
    # What the cluster holds now and what its autoscaler may still start: read again for every stage.
    inventory = read_inventory(options.cluster_file)
    plan = stage.plan(inventory, base, longest, experiment.prices, promoted)
    print(format_plan(plan, inventory), flush=True)
    tune_dir = ExperimentDir.tune_uri(exp_uri, stage.name)
    restore = options.resume and tune.Tuner.can_restore(tune_dir)
    callbacks = wandb_callbacks(enabled=options.use_wandb, project=experiment.settings.wandb_project,
                                experiment=experiment.name, stage=stage.name, log_dir=exp.wandb_dir,
                                verbose=display.verbose)
    view = display.stage_view(stage, num_trials=stage.num_trials(promoted),
                              start_epochs=[c.start_epoch for c in promoted or []])
    ctx = trials.StageContext(stage=stage, base=base, plan=plan, train_storage=ExperimentDir.train_uri(exp_uri),
                              longest=longest)
    started = time.time()
    # Ray Train DDP trials reading the same splits: Ray Data datasets loaded once per stage (an ensemble's members
    # differ in their folds: each Train run loads its own).
    shared_data = plan.num_workers > 1 and all(_datasets_of(c) == _datasets_of(base)
                                               for c in stage.planned_configs(base, promoted))
    tuner = trials.build_tuner(ctx, tune_dir=tune_dir, driver_resources=driver_resources(inventory),
                               callbacks=[*callbacks, view], seed=experiment.settings.seed,
                               datasets=load_datasets(base) if shared_data else None,
                               keep_checkpoints=base.train.keep_checkpoints, promoted=promoted, restore=restore,
                               verbose=None if display.verbose else 0, halving_file=exp.halving_file(stage.name))
    with view:
        results = tuner.fit()
    release_leaked_placement_groups()
    record = trials.collect_stage(results, ctx, wall_time_s=time.time() - started)
    stage.finish(record, exp)
    exp.save_stage(record)
    storage.upload(exp.root, exp_uri)
    display.stage_done(record)
    return record


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
    exp.save_experiment(ExperimentRecord(name=experiment.name, source=experiment.source,
                                         stages=[s.name for s in experiment.stages], base=experiment.base))
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
        records[stage.name] = run_stage(stage, base, experiment=experiment, exp_uri=exp_uri, exp=exp,
                                        options=options, longest=longest, records=records, display=display)
    winner = pick_winner(list(records.values())[-1], exp) if records else None
    return records, winner
