"""One training run, start to finish: `fit(config, session)`.

The same function runs in-process (`LocalSession`, `python -m protopo_ray.train --local`) and inside every
Ray Train worker (`worker.RaySession`). A session says where the split tables come from, how the model is
wrapped (DDP or not), how per-protein results are gathered across ranks, and where metrics and
checkpoints go. Everything else (the plan of batches, the loop, the metrics) is shared.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from protopo_ray.config import Config
from protopo_ray.data import collate, shards, storage
from protopo_ray.model.metrics import METRIC_KEYS, aggregate
from protopo_ray.model.network import TopologyModel
from protopo_ray.training import loop
from protopo_ray.training.checkpoint import (
    BestTracker,
    TrainState,
    checkpoint_epoch,
    copy_checkpoint,
    find_checkpoints,
    load_checkpoint,
    load_latest_valid,
    rng_state,
    save_checkpoint,
    unwrap,
)
from protopo_ray.training.memory import process_watch, tame_allocator, trim
from protopo_ray.training.schedule import EpochSchedule
from protopo_ray.training.splits import SPLIT_FOLDS, Split, id_keys, local_split, lockstep

log = logging.getLogger(__name__)

#: Every metric a run reports each epoch (a stage metric must be one of these).
REPORTED_METRICS = (
    ("epoch", "val_loss", "epoch_time_s", "train_padding_efficiency", "train_proteins_all_ranks", "train_rank_overlap",
     "resumed_from_epoch", "peak_rss_bytes_max_rank", "peak_anon_bytes_max_rank")
    + tuple(f"val_{key}" for key in METRIC_KEYS)
    + tuple(loop.EpochStats().as_metrics().keys())
)


class Session(Protocol):
    rank: int
    world_size: int

    def split(self, name: str) -> Split:
        """This rank's view of split `name` ("train" / "val"): held in memory or streamed (`stream`)."""
    def all_min(self, value: int) -> int:
        """The minimum of `value` over all ranks (a collective; identity with one rank)."""
    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module: ...
    def gather(self, value: Any) -> list[Any]: ...
    def resume_state(self) -> TrainState | None:
        """The newest complete checkpoint of this run itself (not `train.init_checkpoint`), if any."""
    def save_best(self, checkpoint_dir: Path) -> None:
        """Make a (complete) checkpoint directory the run's `<run>/best`."""
    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, is_best: bool) -> None:
        """Record an epoch: metrics always, the checkpoint when one was written (also as best/ when best)."""


def validate_data(config: Config) -> dict[str, Any]:
    """Fail before any worker starts: shards exist, every configured fold is in them, no split is empty."""
    manifest = shards.read_manifest(config.data.path)
    folds = manifest.get("counts", {}).get("fold", {})
    for split, attr in SPLIT_FOLDS.items():
        wanted = getattr(config.data, attr)
        missing = [f for f in wanted if f not in folds]
        if missing:
            raise ValueError(f"data.{attr}: fold(s) {missing} not in the shards at {config.data.path} "
                             f"(folds there: {sorted(folds)}); fix the experiment's folds or re-run prepare")
        if split != "test" and sum(folds.get(f, 0) for f in wanted) == 0:
            raise ValueError(f"data.{attr} = {list(wanted)}: the {split} split is empty in {config.data.path}")
    return manifest


def collated(tables: Iterable[pa.Table], depth: int = 2) -> Iterator:
    """PyG batches of a stream of Arrow batch tables, collated in a prefetch thread ahead of the step."""
    return loop.prefetch(collate.table_to_batch, tables, depth)


def iter_batches(table: pa.Table, plan: list[np.ndarray], prefetch_depth: int = 2) -> Iterator:
    """Collated batches of a plan of row indices into `table` (tools that plan their own batches)."""
    return collated((table.take(pa.array(idx)) for idx in plan), prefetch_depth)


