"""DeepTMHMM records: read and validate 3-line files, the partitions JSON and plain FASTA.

Every problem becomes a `RecordError` that names the file, the line (or JSON path such as `$.cv0[12]`), the
protein id and what to do about it. With `skip_invalid=True` a reader keeps the good records and collects the
bad ones in `ReadResult.skipped`, so one broken entry never takes a whole data set down.

Decisions worth knowing:
- Lowercase residues are rejected (with a hint to uppercase them) rather than silently uppercased when data is
  prepared for training: in FASTA files lowercase often marks masked or low-confidence regions, and the user
  should make that call. Prediction reads with `lenient=True`, accepting what the field's tools accept:
  lowercase is upper-cased and one terminal `*` (a translated stop codon, as Prodigal writes) dropped, each
  counted in `ReadResult.fixed` so the caller can say so.
- `stream_fasta` reads FASTA lazily, record by record, from a local path or an object-store URI (plain or .gz),
  yielding each record or its `RecordError`: a 500,000-sequence proteome never sits in memory.
- `source` holds the file *name* (not the full path) plus the line or JSON path, so prepared shards stay
  meaningful when moved to another machine; `RecordError` messages use the full path as given.
- Files ending in `.gz` are read transparently; the format is chosen from the suffix before `.gz`.
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protopo_ray.data import storage
from protopo_ray.data.alphabet import AMINO_ACIDS, INVALID_TYPE, LABELS, PROTEIN_TYPES, RARE_AMINO_ACIDS, protein_type


@dataclass(frozen=True, slots=True)
class ProteinRecord:
    """One labelled (or, for prediction, unlabelled) protein."""

    id: str
    sequence: str
    """Validated one-letter sequence; rare codes (U, O, B, Z, J, X) kept as written (see alphabet.AA_INDEX)."""
    labels: str = ""
    """Per-residue labels over IOPSMB, same length as `sequence`; empty when unlabelled."""
    type: str = ""
    """Protein type (TM, SP+TM, SP, GLOBULAR, BETA) derived from the labels; empty when unlabelled."""
    fold: str = ""
    """Partition, e.g. cv0..cv4 (partitions JSON) or train/val/test (synthetic)."""
    source: str = ""
    """Where it came from: 'file:line' or 'file:$.cv0[12]'."""


class RecordError(ValueError):
    """A malformed record, located precisely enough to fix it by hand."""

    def __init__(self, path: str | Path, where: int | str, protein_id: str | None, problem: str, hint: str = ""):
        self.path = Path(path)
        self.where = where
        self.protein_id = protein_id
        self.problem = problem
        self.hint = hint
        # Line numbers read as `file:12`, JSON paths as `file:$.cv0[12]`, just like `ProteinRecord.source`.
        who = f"record {protein_id!r}" if protein_id else "record without id"
        message = f"{self.path}:{where}: {who}: {problem}"
        super().__init__(f"{message}. {hint}" if hint else message)


@dataclass(slots=True)
class ReadResult:
    """Records that passed validation, and an error for every one that did not (empty unless skip_invalid)."""

    records: list[ProteinRecord] = field(default_factory=list)
    skipped: list[RecordError] = field(default_factory=list)
    fixed: Counter = field(default_factory=Counter)
    """lenient reading: records whose sequence was repaired, per repair ('lowercase', 'stop')."""


VALID_RESIDUES = frozenset(AMINO_ACIDS) | frozenset(RARE_AMINO_ACIDS)
VALID_LABELS = frozenset(LABELS)


#: The one protein-type rule (alphabet.protein_type), under the name the readers and the generator use.
label_type = protein_type


def _sequence_problem(sequence: str) -> tuple[str, str] | None:
    """(problem, hint) for an invalid sequence, or None when it is fine."""
    if not sequence:
        return "empty sequence", "remove the record or fill in its sequence"
    bad = [(i, c) for i, c in enumerate(sequence) if c not in VALID_RESIDUES]
    if not bad:
        return None
    pos, char = bad[0]
    shown = "".join(sorted({c for _, c in bad}))
    problem = f"sequence has {len(bad)} invalid residue(s) {shown!r}, first {char!r} at position {pos + 1}"
    if all(c.upper() in VALID_RESIDUES for _, c in bad):
        return problem, "lowercase residues are not accepted (they often mark masked regions); uppercase the sequence"
    if "*" in shown:
        return problem, "remove the stop codon '*'; only one-letter amino-acid codes are allowed"
    return problem, f"allowed are the 20 standard codes plus {''.join(RARE_AMINO_ACIDS)}"


def _shown(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _labels_problem(sequence: str, labels: str) -> tuple[str, str] | None:
    bad = sorted({c for c in labels if c not in VALID_LABELS})
    if bad:
        pos = next(i for i, c in enumerate(labels) if c not in VALID_LABELS)
        return (
            f"labels contain unknown letter(s) {''.join(bad)!r}, first at position {pos + 1}",
            f"labels must use only {LABELS}",
        )
    if len(labels) != len(sequence):
        return (
            f"label length {len(labels)} != sequence length {len(sequence)}",
            "every residue needs exactly one label; check for a truncated or wrapped line",
        )
    return None


#: The repairs lenient reading makes, by the name `ReadResult.fixed` counts them under.
FIXES = {"lowercase": "upper-cased (lowercase residues)", "stop": "terminal '*' dropped"}


def repair_sequence(sequence: str) -> tuple[str, tuple[str, ...]]:
    """(sequence, repairs) as prediction reads it: one terminal '*' dropped, lowercase letters upper-cased, so
    soft-masked regions and translated stop codons are predicted; anything else is left for validation."""
    repairs = []
    if sequence.endswith("*"):
        sequence, repairs = sequence[:-1], ["stop"]
    if sequence != sequence.upper():
        sequence, repairs = sequence.upper(), [*repairs, "lowercase"]
    return sequence, tuple(repairs)


class _Validator:
    """Shared checks for one file: sequence, labels, header type and duplicate ids."""

    def __init__(self, path: Path, skip_invalid: bool, lenient: bool = False):
        self.path = path
        self.skip_invalid = skip_invalid
        self.lenient = lenient
        self.result = ReadResult()
        self.seen: dict[str, str] = {}  # id -> where it was first read, for duplicate messages

    def fail(self, where: int | str, protein_id: str | None, problem: str, hint: str = "") -> None:
        error = RecordError(self.path, where, protein_id, problem, hint)
        if not self.skip_invalid:
            raise error
        self.result.skipped.append(error)

    def add(
        self,
        protein_id: str,
        sequence: str,
        labels: str | None,
        *,
        where: int | str,
        fold: str = "",
        header_type: str = "",
        sequence_where: int | str | None = None,
        labels_where: int | str | None = None,
    ) -> None:
        """Validate one record and keep it, or report it (labels=None means unlabelled)."""
        if not protein_id:
            return self.fail(where, None, "empty protein id", "give every record a unique id")
        repairs: tuple[str, ...] = ()
        if self.lenient:
            sequence, repairs = repair_sequence(sequence)
        problem = _sequence_problem(sequence)
        if problem:
            return self.fail(sequence_where or where, protein_id, *problem)
        kind = ""
        if labels is not None:
            problem = _labels_problem(sequence, labels)
            if problem:
                return self.fail(labels_where or where, protein_id, *problem)
            kind = label_type(labels)
            if kind == INVALID_TYPE:
                return self.fail(
                    labels_where or where,
                    protein_id,
                    f"labels {_shown(labels)!r} make no protein type: they reach O/P without a signal peptide (S), "
                    f"TM helix (M) or beta strand (B)",
                    "A GLOBULAR protein is all I; fix the labels or leave the record out",
                )
            if header_type and header_type != kind:
                known = "" if header_type in PROTEIN_TYPES else f" (not one of {', '.join(PROTEIN_TYPES)})"
                return self.fail(
                    where,
                    protein_id,
                    f"header type {header_type!r}{known} contradicts the labels, which make it {kind}",
                    "fix the header or the labels; the type is derived from the labels",
                )
        if protein_id in self.seen:
            return self.fail(
                where,
                protein_id,
                f"duplicate id, first seen at {self.seen[protein_id]}",
                "ids must be unique across the whole file; remove or rename one of them",
            )
        source = f"{self.path.name}:{where}"
        self.seen[protein_id] = source
        self.result.fixed.update(repairs)
        self.result.records.append(ProteinRecord(protein_id, sequence, labels or "", kind, fold, source))

    def drain(self) -> list[ProteinRecord | RecordError]:
        """The record or error added since the last drain (`_fasta_entries` drains after each one)."""
        found = [*self.result.records, *self.result.skipped]
        self.result.records, self.result.skipped = [], []
        return found


def _read_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    return path.read_text(encoding="utf-8")


def _numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with 1-based line numbers (blank lines between records are tolerated)."""
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line:
            yield number, line


