"""`python -m protopo_ray.tune`: the whole search — stages of Ray Tune trials, promotion, winner, report.

    python -m protopo_ray.tune                          # experiments/default.toml on the synthetic set
    python -m protopo_ray.tune experiments/full.toml --data data/deeptmhmm --storage s3://bucket/runs
    python -m protopo_ray.tune experiments/full.toml --dry-run          # print the hardware plan and exit
    python -m protopo_ray.tune experiments/full.toml --resume           # continue an interrupted search

Layout of an experiment directory (STORAGE/NAME): experiment.json, stages/<stage>.json (one per finished
stage), tune/<stage>/ (Ray Tune's own state, what --resume restores), train/ (the trials' Ray Train runs and
checkpoints), winner/ (winner.json + the winning checkpoint), report.md and plots/, wandb/, logs/ray.log (what
Ray, W&B and the libraries print; `--verbose` prints it on the console instead, see protopo_ray/search/console.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protopo_ray.config import Config, parse_overrides
from protopo_ray.data import storage
from protopo_ray.search import plan as hardware
from protopo_ray.search import trials as stages
from protopo_ray.search.cost import PriceConfig
from protopo_ray.search.experiment import Experiment, StageSpec, load_experiment
from protopo_ray.search.inventory import format_inventory, inventory_from_cluster_yaml, inventory_json, read_inventory
from protopo_ray.search.rotation import build_ensemble, evaluate_ensemble, member_overrides

if TYPE_CHECKING:
    from protopo_ray.search.console import SearchConsole

log = logging.getLogger(__name__)
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def build_parser() -> argparse.ArgumentParser:
    from protopo_ray.config import describe_keys

    parser = argparse.ArgumentParser(prog="python -m protopo_ray.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="base config keys (--set KEY=VALUE):\n" + describe_keys())
    parser.add_argument("experiment", nargs="?", help="experiment TOML (default: experiments/default.toml)")
    parser.add_argument("--data", help="shard directory (overrides data.path)")
    parser.add_argument("--storage", help="where the experiment goes (overrides resources.storage)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base config value")
    parser.add_argument("--dry-run", action="store_true", help="print the inventory and the stage plans, then exit")
    parser.add_argument("--cluster", help="the autoscaler's cluster YAML: with --dry-run, plan for its full size without "
                        "a cluster; connected, plan for the nodes it may still start (a `ray up` head reads "
                        "~/ray_bootstrap_config.yaml by itself)")
    parser.add_argument("--json", action="store_true", help="print the inventory and the plan as JSON")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    parser.add_argument("--stages", help="comma-separated subset of stages to run")
    parser.add_argument("--no-wandb", action="store_true", help="no W&B runs")
    parser.add_argument("--verbose", action="store_true", help="Ray Tune's trial tables, the workers' and W&B's output "
                        "on the console (else in EXP/logs/ray.log)")
    return parser


def resolve_experiment(args: argparse.Namespace) -> Experiment:
    overrides = parse_overrides(args.set)
    if args.data:
        overrides["data.path"] = args.data
    if args.storage:
        overrides["resources.storage"] = args.storage
    experiment = load_experiment(args.experiment or EXPERIMENTS / "default.toml", overrides)
    # Trials run in other processes (and other working directories on a cluster): make local paths absolute.
    fixes = {"data.path": storage.resolve(experiment.base.data.path),
             "resources.storage": storage.resolve(experiment.base.resources.storage)}
    return dataclasses.replace(experiment, base=experiment.base.replace(fixes))


def max_length(config: Config) -> int:
    """Longest protein of the training split: with each config's batch plan it sets the trial footprints."""
    from protopo_ray.data.shards import read_table

    lengths = read_table(config.data.path, folds=config.data.train_folds, columns=["length"]).column("length")
    return int(max(lengths.to_pylist(), default=1))


