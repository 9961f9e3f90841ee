"""Collation: Arrow rows of residue graphs (or in-memory records) -> one `torch_geometric.data.Batch`.

Training collates every planned batch in a prefetch thread (`training.loop.collated` -> `table_to_batch`), so
that path is numpy over flattened Arrow buffers with no Python loop per protein; `table_to_data_list` is
the deliberately naive row-by-row version the tests compare it with; prediction goes through
`records_to_batch`, the same row encoding as the shards. torch and torch_geometric are imported inside the
functions that build tensors, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protopo_ray.data.alphabet import IGNORE_LABEL, LABEL_INDEX
from protopo_ray.data.graphs import NODE_FEATURES, ResidueGraph, edge_features
from protopo_ray.data.records import ProteinRecord
from protopo_ray.data.shards import record_to_row, rows_to_table

# Byte lookup table for label letters; -1 marks a letter that is not a label.
_LABEL_LUT = np.full(256, -1, dtype=np.int64)
for _letter, _index in LABEL_INDEX.items():
    _LABEL_LUT[ord(_letter)] = _index


def _flat(table: pa.Table, name: str) -> np.ndarray:
    """Values of list column `name` over all rows and chunks, as one numpy array (nulls contribute nothing)."""
    return pc.list_flatten(table[name]).to_numpy()


def _labels(table: pa.Table, lengths: np.ndarray) -> np.ndarray:
    """int64 [N] label indices from the labels column; IGNORE_LABEL for residues of unlabelled rows."""
    labels = table["labels"].combine_chunks()
    offset_type = np.int64 if pa.types.is_large_string(labels.type) else np.int32  # Arrow may hand large_string
    offsets = np.frombuffer(labels.buffers()[1], dtype=offset_type)[labels.offset:labels.offset + len(labels) + 1]
    sizes = np.diff(offsets)
    labelled = sizes > 0
    bad = labelled & (sizes != lengths)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"protein {table['id'][row]}: {sizes[row]} labels for {lengths[row]} residues")
    y = np.full(int(lengths.sum()), IGNORE_LABEL, dtype=np.int64)
    if labelled.any():
        data = np.frombuffer(labels.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        indices = _LABEL_LUT[data]
        if (indices < 0).any():
            raise ValueError(f"labels column holds a letter outside IOPSMB: {chr(data[indices < 0][0])!r}")
        y[np.repeat(labelled, lengths)] = indices
    return y


def _node_inputs(table: pa.Table) -> np.ndarray:
    """float32 [N, F (+ D)]: the node features, followed by the embeddings where the set has them."""
    x = _flat(table, "node_features").astype(np.float32).reshape(-1, len(NODE_FEATURES))
    if "embedding" not in table.column_names or table["embedding"].null_count == table.num_rows:
        return x
    if table["embedding"].null_count:
        row = int(np.flatnonzero(pc.is_null(table["embedding"]).to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"protein {table['id'][row]}: no embedding, but other proteins of the batch have one")
    return np.concatenate([x, _flat(table, "embedding").astype(np.float32).reshape(x.shape[0], -1)], axis=1)


def _batch_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Every tensor field of a batch as numpy, from flattened Arrow columns (no per-protein Python)."""
    lengths = table["length"].to_numpy().astype(np.int64)
    num_edges = pc.list_value_length(table["edge_src"]).to_numpy().astype(np.int64)
    src, dst = _flat(table, "edge_src"), _flat(table, "edge_dst")
    distance = np.full(src.shape[0], np.nan, dtype=np.float32)
    has_distance = pc.is_valid(table["edge_distance"]).to_numpy(zero_copy_only=False)
    distance[np.repeat(has_distance, num_edges)] = _flat(table, "edge_distance")
    edge_index = np.stack([src, dst]).astype(np.int64)
    attr = edge_features(edge_index, distance)  # before the offsets: separations are per protein anyway
    ptr = np.concatenate([[0], np.cumsum(lengths)])
    edge_index += np.repeat(ptr[:-1], num_edges)
    return {
        "aa": _flat(table, "aa").astype(np.int64),
        "x": _node_inputs(table),
        "edge_index": edge_index,
        "edge_attr": attr,
        "y": _labels(table, lengths),
        "lengths": lengths,
        "batch": np.repeat(np.arange(len(lengths), dtype=np.int64), lengths),
        "ptr": ptr,
        "edge_ptr": np.concatenate([[0], np.cumsum(num_edges)]),
    }


def sequence_window(table: pa.Table, src: np.ndarray, dst: np.ndarray) -> int:
    """The half-width of the batch's graphs when every one is a sequence window (`graphs.build_graph` without a
    structure: each residue linked both ways to all residues within k // 2), else -1. The widest separation
    present is exact for every graph: a protein shorter than the window is linked end to end either way."""
    if not len(src):
        return 0 if table.num_rows else -1
    sources = pc.unique(table["graph_source"]).to_pylist()
    return int(np.abs(src - dst).max()) if sources == ["sequence"] else -1


