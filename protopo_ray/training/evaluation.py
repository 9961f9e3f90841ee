"""Evaluation: a model's loss and metrics over a split, gathered over ranks, and a saved predictor's on any split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protopo_ray.config import Config
from protopo_ray.data import shards
from protopo_ray.model.metrics import aggregate
from protopo_ray.training import loop
from protopo_ray.training.input_shift import InputShift, find_input_shifts
from protopo_ray.training.predictor import Predictor, load_predictor
from protopo_ray.training.splits import Split, local_split, split_folds

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # annotation only: sessions are handed in by the caller
    from protopo_ray.training.session import Session


def evaluate_split(model, split: Split, config: Config, device, session: Session | None = None) -> dict[str, float]:
    """Loss and the full metric dict over a split; with a session, over all ranks' parts of it (each protein once)."""
    rank, world = (session.rank, session.world_size) if session is not None else (0, 1)
    loss_sum, residues, results = loop.evaluate(model, loop.collated(split.eval_batches(rank, world)), device,
                                                config.train.bf16)
    if world > 1:
        gathered = session.gather((loss_sum, residues, results))
        loss_sum = sum(g[0] for g in gathered)
        residues = sum(g[1] for g in gathered)
        results = [r for g in gathered for r in g[2]]
    metrics = aggregate(results)
    metrics["loss"] = loss_sum / max(1, residues)
    return metrics


def evaluate_checkpoint(path: str | Path, config: Config | None = None, split: str = "val",
                        device: str = "cpu") -> dict[str, float]:
    """Single-process evaluation of a checkpoint or an ensemble directory on a split of its own (or `config`'s)
    data."""
    predictor = load_predictor(path, device)
    config = config or predictor.config
    for shift in split_input_shifts(predictor, config, split):
        log.warning("evaluating %s on %s: %s", path, split, shift.message)
    return evaluate_split(predictor.module, local_split(config, split), config, torch.device(device))


def split_input_shifts(predictor: Predictor, config: Config, split: str) -> list[InputShift]:
    """What a split's proteins have that the predictor did not train on (`input_shift`): its graph sources and
    embedding against the checkpoint's. Evaluation says so and goes on (the figures are then of that shift)."""
    manifest = shards.read_manifest(config.data.path)
    table = shards.read_table(config.data.path, folds=split_folds(config, split), columns=["graph_source"])
    return find_input_shifts(predictor.inputs, table["graph_source"].to_pylist(), manifest.get("embedding"),
                             where=str(predictor.path))
