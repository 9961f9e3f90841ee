"""One training run, start to finish: `fit(config, session)`.

The same function runs in-process (`session.LocalSession`, `python -m protopo_ray.train --local`) and inside
every Ray Train worker or one-worker Tune trial (`protopo_ray.cluster.sessions`). The session says where the
splits come from, how the model is wrapped and where metrics and checkpoints go; the plan of batches, the loop,
the metrics and the checkpoints' content are the same everywhere.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protopo_ray.config import Config
from protopo_ray.config.objective import finite
from protopo_ray.data import shards, storage
from protopo_ray.model.grammar import Grammar, build_grammar, default_grammar
from protopo_ray.model.metrics import METRIC_KEYS
from protopo_ray.model.network import TopologyModel
from protopo_ray.model.segments import segment_stats
from protopo_ray.training import loop
from protopo_ray.training.checkpoint import (
    BestTracker,
    Checkpoint,
    CheckpointMeta,
    ModelInputs,
    TrainState,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    unwrap,
)
from protopo_ray.training.evaluation import evaluate_split
from protopo_ray.training.memory import process_watch, tame_allocator, trim
from protopo_ray.training.schedule import EpochSchedule
from protopo_ray.training.session import Session
from protopo_ray.training.splits import SPLIT_FOLDS, id_keys, lockstep

log = logging.getLogger(__name__)

#: Every metric a run reports each epoch (a stage metric must be one of these).
REPORTED_METRICS = (
    ("epoch", "val_loss", "epoch_time_s", "train_padding_efficiency", "train_proteins_all_ranks", "train_rank_overlap",
     "resumed_from_epoch", "peak_rss_bytes_max_rank", "peak_anon_bytes_max_rank")
    + tuple(f"val_{key}" for key in METRIC_KEYS)
    # With data.structure_dropout: the validation split again, every protein through its sequence-window graph.
    + ("val_seq_loss",) + tuple(f"val_seq_{key}" for key in METRIC_KEYS)
    + tuple(loop.EpochStats().as_metrics().keys())
)


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


def training_grammar(config: Config) -> Grammar:
    """The topology grammar of the run's training folds: their segments, contexts and length distributions (the
    labels column only; DeepTMHMM's cv0 + cv3 + cv4 give `segments.DEFAULT_STATS`)."""
    table = shards.read_table(config.data.path, folds=config.data.train_folds, columns=["id", "type", "labels"])
    if config.data.max_proteins:  # the same proteins `splits.MemorySplit` trains on
        table = table.sort_by("id").slice(0, config.data.max_proteins)
    labelled = [(t, labels) for t, labels in zip(table["type"].to_pylist(), table["labels"].to_pylist()) if labels]
    return build_grammar(segment_stats(labelled)) if labelled else default_grammar()


def continuation(config: Config) -> Checkpoint | None:
    """The checkpoint a run continues from when it has none of its own: `train.init_checkpoint` (local or a URI)."""
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
    inputs = ModelInputs.of_manifest(shards.read_manifest(config.data.path)).with_structure_dropout(
        config.data.structure_dropout)

    own = session.resume_state()
    start = own or continuation(config)
    # A run continues with the grammar its checkpoint was built with (a CRF's transitions are per grammar state);
    # a new one reads its grammar off its training folds.
    grammar = build_grammar(start.meta.grammar) if start is not None else training_grammar(config)
    model = session.prepare_model(TopologyModel(config.model, grammar, inputs.embedding_dim).to(device), device)
    optimizer = loop.build_optimizer(model, cfg)
    loss_fn = loop.build_loss(cfg)
    best = BestTracker(cfg.objective)
    start_epoch = schedule_start = 0
    if start is not None:
        start.state.restore_into(model, optimizer)
        start_epoch = start.epoch
        if own is not None:  # this run's own checkpoint: same schedule span, same best so far
            schedule_start, best.best = start.meta.schedule_start_epoch, start.meta.best_value
        else:  # a promotion: a new schedule over the new budget; the checkpoint it came from is the best so far
            schedule_start = start.epoch
            value = start.meta.metrics.get(cfg.metric)
            best.best = float(value) if finite(value) else None
            if session.rank == 0 and best.best is not None:
                with tempfile.TemporaryDirectory(prefix="protopo-ckpt-") as tmp:
                    session.save_best(save_checkpoint(Path(tmp) / f"epoch_{start.epoch:04d}", start.meta, start.state))
        log.info("resumed at epoch %d (%s)", start_epoch, "own checkpoint" if own else cfg.init_checkpoint)
    scheduler = EpochSchedule(optimizer, cfg, start_epoch=schedule_start)

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        steps, tables = train.train_epoch(epoch, session.rank, session.world_size)
        scheduler.start_epoch(epoch, steps)
        trained = EpochLog()
        batches = trained.watch(lockstep(loop.collated(tables, pin=device.type == "cuda"), session.all_min))
        stats = loop.train_epoch(model, batches, optimizer, scheduler, loss_fn, cfg, device)
        # Which proteins each rank trained on this epoch (unique per rank; resampling may repeat one within a rank).
        seen = session.gather(trained.seen())
        trim()
        memory = session.gather(process_watch().peaks())
        val = evaluate_split(model, val_split, config, device, session)
        if config.data.structure_dropout > 0:  # a model meant to serve FASTA inputs too: measured on them
            seq = evaluate_split(model, val_split, config, device, session, graphs="sequence")
            val.update({f"seq_{k}": v for k, v in seq.items()})
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
                meta = CheckpointMeta(epoch=epoch + 1, metrics=metrics, best_value=best.best,
                                      schedule_start_epoch=schedule_start, config=config, inputs=inputs,
                                      grammar=grammar.stats)
                state = TrainState(model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(), rng=rng_state())
                checkpoint_dir = save_checkpoint(Path(tmp) / f"epoch_{epoch + 1:04d}", meta, state)
            session.report(metrics, checkpoint_dir, is_best)
    return metrics
