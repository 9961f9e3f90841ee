"""Collation: hand-built two-protein batches with hand-computed tensors, then the vectorised path against the
row-by-row `Batch.from_data_list` reference on a mixed set written to shards (several chunks, sliced)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from protopo_ray.data.alphabet import IGNORE_LABEL
from protopo_ray.data.graphs import (
    EDGE_FEATURES,
    NODE_FEATURES,
    ResidueGraph,
    build_graph,
    edge_features,
    node_features,
)
from protopo_ray.data.records import ProteinRecord
from protopo_ray.data.shards import read_table, record_to_row, rows_to_table, write_shards

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")
from torch_geometric.data import Batch  # noqa: E402

from protopo_ray.data.collate import records_to_batch, table_to_batch, table_to_data_list  # noqa: E402

SEP1 = math.log1p(1) / math.log1p(1000)  # seq_separation of neighbours one residue apart


def two_proteins() -> tuple[list[ProteinRecord], list[ResidueGraph]]:
    """ACD (labelled IMO) and KL (unlabelled), both sequence-window graphs with k=2 (one neighbour each side)."""
    records = [ProteinRecord(id="a", sequence="ACD", labels="IMO", type="TM"), ProteinRecord(id="b", sequence="KL")]
    return records, [build_graph(r.sequence, k=2) for r in records]


def test_hand_built_batch():
    records, graphs = two_proteins()
    batch = records_to_batch(records, graphs)
    assert batch.num_graphs == 2 and batch.protein_id == ["a", "b"] and batch.sequence == ["ACD", "KL"]
    assert batch.ptype == ["TM", ""]
    assert batch.aa.tolist() == [0, 1, 2, 8, 9]  # A C D | K L in alphabet order
    assert batch.y.tolist() == [0, 4, 1, IGNORE_LABEL, IGNORE_LABEL]  # I M O | unlabelled
    assert batch.lengths.tolist() == [3, 2] and batch.ptr.tolist() == [0, 3, 5]
    assert batch.batch.tolist() == [0, 0, 0, 1, 1]
    # Edges sorted by (target, source); the second protein's node ids are offset by 3.
    assert batch.edge_index.tolist() == [[1, 0, 2, 1, 4, 3], [0, 1, 1, 2, 3, 4]]
    expected_attr = [[0.0, s * SEP1, 0.0] for s in (-1, 1, -1, 1, -1, 1)]
    np.testing.assert_allclose(batch.edge_attr.numpy(), expected_attr, rtol=1e-6)
    assert batch.x.shape == (5, len(NODE_FEATURES)) and batch.x.dtype == torch.float32
    assert batch.x[:, 0].tolist() == [0.0, 0.5, 1.0, 0.0, 1.0]  # rel_position i / (L - 1)


def test_structure_edges_carry_their_distance():
    ca = np.array([[0.0, 0.0, 0.0], [3.8, 0.0, 0.0]], dtype=np.float32)
    graph = ResidueGraph(aa=np.array([10, 8], dtype=np.int8), node_features=node_features(2, ca),
                         edge_index=np.array([[1, 0], [0, 1]], dtype=np.int32),
                         edge_distance=np.array([3.8, 3.8], dtype=np.float32), graph_source="structure", ca=ca)
    batch = records_to_batch([ProteinRecord(id="s", sequence="MK", labels="II", type="GLOBULAR")], [graph])
    # distance / 10 A (stored as float16, so 3.8 comes back as 3.80078), separation, has_distance = 1
    np.testing.assert_allclose(batch.edge_attr.numpy(), [[0.38, -SEP1, 1.0], [0.38, SEP1, 1.0]], rtol=1e-3)
    assert batch.y.tolist() == [0, 0]


def test_a_label_letter_outside_the_alphabet_is_rejected():
    row = record_to_row(ProteinRecord(id="q", sequence="ACD"), build_graph("ACD", k=2))
    row["labels"] = "IXO"
    with pytest.raises(ValueError, match="outside IOPSMB: 'X'"):
        table_to_batch(rows_to_table([row]))


def test_records_and_graphs_must_pair_up():
    records, graphs = two_proteins()
    with pytest.raises(ValueError, match="2 records but 1 graphs"):
        records_to_batch(records, graphs[:1])


# ---- the vectorised path against the row-by-row reference ---------------------------------------------------


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """12 proteins over 3 shards: every third without a structure, every fourth unlabelled, one missing residue."""
    rng = np.random.default_rng(0)
    records, graphs = [], []
    for i in range(12):
        length = int(rng.integers(3, 40))
        sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), length))
        labels = "".join(rng.choice(list("IOM"), length)) if i % 4 != 3 else ""
        ca = None
        if i % 3:
            ca = np.cumsum(rng.normal(scale=2.2, size=(length, 3)), axis=0).astype(np.float32)
            if i == 1:
                ca[1] = np.nan
        records.append(ProteinRecord(id=f"P{i:03d}", sequence=sequence, labels=labels, fold=f"cv{i % 3}"))
        graphs.append(build_graph(sequence, ca, k=4))
    path = tmp_path_factory.mktemp("collate") / "shards"
    write_shards((record_to_row(r, g) for r, g in zip(records, graphs)), path, k=4, max_rows_per_shard=5)
    return path, records, graphs


def test_batch_tensors_match_the_graphs(mixed_shards):
    path, records, graphs = mixed_shards
    batch = table_to_batch(read_table(path))
    lengths = [len(r.sequence) for r in records]
    assert batch.num_graphs == len(records) and batch.lengths.tolist() == lengths
    assert batch.ptr.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert batch.aa.dtype == torch.long and batch.aa.tolist() == np.concatenate([g.aa for g in graphs]).tolist()
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    expected_edges = np.concatenate([g.edge_index + o for g, o in zip(graphs, offsets)], axis=1)
    assert batch.edge_index.dtype == torch.long and batch.edge_index.tolist() == expected_edges.tolist()
    expected_attr = np.concatenate([edge_features(g.edge_index, g.edge_distance) for g in graphs])
    assert batch.edge_attr.shape == (expected_edges.shape[1], len(EDGE_FEATURES))
    np.testing.assert_allclose(batch.edge_attr.numpy(), expected_attr, rtol=1e-3, atol=1e-4)
    assert not torch.isnan(batch.edge_attr).any()  # the missing residue's NaN distances become 0
    np.testing.assert_allclose(batch.x.numpy(), np.concatenate([g.node_features for g in graphs]), atol=1e-3)
    for i, record in enumerate(records):
        y = batch.y[batch.ptr[i]:batch.ptr[i + 1]].tolist()
        assert (IGNORE_LABEL not in y) if record.labels else (y == [IGNORE_LABEL] * len(record.sequence))


def test_batch_equals_from_data_list(mixed_shards):
    table = read_table(mixed_shards[0])
    fast, slow = table_to_batch(table), Batch.from_data_list(table_to_data_list(table))
    # `window` is the batch's own: structure and sequence graphs mixed, so the GC layers run on the edges
    assert fast.window == -1 and set(fast.keys()) - {"window"} == set(slow.keys()) and fast.num_graphs == slow.num_graphs
    for key in slow.keys():
        if isinstance(slow[key], torch.Tensor):
            assert fast[key].dtype == slow[key].dtype and torch.equal(fast[key], slow[key]), key
        else:
            assert fast[key] == slow[key], key
    # The slice bookkeeping matches too, so splitting a batch back into graphs works.
    for one, other in [(fast.get_example(3), slow.get_example(3)), (fast.to_data_list()[1], slow.to_data_list()[1])]:
        assert set(one.keys()) == set(other.keys())
        for key in other.keys():
            value = other[key]
            assert torch.equal(one[key], value) if isinstance(value, torch.Tensor) else one[key] == value, key
    moved = fast.to("cpu")
    assert moved.num_graphs == fast.num_graphs and torch.equal(moved["x"], fast.x)


def test_batch_over_several_record_batches_and_slices(mixed_shards):
    table = read_table(mixed_shards[0])  # one chunk per shard: the flattening must cross chunk boundaries
    assert table["id"].num_chunks > 1
    for part in (table.slice(3, 6), table.take(pa.array([7, 0, 11]))):  # Ray Data hands offset slices
        fast, slow = table_to_batch(part), Batch.from_data_list(table_to_data_list(part))
        for key in ("x", "y", "edge_index", "edge_attr", "aa", "batch", "ptr"):
            assert torch.equal(fast[key], slow[key]), key


def test_embeddings_follow_the_node_features_in_x_and_round_trip_through_shards(tmp_path):
    records, graphs = two_proteins()
    embeddings = [np.arange(3 * 4, dtype=np.float32).reshape(3, 4) / 8, -np.ones((2, 4), np.float32)]
    batch = records_to_batch(records, graphs, embeddings)
    assert batch.x.shape == (5, len(NODE_FEATURES) + 4)
    np.testing.assert_array_equal(batch.x[:3, len(NODE_FEATURES):].numpy(), embeddings[0])  # exact in float16
    np.testing.assert_array_equal(batch.x[3:, len(NODE_FEATURES):].numpy(), embeddings[1])
    write_shards([record_to_row(r, g, e) for r, g, e in zip(records, graphs, embeddings)], tmp_path / "s", k=4,
                 embedding={"model": "m", "dim": 4})
    table = read_table(tmp_path / "s")
    assert torch.equal(table_to_batch(table).x, batch.x)
    assert torch.equal(torch.cat([d.x for d in table_to_data_list(table)]), batch.x)
    # A set without embeddings reads as null and collates to the node features alone.
    assert records_to_batch(records, graphs).x.shape == (5, len(NODE_FEATURES))
    mixed = rows_to_table([record_to_row(records[0], graphs[0], embeddings[0]), record_to_row(records[1], graphs[1])])
    with pytest.raises(ValueError, match="protein b: no embedding"):
        table_to_batch(mixed)
