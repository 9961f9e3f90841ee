"""The sessions `training.fit` runs under on a cluster; this code runs inside Ray workers and Tune trial processes.

`RaySession`: one rank of a Ray Train DDP worker group (data streamed by Ray Data, gloo/NCCL, Train checkpoints).
`TuneSession`: a single-worker trial run inside its Tune trial process, which holds the worker's resources
itself; it skips the Train worker group's start-up, which cost ~40 s a trial (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
import torch.distributed as dist

from protopo_ray.cluster.datasets import worker_split
from protopo_ray.config import Config
from protopo_ray.data import shards, storage
from protopo_ray.monitoring.metrics import TrialLabels, emit_epoch
from protopo_ray.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    copy_checkpoint,
    find_checkpoints,
    load_checkpoint,
    load_latest_valid,
)
from protopo_ray.training.fit import fit
from protopo_ray.training.layout import BEST_DIR, META_FILE, METRICS_FILE
from protopo_ray.training.memory import process_watch
from protopo_ray.training.splits import MemorySplit, Split, loading_mode, local_split, split_folds

log = logging.getLogger(__name__)


class NoCudaError(RuntimeError):
    """Ray gave this worker GPUs but torch sees no CUDA device: training would silently run on the CPU."""


def require_cuda(config: Config, gpu_ids: list[str], cuda_available: bool, node: str = "") -> None:
    """Refuse to train on the CPU what Ray placed on GPUs, unless the config asks for the CPU (`train.device = "cpu"`:
    logical GPUs with CPU compute, as on the fake autoscaler and in the tests)."""
    if not gpu_ids or cuda_available or config.train.device == "cpu":
        return
    raise NoCudaError(
        f"Ray gave {config.name} GPU(s) {', '.join(gpu_ids)} on node {node or '?'}, but torch {torch.__version__} "
        f"(CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device, and train.device = "
        f"{config.train.device!r} would train on the CPU while the GPU stays reserved. Install a CUDA build of torch "
        f"and an NVIDIA driver it supports on the GPU nodes (`nvidia-smi` must work there); for logical GPUs with "
        f"CPU compute (a fake autoscaler, tests) set train.device = 'cpu'")


class StorageSession:
    """What every Ray-side run writes beside its checkpoints in `<storage>/<name>/`, local or object storage:
    metrics.jsonl (every epoch), workers.json (where each rank ran) and best/ (the best epoch's checkpoint); and
    each epoch's figures as live metrics tagged with `labels` (protopo_ray.monitoring.metrics; a run outside a search
    is experiment = stage "train" = its name)."""

    rank: int
    world_size: int

    def __init__(self, config: Config, labels: TrialLabels | None = None) -> None:
        self.config = config
        self.labels = labels or TrialLabels(experiment=config.name, stage="train", trial=config.name)
        self.emit_s = 0.0
        """Seconds this rank has spent setting live metrics (what they cost the run)."""
        self.history: list[str] = []
        runtime = ray.get_runtime_context()
        # Where this rank landed: node and accelerator ids (written to <run>/workers.json by rank 0).
        self.placement = {"rank": self.rank, "node_id": runtime.get_node_id(),
                          "gpu_ids": [str(i) for i in runtime.get_accelerator_ids().get("GPU", [])]}
        require_cuda(config, self.placement["gpu_ids"], torch.cuda.is_available(), node=runtime.get_node_id())

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def save_best(self, checkpoint_dir: Path) -> None:
        copy_checkpoint(checkpoint_dir, self.config.resources.storage, f"{self.config.name}/{BEST_DIR}")

    def record(self, metrics: dict[str, float], checkpoint_dir: Path | None, is_best: bool) -> None:
        """Rank 0's files for one epoch (every rank calls it: placements and peak memory are gathered)."""
        # Where every rank runs and its peak resident memory so far; every rank takes part (a collective).
        peaks = process_watch().peaks().as_dict()  # rss (shared pages too), anon (private), shmem (object store)
        placements = self.gather({**self.placement, **{f"peak_{k}": v for k, v in peaks.items()}})
        if self.rank == 0:
            began = time.perf_counter()
            cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            emit_epoch(self.labels, metrics, metric=self.config.train.metric, cuda_peak_bytes=cuda_peak)
            self.emit_s += time.perf_counter() - began
            self._write_file("workers.json", json.dumps(placements, indent=1))
            self._write_metrics(metrics)
            if checkpoint_dir is not None and is_best:
                self.save_best(checkpoint_dir)

    def _run_dir(self):
        filesystem, root = storage.filesystem(self.config.resources.storage)
        run_dir = f"{root}/{self.config.name}"
        filesystem.create_dir(run_dir, recursive=True)
        return filesystem, run_dir

    def _write_file(self, name: str, text: str) -> None:
        filesystem, run_dir = self._run_dir()
        with filesystem.open_output_stream(f"{run_dir}/{name}") as handle:
            handle.write(text.encode())

    def _write_metrics(self, metrics: dict[str, float]) -> None:
        """metrics.jsonl beside the run's checkpoints, rewritten whole (object stores cannot append)."""
        if not self.history:  # first report of this worker group: keep what earlier attempts wrote
            filesystem, run_dir = self._run_dir()
            try:
                with filesystem.open_input_stream(f"{run_dir}/{METRICS_FILE}") as handle:
                    lines = handle.read().decode().splitlines()
                self.history = [line for line in lines if json.loads(line).get("epoch", 0) < metrics["epoch"]]
            except (FileNotFoundError, OSError, ValueError):
                self.history = []
        self.history.append(json.dumps(metrics))
        self._write_file(METRICS_FILE, "\n".join(self.history) + "\n")


