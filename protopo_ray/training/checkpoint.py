"""Checkpoints: everything needed to resume or predict, in one directory, loadable on CPU.

Layout of a checkpoint directory: `state.pt` (a `TrainState`: model, optimiser, epoch, schedule start, best
value so far, RNG states, resolved config, metrics of that epoch) and `meta.json` (epoch, metrics and best
value, readable without torch). `meta.json` is
written last, so a directory without it is a checkpoint whose writing was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    pass


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
    """Everything a run needs to continue exactly where it stopped, and what predict needs to load the model.

    The LR schedule has no state of its own (it is a function of fractional epochs, see `schedule`); what it
    needs is `epoch` and `schedule_start_epoch`, the epoch this run's span began at (0, or the epoch of the
    checkpoint a promotion continued from). `best_value` is the best `metric` the run has seen up to and
    including `epoch`: a resumed run keeps comparing against it, so `<run>/best` never regresses.
    """

    model: dict[str, Any]
    optimizer: dict[str, Any] | None
    epoch: int
    config: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    schedule_start_epoch: int = 0
    best_value: float | None = None
    rng: dict[str, Any] | None = None

    def restore_into(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        unwrap(model).load_state_dict(self.model)
        if optimizer is not None and self.optimizer:
            optimizer.load_state_dict(self.optimizer)
        if self.rng is not None:
            restore_rng(self.rng)


def save_checkpoint(directory: str | Path, state: TrainState) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(dataclasses.asdict(state), directory / STATE_FILE)
    meta = {"epoch": state.epoch, "metrics": state.metrics, "best_value": state.best_value,
            "schedule_start_epoch": state.schedule_start_epoch}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, default=float))
    return directory


def load_checkpoint(directory: str | Path) -> TrainState:
    """Load a checkpoint onto the CPU; a partial or corrupt one raises CheckpointError naming the path."""
    directory = Path(directory)
    if not (directory / META_FILE).exists():
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {META_FILE}); its writing was interrupted")
    try:
        # weights_only=False: the state holds numpy RNG state and the config dict, both written by us.
        raw = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, pickling garbage, missing file
        raise CheckpointError(f"{directory / STATE_FILE}: unreadable checkpoint ({type(error).__name__}: {error})") from None
    names = {f.name for f in dataclasses.fields(TrainState)}
    # Checkpoints written before TrainState carried a LambdaLR "scheduler" state and no best value.
    return TrainState(**{k: v for k, v in raw.items() if k in names})


def load_model(directory: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, its Config, its TrainState): the one way to load a trained model."""
    from protopo_ray.config import Config
    from protopo_ray.model.network import TopologyModel

    state = load_checkpoint(directory)
    config = Config.from_dict(state.config, where=f"{directory} config")
    model = TopologyModel(config.model)
    model.load_state_dict(state.model)
    return model.to(device).eval(), config, state


def checkpoint_epoch(directory: Path) -> int:
    try:
        return int(json.loads((directory / META_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return -1


def load_latest_valid(candidates: list[Path]) -> tuple[Path, TrainState] | None:
    """The newest loadable checkpoint among `candidates`; corrupt ones are skipped with a warning."""
    ordered = sorted(candidates, key=lambda p: (checkpoint_epoch(p), p.name), reverse=True)
    for directory in ordered:
        try:
            return directory, load_checkpoint(directory)
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

    def __init__(self, metric: str, mode: str, best: float | None = None) -> None:
        self.metric, self.mode, self.best = metric, mode, best

    def update(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric, float("nan"))
        if not np.isfinite(value):
            return False
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
            return True
        return False


def copy_checkpoint(source: Path, storage: str, relative: str) -> None:
    """Copy a checkpoint directory to `storage/relative` (local path or s3:// / gs:// URI), replacing it."""
    from pyarrow import fs as pafs

    from protopo_ray.data.storage import filesystem as storage_filesystem

    filesystem, root = storage_filesystem(storage)
    target = f"{root}/{relative}"
    filesystem.delete_dir_contents(target, missing_dir_ok=True)
    filesystem.create_dir(target, recursive=True)
    pafs.copy_files(str(source), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
