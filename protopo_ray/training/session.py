"""What a run reports through: the `Session` protocol `fit` runs under, and `LocalSession`, the in-process one.

A session says where the split tables come from, how the model is wrapped (DDP or not), how per-protein results
are gathered across ranks, and where metrics and checkpoints go. The Ray sessions (a Ray Train rank, a one-worker
Tune trial) are `protopo_ray.cluster.sessions`'.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from protopo_ray.config import Config
from protopo_ray.training.checkpoint import (
    Checkpoint,
    copy_checkpoint,
    find_checkpoints,
    load_latest_valid,
)
from protopo_ray.training.layout import BEST_DIR, METRICS_FILE, checkpoint_epoch
from protopo_ray.training.splits import Split, local_split

log = logging.getLogger(__name__)


class Session(Protocol):
    rank: int
    world_size: int

    def split(self, name: str) -> Split:
        """This rank's view of split `name` ("train" / "val"): held in memory or streamed (`splits`)."""
    def all_min(self, value: int) -> int:
        """The minimum of `value` over all ranks (a collective; identity with one rank)."""
    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module: ...
    def gather(self, value: Any) -> list[Any]: ...
    def resume_state(self) -> Checkpoint | None:
        """The newest complete checkpoint of this run itself (not `train.init_checkpoint`), if any."""
    def save_best(self, checkpoint_dir: Path) -> None:
        """Make a (complete) checkpoint directory the run's `<run>/best`."""
    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, is_best: bool) -> None:
        """Record an epoch: metrics always, the checkpoint when one was written (also as best/ when best)."""


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

    def resume_state(self) -> Checkpoint | None:
        candidates = [p for p in find_checkpoints(self.run_dir) if p.name != BEST_DIR] if self.resume else []
        return load_latest_valid(candidates)

    def save_best(self, checkpoint_dir):
        copy_checkpoint(checkpoint_dir, str(self.run_dir), BEST_DIR)

    def report(self, metrics, checkpoint_dir, is_best):
        with (self.run_dir / METRICS_FILE).open("a") as handle:
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