def stage_configs(stage: StageSpec, base: Config, promoted: list[stages.Continuation] | None = None) -> list[Config]:
    if stage.kind == "promotion":
        return [base.replace(c.overrides) for c in promoted] if promoted else [base]
    if stage.kind == "ensemble":
        return [base.replace(member_overrides(base, fold)) for fold in stage.folds]
    if stage.search == "grid":
        return [base.replace(point) for point in stages.grid_points(stage)]
    # HyperOpt: size the plan for the largest corner of the space.
    corner = {k: (max(s["values"]) if s["dist"] == "choice" else s["high"]) for k, s in stage.space.items()}
    return [base.replace({k: v for k, v in corner.items() if not isinstance(v, str)})]


def plan_stage(stage: StageSpec, base: Config, inventory, longest: int,
               promoted: list[stages.Continuation] | None = None, prices: PriceConfig | None = None) -> hardware.StagePlan:
    configs = stage_configs(stage, base, promoted)
    if stage.kind in ("promotion", "ensemble"):
        # Final runs, planned alike: whole GPUs of the biggest type, DDP across several where there are more GPUs
        # than trials. Sized for one worker's share of the global batch on the most workers a trial could get.
        footprint = max(hardware.trial_footprints(configs, longest))
        trials = len(stage.folds) if stage.kind == "ensemble" else len(promoted) if promoted else stage.top_k
        plan = hardware.plan_promotion(inventory, footprint, num_trials=trials,
                                       max_workers=min(c.data.batch_size for c in configs), prices=prices)
        return dataclasses.replace(plan, kind=stage.kind)
    return hardware.plan_search(inventory, hardware.trial_footprints(configs, longest), prices=prices,
                                num_trials=stages.num_trials(stage), cpus_per_trial=base.resources.cpus_per_worker)


def plan_table(experiment: Experiment, inventory, longest: int) -> list[dict[str, Any]]:
    """Per stage, per config: GPU share, workers, CPUs, footprint, concurrency (what --dry-run --json prints).

    Stages that inherit the previous stage's best config are planned on the base config, and promotions on
    the base config with the stage's top_k: a dry run knows no results yet.
    """
    from protopo_ray.model.footprint import trial_footprint

    rows = []
    for stage in experiment.stages:
        plan = plan_stage(stage, experiment.base, inventory, longest, prices=experiment.prices)
        configs = stage_configs(stage, experiment.base)
        points = stages.grid_points(stage) if stage.kind == "search" and stage.search == "grid" else [{}]
        trials = []
        for point, config in zip(points, configs):
            footprint = trial_footprint(config, longest, plan.num_workers)
            share = plan.resources_overrides(footprint.total_bytes)
            trials.append({"params": point, "footprint_bytes": footprint.total_bytes,
                           "padded_positions": footprint.padded_positions,
                           "gpus_per_worker": share["resources.gpus_per_worker"],
                           "trials_per_gpu": plan.trials_per_gpu_for(footprint.total_bytes),
                           "num_workers": plan.num_workers, "cpus_per_worker": share["resources.cpus_per_worker"]})
        rows.append({"stage": stage.name, "kind": stage.kind, "device": plan.device,
                     "accelerator_type": plan.accelerator_type, "num_trials": plan.num_trials,
                     "usd_per_device_hour": plan.usd_per_device_hour, "market": plan.market,
                     "max_concurrent_trials": plan.max_concurrent_trials, "notes": list(plan.notes), "trials": trials})
    return rows