def read_3line(path: str | Path, skip_invalid: bool = False, lenient: bool = False) -> ReadResult:
    """Read `>ID|TYPE[|FOLD]`, sequence and label lines. TYPE and FOLD are optional; TYPE must match labels."""
    path = Path(path)
    check = _Validator(path, skip_invalid, lenient)
    lines = list(_numbered_lines(_read_text(path)))
    i = 0
    while i < len(lines):
        number, header = lines[i]
        if not header.startswith(">"):
            # Resynchronise on the next header so one broken record costs only itself.
            j = next((k for k in range(i + 1, len(lines)) if lines[k][1].startswith(">")), len(lines))
            check.fail(number, None, f"expected a '>ID|TYPE' header, found {header[:30]!r}", "add the missing '>'")
            i = j
            continue
        fields = [f.strip() for f in header[1:].split("|")]
        protein_id = fields[0]
        body = lines[i + 1 : i + 3]
        truncated_at = next((k for k, (_, line) in enumerate(body) if line.startswith(">")), len(body))
        if truncated_at < 2:
            missing = "sequence and label lines" if truncated_at == 0 else "label line"
            ends = "the file ends" if truncated_at == len(body) else f"line {body[truncated_at][0]} is a header"
            check.fail(number, protein_id or None, f"truncated record: {missing} missing ({ends})",
                       "every record needs a header, a sequence line and a label line")
            i += 1 + truncated_at
            continue
        if len(fields) > 3:
            check.fail(number, protein_id or None, f"header has {len(fields)} '|' fields, expected at most 3",
                       "use '>ID|TYPE' or '>ID|TYPE|FOLD'")
            i += 3
            continue
        (seq_line, sequence), (label_line, labels) = body
        check.add(
            protein_id,
            sequence,
            labels,
            where=number,
            fold=fields[2] if len(fields) > 2 else "",
            header_type=fields[1] if len(fields) > 1 else "",
            sequence_where=seq_line,
            labels_where=label_line,
        )
        i += 3
    return check.result


