"""A predictor on new proteins: their graphs (built as its training graphs were), decoded labels and the label
probabilities behind them, in the order of the input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from protopo_ray.data import batching, embeddings
from protopo_ray.data.collate import records_to_batch
from protopo_ray.data.graphs import ResidueGraph, build_graph
from protopo_ray.data.records import ProteinRecord
from protopo_ray.data.structures import load_aligned_ca
from protopo_ray.inference.outputs import Prediction
from protopo_ray.training import loop


def build_graphs(records: list[ProteinRecord], structures: str | Path | None, k: int) -> list[ResidueGraph]:
    """A structure graph where `structures` holds a model of the protein that aligns to it, else the sequence
    window, exactly as `prepare` builds them; `k` from the predictor's checkpoint."""
    built = []
    for record in records:
        ca, _ = load_aligned_ca(structures, record) if structures else (None, "")
        built.append(build_graph(record.sequence, ca, k=k))
    return built


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


@torch.no_grad()
def label_probabilities(model: nn.Module, batch, device: torch.device) -> list[np.ndarray]:
    """float [L, NUM_LABELS] per protein of `batch`: the decoder's label posteriors (softmax, or CRF marginals).

    A forward pass of its own, so the labels stay exactly what `loop.predict_labels` decodes (argmax, or the
    model's own decoder) while the plots and confidences show the per-residue distribution behind them.
    """
    model.eval()
    batch = batch.to(device)
    logits = model(batch)
    # The decoder's own per-residue distribution: softmax for cross-entropy models, CRF marginals for CRF models
    # and ensembles (their emissions are not probabilities).
    probabilities = model.label_posteriors(batch, logits).float().cpu().numpy()
    ptr = batch.ptr.cpu().numpy()
    return [probabilities[ptr[i]:ptr[i + 1]] for i in range(int(batch.num_graphs))]


def predict_records(model: nn.Module, records: list[ProteinRecord], graph_list: list[ResidueGraph],
                    device: torch.device, batch_size: int = 32,
                    embedding_list: list[np.ndarray] | None = None) -> list[Prediction]:
    """Decoded labels and label probabilities per protein, batched by length, in the order of `records`
    (`embedding_list`: `embed_records`' arrays, for a predictor trained on embeddings)."""
    lengths = [len(r.sequence) for r in records]
    found: dict[str, Prediction] = {}
    for idx in batching.eval_batches(lengths, batch_size):
        batch = records_to_batch([records[i] for i in idx], [graph_list[i] for i in idx],
                                 None if embedding_list is None else [embedding_list[i] for i in idx])
        ((proteins, _, _),) = loop.predict_labels(model, [batch], device)
        for (pid, sequence, _, labels), probabilities in zip(proteins, label_probabilities(model, batch, device)):
            found[pid] = Prediction(pid, sequence, labels, probabilities)
    return [found[r.id] for r in records]
