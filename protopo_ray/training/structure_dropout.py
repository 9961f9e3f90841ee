"""Structure dropout: training proteins seen through their sequence-window graph instead of their structure graph.

A model trained on structure graphs only meets a FASTA's proteins as sequence-window graphs it never saw
(issue 27: the embedded default's winner fell from overlap 0.92 to 0.35). With `data.structure_dropout = p`,
each epoch a share p of the training rows whose graph_source is "structure" are rebuilt, before collation, as
exactly the graph `graphs.build_graph(sequence)` gives a protein without coordinates: the k//2-residue window
edges, no distances, no C-alpha, node features without the structure columns, graph_source "sequence". So one
model serves proteins with and without structures.

Which rows drop is a pure function of (seed, epoch, protein id), never of the batch a row lands in or the rank
that holds it: every DDP rank, the in-memory and the streamed path and a resumed run drop the same proteins.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protopo_ray.data.graphs import build_graph

#: The columns a sequence view replaces; every other column (id, labels, aa, embedding, ...) stays as it is.
GRAPH_COLUMNS = ("graph_source", "node_features", "edge_src", "edge_dst", "edge_distance", "ca")


def dropped(ids: list[str], share: float, seed: int, epoch: int) -> np.ndarray:
    """bool [N]: which proteins are seen as sequence graphs this epoch (each with probability `share`)."""
    if share <= 0:
        return np.zeros(len(ids), dtype=bool)
    draws = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{i}".encode(), digest_size=8).digest(),
                                     "little") for i in ids], dtype=np.float64) / 2.0**64
    return draws < share


def sequence_view(table: pa.Table, rows: np.ndarray, k: int) -> pa.Table:
    """`table` with the rows at `rows` (indices) rebuilt as sequence-window graphs of window k//2 per side."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return table
    schema = table.schema
    part = table.take(pa.array(rows))
    views = [build_graph(sequence, None, k) for sequence in part.column("sequence").to_pylist()]
    values = {
        "graph_source": pa.array([g.graph_source for g in views], type=schema.field("graph_source").type)
        if "graph_source" in schema.names else None,
        "node_features": [g.node_features.astype(np.float16).reshape(-1) for g in views],
        "edge_src": [g.edge_index[0].astype(np.int32) for g in views],
        "edge_dst": [g.edge_index[1].astype(np.int32) for g in views],
        "edge_distance": None, "ca": None,  # null lists: a sequence graph has neither (shards.record_to_row)
    }
    for name, value in values.items():
        if name not in schema.names:
            continue
        field = schema.field(name)
        if value is None:
            array = pa.nulls(len(views), type=field.type)
        elif isinstance(value, list):
            array = pa.array(value, type=field.type)
        else:
            array = value
        part = part.set_column(schema.get_field_index(name), field, array)
    kept = np.setdiff1d(np.arange(table.num_rows), rows)
    joined = pa.concat_tables([table.take(pa.array(kept)), part])
    return joined.take(pa.array(np.argsort(np.concatenate([kept, rows]), kind="stable")))


def drop_structures(table: pa.Table, share: float, *, seed: int, epoch: int, k: int) -> pa.Table:
    """A training batch with this epoch's dropped structure rows (`dropped`) seen as sequence graphs."""
    if share <= 0 or table.num_rows == 0:
        return table
    structure = pc.equal(table.column("graph_source"), "structure").to_numpy(zero_copy_only=False)
    drop = dropped(table.column("id").to_pylist(), share, seed, epoch) & structure
    return sequence_view(table, np.flatnonzero(drop), k)


def all_sequence(table: pa.Table, k: int) -> pa.Table:
    """Every structure row of `table` as its sequence graph: what the proteins look like given as a FASTA."""
    structure = pc.equal(table.column("graph_source"), "structure").to_numpy(zero_copy_only=False)
    return sequence_view(table, np.flatnonzero(structure), k)