def read_partitions_json(path: str | Path, skip_invalid: bool = False, lenient: bool = False) -> ReadResult:
    """Read `{"cv0": [{"id", "sequence", "labels"}, ...], ...}`; the key becomes each record's fold."""
    path = Path(path)
    check = _Validator(path, skip_invalid, lenient)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        # A file that is not JSON at all has no good records to keep, so this raises even with skip_invalid.
        raise RecordError(path, error.lineno, None, f"not valid JSON ({error.msg}, column {error.colno})",
                          "check the file is complete and was not truncated") from None
    if not isinstance(data, dict):
        raise RecordError(path, "$", None, f"top level is a {type(data).__name__}, expected an object of folds",
                          'expected {"cv0": [{"id": ..., "sequence": ..., "labels": ...}], ...}')
    for fold, entries in data.items():
        if not isinstance(entries, list):
            check.fail(f"$.{fold}", None, f"fold {fold!r} is a {type(entries).__name__}, expected a list of records",
                       "each fold must map to a list of {id, sequence, labels} objects")
            continue
        for index, entry in enumerate(entries):
            where = f"$.{fold}[{index}]"
            if not isinstance(entry, dict):
                check.fail(where, None, f"entry is a {type(entry).__name__}, expected an object",
                           "each entry must be {id, sequence, labels}")
                continue
            raw_id = entry.get("id")
            protein_id = raw_id if isinstance(raw_id, str) else None
            missing = [key for key in ("id", "sequence", "labels") if key not in entry]
            if missing:
                check.fail(where, protein_id, f"entry is missing key(s) {', '.join(missing)}",
                           "each entry must have id, sequence and labels")
                continue
            wrong = [f"{key} is {type(entry[key]).__name__}" for key in ("id", "sequence", "labels")
                     if not isinstance(entry[key], str)]
            if wrong:
                check.fail(where, protein_id, f"wrong type(s): {', '.join(wrong)}", "id, sequence and labels are strings")
                continue
            check.add(entry["id"].strip(), entry["sequence"].strip(), entry["labels"].strip(), where=where, fold=fold)
    return check.result