def evaluate_split(model, split: Split, config: Config, device, session: Session | None = None) -> dict[str, float]:
    """Loss and the full metric dict over a split; with a session, over all ranks' parts of it (each protein once)."""
    rank, world = (session.rank, session.world_size) if session is not None else (0, 1)
    loss_sum, residues, results = loop.evaluate(model, collated(split.eval_batches(rank, world)), device,
                                                config.train.bf16)
    if world > 1:
        gathered = session.gather((loss_sum, residues, results))
        loss_sum = sum(g[0] for g in gathered)
        residues = sum(g[1] for g in gathered)
        results = [r for g in gathered for r in g[2]]
    metrics = aggregate(results)
    metrics["loss"] = loss_sum / max(1, residues)
    return metrics


class EpochLog:
    """What a rank trained on in an epoch, seen where the step consumes it: ids (stable keys) and lengths."""

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.real = self.padded = 0

    def watch(self, batches: Iterable) -> Iterator:
        for batch in batches:
            lengths = batch.lengths.numpy()
            self.keys.append(id_keys(batch.protein_id))
            self.real += int(lengths.sum())
            self.padded += len(lengths) * int(lengths.max())
            yield batch

    def seen(self) -> np.ndarray:
        return np.unique(np.concatenate(self.keys)) if self.keys else np.zeros(0, dtype=np.uint64)


def continuation_state(config: Config) -> TrainState | None:
    """The state a run continues from when it has none of its own: `train.init_checkpoint` (local or a URI)."""
    source = config.train.init_checkpoint
    if not source:
        return None
    with tempfile.TemporaryDirectory(prefix="protopo-init-") as tmp:
        return load_checkpoint(storage.fetch_dir(source, Path(tmp) / "checkpoint"))


def fit(config: Config, session: Session) -> dict[str, float]:
    """Train for `config.train.epochs` epochs (resuming where a checkpoint says), report every epoch."""
    cfg = config.train
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = loop.resolve_device(cfg.device)
    tame_allocator()
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        device = torch.device("cuda", session.rank % torch.cuda.device_count())
    loop.set_seed(cfg.seed)
    train, val_split = session.split("train"), session.split("val")

    model = session.prepare_model(TopologyModel(config.model).to(device), device)
    optimizer = loop.build_optimizer(model, cfg)
    loss_fn = loop.build_loss(cfg)
    best = BestTracker(cfg.metric, cfg.mode)

    own = session.resume_state()
    state = own or continuation_state(config)
    start_epoch = schedule_start = 0
    if state is not None:
        state.restore_into(model, optimizer)
        start_epoch = state.epoch
        if own is not None:  # this run's own checkpoint: same schedule span, same best so far
            schedule_start, best.best = state.schedule_start_epoch, state.best_value
        else:  # a promotion: a new schedule over the new budget; the checkpoint it came from is the best so far
            schedule_start = state.epoch
            best.best = _finite_or_none(state.metrics.get(cfg.metric))
            if session.rank == 0 and best.best is not None:
                with tempfile.TemporaryDirectory(prefix="protopo-ckpt-") as tmp:
                    session.save_best(save_checkpoint(Path(tmp) / f"epoch_{state.epoch:04d}", state))
        log.info("resumed at epoch %d (%s)", start_epoch, "own checkpoint" if own else cfg.init_checkpoint)
    scheduler = EpochSchedule(optimizer, cfg, start_epoch=schedule_start)

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        steps, tables = train.train_epoch(epoch, session.rank, session.world_size)
        scheduler.start_epoch(epoch, steps)
        trained = EpochLog()
        batches = trained.watch(lockstep(collated(tables), session.all_min))
        stats = loop.train_epoch(model, batches, optimizer, scheduler, loss_fn, cfg, device)
        # Which proteins each rank trained on this epoch (unique per rank; resampling may repeat one within a rank).
        seen = session.gather(trained.seen())
        trim()
        memory = session.gather(process_watch().peaks())
        val = evaluate_split(model, val_split, config, device, session)
        metrics = {"epoch": epoch + 1, "val_loss": val.pop("loss"), **{f"val_{k}": v for k, v in val.items()},
                   **stats.as_metrics(), "train_padding_efficiency": trained.real / max(1, trained.padded),
                   # Proteins this epoch over all ranks, and how many of them more than one rank trained on (0 = disjoint).
                   "train_proteins_all_ranks": len(np.unique(np.concatenate(seen))),
                   "train_rank_overlap": sum(len(s) for s in seen) - len(np.unique(np.concatenate(seen))),
                   "resumed_from_epoch": start_epoch, "peak_rss_bytes_max_rank": max(m.rss_bytes for m in memory),
                   "peak_anon_bytes_max_rank": max(m.anon_bytes for m in memory),
                   "epoch_time_s": time.perf_counter() - started}
        metrics = {k: float(v) for k, v in metrics.items()}
        last = epoch + 1 == cfg.epochs
        keep = last or (epoch + 1) % cfg.checkpoint_every == 0
        is_best = keep and best.update(metrics)
        with tempfile.TemporaryDirectory(prefix="protopo-ckpt-") as tmp:
            checkpoint_dir = None
            if keep and session.rank == 0:
                checkpoint_dir = save_checkpoint(Path(tmp) / f"epoch_{epoch + 1:04d}", TrainState(
                    model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(), epoch=epoch + 1,
                    config=config.to_dict(), metrics=metrics, schedule_start_epoch=schedule_start,
                    best_value=best.best, rng=rng_state()))
            session.report(metrics, checkpoint_dir, is_best)
    return metrics


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None


