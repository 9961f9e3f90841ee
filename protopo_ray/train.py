"""`python -m protopo_ray.train`: one training run, in-process (`--local`) or as a Ray Train DDP job.

    python -m protopo_ray.train --config experiments/smoke.toml --local
    python -m protopo_ray.train --config experiments/train_default.toml --num-workers 2 --storage runs

`--local` needs no Ray at all (a GPU box with torch and PyG only runs it). A config file's `[experiment]`
table may name the embedded synthetic set, which is then prepared at data.path when that holds no shards.
Shards prepared with ESM-2 embeddings (`prepare --embed-weights FILE`) need nothing more: the model's input width
comes from their manifest, and the checkpoint records the embedding model, layer and weights path for predict.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from protopo_ray.config import Config, ExperimentSettings, describe_keys, load_config, parse_overrides, save_config
from protopo_ray.training.fit import fit, validate_data
from protopo_ray.training.session import LocalSession


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.train", description=__doc__, epilog=describe_keys(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file with [data] [model] [train] [resources] sections")
    parser.add_argument("--local", action="store_true", help="run in this process, without Ray")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (fractions only with one worker)")
    parser.add_argument("--storage", help="where runs go: local directory or s3:// / gs:// URI")
    parser.add_argument("--shared-storage", action="store_true", help="the local --storage path is a mount every "
                        "node has (NFS): allowed on a multi-node cluster (resources.shared_storage = true)")
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
    if args.shared_storage:
        overrides["resources.shared_storage"] = True
    return load_config(args.config, overrides).with_absolute_paths()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        config = resolve(args)
        settings = ExperimentSettings.of_file(args.config)
        settings.ensure_data(config.data.path)
        if args.local:
            validate_data(config)
            session = LocalSession(config, resume=args.resume)
            save_config(config, session.run_dir / "config.json")
            metrics = fit(config, session)
        else:
            # Deferred on purpose: the in-process path above runs where Ray is not installed (a bare GPU box).
            from protopo_ray.cluster import train_run

            metrics = train_run.run(config, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
