"""Parquet shards of residue graphs: one Arrow row per protein, and a manifest.

Preparation writes shards once (`ShardWriter` / `write_shards`); training reads them (`read_table`) and
`protopo_ray.collate` turns the Arrow rows into PyG batches. Writing shards needs neither torch nor
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

from protopo_ray.graphs import EDGE_FEATURES, NODE_FEATURES, ResidueGraph
from protopo_ray.records import ProteinRecord

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

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
], metadata={"protopo_ray.schema_version": str(SCHEMA_VERSION)})

_LIST_DTYPES = {"aa": np.int8, "node_features": np.float16, "edge_src": np.int32, "edge_dst": np.int32,
                "edge_distance": np.float16, "ca": np.float32}


def record_to_row(record: ProteinRecord, graph: ResidueGraph) -> dict[str, Any]:
    """One shard row: strings as str, list columns as numpy arrays (None for null lists)."""
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


def _filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    path = str(path)
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (recorded in the manifest for every source the shards were built from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes rows to part-00000.parquet, part-00001.parquet, ... and manifest.json (last) on close.

    A shard closes when it holds `max_rows_per_shard` rows or its rows' in-memory size reaches
    `max_bytes_per_shard`; zstd makes files on disk several times smaller than that bound.
    """

    def __init__(self, out_dir: str | os.PathLike, *, k: int, sources: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None, max_rows_per_shard: int = 512,
                 max_bytes_per_shard: int = 64 << 20) -> None:
        if max_rows_per_shard < 1 or max_bytes_per_shard < 1:
            raise ValueError("max_rows_per_shard and max_bytes_per_shard must be >= 1")
        self.out_dir = str(out_dir)
        self.fs, self.root = _filesystem(out_dir)
        self.k, self.sources, self.extra = k, dict(sources or {}), dict(extra or {})
        self.max_rows, self.max_bytes = max_rows_per_shard, max_bytes_per_shard
        self.fs.create_dir(self.root, recursive=True)
        # A stale manifest would describe shards we are about to overwrite; remove it and old parts first.
        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
            if info.base_name == MANIFEST or (info.base_name.startswith("part-") and info.extension == "parquet"):
                self.fs.delete_file(info.path)
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0
        self._shards: list[dict[str, Any]] = []
        self._counts: dict[str, Counter] = {"type": Counter(), "fold": Counter(), "graph_source": Counter()}
        self._num_residues = 0
        self.manifest: dict[str, Any] | None = None

    def add(self, row: dict[str, Any]) -> None:
        size = _row_bytes(row)
        if self._buffer and self._buffer_bytes + size > self.max_bytes:
            self._flush()
        self._buffer.append(row)
        self._buffer_bytes += size
        for key, counter in self._counts.items():
            counter[row[key]] += 1
        self._num_residues += int(row["length"])
        if len(self._buffer) >= self.max_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"part-{len(self._shards):05d}.parquet"
        path = f"{self.root}/{name}"
        # Dictionary-encode only the repetitive strings; the numeric lists compress better plain + zstd.
        pq.write_table(rows_to_table(self._buffer), path, filesystem=self.fs, compression="zstd",
                       use_dictionary=["type", "fold", "graph_source"])
        self._shards.append({"file": name, "num_rows": len(self._buffer),
                             "num_bytes": self.fs.get_file_info(path).size})
        self._buffer, self._buffer_bytes = [], 0

    def close(self) -> dict[str, Any]:
        """Flush the last shard and write manifest.json; returns the manifest."""
        if self.manifest is not None:
            return self.manifest
        self._flush()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "num_proteins": sum(s["num_rows"] for s in self._shards),
            "num_residues": self._num_residues,
            "counts": {key: dict(sorted(counter.items())) for key, counter in self._counts.items()},
            "k": self.k,
            "node_features": list(NODE_FEATURES),
            "edge_features": list(EDGE_FEATURES),
            "shards": self._shards,
            "sources": self.sources,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "extra": self.extra,
        }
        # Written last and moved into place, so a directory with a manifest always holds complete shards.
        tmp = f"{self.root}/{MANIFEST}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write((json.dumps(manifest, indent=2) + "\n").encode())
        self.fs.move(tmp, f"{self.root}/{MANIFEST}")
        self.manifest = manifest
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # on error leave no manifest: the directory must not look complete
            self.close()


def write_shards(rows: Iterable[dict[str, Any]], out_dir: str | os.PathLike, *, k: int,
                 sources: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 max_rows_per_shard: int = 512, max_bytes_per_shard: int = 64 << 20) -> dict[str, Any]:
    """Write `record_to_row` dicts as shards + manifest under `out_dir`; returns the manifest."""
    with ShardWriter(out_dir, k=k, sources=sources, extra=extra, max_rows_per_shard=max_rows_per_shard,
                     max_bytes_per_shard=max_bytes_per_shard) as writer:
        for row in rows:
            writer.add(row)
    return writer.close()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of shard directory `path` (local or s3:// / gs://), checked for this schema version."""
    fs, root = _filesystem(path)
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
    fs, root = _filesystem(path)
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