def table_to_batch(table: pa.Table):
    """A `torch_geometric.data.Batch` of every row of `table` (vectorised, no per-protein Python).

    Fields: aa [N], x [N, F] (F + D with embeddings), edge_index [2, E] (batch-global node ids), edge_attr [E, len(EDGE_FEATURES)],
    y [N] (IGNORE_LABEL for unlabelled proteins), batch [N], ptr [B+1], lengths [B], protein_id / ptype / sequence
    (lists of B strings), window (`sequence_window`: what lets the model run its GC layers densely);
    `num_graphs` = B. Slice bookkeeping matches `Batch.from_data_list`, so
    `to_data_list()`, `get_example(i)` and `.to(device)` work.
    """
    import torch
    from torch_geometric.data import Batch

    arrays = _batch_arrays(table)
    src, dst = arrays["edge_index"]  # batch-global ids, but a separation is the same within a protein
    window = sequence_window(table, src, dst)
    tensors = {name: torch.from_numpy(value) for name, value in arrays.items()}
    num_graphs = table.num_rows
    batch = Batch(aa=tensors["aa"], x=tensors["x"], edge_index=tensors["edge_index"],
                  edge_attr=tensors["edge_attr"], y=tensors["y"], lengths=tensors["lengths"],
                  protein_id=table["id"].to_pylist(), ptype=table["type"].to_pylist(),
                  sequence=table["sequence"].to_pylist(), batch=tensors["batch"], ptr=tensors["ptr"], window=window)
    batch._num_graphs = num_graphs
    node_ptr, edge_ptr, row_ptr = tensors["ptr"], tensors["edge_ptr"], torch.arange(num_graphs + 1)
    zeros = torch.zeros(num_graphs, dtype=torch.long)
    batch._slice_dict = {"aa": node_ptr, "x": node_ptr, "edge_index": edge_ptr, "edge_attr": edge_ptr,
                         "y": node_ptr, "lengths": row_ptr, "protein_id": row_ptr, "ptype": row_ptr,
                         "sequence": row_ptr}
    batch._inc_dict = {"aa": zeros, "x": zeros, "edge_index": node_ptr[:-1], "edge_attr": zeros, "y": zeros,
                       "lengths": zeros, "protein_id": None, "ptype": None, "sequence": None}
    return batch


def table_to_data_list(table: pa.Table) -> list:
    """One `torch_geometric.data.Data` per row (same fields as `table_to_batch`, node ids per protein).

    Deliberately written row by row, independently of `table_to_batch`, which the tests compare it with.
    """
    import torch
    from torch_geometric.data import Data

    data_list = []
    for row in table.to_pylist():
        length = row["length"]
        edge_index = np.array([row["edge_src"], row["edge_dst"]], dtype=np.int64).reshape(2, -1)
        distance = None if row["edge_distance"] is None else np.array(row["edge_distance"], dtype=np.float32)
        labels = row["labels"]
        x = np.array(row["node_features"], dtype=np.float32).reshape(length, len(NODE_FEATURES))
        if row.get("embedding") is not None:
            x = np.concatenate([x, np.array(row["embedding"], dtype=np.float32).reshape(length, -1)], axis=1)
        y = [LABEL_INDEX[c] for c in labels] if labels else [IGNORE_LABEL] * length
        data_list.append(Data(
            aa=torch.tensor(row["aa"], dtype=torch.long),
            x=torch.from_numpy(x),
            edge_index=torch.from_numpy(edge_index),
            edge_attr=torch.from_numpy(edge_features(edge_index, distance)),
            y=torch.tensor(y, dtype=torch.long),
            lengths=torch.tensor([length], dtype=torch.long),
            protein_id=row["id"], ptype=row["type"], sequence=row["sequence"],
        ))
    return data_list


def records_to_batch(records: Sequence[ProteinRecord], graphs: Sequence[ResidueGraph],
                     embeddings: Sequence[np.ndarray] | None = None):
    """A Batch straight from in-memory records and graphs (and [L, D] embeddings where the model takes them;
    prediction), through the same row encoding."""
    if len(records) != len(graphs) or (embeddings is not None and len(embeddings) != len(records)):
        raise ValueError(f"{len(records)} records but {len(graphs)} graphs"
                         + (f" and {len(embeddings)} embeddings" if embeddings is not None else ""))
    embeddings = embeddings if embeddings is not None else [None] * len(records)
    return table_to_batch(rows_to_table([record_to_row(r, g, e) for r, g, e in zip(records, graphs, embeddings)]))
