"""A run directory's layout, torch-free so the search's records and the report can point into it:

    <storage>/<run name>/
      checkpoint_epoch_NNNN/  state.pt + meta.json (protopo_ray.training.checkpoint; Ray Train names its own)
      best/                   the best epoch's checkpoint by `train.metric` (never regresses)
      metrics.jsonl           one line per epoch
"""

from __future__ import annotations

import json
from pathlib import Path

from protopo_ray.data import storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"
"""Written last: a directory without it is a checkpoint whose writing was interrupted."""
BEST_DIR = "best"
METRICS_FILE = "metrics.jsonl"


def checkpoint_epoch(directory: Path) -> int:
    """The epoch a checkpoint directory holds (-1 when it holds none readable)."""
    try:
        return int(json.loads((directory / META_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return -1


def best_or_latest(run_uri: str, latest: str | None) -> str | None:
    """The checkpoint a finished run hands on: its best/ (the best epoch by its metric, never regressing) when that
    is complete, else `latest` (a path or URI)."""
    best = storage.join(run_uri, BEST_DIR)
    return best if storage.exists(storage.join(best, META_FILE)) else latest
