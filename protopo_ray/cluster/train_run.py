"""The Ray Train side of one run: a `TorchTrainer` built from a Config (scaling, storage, failures, data)."""

from __future__ import annotations

from typing import Any

from protopo_ray.config import Config
from protopo_ray.data import storage


def build_trainer(config: Config, run_name: str | None = None, callbacks: list | None = None,
                  datasets: dict[str, Any] | None = None):
    """A TorchTrainer for `config`: datasets, scaling, storage, failures and checkpoint retention."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from protopo_ray.cluster.datasets import data_config, load_datasets
    from protopo_ray.cluster.sessions import train_fn_per_worker

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
        dataset_config=data_config(config),  # unsplit (in memory) or one stream per rank
        # NCCL only where the workers really compute on GPUs (train.device = "cpu" forces gloo).
        torch_config=TorchConfig(backend="nccl" if use_gpu and config.train.device != "cpu" else "gloo"),
    )
