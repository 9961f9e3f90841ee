"""Checkpoints: a directory that says what it is, with everything needed to resume, promote or predict from it.

    state.pt    TrainState: weights, optimiser, RNG states (torch)
    meta.json   CheckpointMeta, readable without torch: format, epoch, metrics, the best value so far, the
                schedule's span, the resolved config, the model's inputs (graph k and sources, node and edge
                features) and the topology grammar it was built with. Written last: a directory without it
                is a checkpoint whose writing was interrupted.

`load_checkpoint` is the one way in: resume, promotion, evaluation, `predict` and ensemble members all load
through it, and `Checkpoint.model()` rebuilds the network (its grammar included) from the checkpoint alone.
A checkpoint missing a field raises `CheckpointError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyarrow import fs as pafs

from protopo_ray.config import Config, Objective
from protopo_ray.data import storage
from protopo_ray.data.graphs import EDGE_FEATURES, NODE_FEATURES
from protopo_ray.model.grammar import build_grammar
from protopo_ray.model.network import TopologyModel
from protopo_ray.model.segments import SegmentStats
from protopo_ray.training.layout import META_FILE, STATE_FILE, checkpoint_epoch

log = logging.getLogger(__name__)

#: meta.json's layout; 2 added the config, the model's inputs and its grammar (format 1 held epoch and metrics).
FORMAT = 2


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """How the graphs a model was trained on were built: new proteins must be built the same way."""

    graph_k: int
    """Neighbours per residue (structure graphs) or window width (sequence graphs) of the training shards."""
    graph_sources: dict[str, int]
    """Training-shard proteins per graph source ('structure' / 'sequence'): what the model has seen. With structure
    dropout, "sequence" also counts the structure proteins seen as sequence graphs in an epoch (expected number)."""
    node_features: tuple[str, ...]
    edge_features: tuple[str, ...]
    embedding: dict[str, Any] | None = None
    """The shards' per-residue embeddings (protopo_ray.data.embeddings.EmbeddingSpec: model, weights, layer, dim,
    ...), None without: predict embeds new proteins with the same model and layer."""
    structure_dropout: float = 0.0
    """The run's `data.structure_dropout`: the share of structure proteins seen as sequence graphs each epoch."""

    @property
    def embedding_dim(self) -> int:
        return int(self.embedding["dim"]) if self.embedding else 0

    @classmethod
    def of_manifest(cls, manifest: dict[str, Any]) -> ModelInputs:
        """The inputs a shard set's manifest describes (`protopo_ray.data.shards.build_manifest`)."""
        return cls(graph_k=int(manifest["k"]), graph_sources=dict(manifest["counts"]["graph_source"]),
                   node_features=tuple(manifest["node_features"]), edge_features=tuple(manifest["edge_features"]),
                   embedding=manifest.get("embedding"))

    def with_structure_dropout(self, share: float) -> ModelInputs:
        """These inputs as a run with `data.structure_dropout = share` sees them: that share of the structure
        proteins also counted under "sequence" (so `input_shift` passes a FASTA's sequence graphs)."""
        if share <= 0:
            return self
        sources = dict(self.graph_sources)
        sources["sequence"] = sources.get("sequence", 0) + round(share * sources.get("structure", 0))
        return dataclasses.replace(self, graph_sources=sources, structure_dropout=float(share))

    def check_builds_here(self, where: str) -> None:
        """Raise unless this code builds graphs with the same node and edge features as the checkpoint's."""
        if self.node_features != NODE_FEATURES or self.edge_features != EDGE_FEATURES:
            raise CheckpointError(f"{where}: trained on node features {list(self.node_features)} and edge features "
                                  f"{list(self.edge_features)}; this protopo_ray builds {list(NODE_FEATURES)} and "
                                  f"{list(EDGE_FEATURES)}: use the version it was trained with, or retrain")


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """meta.json: what a checkpoint is, without loading its weights."""

    epoch: int
    """Epochs trained (from the start of the whole run, promotions included)."""
    metrics: dict[str, float]
    """What that epoch reported."""
    best_value: float | None
    """The best `train.metric` the run had seen up to and including `epoch` (a resumed run keeps comparing to it)."""
    schedule_start_epoch: int
    """The epoch this run's LR schedule span began at (0, or the checkpoint a promotion continued from)."""
    config: Config
    """The resolved run config."""
    inputs: ModelInputs
    grammar: SegmentStats
    """Statistics of the topology grammar the model's decoder was built from."""
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "epoch": self.epoch, "metrics": self.metrics, "best_value": self.best_value,
                "schedule_start_epoch": self.schedule_start_epoch, "config": self.config.to_dict(),
                "inputs": dataclasses.asdict(self.inputs), "grammar": self.grammar.to_json()}

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str) -> CheckpointMeta:
        missing = [key for key in ("epoch", "metrics", "config", "inputs", "grammar") if key not in values]
        if missing:
            raise CheckpointError(
                f"{where}: no {', '.join(repr(k) for k in missing)} (format {values.get('format', 1)}, written by an "
                f"older protopo_ray before checkpoints described their inputs); retrain, or load it with that version")
        try:
            inputs = values["inputs"]
            return cls(epoch=int(values["epoch"]), metrics=dict(values["metrics"]), best_value=values.get("best_value"),
                       schedule_start_epoch=int(values.get("schedule_start_epoch", 0)),
                       config=Config.from_dict(values["config"], where=f"{where} config"),
                       inputs=ModelInputs(graph_k=int(inputs["graph_k"]), graph_sources=dict(inputs["graph_sources"]),
                                          node_features=tuple(inputs["node_features"]),
                                          edge_features=tuple(inputs["edge_features"]),
                                          embedding=inputs.get("embedding"),
                                          structure_dropout=float(inputs.get("structure_dropout", 0.0))),
                       grammar=SegmentStats.from_json(values["grammar"]), format=int(values.get("format", FORMAT)))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: malformed ({type(error).__name__}: {error})") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under a DDP wrapper (state dicts are saved without the `module.` prefix)."""
    return getattr(model, "module", model)


