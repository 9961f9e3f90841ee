"""A run's splits, held in memory or streamed: what `fit.fit` draws its batches from.

`MemorySplit` holds a split as one Arrow table and cuts the exact, seeded global plan of `batching` (every
rank takes its slice of every global batch). `StreamSplit` never holds a split: rows arrive as Arrow tables
(a rank's Ray Data `streaming_split` in DDP workers, row groups read by pyarrow in one process), pass a
seeded shuffle pool, and every window of `bucket_batches` batches is sorted by length, cut by count and
residue budget (`batching`'s rule) and yielded in shuffled order. A streaming rank holds the pool, one
window and the prefetched batches; nothing else grows with the data. Ranks of a stream see different
rows, so their batch counts can differ by a batch or two under a residue budget: `lockstep` stops every
rank at the shortest one (DDP must take the same number of steps on every rank).

Which path a run takes is one rule, `loading_mode`: "auto" streams a split estimated above
`data.stream_above_gib` in memory (docs/benchmarks.md: the measured trade-off).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from protopo_ray.config import Config
from protopo_ray.data import batching, shards, storage
from protopo_ray.training.structure_dropout import drop_structures

SPLIT_FOLDS = {"train": "train_folds", "val": "val_folds", "test": "test_folds"}

#: epoch -> this rank's rows of the split for that epoch, as Arrow tables of any size.
RowSource = Callable[[int], Iterable[pa.Table]]


def split_folds(config: Config, split: str) -> tuple[str, ...]:
    return tuple(getattr(config.data, SPLIT_FOLDS[split]))


# ---- which path ------------------------------------------------------------------------------------------

def bytes_per_residue(manifest: dict[str, Any]) -> int:
    """In-memory Arrow bytes of one residue in the shard schema: k edges x (src, dst int32 + distance fp16),
    node features fp16, aa int8, C-alpha fp32 x 3 (when structures are present), label and sequence letters, and
    the fp16 embeddings where the set has them (2,560 bytes at ESM-2 650M's 1,280 values: such sets stream sooner)."""
    return (int(manifest.get("k", 16)) * 10 + 2 * len(manifest.get("node_features", ())) + 1 + 12 + 2
            + 2 * shards.embedding_dim(manifest))


def split_bytes(manifest: dict[str, Any], folds: Iterable[str]) -> float:
    """Estimated in-memory size of the rows of `folds`: the manifest's residues per fold (older manifests: all
    residues pro rata to the fold counts) x `bytes_per_residue`."""
    folds = list(folds)
    per_fold = manifest.get("residues", {}).get("fold")
    if per_fold is not None:
        residues = sum(per_fold.get(fold, 0) for fold in folds)
    else:
        counts = manifest.get("counts", {}).get("fold", {})
        share = sum(counts.get(fold, 0) for fold in folds) / max(1, int(manifest.get("num_proteins", 0)))
        residues = share * int(manifest.get("num_residues", 0))
    return residues * bytes_per_residue(manifest)


def loading_mode(config: Config, manifest: dict[str, Any]) -> str:
    """"memory" or "stream" for this run: `data.loading`, with "auto" deciding by the train split's size."""
    if config.data.loading != "auto":
        return config.data.loading
    if config.data.max_proteins:  # a capped quick run: the first N by id need the whole split sorted
        return "memory"
    size = split_bytes(manifest, config.data.train_folds)
    return "stream" if size > config.data.stream_above_gib * 2**30 else "memory"


# ---- sources of rows ---------------------------------------------------------------------------------------

def parquet_rows(path: str, folds: Iterable[str], *, seed: int | None = None, epoch: int = 0,
                 columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A split's rows read row group by row group with pyarrow (local or object storage); with a seed the
    files come in a shuffled order per epoch. Memory: one row group at a time."""
    files, _ = shards.shard_files(path)
    if seed is not None:
        files = [files[i] for i in np.random.default_rng([seed, epoch, 7]).permutation(len(files))]
    for name in files:
        yield from parquet_file_rows(path, name, folds, columns)


def parquet_file_rows(path: str, name: str, folds: Iterable[str], columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows of `folds` in one shard file of shard directory `path`, a row group at a time."""
    filesystem, _ = storage.filesystem(path)
    wanted = pa.array(list(folds))
    with filesystem.open_input_file(name) as handle:
        reader = pq.ParquetFile(handle)
        for group in range(reader.num_row_groups):
            table = reader.read_row_group(group, columns=columns)
            table = table.filter(pc.is_in(table["fold"], value_set=wanted))
            if table.num_rows:
                yield table


def split_metadata(path: str, folds: Iterable[str]) -> pa.Table:
    """Length and type of every protein of a split (a few bytes each): the step estimate and type weights."""
    return shards.read_table(path, folds=list(folds), columns=["length", "type"])


# ---- the two kinds of split ---------------------------------------------------------------------------------

class MemorySplit:
    """A split held as one table, sorted by id (first `data.max_proteins` only, when set)."""

    def __init__(self, table: pa.Table, config: Config) -> None:
        table = table.sort_by("id")
        if config.data.max_proteins:
            table = table.slice(0, config.data.max_proteins)
        self.table, self.config = table, config
        self.lengths = table.column("length").to_numpy()
        self.num_proteins = table.num_rows

    def train_epoch(self, epoch: int, rank: int, world_size: int) -> tuple[int, Iterator[pa.Table]]:
        """(steps, this rank's batches): its slice of every batch of the seeded global plan."""
        data, types = self.config.data, self.table.column("type")
        if data.balance == "type":
            plan = batching.plan_balanced(self.lengths, types.to_numpy(zero_copy_only=False), data.batch_size,
                                          max_residues=data.max_residues_per_batch, bucket_batches=data.bucket_batches,
                                          seed=self.config.train.seed, epoch=epoch, world_size=world_size)
        else:
            table = type_weight_table(types, self.config)
            weights = None if table is None else np.array([table[t] for t in types.to_pylist()], dtype=np.float64)
            plan = batching.plan_batches(self.lengths, data.batch_size, max_residues=data.max_residues_per_batch,
                                         bucket_batches=data.bucket_batches, seed=self.config.train.seed, epoch=epoch,
                                         weights=weights, world_size=world_size)
        plan = batching.shard_batches(plan, self.lengths, rank, world_size)
        return len(plan), with_structure_dropout((self.table.take(pa.array(idx)) for idx in plan), self.config, epoch)

    def eval_batches(self, rank: int, world_size: int) -> Iterator[pa.Table]:
        """Length-sorted batches over the whole split, dealt to ranks: every protein on exactly one rank."""
        data = self.config.data
        plan = batching.eval_batches(self.lengths, data.batch_size, data.max_residues_per_batch)[rank::world_size]
        return (self.table.take(pa.array(idx)) for idx in plan)


class StreamSplit:
    """This rank's stream of a split: rows from `source`, windows bucketed by length, nothing held whole.

    `metadata` (length and type of every protein of the whole split) gives the epoch's step estimate for the
    LR schedule and the normaliser of type weights; it is 8 bytes a protein, not the split. A stream draws each
    row a Poisson number of times (the in-memory path's multinomial draws, independently); with
    `data.balance = "type"` the draws give every type an equal share of the epoch (the in-memory path's plan
    balances every batch; a stream cannot hold a rare type back to place it).
    """

    def __init__(self, source: RowSource, metadata: pa.Table, config: Config) -> None:
        self.source, self.config = source, config
        self.lengths = metadata.column("length").to_numpy()
        self.weight_of = type_weight_table(metadata.column("type"), config)
        if self.weight_of is not None:  # the expected draws of an epoch: one per protein
            counts = Counter(metadata.column("type").to_pylist())
            self.scale = metadata.num_rows / sum(self.weight_of[t] * n for t, n in counts.items())
        self.num_proteins = metadata.num_rows

    def train_epoch(self, epoch: int, rank: int, world_size: int) -> tuple[int, Iterator[pa.Table]]:
        data = self.config.data
        # The global plan's batch count: what every rank's stream cuts, within a batch or two (`lockstep`).
        steps = len(batching.plan_batches(self.lengths, data.batch_size, max_residues=data.max_residues_per_batch,
                                          bucket_batches=data.bucket_batches, seed=self.config.train.seed,
                                          epoch=epoch, world_size=world_size))
        rng = np.random.default_rng([self.config.train.seed, epoch, rank])
        repeat = None
        if self.weight_of is not None:
            def repeat(table: pa.Table) -> np.ndarray:
                means = np.array([self.weight_of[t] for t in table.column("type").to_pylist()]) * self.scale
                return rng.poisson(means)
        batch_size = -(-data.batch_size // world_size)  # this rank's part of each global batch
        window = batch_size * data.bucket_batches
        pool_rows = data.shuffle_rows or 2 * window
        batches = bucketed(self.source(epoch), rng, batch_size=batch_size, max_residues=data.max_residues_per_batch,
                           window=window, pool_rows=pool_rows, repeat=repeat)
        return steps, with_structure_dropout(batches, self.config, epoch)

    def eval_batches(self, rank: int, world_size: int) -> Iterator[pa.Table]:
        """Every row of this rank's stream once, in length-sorted windows (exact metrics once gathered)."""
        data = self.config.data
        window = data.batch_size * data.bucket_batches * 4
        for table in windows(self.source(0), window):
            for idx in batching.eval_batches(table.column("length").to_numpy(), data.batch_size,
                                             data.max_residues_per_batch):
                yield table.take(pa.array(idx))


Split = MemorySplit | StreamSplit


def with_structure_dropout(batches: Iterable[pa.Table], config: Config, epoch: int) -> Iterator[pa.Table]:
    """Training batches with `data.structure_dropout` of their structure rows seen as sequence graphs this epoch
    (`structure_dropout`: the same proteins on every rank and path, by seed, epoch and id)."""
    share = config.data.structure_dropout
    if share <= 0:
        yield from batches
        return
    k = int(shards.read_manifest(config.data.path).get("k", 16))  # the window the set's sequence graphs have
    for table in batches:
        yield drop_structures(table, share, seed=config.train.seed, epoch=epoch, k=k)


def type_weight_table(types: pa.ChunkedArray | pa.Array, config: Config) -> dict[str, float] | None:
    """Relative draw weight of a protein by its type: `data.type_weights` (missing types 1), or with
    `data.balance = "type"` 1 / the type's count in the split (every type the same expected share); None for
    plain shuffling."""
    data = config.data
    counts = Counter(types.to_pylist())
    if data.balance == "type":
        return {t: 1.0 / n for t, n in counts.items()}
    if not data.type_weights:
        return None
    return {t: data.type_weights.get(t, 1.0) for t in counts}


# ---- stream kernels -------------------------------------------------------------------------------------------

def windows(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Re-cut a stream of tables into tables of `rows` rows (the last one shorter)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= rows:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, rows)
            rest = joined.slice(rows)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held:
        yield pa.concat_tables(pending)


def bucketed(tables: Iterable[pa.Table], rng: np.random.Generator, *, batch_size: int, max_residues: int,
             window: int, pool_rows: int, repeat: Callable[[pa.Table], np.ndarray] | None = None) -> Iterator[pa.Table]:
    """Batches of a stream: a shuffle pool of `pool_rows` rows; each `window` drawn from it at random is sorted
    by length, cut by count and residue budget, and its batches are yielded in a shuffled order."""
    pool: pa.Table | None = None

    def cut(rows: pa.Table) -> Iterator[pa.Table]:
        batches = batching.eval_batches(rows.column("length").to_numpy(), batch_size, max_residues)  # sorted, cut
        for i in rng.permutation(len(batches)):
            yield rows.take(pa.array(batches[i]))

    for table in tables:
        if repeat is not None:
            table = table.take(pa.array(np.repeat(np.arange(table.num_rows), repeat(table))))
        pool = table if pool is None else pa.concat_tables([pool, table])
        while pool.num_rows >= pool_rows + window:
            pick = rng.permutation(pool.num_rows)
            yield from cut(pool.take(pa.array(pick[:window])))
            pool = pool.take(pa.array(np.sort(pick[window:])))
    if pool is not None and pool.num_rows:
        pool = pool.take(pa.array(rng.permutation(pool.num_rows)))
        for start in range(0, pool.num_rows, window):
            yield from cut(pool.slice(start, window))


def lockstep(batches: Iterable, all_min: Callable[[int], int]) -> Iterator:
    """Yield batches while every rank still has one (a collective per step); then drain this rank's rest, so
    its stream ends cleanly. With one rank, `all_min` is the identity and this is a plain pass-through."""
    iterator = iter(batches)
    for batch in iterator:
        if all_min(1) == 0:
            break
        yield batch
    else:
        all_min(0)  # this rank ran out: tell the others (they break on the same step)
        return
    for _ in iterator:
        pass


def id_keys(ids: Iterable[str]) -> np.ndarray:
    """Stable 64-bit keys of protein ids (the same in every process), to count what ranks trained on."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
                    dtype=np.uint64)


def local_split(config: Config, split: str, mode: str | None = None) -> Split:
    """A split as one process reads it (in-process runs, one-worker Tune trials, evaluation): the whole table
    in memory, or its shards streamed row group by row group (training files shuffled per epoch)."""
    folds = split_folds(config, split)
    mode = mode or loading_mode(config, shards.read_manifest(config.data.path))
    if mode == "memory":
        return MemorySplit(shards.read_table(config.data.path, folds=folds), config)
    seed = config.train.seed if split == "train" else None

    def source(epoch: int) -> Iterator[pa.Table]:
        return parquet_rows(config.data.path, folds, seed=seed, epoch=epoch)

    return StreamSplit(source, split_metadata(config.data.path, folds), config)
