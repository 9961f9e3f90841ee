"""Result shards: per-protein predictions as Parquet, one file per input unit, written as each unit finishes, and
the outputs of today (3-line, GFF3, summary, rejects) assembled from them in input order.

    <out-dir>/shards/part-<file>-<unit>.parquet   one row per record of the unit, in file order
    <out-dir>/shards/resume.json                  the inputs and arguments the shards were made from

A row: input (file index), unit, position, id, source (file:line), reject (the reason, or null: predicted),
sequence, labels (the topology over IOPSMB), type, segments (label, start, end; 1-based inclusive),
num_membrane_segments, confidence (float32 per residue: the probability of the decoded label) and, with
--probabilities, probabilities (float32 [L x 6], row-major in alphabet.LABELS order). The file's metadata holds
the unit's repairs (lowercase, stop). A shard is written under a temporary name and renamed (locally) or put in
one request (object storage), so a listed shard is complete: a rerun skips those and predicts the rest.
Pure pyarrow and numpy; no Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from protopo_ray.data import storage
from protopo_ray.data.alphabet import NUM_LABELS
from protopo_ray.inference.inputs import Reject, Unit
from protopo_ray.inference.outputs import (
    FILES,
    Prediction,
    Topology,
    regions,
    write_3line,
    write_gff3,
    write_rejects,
    write_summary,
)

SHARDS_DIR = "shards"
RESUME_FILE = "resume.json"
SEGMENT = pa.struct([("label", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
SCHEMA = pa.schema([
    ("input", pa.int32()), ("unit", pa.int32()), ("position", pa.int32()), ("id", pa.string()),
    ("source", pa.string()), ("reject", pa.string()), ("sequence", pa.string()), ("labels", pa.string()),
    ("type", pa.string()), ("segments", pa.list_(SEGMENT)), ("num_membrane_segments", pa.int32()),
    ("confidence", pa.list_(pa.float32())), ("probabilities", pa.list_(pa.float32())),
])


class ResumeMismatch(ValueError):
    """The out-dir holds shards of a run with other inputs or arguments (and --overwrite was not given)."""


def shard_name(key: str) -> str:
    return f"part-{key}.parquet"


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardReport:
    """What one written shard holds (the small row the Ray pipeline hands back to the driver)."""

    key: str
    num_predicted: int
    num_rejected: int
    residues: int
    fixed: dict[str, int]


def shard_table(unit: Unit, predictions: Sequence[Prediction], probabilities: bool = False) -> pa.Table:
    """The rows of `unit`: its records' `predictions` (in the order of `unit.records`) and its rejects, in file
    order."""
    found = iter(predictions)
    rows = []
    for position, item in enumerate(unit.items):
        row: dict[str, Any] = {"input": unit.file, "unit": unit.index, "position": position, "id": item.id,
                               "source": item.source}
        if isinstance(item, Reject):
            row["reject"] = item.reason
        else:
            p = next(found)
            row.update(sequence=p.sequence, labels=p.labels, type=p.type,
                       segments=[{"label": c, "start": a, "end": b} for c, a, b in regions(p.labels)],
                       num_membrane_segments=p.num_membrane_segments,
                       confidence=p.confidence.astype(np.float32),
                       probabilities=p.probabilities.astype(np.float32).reshape(-1) if probabilities else None)
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table.replace_schema_metadata({"fixed": json.dumps(unit.fixed)})


def write_shard(root: str, unit: Unit, predictions: Sequence[Prediction], probabilities: bool = False) -> ShardReport:
    """One unit's shard under `root` (a local directory or URI), complete or not there at all."""
    table = shard_table(unit, predictions, probabilities)
    fs, inner = storage.filesystem(root)
    final = f"{inner}/{shard_name(unit.key)}"
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{final}.tmp-{os.getpid()}"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
    else:  # object storage: the object appears when its single upload completes
        with fs.open_output_stream(final) as handle:
            pq.write_table(table, handle, compression="zstd")
    return ShardReport(key=unit.key, num_predicted=len(predictions), num_rejected=len(unit.items) - len(predictions),
                       residues=sum(len(p.sequence) for p in predictions), fixed=dict(unit.fixed))


def finished_shards(root: str) -> dict[str, str]:
    """key -> path of every complete shard under `root` (temporary files of killed writers are not listed)."""
    fs, inner = storage.filesystem(root)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return {}
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(inner)):
        name = info.base_name
        if name.startswith("part-") and name.endswith(".parquet"):
            found[name[len("part-"):-len(".parquet")]] = info.path
    return found


