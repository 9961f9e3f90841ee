"""Parquet shards of residue graphs: one Arrow row per protein, and a manifest.

Preparation writes shards once (`ShardWriter` / `write_shards`); training reads them (`read_table`) and
`protopo_ray.data.collate` turns the Arrow rows into PyG batches. Writing shards needs neither torch nor
torch_geometric. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from protopo_ray.data import storage
from protopo_ray.data.graphs import EDGE_FEATURES, NODE_FEATURES, ResidueGraph
from protopo_ray.data.records import ProteinRecord

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# Shard layout, sized for streaming: the one rule every writer (the process pool and the Ray Data path) uses.
# A streaming reader (pyarrow `ParquetFile.read_row_group`, a Ray Data `read_parquet` task) decodes at least a
# whole row group of a column at once, so the row group bounds the memory of one read step; the file bounds
# one read task (Ray Data reads a file per task) and is the unit a rank or a shuffle moves around.
# Measured on synthetic structure graphs (k = 16): ~196 B per residue in memory, ~54 B on disk (zstd).
MAX_ROWS_PER_FILE = 512
"""A file closes at 512 proteins: ~10 MB on disk at the synthetic set's mean length (~390), ~14 MB at
AlphaFold's ~500. Large enough that an object-store GET (tens of ms) is amortised, small enough that a 20k
set has 40 files to spread over ranks and shuffle by file."""
MAX_BYTES_PER_FILE = 64 << 20
"""...or earlier, when its rows' in-memory size reaches 64 MiB (long proteins), so one read task holds <= 64 MiB."""
ROW_GROUP_ROWS = 64
"""A row group holds <= 64 proteins (two batches of 32; ~5 MB in memory at mean length 390)..."""
ROW_GROUP_BYTES = 16 << 20
"""...and <= 16 MiB of in-memory row size (64 proteins of 1300+ residues close it earlier)."""

LENGTH_BIN_EDGES = (*range(0, 1000, 50), 1000, 1250, 1500, 2000, 2500, 3000, 4000)
"""Fixed bins of the manifest's length histograms: bin i counts proteins with edges[i] <= length < edges[i+1],
the last bin lengths >= 4000. 50-residue bins up to 1000 (where most proteins and the batching decisions are),
then coarser. Fixed, so histograms of different sets (and shards) add up bin by bin."""

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("type", pa.string(), nullable=False),
    pa.field("fold", pa.string(), nullable=False),
    pa.field("length", pa.int32(), nullable=False),
    pa.field("sequence", pa.string(), nullable=False),
    pa.field("labels", pa.string(), nullable=False),  # "" when unlabelled
    pa.field("graph_source", pa.string(), nullable=False),
    pa.field("aa", pa.list_(pa.int8()), nullable=False),
    pa.field("node_features", pa.list_(pa.float16()), nullable=False),  # flattened [L, F]
    pa.field("edge_src", pa.list_(pa.int32()), nullable=False),
    pa.field("edge_dst", pa.list_(pa.int32()), nullable=False),
    pa.field("edge_distance", pa.list_(pa.float16())),  # null for sequence graphs
    pa.field("ca", pa.list_(pa.float32())),  # flattened [L, 3]; null without a structure
    # flattened [L, D] protein language model embeddings (protopo_ray.data.embeddings; the manifest's
    # "embedding" says which); null in sets prepared without --embed-weights, and read as null from older files
    pa.field("embedding", pa.list_(pa.float16())),
], metadata={"protopo_ray.schema_version": str(SCHEMA_VERSION)})

_LIST_DTYPES = {"aa": np.int8, "node_features": np.float16, "edge_src": np.int32, "edge_dst": np.int32,
                "edge_distance": np.float16, "ca": np.float32, "embedding": np.float16}