class RaySession(StorageSession):
    """A rank of a Ray Train worker group: its split streamed through Ray Data, DDP, checkpoints via Train."""

    def __init__(self, config: Config, labels: TrialLabels | None = None) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        super().__init__(config, labels)

    def split(self, name: str) -> Split:
        return worker_split(name, self.config)

    def all_min(self, value: int) -> int:
        if self.world_size <= 1:
            return value
        # NCCL reduces device tensors only; gloo host tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return int(flag.item())

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if self.world_size <= 1:
            return model
        if device.type == "cpu":  # also when GPUs are reserved but train.device forces the CPU
            return torch.nn.parallel.DistributedDataParallel(model)
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def gather(self, value: Any) -> list[Any]:
        if self.world_size <= 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def resume_state(self) -> Checkpoint | None:
        """The newest loadable checkpoint of this run (a continuation's `init_checkpoint` is `fit`'s business).

        Ray registers a checkpoint only after every rank has reported and the controller has polled, so
        after a crash its `get_checkpoint()` can lag behind what is already complete on disk (by several
        epochs when epochs are short). On local or NFS storage the run directory is scanned as well;
        `meta.json` is written last, so a checkpoint whose copy was cut short is skipped.
        """
        candidates: list[Path] = []
        if not storage.is_uri(self.config.resources.storage):
            run_dir = Path(self.config.resources.storage) / self.config.name
            candidates += [p for p in find_checkpoints(run_dir) if p.name != BEST_DIR]
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None and not storage.is_uri(checkpoint.path):
            candidates.append(Path(checkpoint.path))
        found = load_latest_valid(sorted(set(candidates)))
        if found is None and checkpoint is not None and storage.is_uri(checkpoint.path):
            try:
                with checkpoint.as_directory() as directory:
                    return load_checkpoint(directory)
            except CheckpointError as error:
                log.warning("%s; starting from the configured checkpoint instead", error)
        return found

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, is_best: bool) -> None:
        self.record(metrics, checkpoint_dir, is_best)
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir.name if checkpoint_dir else None)