def prepare_shard_dir(root: str, key: dict[str, Any], overwrite: bool) -> dict[str, str]:
    """Make `root` ready for a run made from `key` (inputs and arguments): the finished shards of an interrupted
    run of the same key are kept and returned; another key's are refused, or removed with `overwrite`."""
    fs, inner = storage.filesystem(root)
    fs.create_dir(inner, recursive=True)
    key = json.loads(json.dumps(key))
    recorded_path = f"{inner}/{RESUME_FILE}"
    made = None
    if fs.get_file_info(recorded_path).type == pafs.FileType.File:
        with fs.open_input_stream(recorded_path) as handle:
            made = json.loads(handle.read())
    done = finished_shards(root)
    if (made is not None and made != key) or (made is None and done):
        differs = sorted(n for n in key.keys() | (made or {}).keys() if (made or {}).get(n) != key.get(n))
        message = (f"{root} holds {len(done)} result shard(s) of a run with other inputs or arguments (differing: "
                   f"{', '.join(differs) or 'unrecorded'})")
        if not overwrite:
            raise ResumeMismatch(f"{message}; rerun that command to finish it, or pass --overwrite to start over")
        print(f"{message}: removing them and starting over (--overwrite)", flush=True)
        fs.delete_dir_contents(inner)
        done = {}
    with fs.open_output_stream(recorded_path) as handle:
        handle.write((json.dumps(key, indent=2) + "\n").encode())
    return done


def read_shards(root: str, keys: Sequence[str], columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of the shards `keys` (in that order), one shard in memory at a time."""
    fs, inner = storage.filesystem(root)
    for key in keys:
        table = pq.read_table(f"{inner}/{shard_name(key)}", filesystem=fs, columns=list(columns) if columns else None)
        yield from table.to_pylist()


def shard_repairs(root: str, keys: Sequence[str]) -> Counter:
    fs, inner = storage.filesystem(root)
    total = Counter()
    for key in keys:
        metadata = pq.read_schema(f"{inner}/{shard_name(key)}", filesystem=fs).metadata or {}
        total.update(json.loads(metadata.get(b"fixed", b"{}")))
    return total


def topology_of(row: dict[str, Any]) -> Topology:
    probabilities = row.get("probabilities")
    return Topology(row["id"], row["sequence"], row["labels"], np.asarray(row["confidence"], np.float32),
                    None if probabilities is None else np.asarray(probabilities, np.float32).reshape(-1, NUM_LABELS))


@dataclass(frozen=True, kw_only=True, slots=True)
class Assembled:
    num_predicted: int
    rejects: list[Reject]
    files: dict[str, str]


def assemble_outputs(root: str, keys: Sequence[str], out_dir: str, out_3line: str | Path | None = None) -> Assembled:
    """predicted.3line, predicted.gff3, summary.tsv and rejects.tsv of the shards `keys` (in input order) into
    `out_dir` (local or URI; written locally and copied there), and the 3-line file to `out_3line`. An id a
    previous input already had is rejected as a duplicate (inputs.first_occurrences' rule)."""
    seen: dict[str, str] = {}
    rejects: list[Reject] = []
    duplicates: set[tuple[int, int, int]] = set()
    for row in read_shards(root, keys, columns=["input", "unit", "position", "id", "source", "reject"]):
        if row["reject"] is not None:
            rejects.append(Reject(row["id"], row["source"], row["reject"]))
        elif row["id"] in seen:
            duplicates.add((row["input"], row["unit"], row["position"]))
            rejects.append(Reject(row["id"], row["source"], f"{row['source']}: record {row['id']!r}: duplicate id, "
                                  f"first seen at {seen[row['id']]}. ids must be unique across the inputs; remove or "
                                  f"rename one of them"))
        else:
            seen[row["id"]] = row["source"]

    def kept(columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        wanted = None if columns is None else ["input", "unit", "position", "reject", *columns]
        for row in read_shards(root, keys, wanted):
            if row["reject"] is None and (row["input"], row["unit"], row["position"]) not in duplicates:
                yield row

    local = Path(out_dir) if not storage.is_uri(out_dir) else Path(tempfile.mkdtemp(prefix="protopo-predict-"))
    local.mkdir(parents=True, exist_ok=True)
    columns = ["id", "sequence", "labels", "confidence"]
    write_3line(local / FILES["3line"], (topology_of(r) for r in kept(columns)))
    write_gff3(local / FILES["gff3"], (topology_of(r) for r in kept(columns)),
               sequence_regions=((r["id"], len(r["sequence"])) for r in kept(["id", "sequence"])))
    write_summary(local / FILES["summary"], (topology_of(r) for r in kept(columns)))
    written = {name: str(local / FILES[name]) for name in ("3line", "gff3", "summary")}
    if rejects:
        written["rejects"] = str(write_rejects(local / FILES["rejects"], rejects))
    if out_3line is not None:
        shutil.copyfile(local / FILES["3line"], out_3line)
    if storage.is_uri(out_dir):
        fs, inner = storage.filesystem(out_dir)
        for name, path in list(written.items()):
            target = f"{inner}/{Path(path).name}"
            with open(path, "rb") as source, fs.open_output_stream(target) as handle:
                shutil.copyfileobj(source, handle)
            written[name] = storage.join(out_dir, Path(path).name)
        shutil.rmtree(local, ignore_errors=True)
    return Assembled(num_predicted=len(seen), rejects=rejects, files=written)