def record_to_row(record: ProteinRecord, graph: ResidueGraph, embedding: np.ndarray | None = None) -> dict[str, Any]:
    """One shard row: strings as str, list columns as numpy arrays (None for null lists); `embedding` is
    [L, D] (protopo_ray.data.embeddings), None when the set has none."""
    length = len(record.sequence)
    if graph.num_nodes != length:
        raise ValueError(f"{record.id}: graph has {graph.num_nodes} nodes but the sequence has {length} residues")
    if record.labels and len(record.labels) != length:
        raise ValueError(f"{record.id}: {len(record.labels)} labels for {length} residues")
    structure = graph.graph_source == "structure"
    return {
        "id": record.id, "type": record.type, "fold": record.fold, "length": length,
        "sequence": record.sequence, "labels": record.labels, "graph_source": graph.graph_source,
        "aa": graph.aa.astype(np.int8),
        "node_features": graph.node_features.astype(np.float16).reshape(-1),
        "edge_src": graph.edge_index[0].astype(np.int32),
        "edge_dst": graph.edge_index[1].astype(np.int32),
        "edge_distance": graph.edge_distance.astype(np.float16) if structure else None,
        "ca": graph.ca.astype(np.float32).reshape(-1) if structure and graph.ca is not None else None,
        "embedding": None if embedding is None else np.asarray(embedding, np.float16).reshape(-1),
    }


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Arrow table (SCHEMA) from `record_to_row` dicts, built column-wise from concatenated numpy arrays."""
    columns: dict[str, pa.Array] = {}
    for field in SCHEMA:
        values = [row[field.name] for row in rows]
        if field.name in _LIST_DTYPES:
            columns[field.name] = _list_array(values, _LIST_DTYPES[field.name], field.type)
        else:
            columns[field.name] = pa.array(values, type=field.type)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _list_array(values: list[np.ndarray | None], dtype: type, list_type: pa.DataType) -> pa.Array:
    sizes = np.array([0 if v is None else len(v) for v in values], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int32)
    flat = np.concatenate([np.asarray(v, dtype=dtype) for v in values if v is not None] or [np.zeros(0, dtype)])
    nulls = np.array([v is None for v in values])
    mask = pa.array(nulls) if nulls.any() else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=list_type.value_type), mask=mask)


def _row_bytes(row: dict[str, Any]) -> int:
    return sum(v.nbytes if isinstance(v, np.ndarray) else len(v) if isinstance(v, str) else 8 for v in row.values())


def length_bin(length: int) -> int:
    """Index of `length` in LENGTH_BIN_EDGES' bins."""
    return int(np.searchsorted(LENGTH_BIN_EDGES, length, side="right")) - 1


