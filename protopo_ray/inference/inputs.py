"""What `predict` reads: input files (FASTA or 3-line, plain or .gz; a file, a directory of them, or an s3:// /
gs:// URI of either) cut into units, the unit of batching, resuming and output shards on both paths.

A unit is up to `UNIT_PROTEINS` consecutive records of one file (fewer when they reach `unit_residues`), records
and rejects in file order: a bad record (illegal letters, an empty sequence, a duplicate id) becomes a `Reject`
with its reason where it stood, so it never costs the others. FASTA is read lazily (`records.FastaStream`), so a
500,000-sequence proteome never sits in one process's memory; units are cut the same way for the in-process and
the Ray path, so both batch every protein with the same neighbours and write the same shards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyarrow import fs as pafs

from protopo_ray.data import storage
from protopo_ray.data.records import READERS, FastaStream, ProteinRecord, RecordError, read_records

#: Records per unit at most (a resumable shard, a Ray Data row).
UNIT_PROTEINS = 256
#: Residues per unit at most (a protein longer than this is a unit of its own).
UNIT_RESIDUES = 131072
#: Bytes of embeddings one unit may carry between the embedding and the network actors.
UNIT_EMBEDDING_BYTES = 64 * 2**20
FASTA_SUFFIXES = (".fasta", ".fa", ".faa")


class InputError(ValueError):
    """An input that cannot be read at all (missing, no input files in a directory, an unknown suffix)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """A record that was not predicted, and why (the reader's message: file, line, id, problem, what to do)."""

    id: str
    source: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Unit:
    """Records (and rejects, where they stood) `index` of input file `file`."""

    file: int
    index: int
    items: tuple[ProteinRecord | Reject, ...]
    fixed: dict[str, int] = field(default_factory=dict)
    """Sequences repaired while reading this unit ('lowercase', 'stop': `records.FIXES`)."""

    @property
    def key(self) -> str:
        return f"{self.file:05d}-{self.index:06d}"

    @property
    def records(self) -> list[ProteinRecord]:
        return [item for item in self.items if isinstance(item, ProteinRecord)]


def unit_residues(embedding_dim: int = 0) -> int:
    """The residue cap of a unit: float16 embeddings of a unit stay under UNIT_EMBEDDING_BYTES."""
    return min(UNIT_RESIDUES, UNIT_EMBEDDING_BYTES // (2 * embedding_dim)) if embedding_dim else UNIT_RESIDUES


def _suffix(name: str) -> str:
    path = Path(name[:-3] if name.endswith(".gz") else name)
    return path.suffix.lower()


def list_inputs(path: str) -> list[str]:
    """The input files of `path` in the order they are read: the file itself, or a directory's (or URI prefix's)
    FASTA / 3-line files by name."""
    fs, inner = storage.filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.File:
        if _suffix(inner) not in READERS:
            raise InputError(f"{path}: unknown file type {_suffix(inner)!r}; use one of {', '.join(READERS)} "
                             f"(optionally .gz)")
        return [path]
    found = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(inner, recursive=False))
                   if f.type == pafs.FileType.File and _suffix(f.base_name) in READERS)
    if not found:
        raise InputError(f"{path}: a directory without input files ({', '.join(READERS)}, optionally .gz)")
    return [storage.with_scheme(f, path) if storage.is_uri(path) else f for f in found]


def reject_of(error: RecordError) -> Reject:
    return Reject(id=error.protein_id or "", source=f"{error.path.name}:{error.where}", reason=str(error))


def _entries(path: str) -> tuple[Iterator[ProteinRecord | RecordError], Counter]:
    """A file's records and errors in order, and the repairs counter the reading fills."""
    if _suffix(path) in FASTA_SUFFIXES:
        stream = FastaStream(path, lenient=True)
        return iter(stream), stream.fixed
    if storage.is_uri(path):
        raise InputError(f"{path}: labelled inputs (3-line, JSON) are read from local files; object storage "
                         f"holds FASTA ({', '.join(FASTA_SUFFIXES)})")
    result = read_records(path, skip_invalid=True, lenient=True)
    # Records first would reorder them: put each error back where its line stood.
    items = sorted([*result.records, *result.skipped], key=_line_of)
    return iter(items), result.fixed


def _line_of(item: ProteinRecord | RecordError) -> tuple[int, str]:
    where = str(item.where if isinstance(item, RecordError) else item.source.rsplit(":", 1)[-1])
    return (int(where), "") if where.isdigit() else (0, where)


def read_units(path: str, file_index: int, residues: int = UNIT_RESIDUES,
               skip: frozenset[int] = frozenset()) -> Iterator[Unit]:
    """The units of input file `path` (the `file_index`-th input), in order; units whose index is in `skip`
    (finished by an interrupted run) are cut but not yielded."""
    entries, fixed = _entries(path)
    items: list[ProteinRecord | Reject] = []
    index, length, repaired, counted = 0, 0, Counter(), Counter()
    for entry in entries:
        # The reader counts an entry's repairs as it reads it: what changed since the last entry is this one's.
        mine = fixed - counted if sum(fixed.values()) != sum(counted.values()) else Counter()
        counted.update(mine)
        size = len(entry.sequence) if isinstance(entry, ProteinRecord) else 0
        if items and (len(items) >= UNIT_PROTEINS or length + size > residues):
            if index not in skip:
                yield Unit(file=file_index, index=index, items=tuple(items), fixed=dict(repaired))
            index, items, length, repaired = index + 1, [], 0, Counter()
        items.append(entry if isinstance(entry, ProteinRecord) else reject_of(entry))
        length += size
        repaired.update(mine)
    if items and index not in skip:
        yield Unit(file=file_index, index=index, items=tuple(items), fixed=dict(repaired))


def first_occurrences(items: list[ProteinRecord | Reject]) -> list[ProteinRecord | Reject]:
    """Items across all inputs with every later record of an id already seen (in another file) made a Reject."""
    seen: dict[str, str] = {}
    out: list[ProteinRecord | Reject] = []
    for item in items:
        if isinstance(item, ProteinRecord) and item.id in seen:
            out.append(Reject(id=item.id, source=item.source, reason=f"{item.source}: record {item.id!r}: duplicate "
                              f"id, first seen at {seen[item.id]}. ids must be unique across the inputs; remove or "
                              f"rename one of them"))
            continue
        if isinstance(item, ProteinRecord):
            seen[item.id] = item.source
        out.append(item)
    return out
