"""Structure dropout: the sequence view is exactly build_graph's sequence graph, the share holds, draws are seeded."""

import numpy as np
import pyarrow as pa
import pytest

from protopo_ray.data import shards
from protopo_ray.data.graphs import build_graph
from protopo_ray.data.records import ProteinRecord
from protopo_ray.training.structure_dropout import all_sequence, drop_structures, dropped

K = 6


def _table(n: int = 6) -> pa.Table:
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        length = 9 + i
        sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), length))
        record = ProteinRecord(id=f"P{i}", sequence=sequence, labels="I" * length, type="GLOBULAR", fold="train")
        ca = None if i == n - 1 else np.cumsum(rng.normal(size=(length, 3)) * 2, axis=0)  # last: sequence already
        rows.append(shards.record_to_row(record, build_graph(sequence, ca, K), np.ones((length, 2))))
    return shards.rows_to_table(rows)


def test_sequence_view_is_the_graph_build_graph_makes():
    table = _table()
    view = all_sequence(table, K)
    assert view.schema == table.schema
    assert view.column("id").to_pylist() == table.column("id").to_pylist()  # order kept
    for row, original in zip(view.to_pylist(), table.to_pylist()):
        expected = shards.record_to_row(
            ProteinRecord(id=row["id"], sequence=row["sequence"], labels=row["labels"], type=row["type"],
                          fold=row["fold"]), build_graph(row["sequence"], None, K), np.ones((row["length"], 2)))
        assert row["graph_source"] == "sequence"
        assert row["edge_distance"] is None and row["ca"] is None
        for key in ("aa", "node_features", "edge_src", "edge_dst", "embedding"):
            np.testing.assert_array_equal(np.asarray(row[key]), np.asarray(expected[key], dtype=np.float64
                                          if key in ("node_features", "embedding") else None))
        assert row["labels"] == original["labels"] and row["embedding"] == original["embedding"]


def test_share_is_respected_and_deterministic():
    ids = [f"SYN{i:06d}" for i in range(4000)]
    first = dropped(ids, 0.3, seed=0, epoch=1)
    assert abs(first.mean() - 0.3) < 0.03
    np.testing.assert_array_equal(first, dropped(ids, 0.3, seed=0, epoch=1))
    assert (first != dropped(ids, 0.3, seed=0, epoch=2)).mean() > 0.2  # a new draw each epoch
    assert (first != dropped(ids, 0.3, seed=1, epoch=1)).mean() > 0.2
    assert not dropped(ids, 0.0, seed=0, epoch=1).any() and dropped(ids, 1.0, seed=0, epoch=1).all()


def test_drop_depends_on_the_protein_not_its_batch():
    table = _table()
    whole = drop_structures(table, 0.5, seed=3, epoch=0, k=K)
    halves = [drop_structures(table.slice(s, 3), 0.5, seed=3, epoch=0, k=K) for s in (0, 3)]
    assert pa.concat_tables(halves).column("graph_source").to_pylist() == whole.column("graph_source").to_pylist()
    drop = dropped(table.column("id").to_pylist(), 0.5, seed=3, epoch=0)
    was = table.column("graph_source").to_pylist()
    assert whole.column("graph_source").to_pylist() == ["sequence" if d else s for d, s in zip(drop, was)]
    assert drop_structures(table, 0.0, seed=3, epoch=0, k=K) is table


def test_evaluating_from_sequence_equals_a_set_prepared_without_structures(tmp_path):
    """evaluate_split(graphs="sequence") scores structure shards exactly as shards of the same proteins built
    without coordinates, as `predict` builds a FASTA's (so the console's 'test FASTA' row is what a user gets)."""
    import torch

    from protopo_ray.config import load_config
    from protopo_ray.data import synthetic
    from protopo_ray.model.network import TopologyModel
    from protopo_ray.training.evaluation import evaluate_split
    from protopo_ray.training.splits import local_split

    records = [synthetic.generate_protein(i, t, fold="val") for i, t in
               enumerate(["TM", "SP", "GLOBULAR", "BETA", "SP+TM", "TM"])]
    for name, with_ca in (("structure", True), ("sequence", False)):
        shards.write_shards((shards.record_to_row(r, build_graph(r.sequence, ca if with_ca else None, 16))
                             for r, ca in records), tmp_path / name, k=16)
    torch.manual_seed(0)
    config = load_config("experiments/smoke.toml", {"data.path": str(tmp_path / "structure")})
    model = TopologyModel(config.model)
    seq_config = config.replace({"data.path": str(tmp_path / "sequence")})
    from_sequence = evaluate_split(model, local_split(config, "val", "memory"), config, torch.device("cpu"),
                                   graphs="sequence")
    prepared = evaluate_split(model, local_split(seq_config, "val", "memory"), seq_config, torch.device("cpu"))
    as_is = evaluate_split(model, local_split(config, "val", "memory"), config, torch.device("cpu"))
    assert from_sequence == pytest.approx(prepared)
    assert from_sequence["loss"] != pytest.approx(as_is["loss"])  # the structure graphs are another input
