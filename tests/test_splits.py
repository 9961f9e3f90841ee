"""Streaming splits: windows, bucketing, lockstep, Parquet row streams, and the in-process run on a stream."""

from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from protopo_ray.config import Config, load_config
from protopo_ray.data import shards
from protopo_ray.training import splits
from protopo_ray.training.evaluation import evaluate_split
from protopo_ray.training.fit import fit
from protopo_ray.training.session import LocalSession


def rows(n: int, seed: int = 0) -> pa.Table:
    lengths = np.random.default_rng(seed).integers(20, 400, n)
    return pa.table({"id": [f"p{i:05d}" for i in range(n)], "length": pa.array(lengths, pa.int32()),
                     "type": ["TM" if i % 5 == 0 else "GLOBULAR" for i in range(n)]})


def pieces(table: pa.Table, sizes: list[int]):
    start = 0
    for size in sizes:
        yield table.slice(start, size)
        start += size


def test_windows_recut_a_stream_exactly():
    table = rows(100)
    out = list(splits.windows(pieces(table, [7, 30, 1, 50, 12]), 32))
    assert [t.num_rows for t in out] == [32, 32, 32, 4]
    assert pa.concat_tables(out).column("id").to_pylist() == table.column("id").to_pylist()


def test_bucketed_covers_every_row_once_within_count_and_budget():
    table = rows(1000)
    rng = np.random.default_rng(0)
    batches = list(splits.bucketed(pieces(table, [64] * 15 + [40]), rng, batch_size=16, max_residues=3000,
                                   window=128, pool_rows=256))
    ids = [i for b in batches for i in b.column("id").to_pylist()]
    assert sorted(ids) == sorted(table.column("id").to_pylist())  # every protein exactly once
    for b in batches:
        lengths = b.column("length").to_numpy()
        assert len(lengths) <= 16
        assert len(lengths) == 1 or len(lengths) * lengths.max() <= 3000
    real = sum(int(b.column("length").to_numpy().sum()) for b in batches)
    padded = sum(b.num_rows * int(b.column("length").to_numpy().max()) for b in batches)
    random_order = [table.slice(i, 16) for i in range(0, 1000, 16)]
    padded_random = sum(b.num_rows * int(b.column("length").to_numpy().max()) for b in random_order)
    assert real / padded > 0.9 > real / padded_random  # bucketing within windows removes most padding


def test_bucketed_is_seeded_and_shuffles_across_the_pool():
    table = rows(600)

    def order(seed):
        batches = splits.bucketed(pieces(table, [50] * 12), np.random.default_rng(seed), batch_size=8,
                                  max_residues=0, window=64, pool_rows=256)
        return [i for b in batches for i in b.column("id").to_pylist()]

    assert order(1) == order(1) and order(1) != order(2)
    first_window = order(1)[:64]
    # The first window is drawn from a pool of 320 rows, not the first 64 rows that arrived.
    assert max(int(i[1:]) for i in first_window) > 64