def row_groups(sizes: Sequence[int], max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of at most `max_rows` rows and `max_bytes` bytes (but >= 1 row) each."""
    groups, start, held = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_rows or held + size > max_bytes):
            groups.append((start, i))
            start, held = i, 0
        held += size
    if start < len(sizes):
        groups.append((start, len(sizes)))
    return groups


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (recorded in the manifest for every source the shards were built from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes rows to part-00000.parquet, part-00001.parquet, ... and manifest.json (last) on close.

    A file closes at `max_rows_per_shard` rows or when its rows' in-memory size reaches `max_bytes_per_shard`;
    inside it, row groups of <= `row_group_rows` rows and <= `row_group_bytes` bytes (defaults: the streaming
    layout above). zstd makes files on disk several times smaller than the in-memory bound.

    The Ray path runs one writer per task with its own `file_prefix`, `clear=False` and `finish()` instead of
    `close()`, and the driver writes the manifest of all tasks' files (`build_manifest`, `write_manifest`).
    """

    def __init__(self, out_dir: str | os.PathLike, *, k: int, sources: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None, max_rows_per_shard: int = MAX_ROWS_PER_FILE,
                 max_bytes_per_shard: int = MAX_BYTES_PER_FILE, row_group_rows: int = ROW_GROUP_ROWS,
                 row_group_bytes: int = ROW_GROUP_BYTES, file_prefix: str = "part", clear: bool = True,
                 embedding: dict[str, Any] | None = None) -> None:
        if min(max_rows_per_shard, max_bytes_per_shard, row_group_rows, row_group_bytes) < 1:
            raise ValueError("max_rows_per_shard, max_bytes_per_shard, row_group_rows and row_group_bytes "
                             "must be >= 1")
        self.out_dir = str(out_dir)
        self.fs, self.root = storage.filesystem(out_dir)
        self.k, self.sources, self.extra, self.embedding = k, dict(sources or {}), dict(extra or {}), embedding
        self.layout = {"max_rows_per_file": max_rows_per_shard, "max_bytes_per_file": max_bytes_per_shard,
                       "row_group_rows": row_group_rows, "row_group_bytes": row_group_bytes}
        self.file_prefix = file_prefix
        self.fs.create_dir(self.root, recursive=True)
        if clear:
            clear_shards(self.fs, self.root)
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0
        self._shards: list[dict[str, Any]] = []
        self._histogram: dict[str, list[int]] = {}
        self.manifest: dict[str, Any] | None = None

    def add(self, row: dict[str, Any]) -> None:
        size = _row_bytes(row)
        if self._buffer and self._buffer_bytes + size > self.layout["max_bytes_per_file"]:
            self._flush()
        self._buffer.append(row)
        self._buffer_bytes += size
        if len(self._buffer) >= self.layout["max_rows_per_file"]:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        rows, name = self._buffer, f"{self.file_prefix}-{len(self._shards):05d}.parquet"
        path = f"{self.root}/{name}"
        groups = row_groups([_row_bytes(row) for row in rows], self.layout["row_group_rows"],
                             self.layout["row_group_bytes"])
        table = rows_to_table(rows)
        # Dictionary-encode only the repetitive strings; the numeric lists compress better plain + zstd.
        with pq.ParquetWriter(path, SCHEMA, filesystem=self.fs, compression="zstd",
                              use_dictionary=["type", "fold", "graph_source"]) as writer:
            for start, stop in groups:
                writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
        lengths = [int(row["length"]) for row in rows]
        counts = {key: dict(sorted(Counter(row[key] for row in rows).items())) for key in COUNTED}
        residues: Counter = Counter()
        for row, length in zip(rows, lengths):
            residues[row["fold"]] += length
            self._histogram.setdefault(row["fold"], [0] * len(LENGTH_BIN_EDGES))[length_bin(length)] += 1
        self._shards.append({"file": name, "num_rows": len(rows), "num_bytes": self.fs.get_file_info(path).size,
                             "num_residues": sum(lengths), "num_row_groups": len(groups),
                             "min_length": min(lengths), "max_length": max(lengths), "counts": counts,
                             "residues": {"fold": dict(sorted(residues.items()))}})
        self._buffer, self._buffer_bytes = [], 0

    def finish(self) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
        """Flush the last file; (shard entries, length histogram per fold) of this writer's files, no manifest."""
        self._flush()
        return self._shards, self._histogram

    def close(self) -> dict[str, Any]:
        """Flush the last shard and write manifest.json; returns the manifest."""
        if self.manifest is not None:
            return self.manifest
        entries, histogram = self.finish()
        manifest = build_manifest(entries, [histogram], k=self.k, sources=self.sources, extra=self.extra,
                                  layout=self.layout, embedding=self.embedding)
        write_manifest(self.fs, self.root, manifest)
        self.manifest = manifest
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # on error leave no manifest: the directory must not look complete
            self.close()


COUNTED = ("type", "fold", "graph_source")
"""Columns whose values the manifest counts (`counts`, overall and per shard)."""


def clear_shards(fs: pafs.FileSystem, root: str) -> None:
    """Delete the manifest (first: a stale one would describe shards about to be overwritten) and part files."""
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    for info in sorted(infos, key=lambda info: info.base_name != MANIFEST):
        if info.base_name == MANIFEST or (info.base_name.startswith("part-") and info.extension == "parquet"):
            fs.delete_file(info.path)


def build_manifest(entries: Sequence[dict[str, Any]], histograms: Iterable[dict[str, list[int]]], *, k: int,
                   sources: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                   layout: dict[str, int] | None = None, embedding: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of shard files `entries` (ShardWriter's, in read order); totals are sums over the entries.
    `embedding` (embeddings.EmbeddingSpec.to_json: model, weights, layer, dim, ...) when rows carry embeddings."""
    counts: dict[str, Counter] = {key: Counter() for key in COUNTED}
    residues: Counter = Counter()
    for entry in entries:
        for key in COUNTED:
            counts[key].update(entry["counts"][key])
        residues.update(entry["residues"]["fold"])
    by_fold: dict[str, np.ndarray] = {}
    for histogram in histograms:
        for fold, bins in histogram.items():
            by_fold[fold] = by_fold.get(fold, np.zeros(len(LENGTH_BIN_EDGES), np.int64)) + np.asarray(bins)
    return {
        "schema_version": SCHEMA_VERSION,
        "num_proteins": sum(entry["num_rows"] for entry in entries),
        "num_residues": sum(entry["num_residues"] for entry in entries),
        "counts": {key: dict(sorted(counter.items())) for key, counter in counts.items()},
        "residues": {"fold": dict(sorted(residues.items()))},
        "length_histogram": {"bin_edges": list(LENGTH_BIN_EDGES),
                             "fold": {fold: bins.tolist() for fold, bins in sorted(by_fold.items())}},
        "k": k,
        "node_features": list(NODE_FEATURES),
        "edge_features": list(EDGE_FEATURES),
        **({"embedding": dict(embedding)} if embedding else {}),
        "shards": list(entries),
        "shard_layout": dict(layout or {"max_rows_per_file": MAX_ROWS_PER_FILE,
                                        "max_bytes_per_file": MAX_BYTES_PER_FILE,
                                        "row_group_rows": ROW_GROUP_ROWS, "row_group_bytes": ROW_GROUP_BYTES}),
        "sources": dict(sources or {}),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
    }


def write_manifest(fs: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> None:
    """Write manifest.json last, through a temporary file and a move, so a directory with a manifest always
    holds complete shards (on object storage the move is a copy: the manifest object appears whole or not)."""
    tmp = f"{root}/{MANIFEST}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write((json.dumps(manifest, indent=2) + "\n").encode())
    fs.move(tmp, f"{root}/{MANIFEST}")


def write_shards(rows: Iterable[dict[str, Any]], out_dir: str | os.PathLike, *, k: int,
                 sources: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 max_rows_per_shard: int = MAX_ROWS_PER_FILE, max_bytes_per_shard: int = MAX_BYTES_PER_FILE,
                 row_group_rows: int = ROW_GROUP_ROWS, embedding: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `record_to_row` dicts as shards + manifest under `out_dir`; returns the manifest."""
    with ShardWriter(out_dir, k=k, sources=sources, extra=extra, max_rows_per_shard=max_rows_per_shard,
                     max_bytes_per_shard=max_bytes_per_shard, row_group_rows=row_group_rows,
                     embedding=embedding) as writer:
        for row in rows:
            writer.add(row)
    return writer.close()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of shard directory `path` (local or s3:// / gs://), checked for this schema version."""
    fs, root = storage.filesystem(path)
    hint = f"run `python -m protopo_ray.prepare` to write shards to {path}"
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as handle:
            manifest = json.loads(handle.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {MANIFEST}, so not a (complete) shard directory; {hint}") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: shards have schema version {version}, this code reads version "
                         f"{SCHEMA_VERSION}; {hint} again")
    return manifest


def shard_files(path: str | os.PathLike, manifest: dict[str, Any] | None = None) -> tuple[list[str], pafs.FileSystem]:
    """The Parquet files the manifest lists (never stray files of an interrupted run) and their filesystem."""
    manifest = manifest or read_manifest(path)
    fs, root = storage.filesystem(path)
    return [f"{root}/{shard['file']}" for shard in manifest["shards"]], fs


def read_table(path: str | os.PathLike, folds: Sequence[str] | None = None,
               columns: Sequence[str] | None = None) -> pa.Table:
    """All shards of `path` as one table (rows in shard order), optionally only the given folds/columns."""
    manifest = read_manifest(path)
    if isinstance(folds, str):
        folds = [folds]
    if folds is not None:
        known = manifest["counts"]["fold"]
        unknown = [fold for fold in folds if fold not in known]
        if unknown:
            raise ValueError(f"{path}: fold(s) {unknown} not in the shards; folds there: {sorted(known)}")
    files, fs = shard_files(path, manifest)
    columns = list(columns) if columns is not None else None
    if not files:
        table = SCHEMA.empty_table()
        return table.select(columns) if columns is not None else table
    dataset = pads.dataset(files, schema=SCHEMA, format="parquet", filesystem=fs)
    # The filter runs inside the scan (row groups whose statistics exclude the folds are skipped).
    where = pc.field("fold").isin(list(folds)) if folds is not None else None
    return dataset.to_table(columns=columns, filter=where)


def embedding_dim(manifest: dict[str, Any]) -> int:
    """Embedding values per residue of a shard set (0 without embeddings): the model's extra input width."""
    return int((manifest.get("embedding") or {}).get("dim", 0))
