"""`python -m protopo_ray.train`: one training run, in-process (`--local`) or as a Ray Train DDP job.

    python -m protopo_ray.train --config experiments/smoke.toml --local
    python -m protopo_ray.train --config experiments/train_default.toml --num-workers 2 --storage runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from protopo_ray import storage
from protopo_ray.config import Config, load_config, parse_overrides, save_config
from protopo_ray.runner import LocalSession, fit, validate_data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.train", description=__doc__,
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


#: True once this process started its own local cluster (so it may clean up after Ray's leaks there).
STARTED_LOCAL_CLUSTER = False


def running_cluster() -> str | None:
    """Address of a Ray cluster running on this machine (started by `ray start`), if its GCS is alive.

    `ray.init(address="auto")` trusts the address file of the last `ray start`; after that cluster died it
    retries a dead GCS for minutes. Only addresses of live GCS processes count here.
    """
    from ray._private import services

    live = services.find_gcs_addresses()
    recorded = services.find_bootstrap_address(None)
    if recorded and recorded in live:
        return recorded
    return next(iter(live)) if len(live) == 1 else None


def ray_init(**kwargs: Any):
    """Join the running cluster (RAY_ADDRESS, or a live local `ray start`), else start one bound to 127.0.0.1.

    Returns Ray's context (None when this process was already connected). `kwargs` go to a new local cluster.
    """
    import ray

    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS") or running_cluster()
    if address and address != "local":  # RAY_ADDRESS=local: always a new local cluster (tests, benchmarks)
        context = ray.init(address=address)
    else:
        # Ray starts workers at nice 15 by default; on a machine shared with other jobs that starves the
        # training workers (measured: 0.54x of an in-process run) and Ray's own placement-group cleanup
        # (stalled searches). A local cluster's processes inherit this environment.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # A local cluster keeps its dashboard on the loopback interface only.
        os.environ.pop("RAY_ADDRESS", None)
        # address="local": a new cluster even where an address file of another one lingers.
        context = ray.init(address="local", dashboard_host="127.0.0.1", include_dashboard=True, **kwargs)
        global STARTED_LOCAL_CLUSTER
        STARTED_LOCAL_CLUSTER = True
    url = context.dashboard_url
    print(f"Ray dashboard: {'http://' + url if url else 'not running'}", flush=True)
    return context


def build_trainer(config: Config, run_name: str | None = None, callbacks: list | None = None,
                  datasets: dict[str, Any] | None = None):
    """A TorchTrainer for `config`: datasets, scaling, storage, failures and checkpoint retention."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from protopo_ray.loader import load_datasets
    from protopo_ray.worker import train_fn_per_worker

    res = config.resources
    use_gpu = res.gpus_per_worker > 0
    resources_per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if use_gpu:
        resources_per_worker["GPU"] = res.gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=max(1, res.num_workers), use_gpu=use_gpu,
                                      resources_per_worker=resources_per_worker,
                                      accelerator_type=res.accelerator_type or None)
    cfg = config.train
    run_config = ray.train.RunConfig(
        name=run_name or config.name,
        storage_path=storage.resolve(res.storage),
        failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
        # Ray keeps the newest k (a restart resumes from the latest); rank 0 copies the best epoch to <run>/best.
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        callbacks=callbacks,
    )
    datasets = datasets or load_datasets(config)
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        # No Ray-side split: every rank reads the whole split and takes its slice of one global plan.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        # NCCL only where the workers really compute on GPUs (train.device = "cpu" forces gloo).
        torch_config=TorchConfig(backend="nccl" if use_gpu and config.train.device != "cpu" else "gloo"),
    )


def run_ray(config: Config, resume: bool = False) -> dict[str, float]:
    validate_data(config)
    run_dir = Path(storage.resolve(config.resources.storage)) / config.name
    if "://" not in config.resources.storage and run_dir.exists() and not resume:
        raise FileExistsError(f"{run_dir} exists; pass --resume to continue that run or choose another name (--set name=...)")
    ray_init()
    result = build_trainer(config).fit()
    metrics = dict(result.metrics or {})
    if "://" not in config.resources.storage:
        save_config(config, run_dir / "config.json")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        config = resolve(args)
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