def run_stage(stage: StageSpec, base: Config, *, experiment: Experiment, exp_uri: str, exp_dir: Path,
              cluster_file: str | None, longest: int, records: dict[str, stages.StageRecord], resume: bool,
              use_wandb: bool, display: SearchConsole) -> stages.StageRecord:
    """Run one stage; Ray writes under `exp_uri` (local or object storage), our records under `exp_dir`."""
    from ray import tune

    from protopo_ray.cluster.connect import release_leaked_placement_groups
    from protopo_ray.search.tracking import wandb_callbacks

    promoted = None
    if stage.kind == "promotion":
        sources = [records[name] for name in (stage.from_stages or [list(records)[-1]])]
        promoted = stages.promotion_candidates(sources, stage)
        if not promoted:
            raise RuntimeError(f"stage {stage.name!r}: no trial with a checkpoint to promote from {list(stage.from_stages)}")
    # What the cluster holds now and what its autoscaler may still start: read again for every stage.
    inventory = read_inventory(cluster_file)
    plan = plan_stage(stage, base, inventory, longest, promoted, prices=experiment.prices)
    print(hardware.format_plan(plan, inventory), flush=True)
    tune_dir = storage.join(exp_uri, "tune", stage.name)
    restore = resume and tune.Tuner.can_restore(tune_dir)
    callbacks = wandb_callbacks(enabled=use_wandb, project=experiment.wandb_project, experiment=experiment.name,
                                stage=stage.name, log_dir=exp_dir / "wandb", verbose=display.verbose)
    view = display.stage_view(stage, num_trials=stages.num_trials(stage, len(promoted or [])),
                              start_epochs=[c.start_epoch for c in promoted or []])
    ctx = stages.StageContext.of(stage, base, plan, storage.join(exp_uri, "train"), longest)
    started = time.time()
    datasets = None
    if plan.num_workers > 1 and stage.kind != "ensemble":
        # Ray Train DDP trials: their splits go through Ray Data, loaded once per stage (ensemble members' folds
        # differ: each Train run loads its own)
        from protopo_ray.cluster.datasets import load_datasets

        datasets = load_datasets(base)
    tuner = stages.build_tuner(stage, ctx, tune_dir=tune_dir, driver_resources=hardware.driver_resources(inventory),
                               callbacks=[*callbacks, view], seed=experiment.seed, datasets=datasets,
                               keep_checkpoints=base.train.keep_checkpoints, promoted=promoted, restore=restore,
                               verbose=None if display.verbose else 0,
                               halving_state=exp_dir / "halving" / f"{stage.name}.json")
    with view:
        results = tuner.fit()
    release_leaked_placement_groups()
    record = stages.collect_stage(results, stage, ctx, wall_time_s=time.time() - started)
    if stage.kind == "ensemble":
        record.ensemble = build_ensemble(record, exp_dir)
    record.save(exp_dir / "stages" / f"{stage.name}.json")
    storage.upload(exp_dir, exp_uri)
    display.stage_done(record)
    return record


def pick_winner(record: stages.StageRecord, exp_dir: Path) -> dict[str, Any] | None:
    """Copy the best trial's checkpoint to winner/ and evaluate it once on the held-out test folds (an ensemble
    stage: its ensemble is the winner)."""
    from protopo_ray.training.fit import evaluate_checkpoint

    if record.ensemble is not None:
        return ensemble_winner(record, exp_dir)
    trial = record.best()
    if trial is None or not trial.checkpoint:
        return None
    target = exp_dir / "winner" / "checkpoint"
    shutil.rmtree(target, ignore_errors=True)
    # The trial's best epoch (by the stage metric; its run never lets best/ regress), else its latest checkpoint.
    best = storage.join(trial.run_uri, "best")
    source = best if storage.exists(storage.join(best, "meta.json")) else trial.checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(storage.fetch_dir(source, Path(tmp) / "checkpoint"), target)
    config = Config.from_dict(trial.config)
    test: dict[str, Any] = {}
    if config.data.test_folds:
        test = evaluate_checkpoint(target, config.replace({"data.max_proteins": 0}), split="test")
    winner = {"stage": record.stage, "trial_id": trial.trial_id, "params": trial.params, "config": trial.config,
              "val": trial.best, "test": test, "checkpoint": str(target), "source": source}
    (exp_dir / "winner" / "winner.json").write_text(json.dumps(winner, indent=1, default=_json_nan))
    return winner


def ensemble_winner(record: stages.StageRecord, exp_dir: Path) -> dict[str, Any]:
    """winner/ of an ensemble stage: its ensemble directory (members' checkpoints + ensemble.json), evaluated once
    on the test folds of the first member's config (every member has the same test folds)."""
    target = exp_dir / "winner" / "checkpoint"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(record.ensemble.path, target)
    config = Config.from_dict(record.trials[0].config).replace({"data.max_proteins": 0})
    test = evaluate_ensemble(target, config, split="test") if config.data.test_folds else {}
    winner = {"stage": record.stage, "trial_id": "ensemble", "params": {"members": record.ensemble.members,
              "entry_penalty": record.ensemble.entry_penalty}, "config": record.trials[0].config,
              "val": record.ensemble.out_of_fold, "test": test, "checkpoint": str(target),
              "source": record.ensemble.path}
    (exp_dir / "winner" / "winner.json").write_text(json.dumps(winner, indent=1, default=_json_nan))
    return winner


