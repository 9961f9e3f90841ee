"""`python -m protopo_ray.train`: one training run, in-process (`--local`) or as a Ray Train DDP job.

    python -m protopo_ray.train --config experiments/smoke.toml --local
    python -m protopo_ray.train --config experiments/train_default.toml --num-workers 2 --storage runs
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from protopo_ray.cluster.connect import ray_init
from protopo_ray.cluster.train_run import build_trainer
from protopo_ray.config import Config, describe_keys, load_config, parse_overrides, save_config
from protopo_ray.data import storage
from protopo_ray.prepare import ensure_run_data
from protopo_ray.training.fit import LocalSession, fit, validate_data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.train", description=__doc__, epilog=describe_keys(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file with [data] [model] [train] [resources] sections")
    parser.add_argument("--local", action="store_true", help="run in this process, without Ray")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (fractions only with one worker)")
    parser.add_argument("--storage", help="where runs go: local directory or s3:// / gs:// URI")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set model.lstm_size=512")
    parser.add_argument("--resume", action="store_true", help="continue the run of the same name from its checkpoint")
    return parser


def resolve(args: argparse.Namespace) -> Config:
    overrides = parse_overrides(args.set)
    if args.num_workers is not None:
        overrides["resources.num_workers"] = args.num_workers
    if args.gpus_per_worker is not None:
        overrides["resources.gpus_per_worker"] = args.gpus_per_worker
    if args.storage:
        overrides["resources.storage"] = args.storage
    config = load_config(args.config, overrides)
    # Ray workers run in their own working directory: hand them absolute paths.
    return config.replace({"data.path": storage.resolve(config.data.path),
                           "resources.storage": storage.resolve(config.resources.storage)})


def run_ray(config: Config, resume: bool = False) -> dict[str, float]:
    validate_data(config)
    run_dir = Path(storage.resolve(config.resources.storage)) / config.name
    if not storage.is_uri(config.resources.storage) and run_dir.exists() and not resume:
        raise FileExistsError(f"{run_dir} exists; pass --resume to continue that run or choose another name (--set name=...)")
    ray_init()
    result = build_trainer(config).fit()
    metrics = dict(result.metrics or {})
    if not storage.is_uri(config.resources.storage):
        save_config(config, run_dir / "config.json")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        config = resolve(args)
        ensure_run_data(config, args.config)  # the config's [experiment] synthetic set, made when data.path is empty
        if args.local:
            validate_data(config)
            session = LocalSession(config, resume=args.resume)
            save_config(config, session.run_dir / "config.json")
            metrics = fit(config, session)
        else:
            metrics = run_ray(config, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