class TableCache:
    """Split tables this process has read: (shard directory, folds, max_proteins, manifest) -> table. Tune reuses a
    one-worker trial's process for the next trial of the stage (trials.build_tuner, reuse_actors), which then
    reads no shard again: the read was most of a reused trial's start-up (docs/benchmarks.md, "Trial start-up")."""

    def __init__(self, max_tables: int = 4) -> None:  # train and val of two data sets
        self.max_tables = max_tables
        self.tables: dict[tuple[str, tuple[str, ...], int, str], pa.Table] = {}
        self.reads = 0
        """Tables read from the shards (not from this cache) by this process."""

    def split(self, config: Config, name: str, manifest: dict[str, Any]) -> MemorySplit:
        data = config.data
        folds = tuple(split_folds(config, name))
        # The manifest is rewritten whenever the shards are: a cached table is the one the shards hold now.
        key = (str(data.path), folds, data.max_proteins, json.dumps(manifest, sort_keys=True))
        table = self.tables.get(key)
        if table is None:
            self.reads += 1
        split = MemorySplit(table if table is not None else shards.read_table(data.path, folds=list(folds)), config)
        if table is None:
            if len(self.tables) >= self.max_tables:
                self.tables.clear()
            self.tables[key] = split.table  # sorted and cut to max_proteins already: the next trial's copy is cheap
        return split


#: The one cache of this process (a reused Tune actor keeps it).
TABLES = TableCache()


class TuneSession(StorageSession):
    """A single-worker search trial run in the Tune trial's own process (no Train worker group to start).

    The trial holds the resources its worker would (its GPU share, its CPUs), reads its splits from the shards
    directly, and reports to Tune with each checkpoint, so Tune's restore hands the checkpoint back.
    """

    rank, world_size = 0, 1

    def split(self, name: str) -> Split:
        """The split in memory, read once per process (a reused process hands the next trial the same table);
        streamed splits are not held."""
        manifest = shards.read_manifest(self.config.data.path)
        if loading_mode(self.config, manifest) != "memory":
            return local_split(self.config, name, mode="stream")
        return TABLES.split(self.config, name, manifest)

    def all_min(self, value: int) -> int:
        return value

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return model

    def resume_state(self) -> Checkpoint | None:
        """Tune's checkpoint of this trial, or the run's own best/ where that is newer.

        Tune registers a checkpoint only once the driver has processed the report that carried it, and restores
        from its last experiment snapshot: a driver killed in between restarts the trial from an older checkpoint
        (or from scratch) although the run had already saved a complete newer one as best/ (measured:
        `tests/test_tune.py::test_smoke_search_killed_then_resumed_end_to_end`). best/ counts only when it is
        this run's own: a promotion seeds best/ with the checkpoint it continues from, which is not.
        """
        state = None
        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state = load_checkpoint(directory)
        best = self._own_best()
        if best is not None and (state is None or best.epoch > state.epoch):
            log.info("resuming from best/ (epoch %d): newer than Tune's checkpoint (%s)", best.epoch,
                     state.epoch if state is not None else "none")
            return best
        return state

    def _own_best(self) -> Checkpoint | None:
        with tempfile.TemporaryDirectory(prefix="protopo-best-") as tmp:
            source = storage.join(self.config.resources.storage, self.config.name, BEST_DIR)
            if not storage.exists(storage.join(source, META_FILE)):
                return None
            try:
                state = load_checkpoint(storage.fetch_dir(source, Path(tmp) / "best"))
            except CheckpointError as error:
                log.warning("%s; not resuming from best/", error)
                return None
        return state if state.config.name == self.config.name else None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, is_best: bool) -> None:
        self.record(metrics, checkpoint_dir, is_best)
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)


LABELS_KEY = "monitor_labels"
"""The key of `train_loop_config` that carries the run's TrialLabels beside the config (`cluster.train_run`)."""


def train_fn_per_worker(config_dict: dict[str, Any]) -> None:
    """Ray Train entry point: one call per worker, the config as a plain dict (and its live metrics' labels)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config_dict = dict(config_dict)
    labels = config_dict.pop(LABELS_KEY, None)
    config = Config.from_dict(config_dict)
    fit(config, RaySession(config, TrialLabels.from_json(labels) if labels else None))
