"""Shards: write -> read round trip, shard bounds, fold filter, manifest (collation: test_collate.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from protopo_ray.data.graphs import EDGE_FEATURES, NODE_FEATURES, build_graph
from protopo_ray.data.records import ProteinRecord
from protopo_ray.data.shards import (
    LENGTH_BIN_EDGES,
    ROW_GROUP_ROWS,
    SCHEMA_VERSION,
    ShardWriter,
    length_bin,
    read_manifest,
    read_table,
    record_to_row,
    row_groups,
    sha256_file,
    write_shards,
)


def make_proteins(num: int, seed: int = 0, k: int = 4) -> tuple[list[ProteinRecord], list]:
    """Mixed proteins: every third has no structure, every fourth is unlabelled, one has a missing residue."""
    rng = np.random.default_rng(seed)
    records, graphs = [], []
    for i in range(num):
        length = int(rng.integers(3, 40))
        sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), length))
        labelled = i % 4 != 3
        labels = "".join(rng.choice(list("IOM"), length)) if labelled else ""
        ca = None
        if i % 3:
            ca = np.cumsum(rng.normal(scale=2.2, size=(length, 3)), axis=0).astype(np.float32)
            if i == 1:
                ca[1] = np.nan
        records.append(ProteinRecord(id=f"P{i:03d}", sequence=sequence, labels=labels,
                                     type=("TM", "GLOBULAR")[i % 2] if labelled else "", fold=f"cv{i % 3}"))
        graphs.append(build_graph(sequence, ca, k=k))
    return records, graphs


@pytest.fixture
def shard_dir(tmp_path):
    records, graphs = make_proteins(12)
    source = tmp_path / "labels.3line"
    source.write_text(">x\nA\nI\n")
    manifest = write_shards((record_to_row(r, g) for r, g in zip(records, graphs)), tmp_path / "shards", k=4,
                            sources={str(source): sha256_file(source)}, extra={"note": "test"},
                            max_rows_per_shard=5)
    return tmp_path / "shards", records, graphs, manifest


def test_round_trip_is_exact_for_ints_and_float16_close_for_floats(shard_dir):
    path, records, graphs, _ = shard_dir
    table = read_table(path)
    assert table["id"].to_pylist() == [r.id for r in records]
    for row, record, graph in zip(table.to_pylist(), records, graphs):
        assert (row["sequence"], row["labels"], row["fold"], row["length"]) == (
            record.sequence, record.labels, record.fold, len(record.sequence))
        assert row["aa"] == graph.aa.tolist()
        assert [row["edge_src"], row["edge_dst"]] == graph.edge_index.tolist()
        np.testing.assert_allclose(np.reshape(row["node_features"], (-1, len(NODE_FEATURES))),
                                   graph.node_features, rtol=1e-3, atol=1e-3)
        if graph.graph_source == "structure":
            np.testing.assert_allclose(np.array(row["edge_distance"], dtype=np.float32), graph.edge_distance,
                                       rtol=1e-3, equal_nan=True)
            np.testing.assert_array_equal(np.reshape(np.array(row["ca"], dtype=np.float32), (-1, 3)), graph.ca)
        else:
            assert row["edge_distance"] is None and row["ca"] is None


def test_shards_are_bounded(tmp_path):
    records, graphs = make_proteins(23)
    rows = [record_to_row(r, g) for r, g in zip(records, graphs)]
    manifest = write_shards(rows, tmp_path / "rows", k=4, max_rows_per_shard=5)
    assert [s["num_rows"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert sorted(p.name for p in (tmp_path / "rows").glob("part-*.parquet")) == [
        f"part-{i:05d}.parquet" for i in range(5)]
    by_bytes = write_shards(rows, tmp_path / "bytes", k=4, max_bytes_per_shard=2000)
    assert len(by_bytes["shards"]) > 2 and sum(s["num_rows"] for s in by_bytes["shards"]) == 23
    assert read_table(tmp_path / "bytes").num_rows == 23


def test_manifest_counts_and_sources(shard_dir):
    path, records, graphs, manifest = shard_dir
    assert read_manifest(path) == json.loads((path / "manifest.json").read_text()) == manifest
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["num_proteins"] == 12
    assert manifest["counts"]["fold"] == {"cv0": 4, "cv1": 4, "cv2": 4}
    assert manifest["counts"]["type"] == {"": 3, "GLOBULAR": 3, "TM": 6}
    assert manifest["counts"]["graph_source"] == {"sequence": 4, "structure": 8}
    assert manifest["num_residues"] == sum(len(r.sequence) for r in records)
    assert manifest["k"] == 4 and manifest["node_features"] == list(NODE_FEATURES)
    assert manifest["edge_features"] == list(EDGE_FEATURES) and manifest["extra"] == {"note": "test"}
    (source, digest), = manifest["sources"].items()
    assert len(digest) == 64 and digest == sha256_file(source)


def test_manifest_has_per_shard_counts_and_length_histograms(shard_dir):
    path, records, _, manifest = shard_dir
    # 12 proteins in shards of 5: P000-P004, P005-P009, P010-P011; folds cycle cv0, cv1, cv2.
    first, _, last = manifest["shards"]
    assert first["counts"]["fold"] == {"cv0": 2, "cv1": 2, "cv2": 1}
    assert last["counts"]["fold"] == {"cv1": 1, "cv2": 1} and last["num_rows"] == 2
    assert first["num_residues"] == sum(len(r.sequence) for r in records[:5])
    assert (first["min_length"], first["max_length"]) == (min(len(r.sequence) for r in records[:5]),
                                                           max(len(r.sequence) for r in records[:5]))
    assert first["residues"]["fold"]["cv2"] == len(records[2].sequence)
    assert manifest["residues"]["fold"]["cv0"] == sum(len(r.sequence) for r in records if r.fold == "cv0")
    histogram = manifest["length_histogram"]
    assert histogram["bin_edges"] == list(LENGTH_BIN_EDGES)
    # make_proteins draws lengths 3..39: every protein is in the first bin [0, 50).
    assert histogram["fold"] == {fold: [4] + [0] * (len(LENGTH_BIN_EDGES) - 1) for fold in ("cv0", "cv1", "cv2")}
    assert manifest["shard_layout"]["row_group_rows"] == ROW_GROUP_ROWS


@pytest.mark.parametrize("length, index", [(1, 0), (49, 0), (50, 1), (999, 19), (1000, 20), (1249, 20),
                                           (3999, 25), (4000, 26), (35000, 26)])
def test_length_bins_are_half_open_with_an_open_last_bin(length, index):
    assert length_bin(length) == index


def test_row_groups_follow_the_layout(tmp_path):
    records, graphs = make_proteins(23)
    with ShardWriter(tmp_path / "s", k=4, max_rows_per_shard=10, row_group_rows=4) as writer:
        for record, graph in zip(records, graphs):
            writer.add(record_to_row(record, graph))
    files = [pq.ParquetFile(tmp_path / "s" / shard["file"]) for shard in writer.manifest["shards"]]
    sizes = [[f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] for f in files]
    assert sizes == [[4, 4, 2], [4, 4, 2], [3]]
    assert [shard["num_row_groups"] for shard in writer.manifest["shards"]] == [3, 3, 1]
    assert read_table(tmp_path / "s")["id"].to_pylist() == [r.id for r in records]


def test_row_groups_close_on_bytes_and_keep_an_oversized_row_alone():
    assert row_groups([5, 5, 5, 5], max_rows=10, max_bytes=12) == [(0, 2), (2, 4)]
    assert row_groups([20, 1, 1], max_rows=10, max_bytes=12) == [(0, 1), (1, 3)]
    assert row_groups([1] * 5, max_rows=2, max_bytes=100) == [(0, 2), (2, 4), (4, 5)]
    assert row_groups([], max_rows=2, max_bytes=100) == []


def test_fold_filter_and_columns(shard_dir):
    path, records, _, _ = shard_dir
    table = read_table(path, folds=["cv1", "cv2"], columns=["id", "length"])
    assert table.column_names == ["id", "length"]
    assert table["id"].to_pylist() == [r.id for r in records if r.fold in ("cv1", "cv2")]
    with pytest.raises(ValueError, match="cv9"):
        read_table(path, folds=["cv9"])


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m protopo_ray.prepare") as error:
        read_table(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_other_schema_version_is_rejected(shard_dir):
    path = shard_dir[0]
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema version"):
        read_manifest(path)



def test_row_rejects_a_graph_of_another_length():
    with pytest.raises(ValueError, match="P1"):
        record_to_row(ProteinRecord(id="P1", sequence="ACD"), build_graph("ACDE"))