def test_lockstep_stops_every_rank_at_the_shortest_and_each_calls_the_collective_equally():
    barrier = threading.Barrier(2)
    values: list[int] = [0, 0]
    calls = [0, 0]
    lock = threading.Lock()

    def all_min_for(rank):
        def all_min(value):
            calls[rank] += 1
            values[rank] = value
            barrier.wait()
            with lock:
                result = min(values)
            barrier.wait()
            return result
        return all_min

    taken: dict[int, list[int]] = {}

    def run(rank, count):
        taken[rank] = list(splits.lockstep(range(count), all_min_for(rank)))

    threads = [threading.Thread(target=run, args=(0, 5)), threading.Thread(target=run, args=(1, 7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert taken == {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4]}
    assert calls == [6, 6]
    assert list(splits.lockstep(range(3), lambda v: v)) == [0, 1, 2]  # one rank: a pass-through


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """120 synthetic proteins in shards of 16 rows, so a stream crosses many files."""
    from protopo_ray.data import synthetic
    from protopo_ray.data.graphs import build_graph

    out = tmp_path_factory.mktemp("stream") / "shards"
    folds = synthetic.assign_folds(synthetic.allocate_types(120), seed=0)
    records = [synthetic.generate_protein(i, t, fold=f) for i, (t, f) in
               enumerate(zip(synthetic.allocate_types(120), folds))]
    shards.write_shards((shards.record_to_row(r, build_graph(r.sequence, ca)) for r, ca in records), out, k=16,
                        max_rows_per_shard=16)
    return out


def config_for(path, **data) -> Config:
    return load_config("experiments/smoke.toml", {"data.path": str(path), "train.num_threads": 1,
                                                   **{f"data.{k}": v for k, v in data.items()}})


def test_parquet_rows_filter_folds_and_shuffle_files_per_epoch(many_shards):
    all_train = shards.read_table(many_shards, folds=["train"]).column("id").to_pylist()

    def ids(epoch):
        return [i for t in splits.parquet_rows(str(many_shards), ["train"], seed=0, epoch=epoch)
                for i in t.column("id").to_pylist()]

    assert sorted(ids(0)) == sorted(all_train)
    assert ids(0) == ids(0) != ids(1)


def test_stream_split_trains_each_protein_once_and_evaluates_exactly(many_shards):
    config = config_for(many_shards, loading="stream", batch_size=8, bucket_batches=2)
    train = splits.local_split(config, "train")
    assert isinstance(train, splits.StreamSplit)
    steps, tables = train.train_epoch(0, 0, 1)
    seen = [i for t in tables for i in t.column("id").to_pylist()]
    assert sorted(seen) == sorted(shards.read_table(many_shards, folds=["train"]).column("id").to_pylist())
    assert abs(steps - -(-len(seen) // 8)) <= 2  # the LR schedule's estimate is the plan's count

    # Validation streamed equals validation held in memory, metric for metric.
    import torch

    from protopo_ray.model.network import TopologyModel

    torch.manual_seed(0)
    model = TopologyModel(config.model)
    streamed = evaluate_split(model, splits.local_split(config, "val"), config, torch.device("cpu"))
    memory = evaluate_split(model, splits.local_split(config, "val", mode="memory"), config, torch.device("cpu"))
    assert streamed["n_proteins"] == memory["n_proteins"] == shards.read_table(many_shards, folds=["val"]).num_rows
    for key in ("loss", "residue_acc", "overlap_acc", "type_acc"):
        assert streamed[key] == pytest.approx(memory[key], rel=1e-5), key


def test_stream_type_weights_resample_in_expectation(many_shards):
    config = config_for(many_shards, loading="stream", batch_size=8, type_weights={"TM": 4.0})
    split = splits.local_split(config, "train")
    counts: Counter = Counter()
    for epoch in range(20):
        for table in split.train_epoch(epoch, 0, 1)[1]:
            counts.update(table.column("type").to_pylist())
    meta = shards.read_table(many_shards, folds=["train"], columns=["type"]).column("type").to_pylist()
    base = Counter(meta)
    expected_tm = 20 * len(meta) * 4 * base["TM"] / (4 * base["TM"] + len(meta) - base["TM"])
    assert counts["TM"] == pytest.approx(expected_tm, rel=0.2)


def test_balance_by_type_in_memory_and_streamed(many_shards):
    meta = Counter(shards.read_table(many_shards, folds=["train"], columns=["type"]).column("type").to_pylist())
    memory = config_for(many_shards, batch_size=10, balance="type")
    for table in splits.local_split(memory, "train").train_epoch(0, 0, 1)[1]:
        assert max(Counter(table.column("type").to_pylist()).values()) - min(Counter(
            table.column("type").to_pylist()).values()) <= 1 and len(set(table.column("type").to_pylist())) == len(meta)
    streamed = config_for(many_shards, loading="stream", batch_size=8, balance="type")
    split, counts = splits.local_split(streamed, "train"), Counter()
    for epoch in range(20):
        for table in split.train_epoch(epoch, 0, 1)[1]:
            counts.update(table.column("type").to_pylist())
    # An equal expected share per type over the epochs (Poisson draws), one draw per protein in all.
    expected = 20 * sum(meta.values()) / len(meta)
    assert all(counts[t] == pytest.approx(expected, rel=0.25) for t in meta), counts


def test_loading_mode_auto_streams_above_the_threshold():
    manifest = {"k": 16, "node_features": ["a"] * 8, "num_proteins": 100, "num_residues": 10_000_000,
                "counts": {"fold": {"train": 80, "val": 20}}}
    config = Config().replace({"data.train_folds": ("train",)})
    assert splits.split_bytes(manifest, ["train"]) == pytest.approx(0.8 * 10_000_000 * splits.bytes_per_residue(manifest))
    assert splits.loading_mode(config, manifest) == "memory"  # 1.4 GB < 2 GiB
    assert splits.loading_mode(config.replace({"data.stream_above_gib": 1.0}), manifest) == "stream"
    assert splits.loading_mode(config.replace({"data.loading": "stream"}), manifest) == "stream"
    exact = {**manifest, "residues": {"fold": {"train": 9_000_000, "val": 1_000_000}}}
    assert splits.split_bytes(exact, ["train"]) == 9_000_000 * splits.bytes_per_residue(manifest)
    capped = config.replace({"data.stream_above_gib": 1.0, "data.max_proteins": 10})
    assert splits.loading_mode(capped, manifest) == "memory"
    with pytest.raises(ValueError, match="max_proteins"):
        config.replace({"data.loading": "stream", "data.max_proteins": 10})


def test_in_process_run_on_a_stream(many_shards, tmp_path):
    config = config_for(many_shards, loading="stream", batch_size=8).replace(
        {"resources.storage": str(tmp_path), "name": "streamed", "train.epochs": 2})
    metrics = fit(config, LocalSession(config))
    rows = [json.loads(line) for line in (tmp_path / "streamed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    num_train = shards.read_table(many_shards, folds=["train"]).num_rows
    assert metrics["train_proteins_all_ranks"] == num_train and metrics["train_rank_overlap"] == 0
    assert metrics["peak_rss_bytes_max_rank"] >= metrics["peak_anon_bytes_max_rank"] > 0
    assert 0 < metrics["train_padding_efficiency"] <= 1


def test_structure_dropout_drops_the_same_proteins_on_both_paths_and_ranks(many_shards):
    """data.structure_dropout: which proteins a training epoch sees as sequence graphs depends on seed, epoch and
    id only: the in-memory plan, a stream and every DDP rank's slice agree, and each epoch draws anew."""
    from protopo_ray.training.structure_dropout import dropped

    def sequence_ids(split, epoch, rank=0, world=1):
        _, tables = split.train_epoch(epoch, rank, world)
        return {i for t in tables for i, s in zip(t.column("id").to_pylist(), t.column("graph_source").to_pylist())
                if s == "sequence"}

    memory = splits.local_split(config_for(many_shards, loading="memory", batch_size=8, structure_dropout=0.4),
                                "train")
    stream = splits.local_split(config_for(many_shards, loading="stream", batch_size=8, structure_dropout=0.4),
                                "train")
    ids = shards.read_table(many_shards, folds=["train"], columns=["id"]).column("id").to_pylist()
    expected = {i for i, d in zip(ids, dropped(ids, 0.4, seed=memory.config.train.seed, epoch=1)) if d}
    assert 0.25 < len(expected) / len(ids) < 0.55
    assert sequence_ids(memory, 1) == sequence_ids(stream, 1) == expected
    assert sequence_ids(memory, 1, 0, 2) | sequence_ids(memory, 1, 1, 2) == expected
    assert sequence_ids(memory, 2) != expected
    assert not sequence_ids(splits.local_split(config_for(many_shards, loading="memory"), "train"), 1)
