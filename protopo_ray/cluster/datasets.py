"""Ray Data side of training: the split datasets a Ray Train run gets, and a worker's view of them.

Two paths, chosen by one rule (`splits.loading_mode`):
- **memory** (small sets, e.g. DeepTMHMM's 3.5k proteins): the driver reads each split with pyarrow and puts
  it in the object store (`from_arrow`); every rank streams the whole split once into one table and cuts its
  slice of the exact seeded global plan (`splits.MemorySplit`). Re-running a Ray Data pipeline per epoch cost
  seconds an epoch on 2 cores, more than a small epoch itself.
- **stream**: the driver reads nothing but the manifest. `ray.data.read_parquet` read tasks on the cluster
  feed `streaming_split` iterators, one per rank: train with `equal=True` (every rank the same number of
  rows), validation with `equal=False` (every protein exactly once, so its metrics stay exact); each epoch
  re-executes the pipeline with the file order reshuffled, and the rank buckets its stream
  (`splits.StreamSplit`). Read tasks ask for `DATA_CPUS` CPUs: the workers hold the node's CPUs, and a read
  task that waits for a whole free CPU never starts (measured here, docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray.data
import ray.train

from protopo_ray.config import Config
from protopo_ray.data import shards
from protopo_ray.training.splits import (
    MemorySplit,
    Split,
    StreamSplit,
    loading_mode,
    parquet_file_rows,
    split_folds,
    split_metadata,
)

#: Logical CPUs a Parquet read task reserves. 0: it runs in the CPU time the training workers leave (their
#: CPUs are all reserved by Train); Ray Data's backpressure still bounds how many run ahead of the consumers.
DATA_CPUS = 0.0


def run_mode(config: Config) -> str:
    return loading_mode(config, shards.read_manifest(config.data.path))


def _quiet_progress() -> None:
    """Every rank streams each split; Ray Data's per-stream progress bars would flood the console (200k lines
    for a 24-trial benchmark search). The dashboard shows dataset progress; RAY_DATA_DISABLE_PROGRESS_BARS=0
    brings them back. A dataset keeps the context it was created under, so this reaches the workers."""
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "0"


def load_datasets(config: Config) -> dict[str, Any]:
    """Ray Data datasets of the train and validation splits for a TorchTrainer (a stage builds them once and
    hands the same datasets to every trial)."""
    _quiet_progress()
    if run_mode(config) == "memory":
        return {split: named(ray.data.from_arrow(shards.read_table(config.data.path, folds=split_folds(config, split))),
                             config, split) for split in ("train", "val")}
    files, _ = shards.shard_files(config.data.path)

    def dataset(split: str, shuffle: bool):
        # One block per shard file; read tasks (`ReadShards`) stream each file's row groups as blocks.
        ds = ray.data.from_items([{"file": name} for name in files], override_num_blocks=len(files))
        if shuffle:  # a new file order every execution (= every epoch): the first level of the epoch's shuffle
            ds = ds.randomize_block_order()
        return ds.map_batches(read_shard_files, fn_kwargs={"path": config.data.path, "folds": split_folds(config, split)},
                              batch_size=1, batch_format="pyarrow", num_cpus=DATA_CPUS)

    return {"train": named(dataset("train", True), config, "train"), "val": named(dataset("val", False), config, "val")}


def named(dataset, config: Config, split: str):
    """`dataset` named after its run and split: the dashboard's Data page and Ray Data's metrics say which it is."""
    dataset.set_name(f"{config.name}.{split}")  # no "/": Ray Data names a log directory after it
    return dataset


def read_shard_files(batch: pa.Table, *, path: str, folds: tuple[str, ...]) -> Iterator[pa.Table]:
    """A read task: the rows of `folds` in the shard files named by `batch`, one row group per block."""
    for name in batch.column("file").to_pylist():
        yield from parquet_file_rows(path, name, folds)


def data_config(config: Config):
    """How Train hands the datasets to ranks: unsplit (memory) or one streaming split per rank (stream)."""
    if run_mode(config) == "memory":
        return ray.train.DataConfig(datasets_to_split=[])  # every rank takes its slice of one global plan
    return streaming_data_config()


def streaming_data_config():
    """A DataConfig that splits every dataset per rank."""
    class StreamingDataConfig(ray.train.DataConfig):
        """Train split `equal=True` (same rows on every rank), validation `equal=False` (each protein once)."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for rank, part in enumerate(ds.streaming_split(world_size, equal=name == "train",
                                                               locality_hints=worker_node_ids)):
                    output[rank][name] = part
            return output

    return StreamingDataConfig()


def worker_split(name: str, config: Config) -> Split:
    """Inside a Ray Train worker: this rank's split, as the run's mode says."""
    iterator = ray.train.get_dataset_shard(name)
    folds = split_folds(config, name)
    if run_mode(config) == "memory":
        parts = list(iterator.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2))
        if not parts:
            raise ValueError(f"the {name} split streamed no rows from {config.data.path}")
        return MemorySplit(pa.concat_tables(parts).combine_chunks(), config)

    def source(epoch: int):
        return iterator.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2)

    return StreamSplit(source, split_metadata(config.data.path, folds), config)
