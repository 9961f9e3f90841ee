"""Ray Data side of training: the split datasets a run hands to Ray Train, and a worker's view of them.

Flow: the driver puts each split (train, val) into the object store as Arrow blocks (`load_datasets`), the
TorchTrainer passes them to every worker unsplit, and each worker streams its split once into one Arrow
table (`stream_split`). Batching happens on the worker from there: every rank cuts the same seeded,
length-bucketed global plan (`batching`), takes its own slice, and collates PyG batches in a prefetch
thread (`runner.iter_batches`). Measured here: re-running a Ray Data pipeline every epoch cost seconds per
epoch on 2 cores, more than a small epoch itself, so the split is streamed once and batched locally.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from protopo_ray import shards
from protopo_ray.config import Config


def load_datasets(config: Config) -> dict[str, Any]:
    """Ray Data datasets of the train and validation splits, ready in the object store before workers start.

    `data.reader = "arrow"` (default): this process reads the Parquet shards with pyarrow (fold filter pushed
    into the scan, local or s3:// / gs://) and hands the Arrow tables to Ray Data (`from_arrow`): ~0.1 s for a
    split here. `"ray"`: `ray.data.read_parquet` read tasks, materialised — the route for shard sets too big
    for one process, but 2.5-6 s per split on 2 cores, and its tasks need free CPUs.
    Either way the data is in the object store before any worker starts: trial workers may hold every CPU
    of a node (2 trials x 1 CPU here), and a read task started after them would wait for a CPU forever.
    A stage of a search loads the splits once and hands the same blocks to every trial.
    """
    import ray.data

    # Every trial's workers stream each split once; Ray Data's per-stream progress bars then flood the console
    # (200k lines for a 24-trial benchmark search). The dashboard shows dataset progress; a dataset keeps the
    # context it was created under, so this reaches the workers. RAY_DATA_DISABLE_PROGRESS_BARS=0 brings them back.
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "0"
    splits = (("train", config.data.train_folds), ("val", config.data.val_folds))
    if config.data.reader == "arrow":
        return {split: ray.data.from_arrow(shards.read_table(config.data.path, folds=folds)) for split, folds in splits}
    from ray.data.expressions import col

    files, filesystem = shards.shard_files(config.data.path)
    return {split: ray.data.read_parquet(files, filesystem=filesystem).filter(expr=col("fold").is_in(list(folds)))
            .materialize() for split, folds in splits}


def stream_split(split: str, config: Config) -> pa.Table:
    """Inside a Ray Train worker: the whole split, streamed from the object store as Arrow batches."""
    import ray.train

    iterator = ray.train.get_dataset_shard(split)
    parts = list(iterator.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2))
    if not parts:
        raise ValueError(f"the {split} split streamed no rows from {config.data.path}")
    return pa.concat_tables(parts).combine_chunks()