def _json_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        experiment = resolve_experiment(args)
        selected = args.stages.split(",") if args.stages else [s.name for s in experiment.stages]
        for name in selected:
            experiment.stage(name)
        exp_uri = storage.join(experiment.base.resources.storage, experiment.name)
        exp_dir = storage.working_dir(exp_uri)
        if storage.exists(storage.join(exp_uri, "experiment.json")) and not (args.resume or args.dry_run or args.stages):
            raise FileExistsError(f"{exp_dir} holds an experiment already; --resume continues it, "
                                  f"--set name=... starts another")
        from protopo_ray.prepare import ensure_data

        ensure_data(experiment.base.data.path, experiment.synthetic, experiment.seed)
        from protopo_ray.training.fit import validate_data

        validate_data(experiment.base)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from protopo_ray.search.console import SearchConsole, quiet_output

    # A search keeps Ray's, the workers' and W&B's output in its log file; a dry run has nothing to keep.
    log_path = None if args.verbose or args.dry_run else quiet_output(exp_dir / "logs" / "ray.log")
    display = SearchConsole(verbose=args.verbose, log_path=log_path)
    if args.dry_run and args.cluster:  # plan before the cluster exists: its YAML fully scaled out
        inventory = inventory_from_cluster_yaml(args.cluster)
    else:
        from protopo_ray.cluster.connect import ray_init

        ray_init(log_to_driver=log_path is None)
        inventory = read_inventory(args.cluster)
    longest = max_length(experiment.base)
    try:
        table = plan_table(experiment, inventory, longest)
        if args.json:
            print(json.dumps({"inventory": inventory_json(inventory), "longest_protein": longest,
                              "stages": table}, indent=1))
        else:
            print(format_inventory(inventory, experiment.prices))
            for stage in experiment.stages:  # a promotion planned for its top_k on the base config (no results yet)
                plan = plan_stage(stage, experiment.base, inventory, longest, prices=experiment.prices)
                print(f"{stage.name}:\n" + hardware.format_plan(plan, inventory))
    except hardware.PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0

    exp_dir.mkdir(parents=True, exist_ok=True)
    if args.resume or args.stages:
        storage.download(storage.join(exp_uri, "stages"), exp_dir / "stages")  # finished stages of a remote run
    (exp_dir / "experiment.json").write_text(json.dumps(
        {"name": experiment.name, "source": experiment.source, "stages": [s.name for s in experiment.stages],
         "base": experiment.base.to_dict()}, indent=1))
    records: dict[str, stages.StageRecord] = {}
    base = experiment.base
    for stage in experiment.stages:
        record_path = exp_dir / "stages" / f"{stage.name}.json"
        if stage.inherit == "best" and records:
            previous = list(records.values())[-1].best()
            if previous:
                base = Config.from_dict(previous.config).replace(
                    {"resources.storage": experiment.base.resources.storage, "train.init_checkpoint": ""})
        if record_path.exists() and (args.resume or stage.name not in selected):
            records[stage.name] = stages.StageRecord.load(record_path)
            print(f"stage {stage.name}: already finished, loaded {record_path}")
            continue
        if stage.name not in selected:
            continue
        records[stage.name] = run_stage(stage, base, experiment=experiment, exp_uri=exp_uri, exp_dir=exp_dir,
                                        cluster_file=args.cluster, longest=longest, records=records, resume=args.resume,
                                        use_wandb=not args.no_wandb, display=display)
    winner = pick_winner(list(records.values())[-1], exp_dir) if records else None
    from protopo_ray.report import write_report

    report = write_report(exp_dir)
    storage.upload(exp_dir, exp_uri)
    display.summary(winner=winner, report=report, metric=list(records.values())[-1].metric if records else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
