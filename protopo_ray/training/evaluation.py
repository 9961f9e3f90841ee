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
from protopo_ray.training.structure_dropout import all_sequence

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # annotation only: sessions are handed in by the caller
    from protopo_ray.training.session import Session


def evaluate_split(model, split: Split, config: Config, device, session: Session | None = None,
                   graphs: str = "shards") -> dict[str, float]:
    """Loss and the full metric dict over a split; with a session, over all ranks' parts of it (each protein once).
    `graphs`: "shards" (each protein's graph as prepared) or "sequence" (every protein through its sequence-window
    graph, as `predict` builds it from a FASTA)."""
    if graphs not in ("shards", "sequence"):
        raise ValueError(f"graphs must be 'shards' or 'sequence', got {graphs!r}")
    rank, world = (session.rank, session.world_size) if session is not None else (0, 1)
    batches = split.eval_batches(rank, world)
    if graphs == "sequence":
        k = int(shards.read_manifest(config.data.path).get("k", 16))
        batches = (all_sequence(table, k) for table in batches)
    loss_sum, residues, results = loop.evaluate(model, loop.collated(batches), device, config.train.bf16)
    if world > 1:
        gathered = session.gather((loss_sum, residues, results))
        loss_sum = sum(g[0] for g in gathered)
        residues = sum(g[1] for g in gathered)
        results = [r for g in gathered for r in g[2]]
    metrics = aggregate(results)
    metrics["loss"] = loss_sum / max(1, residues)
    return metrics


def evaluate_checkpoint(path: str | Path, config: Config | None = None, split: str = "val",
                        device: str = "cpu", graphs: str = "shards") -> dict[str, float]:
    """Single-process evaluation of a checkpoint or an ensemble directory on a split of its own (or `config`'s)
    data; `graphs = "sequence"` as if its proteins came as a FASTA (`evaluate_split`)."""
    predictor = load_predictor(path, device)
    config = config or predictor.config
    for shift in split_input_shifts(predictor, config, split, graphs):
        log.warning("evaluating %s on %s: %s", path, split, shift.message)
    return evaluate_split(predictor.module, local_split(config, split), config, torch.device(device), graphs=graphs)


def evaluate_checkpoint_from_sequence(path: str | Path, config: Config | None = None, split: str = "test",
                                      device: str = "cpu") -> dict[str, float]:
    """A checkpoint's metrics on a split's proteins given by sequence alone, every one through the sequence-window
    graph `predict` builds for a FASTA record: what a user without structures gets (issue 27)."""
    return evaluate_checkpoint(path, config, split, device, graphs="sequence")


def split_input_shifts(predictor: Predictor, config: Config, split: str, graphs: str = "shards") -> list[InputShift]:
    """What a split's proteins have that the predictor did not train on (`input_shift`): its graph sources and
    embedding against the checkpoint's. Evaluation says so and goes on (the figures are then of that shift)."""
    manifest = shards.read_manifest(config.data.path)
    table = shards.read_table(config.data.path, folds=split_folds(config, split), columns=["graph_source"])
    sources = table["graph_source"].to_pylist() if graphs == "shards" else ["sequence"] * table.num_rows
    return find_input_shifts(predictor.inputs, sources, manifest.get("embedding"),
                             where=str(predictor.path))