class LocalSession:
    """In-process run: tables from the shard directory, checkpoints and metrics.jsonl under storage/name."""

    rank, world_size = 0, 1

    def __init__(self, config: Config, resume: bool = False) -> None:
        self.config = config
        self.run_dir = Path(config.resources.storage) / config.name
        existing = find_checkpoints(self.run_dir)
        if existing and not resume and not config.train.init_checkpoint:
            raise FileExistsError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run "
                                  f"or choose another name (--set name=...)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resume = resume

    def split(self, name: str) -> Split:
        return local_split(self.config, name)

    def prepare_model(self, model, device):
        return model

    def gather(self, value):
        return [value]

    def all_min(self, value: int) -> int:
        return value

    def resume_state(self):
        candidates = [p for p in find_checkpoints(self.run_dir) if p.name != "best"] if self.resume else []
        found = load_latest_valid(candidates)
        return found[1] if found else None

    def save_best(self, checkpoint_dir):
        copy_checkpoint(checkpoint_dir, str(self.run_dir), "best")

    def report(self, metrics, checkpoint_dir, is_best):
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        log.info("epoch %d: %s", metrics["epoch"], {k: round(v, 4) for k, v in metrics.items() if k.startswith("val_")})
        if checkpoint_dir is None:
            return
        target = self.run_dir / f"checkpoint_{checkpoint_dir.name}"
        shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
        if is_best:
            self.save_best(checkpoint_dir)
        # The newest k stay (resume needs the latest); the best epoch lives on in run_dir/best.
        kept = sorted(find_checkpoints(self.run_dir), key=checkpoint_epoch)
        kept = [p for p in kept if p.name.startswith("checkpoint_")]
        for old in kept[: -self.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def evaluate_checkpoint(checkpoint_dir: str | Path, config: Config | None = None, split: str = "val",
                        device: str = "cpu") -> dict[str, float]:
    """Single-process evaluation of a checkpoint on a split of its (or the given) config's data."""
    from protopo_ray.training.checkpoint import load_model

    model, own_config, _ = load_model(checkpoint_dir, device)
    config = config or own_config
    return evaluate_split(model, local_split(config, split), config, torch.device(device))