@dataclass(kw_only=True)
class TrainState:
    """state.pt: what training continues from (the LR schedule has no state of its own: see `schedule`)."""

    model: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None

    def restore_into(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        unwrap(model).load_state_dict(self.model)
        if optimizer is not None and self.optimizer:
            optimizer.load_state_dict(self.optimizer)
        if self.rng is not None:
            restore_rng(self.rng)


@dataclass(kw_only=True)
class Checkpoint:
    path: Path
    meta: CheckpointMeta
    state: TrainState

    @property
    def epoch(self) -> int:
        return self.meta.epoch

    @property
    def config(self) -> Config:
        return self.meta.config

    def model(self, device: str | torch.device = "cpu", overrides: dict[str, Any] | None = None) -> TopologyModel:
        """The trained network in eval mode on `device`, built with the checkpoint's own config and grammar;
        `overrides` change how it decodes (e.g. {"model.decoder": "viterbi"}), never its shape."""
        config = self.config.replace(overrides) if overrides else self.config
        model = TopologyModel(config.model, build_grammar(self.meta.grammar), self.meta.inputs.embedding_dim)
        model.load_state_dict(self.state.model)
        return model.to(device).eval()


def save_checkpoint(directory: str | Path, meta: CheckpointMeta, state: TrainState) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(dataclasses.asdict(state), directory / STATE_FILE)
    write_meta(directory, meta)
    return directory


def write_meta(directory: str | Path, meta: CheckpointMeta) -> None:
    """Rewrite a checkpoint's meta.json (its weights untouched), e.g. with the decoding chosen after training."""
    (Path(directory) / META_FILE).write_text(json.dumps(meta.to_json(), indent=1, default=float))


def read_meta(directory: str | Path) -> CheckpointMeta:
    """A checkpoint's meta.json alone (no torch load); CheckpointError when it is missing or incomplete."""
    path = Path(directory) / META_FILE
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {META_FILE}); its writing was interrupted, "
                              f"or this is not a checkpoint directory") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    return CheckpointMeta.from_json(values, str(path))


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """The one checkpoint loader (onto the CPU); a partial, corrupt or older-format one raises CheckpointError."""
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        # weights_only=False: the state holds numpy's RNG state, written by us.
        raw = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, pickling garbage, missing file
        raise CheckpointError(f"{directory / STATE_FILE}: unreadable checkpoint ({type(error).__name__}: {error})") from None
    if "model" not in raw:
        raise CheckpointError(f"{directory / STATE_FILE}: no 'model' weights")
    return Checkpoint(path=directory, meta=meta, state=TrainState(model=raw["model"], optimizer=raw.get("optimizer"),
                                                                  rng=raw.get("rng")))


def load_latest_valid(candidates: list[Path]) -> Checkpoint | None:
    """The newest loadable checkpoint among `candidates`; corrupt ones are skipped with a warning."""
    ordered = sorted(candidates, key=lambda p: (checkpoint_epoch(p), p.name), reverse=True)
    for directory in ordered:
        try:
            return load_checkpoint(directory)
        except CheckpointError as error:
            log.warning("skipping checkpoint: %s; trying the previous one", error)
    return None


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories (those holding a state file) anywhere under a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return []
    return [p.parent for p in run_dir.rglob(STATE_FILE)]


class BestTracker:
    """Whether an epoch's metric is the best so far (NaN never is); decides what goes to `<run>/best`."""

    def __init__(self, objective: Objective, best: float | None = None) -> None:
        self.objective, self.best = objective, best

    def update(self, metrics: dict[str, float]) -> bool:
        value = self.objective.value(metrics)
        if not self.objective.better(value, self.best):
            return False
        self.best = value
        return True


def copy_checkpoint(source: Path, storage_uri: str, relative: str) -> None:
    """Copy a checkpoint directory to `storage_uri/relative` (local path or s3:// / gs:// URI), replacing it."""
    filesystem, root = storage.filesystem(storage_uri)
    target = f"{root}/{relative}"
    filesystem.delete_dir_contents(target, missing_dir_ok=True)
    filesystem.create_dir(target, recursive=True)
    pafs.copy_files(str(source), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
