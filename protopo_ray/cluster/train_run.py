"""A Ray Train run of a `Config`: the `TorchTrainer` (scaling, storage, failures, datasets) and running it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from protopo_ray.cluster.connect import TRAIN_STATE_TRACKING_ENV, cluster_node_count, ray_init, require_shared_storage
from protopo_ray.cluster.datasets import data_config, load_datasets
from protopo_ray.cluster.sessions import LABELS_KEY, train_fn_per_worker
from protopo_ray.config import Config, save_config
from protopo_ray.data import storage
from protopo_ray.monitoring.metrics import TrialLabels
from protopo_ray.training.fit import validate_data


def build_trainer(config: Config, run_name: str | None = None, callbacks: list | None = None,
                  datasets: dict[str, Any] | None = None, labels: TrialLabels | None = None) -> TorchTrainer:
    """A TorchTrainer for `config`: datasets, scaling, storage, failures and checkpoint retention; `labels` tag its
    live metrics (a search's trial; default: the run's own name)."""
    # Read by the trainer in this process at fit(), which hands it on to the controller: the run, its attempts and
    # workers show on the dashboard's Train page. A search's trial processes do not inherit the driver's environment.
    os.environ.setdefault(TRAIN_STATE_TRACKING_ENV, "1")
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
        train_loop_config={**config.to_dict(), **({LABELS_KEY: labels.to_json()} if labels else {})},
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=data_config(config),  # unsplit (in memory) or one stream per rank
        # NCCL only where the workers really compute on GPUs (train.device = "cpu" forces gloo).
        torch_config=TorchConfig(backend="nccl" if use_gpu and config.train.device != "cpu" else "gloo"),
    )


def run(config: Config, resume: bool = False) -> dict[str, float]:
    """Fit `config` as a Ray Train job on the cluster this process joins; the last epoch's metrics.

    A new run refuses a local run directory that exists already (Ray would silently continue it): `resume`
    continues it on purpose; and a local storage path on a cluster of more than one node alive, unless declared
    shared (`resources.shared_storage`)."""
    validate_data(config)
    run_dir = Path(storage.resolve(config.resources.storage)) / config.name
    if not storage.is_uri(config.resources.storage) and run_dir.exists() and not resume:
        raise FileExistsError(f"{run_dir} exists; pass --resume to continue that run or choose another name (--set name=...)")
    ray_init(job_name=config.name)
    require_shared_storage(config.resources.storage, shared=config.resources.shared_storage,
                           num_nodes=cluster_node_count(), what=f"run {config.name}")
    result = build_trainer(config).fit()
    if not storage.is_uri(config.resources.storage):
        save_config(config, run_dir / "config.json")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    return dict(result.metrics or {})