def _fasta_id(header: str) -> str:
    """First word of a FASTA header; UniProt `sp|P12345|NAME` gives the accession, `ID|TYPE` gives ID."""
    words = header.split()
    token = words[0] if words else ""
    parts = token.split("|")
    if len(parts) >= 3 and parts[0] in ("sp", "tr"):
        return parts[1]
    return parts[0]


def _fasta_entries(check: _Validator, lines: Iterable[tuple[int, str]]) -> Iterator[None]:
    """Validate FASTA records from numbered non-blank lines into `check`, one yield per record (or orphan-line
    error) added; sequences may wrap over several lines."""
    header_line, protein_id, chunks = 0, "", []
    for number, line in lines:
        if line.startswith(">"):
            if header_line > 0:
                check.add(protein_id, "".join(chunks), None, where=header_line)
                yield
            header_line, protein_id, chunks = number, _fasta_id(line[1:]), []
        elif not header_line:
            check.fail(number, None, f"sequence before the first '>' header: {line[:30]!r}", "add a '>ID' header")
            header_line = -1  # report once; the orphan lines are dropped with it
            yield
        elif header_line > 0:
            chunks.append(line.replace(" ", ""))
    if header_line > 0:
        check.add(protein_id, "".join(chunks), None, where=header_line)
        yield


def read_fasta(path: str | Path, skip_invalid: bool = False, lenient: bool = False) -> ReadResult:
    """Read unlabelled records (labels="" and type="") from FASTA; sequences may wrap over several lines."""
    path = Path(path)
    check = _Validator(path, skip_invalid, lenient)
    for _ in _fasta_entries(check, _numbered_lines(_read_text(path))):
        pass
    return check.result


class FastaStream:
    """The records of one FASTA file (local path or s3:// / gs:// URI, plain or .gz), read lazily: iterating
    yields each record, or the `RecordError` of a bad one, in file order (read as `lenient` says; duplicate ids
    are errors within the file). `fixed` counts the repairs made so far."""

    def __init__(self, path: str | Path, lenient: bool = True) -> None:
        self.path = str(path)
        self.check = _Validator(Path(self.path), skip_invalid=True, lenient=lenient)

    @property
    def fixed(self) -> Counter:
        return self.check.result.fixed

    def __iter__(self) -> Iterator[ProteinRecord | RecordError]:
        with open_text(self.path) as handle:
            for _ in _fasta_entries(self.check, _stripped(handle)):
                yield from self.check.drain()


def _stripped(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line:
            yield number, line


def open_text(path: str | Path) -> io.TextIOBase:
    """A text stream of a local file or object-store URI, gunzipped when its name ends in .gz."""
    fs, inner = storage.filesystem(str(path))
    compression = "gzip" if str(path).endswith(".gz") else None
    return io.TextIOWrapper(fs.open_input_stream(inner, compression=compression), encoding="utf-8")


_EXPECTED = {read_3line: "3-line records ('>ID|TYPE' header, sequence line, label line)",
             read_partitions_json: 'a JSON object of folds: {"cv0": [{"id": ..., "sequence": ..., "labels": ...}]}',
             read_fasta: "FASTA records ('>ID' header, sequence lines)"}
READERS = {".3line": read_3line, ".txt": read_3line, ".json": read_partitions_json,
           ".fasta": read_fasta, ".fa": read_fasta, ".faa": read_fasta}


class NoRecordsError(ValueError):
    """An input file without a single valid record: empty, only blank lines, or every record invalid."""


def read_records(path: str | Path, skip_invalid: bool = False, *, allow_empty: bool = True,
                 lenient: bool = False) -> ReadResult:
    """Read any supported file, choosing the format from the suffix (ignoring a trailing .gz).

    With `allow_empty=False` a file that yields no valid record raises `NoRecordsError` naming the file
    (prepare and predict: zero proteins is never what the user meant).
    """
    path = Path(path)
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    reader = READERS.get(suffix.lower())
    if reader is None:
        raise RecordError(path, 0, None, f"unknown file type {suffix!r}",
                          f"use one of {', '.join(READERS)} (optionally .gz)")
    result = reader(path, skip_invalid=skip_invalid, lenient=lenient)
    if not result.records and not allow_empty:
        if result.skipped:
            raise NoRecordsError(f"{path}: none of its {len(result.skipped)} record(s) is valid, so there is nothing "
                                 f"to use; the first problem: {result.skipped[0]}")
        raise NoRecordsError(f"{path}: no records (the file is empty or holds only blank lines); expected "
                             f"{_EXPECTED[reader]}")
    return result
