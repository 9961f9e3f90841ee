"""A predictor on new proteins, in two steps that run wherever they are cheapest: the network's per-residue
posteriors (`compute_posteriors`, the accelerator's work) and the topology decoding over them (`decode_posteriors`,
the grammar's Viterbi: CPU work). `predict_records` is both in one process; the Ray Data path
(`protopo_ray.cluster.batch_predict`) runs the first in an actor pool and the second as CPU tasks, through these
same functions, so the two paths cannot drift.

Graphs are built as the predictor's training graphs were (its k, structure graphs where `structures` holds a model
that aligns, else the sequence window, exactly as `prepare` builds them). A protein longer than `max_length`
residues (titin: 35k) is cut into overlapping windows (`data.embeddings.windows`); each window is one protein of
a batch, node features are the whole protein's (positions and termini stay true), and each residue takes the
posteriors of the window it lies most central in. The Viterbi then runs over the whole stitched protein, so its
topology is one the grammar accepts. Batches are planned by a residue budget (`batching.eval_batches`); a batch
that runs out of device memory is split in halves and retried.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from protopo_ray.data import batching, embeddings
from protopo_ray.data.collate import records_to_batch
from protopo_ray.data.graphs import ResidueGraph, build_graph, node_features
from protopo_ray.data.records import ProteinRecord
from protopo_ray.data.structures import load_aligned_ca
from protopo_ray.inference.outputs import Prediction

#: Proteins longer than this are predicted in overlapping windows (LSTM steps and activations stay bounded).
MAX_LENGTH = 4096
#: Residues neighbouring windows share; each keeps the half nearest its own centre.
WINDOW_OVERLAP = 512
#: Padded residues per forward batch (proteins x longest of them), the training path's kind of budget.
MAX_RESIDUES = 32768
#: Proteins per forward batch at most.
BATCH_SIZE = 32


@dataclass(frozen=True, kw_only=True, slots=True)
class Batching:
    """How proteins are cut and batched on the way through the network (the same on both paths)."""

    batch_size: int = BATCH_SIZE
    max_residues: int = MAX_RESIDUES
    max_length: int = MAX_LENGTH
    overlap: int = WINDOW_OVERLAP

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_residues < 1:
            raise ValueError(f"batch size {self.batch_size} and residue budget {self.max_residues} must be >= 1")
        if not 0 <= self.overlap < self.max_length // 2:
            raise ValueError(f"window overlap {self.overlap} must be under half the window ({self.max_length})")


@dataclass(frozen=True, slots=True)
class Posteriors:
    """One protein's network output: what the decoder reads (`logits`, the model's own output per residue:
    [L, NUM_LABELS] for a network, [L, 1 + members, NUM_LABELS] log-posteriors for an ensemble) and the label
    probabilities behind it ([L, NUM_LABELS]: softmax, CRF marginals or the members' mean)."""

    id: str
    sequence: str
    logits: np.ndarray
    probabilities: np.ndarray


@dataclass(frozen=True, slots=True)
class ProteinInput:
    """A protein ready for the network: its record, the pieces it is cut into (start, stop) with their graphs, its
    embedding ([L, D] or None) and the graph source of its whole-protein graph ('structure' / 'sequence')."""

    record: ProteinRecord
    windows: tuple[tuple[int, int], ...]
    graphs: tuple[ResidueGraph, ...]
    graph_source: str
    embedding: np.ndarray | None = None


def build_graphs(records: list[ProteinRecord], structures: str | Path | None, k: int) -> list[ResidueGraph]:
    """Whole-protein graphs: a structure graph where `structures` holds a model of the protein that aligns to it,
    else the sequence window, exactly as `prepare` builds them; `k` from the predictor's checkpoint."""
    return [build_graph(r.sequence, load_aligned_ca(structures, r)[0] if structures else None, k=k) for r in records]


def build_inputs(records: Sequence[ProteinRecord], structures: str | Path | None, k: int,
                 cut: Batching = Batching()) -> list[ProteinInput]:
    """Each protein's pieces and their graphs (one piece up to `cut.max_length` residues, windows beyond)."""
    built = []
    for record in records:
        ca = load_aligned_ca(structures, record)[0] if structures else None
        length = len(record.sequence)
        spans = tuple(embeddings.windows(length, cut.max_length, cut.overlap))
        if len(spans) == 1:
            graphs = (build_graph(record.sequence, ca, k=k),)
        else:  # graphs of the windows; node features of the whole protein (true positions, termini, angles)
            whole = node_features(length, None if ca is None else np.asarray(ca, np.float32))
            graphs = tuple(_window_graph(record.sequence, ca, whole, a, b, k) for a, b in spans)
        built.append(ProteinInput(record=record, windows=spans, graphs=graphs, graph_source=graphs[0].graph_source))
    return built


def _window_graph(sequence: str, ca: np.ndarray | None, whole: np.ndarray, start: int, stop: int,
                  k: int) -> ResidueGraph:
    graph = build_graph(sequence[start:stop], None if ca is None else ca[start:stop], k=k)
    graph.node_features = whole[start:stop].copy()
    return graph


def embed_records(records: list[ProteinRecord], spec: dict | None, weights: str | None = None
                  ) -> list[np.ndarray] | None:
    """[L, D] embeddings of `records` with the model and layer the predictor was trained on (`spec`, its
    checkpoint's `inputs.embedding`; None: it takes none), read from `weights` (default: the path recorded at
    training). Raises embeddings.EmbeddingError (a ValueError) when the weights are not there or differ."""
    if not spec:
        return None
    values = embeddings.EmbeddingSpec.from_json(spec)
    if weights is not None:
        values = embeddings.EmbeddingSpec.from_json({**values.to_json(), "weights": str(weights)})
    try:
        embedder = embeddings.cached_embedder(values)
    except embeddings.EmbeddingError as error:
        raise embeddings.EmbeddingError(f"this predictor was trained on {values.model} embeddings (layer "
                                        f"{values.layer}) and needs its weights to embed new proteins: {error}; "
                                        f"--embed-weights FILE overrides the recorded path") from None
    return embedder.embed([record.sequence for record in records])


def with_embeddings(inputs: list[ProteinInput], vectors: list[np.ndarray] | None) -> list[ProteinInput]:
    if vectors is None:
        return inputs
    return [ProteinInput(record=i.record, windows=i.windows, graphs=i.graphs, graph_source=i.graph_source,
                         embedding=v) for i, v in zip(inputs, vectors)]


# ------------------------------------------------------------------------------ posteriors (accelerator)


@torch.no_grad()
def forward_batch(module: nn.Module, batch, device: torch.device) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logits, label probabilities) per protein of `batch`, as float32 numpy on the host."""
    module.eval()
    batch = batch.to(device)
    logits = module(batch).float()
    # The decoder's own per-residue distribution: softmax for cross-entropy models, CRF marginals for CRF models,
    # the members' mean for ensembles (their emissions are not probabilities).
    probabilities = module.label_posteriors(batch, logits).float().cpu().numpy()
    logits = logits.cpu().numpy()
    ptr = batch.ptr.cpu().numpy()
    return [(logits[ptr[i]:ptr[i + 1]], probabilities[ptr[i]:ptr[i + 1]]) for i in range(int(batch.num_graphs))]


def forward_splitting(forward: Callable[[list[int]], list], indices: list[int]) -> list:
    """`forward(indices)`, and where it runs out of device memory, each half of `indices` on its own, recursively
    (one piece that still does not fit is an error naming what to lower)."""
    try:
        return forward(indices)
    except torch.OutOfMemoryError as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(indices) == 1:
            raise torch.OutOfMemoryError(f"one window of a protein does not fit in device memory ({error}); "
                                         f"lower --max-length (windows) or predict on a bigger device") from None
        half = len(indices) // 2
        return forward_splitting(forward, indices[:half]) + forward_splitting(forward, indices[half:])


def compute_posteriors(module: nn.Module, inputs: Sequence[ProteinInput], device: torch.device,
                       cut: Batching = Batching()) -> list[Posteriors]:
    """The network's posteriors per protein of `inputs`, in their order: pieces batched by length under the
    residue budget, windows stitched back (each residue from the window it is most central in)."""
    pieces = [(n, w) for n, item in enumerate(inputs) for w in range(len(item.windows))]
    lengths = [inputs[n].windows[w][1] - inputs[n].windows[w][0] for n, w in pieces]
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(pieces)

    def forward(indices: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        records, graphs, vectors = [], [], []
        for i in indices:
            n, w = pieces[i]
            item, (a, b) = inputs[n], inputs[n].windows[w]
            records.append(ProteinRecord(id=f"{item.record.id}#{w}", sequence=item.record.sequence[a:b]))
            graphs.append(item.graphs[w])
            vectors.append(None if item.embedding is None else item.embedding[a:b])
        embedded = None if vectors and vectors[0] is None else vectors
        return forward_batch(module, records_to_batch(records, graphs, embedded), device)

    for plan in batching.eval_batches(lengths, cut.batch_size, cut.max_residues):
        indices = [int(i) for i in plan]
        for i, result in zip(indices, forward_splitting(forward, indices)):
            out[i] = result
    found, cursor = [], 0
    for item in inputs:
        parts = out[cursor:cursor + len(item.windows)]
        cursor += len(item.windows)
        logits, probabilities = stitch(item.windows, [p[0] for p in parts]), stitch(item.windows, [p[1] for p in parts])
        found.append(Posteriors(item.record.id, item.record.sequence, logits, probabilities))
    return found


def stitch(windows: Sequence[tuple[int, int]], values: Sequence[np.ndarray]) -> np.ndarray:
    """Per-window values back into one protein: each residue from the window it is most central in (neighbours
    split their overlap at its middle)."""
    if len(values) == 1:
        return values[0]
    pieces = []
    for j, ((start, stop), value) in enumerate(zip(windows, values)):
        lo = 0 if j == 0 else (start + windows[j - 1][1]) // 2
        hi = stop if j == len(windows) - 1 else (windows[j + 1][0] + stop) // 2
        pieces.append(value[lo - start:hi - start])
    return np.concatenate(pieces)


# ----------------------------------------------------------------------------------- decoding (CPUs)


class DecodeBatch:
    """What a model's `decode` reads of a batch (its proteins' offsets), for posteriors computed elsewhere."""

    def __init__(self, lengths: Sequence[int]) -> None:
        counts = torch.as_tensor(list(lengths), dtype=torch.long)
        self.ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.batch = torch.repeat_interleave(torch.arange(len(counts)), counts)
        self.num_graphs = len(counts)
        self.max_length = int(counts.max()) if len(counts) else 0


def decode_posteriors(module: nn.Module, posteriors: Sequence[Posteriors],
                      cut: Batching = Batching()) -> list[Prediction]:
    """Each protein's topology read off its posteriors by the predictor's own decoder (argmax, the grammar's
    Viterbi, the CRF's, or the ensemble's rule), on the CPU, batched by length; in the order given. The Viterbi
    is exact per protein, so the batching never changes a topology."""
    lengths = [len(p.sequence) for p in posteriors]
    labels: list[str | None] = [None] * len(posteriors)
    letters = np.array(list("IOPSMB"))
    for plan in batching.eval_batches(lengths, cut.batch_size, cut.max_residues):
        chosen = [posteriors[int(i)] for i in plan]
        logits = torch.from_numpy(np.concatenate([p.logits for p in chosen]))
        decoded = module.decode(DecodeBatch([len(p.sequence) for p in chosen]), logits).cpu().numpy()
        offset = 0
        for i, p in zip(plan, chosen):
            labels[int(i)] = "".join(letters[decoded[offset:offset + len(p.sequence)]])
            offset += len(p.sequence)
    return [Prediction(p.id, p.sequence, label, p.probabilities) for p, label in zip(posteriors, labels)]


def cpu_decoder(module: nn.Module) -> nn.Module:
    """The module itself on the CPU, else a CPU copy: the decoder's scores live beside the weights, and the
    decoding (Viterbi backtrace, ensemble vote) reads host arrays."""
    on_cpu = all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()])
    return module if on_cpu else copy.deepcopy(module).cpu()


def predict_inputs(module: nn.Module, inputs: Sequence[ProteinInput], device: torch.device,
                   cut: Batching = Batching(), decoder: nn.Module | None = None) -> list[Prediction]:
    """Posteriors on `device`, topologies on the CPU (`decoder`: `cpu_decoder(module)`, made here when not
    given): the whole prediction of a group of proteins in one process."""
    posteriors = compute_posteriors(module, inputs, device, cut)
    return decode_posteriors(decoder or cpu_decoder(module), posteriors, cut)


def predict_records(model: nn.Module, records: list[ProteinRecord], graph_list: list[ResidueGraph],
                    device: torch.device, batch_size: int = BATCH_SIZE,
                    embedding_list: list[np.ndarray] | None = None) -> list[Prediction]:
    """Decoded labels and label probabilities per protein, batched by length, in the order of `records`, from
    whole-protein graphs built already (`build_graphs`; `embedding_list`: `embed_records`' arrays)."""
    inputs = [ProteinInput(record=r, windows=((0, len(r.sequence)),), graphs=(g,), graph_source=g.graph_source,
                           embedding=None if embedding_list is None else embedding_list[i])
              for i, (r, g) in enumerate(zip(records, graph_list))]
    return predict_inputs(model, inputs, device, Batching(batch_size=batch_size, max_length=max(
        [MAX_LENGTH, *(len(r.sequence) for r in records)])))
