"""`python -m protopo_ray.tune`: the whole search — stages of Ray Tune trials, promotion, winner, report.

    python -m protopo_ray.tune                          # experiments/default.toml on the synthetic set
    python -m protopo_ray.tune experiments/full.toml --data data/deeptmhmm --storage s3://bucket/runs
    python -m protopo_ray.tune experiments/full.toml --dry-run          # print the hardware plan and exit
    python -m protopo_ray.tune experiments/full.toml --resume           # continue an interrupted search
    python -m protopo_ray.tune experiments/full.toml --storage /mnt/nfs/runs --shared-storage  # NFS on every node
    python -m protopo_ray.tune experiments/smoke.toml --prometheus      # and a local Prometheus while it runs

The experiment directory (STORAGE/NAME) is laid out in protopo_ray/search/results.py and described field by
field in docs/results.md: experiment.json, stages/<stage>.json, the trials' runs, winner/, report.md and plots/,
logs/ray.log (what Ray, W&B and the libraries print; `--verbose` prints it on the console instead).
ESM-2 embeddings: point --data at shards prepared with `prepare --embed-weights FILE`; every trial's model takes
the wider input the manifest records, and the winner's checkpoint carries the weights path predict embeds with.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from protopo_ray.cluster.connect import (
    ClusterAuthError,
    SharedStorageError,
    ray_init,
    require_shared_storage,
    session_dir,
)
from protopo_ray.cluster.logs import quiet_output
from protopo_ray.cluster.sessions import NoCudaError
from protopo_ray.config import describe_keys, parse_overrides
from protopo_ray.data import storage
from protopo_ray.monitoring.grafana import provision
from protopo_ray.monitoring.prometheus import PrometheusError, find_prometheus, local_prometheus, pick_port
from protopo_ray.reporting.markdown import write_report
from protopo_ray.search.console import SearchConsole
from protopo_ray.search.experiment import Experiment, load_experiment
from protopo_ray.search.inventory import format_inventory, inventory_from_cluster_yaml, inventory_json, read_inventory
from protopo_ray.search.plan import PlanError
from protopo_ray.search.results import ExperimentDir
from protopo_ray.search.run import SearchOptions, format_plans, longest_protein, plan_rows, run_search
from protopo_ray.training.fit import validate_data

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="base config keys (--set KEY=VALUE):\n" + describe_keys())
    parser.add_argument("experiment", nargs="?", help="experiment TOML (default: experiments/default.toml)")
    parser.add_argument("--data", help="shard directory (overrides data.path)")
    parser.add_argument("--storage", help="where the experiment goes (overrides resources.storage)")
    parser.add_argument("--shared-storage", action="store_true", help="the local --storage path is a mount every "
                        "node has (NFS): allowed on a multi-node cluster (resources.shared_storage = true)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base config value")
    parser.add_argument("--dry-run", action="store_true", help="print the inventory and the stage plans, then exit")
    parser.add_argument("--cluster", help="the autoscaler's cluster YAML: with --dry-run, plan for its full size without "
                        "a cluster; connected, plan for the nodes it may still start (a `ray up` head reads "
                        "~/ray_bootstrap_config.yaml by itself)")
    parser.add_argument("--json", action="store_true", help="print the inventory and the plan as JSON")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    parser.add_argument("--stages", help="comma-separated subset of stages to run")
    parser.add_argument("--no-wandb", action="store_true", help="no W&B runs")
    parser.add_argument("--prometheus", action="store_true", help="run a local Prometheus (the `prometheus` binary on "
                        "PATH) on Ray's scrape configuration for the search's lifetime and print its URL "
                        "(docs/monitoring.md)")
    parser.add_argument("--verbose", action="store_true", help="Ray Tune's trial tables, the workers' and W&B's output "
                        "on the console (else in EXP/logs/ray.log)")
    return parser


def resolve_experiment(args: argparse.Namespace) -> Experiment:
    overrides = parse_overrides(args.set)
    if args.data:
        overrides["data.path"] = args.data
    if args.storage:
        overrides["resources.storage"] = args.storage
    if args.shared_storage:
        overrides["resources.shared_storage"] = True
    experiment = load_experiment(args.experiment or EXPERIMENTS / "default.toml", overrides)
    return dataclasses.replace(experiment, base=experiment.base.with_absolute_paths())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        experiment = resolve_experiment(args)
        selected = tuple(args.stages.split(",")) if args.stages else ()
        for name in selected:
            experiment.stage(name)
        exp_uri = storage.join(experiment.base.resources.storage, experiment.name)
        exp = ExperimentDir(storage.working_dir(exp_uri))
        if storage.exists(storage.join(exp_uri, exp.experiment_file.name)) and not (
                args.resume or args.dry_run or args.stages):
            raise FileExistsError(f"{exp.root} holds an experiment already; --resume continues it, "
                                  f"--set name=... starts another")
        experiment.settings.ensure_data(experiment.base.data.path)
        validate_data(experiment.base)
        if args.prometheus and not args.dry_run:
            find_prometheus()
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, PrometheusError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    prometheus_port = None
    if args.prometheus and not args.dry_run:
        # Chosen before a local cluster starts, so that its dashboard's Metrics view queries this Prometheus.
        prometheus_port = pick_port()
        os.environ.setdefault("RAY_PROMETHEUS_HOST", f"http://127.0.0.1:{prometheus_port}")

    # A search keeps Ray's, the workers' and W&B's output in its log file; a dry run has nothing to keep.
    log_path = None if args.verbose or args.dry_run else quiet_output(exp.log_file)
    display = SearchConsole(verbose=args.verbose, log_path=log_path)
    if args.dry_run and args.cluster:  # plan before the cluster exists: its YAML fully scaled out
        inventory = inventory_from_cluster_yaml(args.cluster)
    else:
        try:  # the dashboard's Jobs page names the driver job after the experiment
            ray_init(log_to_driver=log_path is None, job_name=experiment.name)
        except ClusterAuthError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        inventory = read_inventory(args.cluster)
    longest = longest_protein(experiment.base)
    try:
        if args.json:
            print(json.dumps({"inventory": inventory_json(inventory), "longest_protein": longest,
                              "stages": [dataclasses.asdict(row) for row in plan_rows(experiment, inventory, longest)]},
                             indent=1))
        else:
            print(format_inventory(inventory, experiment.prices))
            print(format_plans(experiment, inventory, longest))
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0

    options = SearchOptions(cluster_file=args.cluster, resume=args.resume, selected=selected,
                            use_wandb=not args.no_wandb)
    try:  # every stage checks again: nodes join and leave
        require_shared_storage(exp_uri, shared=experiment.base.resources.shared_storage,
                               num_nodes=len(inventory.nodes), what="this search")
        with contextlib.ExitStack() as running:
            if prometheus_port is not None:
                url = running.enter_context(local_prometheus(session_dir(), prometheus_port))
                dashboard = provision(session_dir())
                print(f"Prometheus: {url} (scrapes this cluster's nodes until the search ends; Grafana dashboard "
                      f"{dashboard})", flush=True)
            records, winner = run_search(experiment, exp_uri=exp_uri, exp=exp, options=options, longest=longest,
                                         display=display)
    except (SharedStorageError, NoCudaError, PrometheusError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = write_report(exp.root)
    storage.upload(exp.root, exp_uri)
    display.summary(winner=winner, report=report, metric=list(records.values())[-1].metric if records else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
