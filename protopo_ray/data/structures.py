"""Protein structures: read backbone atoms (N, CA, C) from PDB/mmCIF and align them to a record's sequence.

Three readers extract the same backbone atoms and share one assembly step, so they agree by construction:
- "fast" (default): for PDB, numpy over the raw bytes: pick the N/CA/C lines by their fixed columns and parse
  the coordinate columns vectorised (bit-identical to float()); for mmCIF, gemmi (measured faster there).
- "gemmi": gemmi.read_structure, the full model.
- "biopython": Bio.PDB's parsers; by far the slowest, kept as the reference.
Measured on the 810-residue AlphaFold BamA model: see tools/bench_structures.py.

Rules all readers follow: first model only; the first chain holding a protein residue (or `chain=`); a residue
from an ATOM record counts if it has any backbone atom, one from a HETATM record (a modified amino acid such as
MSE) only if it has all of N, CA and C, which excludes waters, ions (calcium is also named "CA") and ligands;
the first alternate location of an atom wins. gemmi and biopython are imported lazily so this module imports
without them.

A file that cannot be read (missing, a directory, empty, truncated or corrupt compression, not text, not parseable)
raises UnreadableStructure naming the file and what is wrong; `.gz` files are decompressed here for every reader, so
all three report a broken archive the same way. load_aligned_ca turns it into a fallback reason: one bad file costs
its protein's structure graph, never the prepare run.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import stat
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

BACKBONE_ATOMS = ("N", "CA", "C")
THREE_TO_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E", "GLY": "G", "HIS": "H",
    "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P", "SER": "S", "THR": "T", "TRP": "W",
    "TYR": "Y", "VAL": "V",
    # Selenocysteine and pyrrolysine have their own letters in the sequence alphabet; selenomethionine is the
    # crystallographer's stand-in for M, and sequences (UniProt) spell it M. Everything else becomes X.
    "SEC": "U", "PYL": "O", "MSE": "M",
}  # fmt: skip
READERS = ("fast", "gemmi", "biopython")


@dataclass(slots=True)
class Backbone:
    """Backbone of one chain, residues in file order."""

    sequence: str
    """One-letter codes from residue names (non-standard -> X)."""
    coords: np.ndarray
    """float32 [L, 3, 3]: N, CA, C coordinates; NaN where an atom is missing."""
    residue_numbers: np.ndarray
    """int32 [L]: author residue numbers (insertion codes dropped)."""


class StructureMismatch(ValueError):
    """The structure does not belong to the sequence closely enough to transfer coordinates."""


class UnreadableStructure(ValueError):
    """The file holds no readable structure: missing, not a file, empty, corrupt, truncated or not parseable."""


# ---- extraction: every reader returns the backbone atoms of the first model as parallel arrays ---------------
# (het: bool, chain, residue number, insertion code, residue name, atom index into BACKBONE_ATOMS, xyz float64).

_PDB_RECORDS = (b"ATOM  ", b"HETATM")
_PDB_NAMES = (b" N  ", b" CA ", b" C  ")  # " CA " is a carbon alpha; calcium is written "CA  "
_PDB_WIDTH = 54  # columns up to the end of z


def _read_bytes(path: Path) -> bytes:
    # In one call rather than streamed through gzip.open: faster, and the same errors for a damaged archive.
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


#: What reading one file may raise: I/O and permissions (OSError, incl. gzip.BadGzipFile), a compressed stream cut
#: short (EOFError) or damaged (zlib.error), bytes that are not text (UnicodeDecodeError).
_READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError)


def _describe(error: BaseException) -> str:
    """What went wrong reading a file, in words (the exception's own text kept)."""
    if isinstance(error, gzip.BadGzipFile) and str(error).startswith("Not a gzipped file"):
        return f"not gzip data although named .gz ({error})"
    if isinstance(error, EOFError):
        return f"truncated: the compressed data ends early ({error})"
    if isinstance(error, (zlib.error, gzip.BadGzipFile)):  # bad deflate data, CRC or length
        return f"corrupt compressed data ({error})"
    if isinstance(error, UnicodeDecodeError):
        return f"not a text file (byte {error.object[error.start]:#04x} is not {error.encoding})"
    if isinstance(error, PermissionError):
        return "permission denied (make it readable: chmod a+r)"
    return (error.strerror or str(error)) if isinstance(error, OSError) else str(error)


def _check_file(path: Path) -> None:
    """UnreadableStructure unless `path` is a regular, non-empty file (checked before any parser sees it: gemmi
    reads a directory as an empty structure)."""
    try:
        info = path.stat()
    except OSError as error:
        raise UnreadableStructure(f"{path}: {_describe(error)}") from error
    if stat.S_ISDIR(info.st_mode):
        raise UnreadableStructure(f"{path}: a directory, not a structure file")
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableStructure(f"{path}: not a regular file")
    if info.st_size == 0:
        raise UnreadableStructure(f"{path}: empty file (0 bytes)")


def _parse_fixed_decimal(field: np.ndarray) -> np.ndarray:
    """Parse right-justified numbers like b' -84.224' held as a uint8 matrix [n, width], without Python loops.

    The digits become one exact integer that is then divided by an exact power of ten; IEEE division rounds
    correctly, so the result is bit-identical to float(text) (the readers are compared for exact equality)."""
    digit = (field >= 48) & (field <= 57)
    dot = field == 46
    if not np.all(digit | dot | (field == 32) | (field == 45)):
        raise ValueError("unexpected character in a numeric PDB column")
    values = np.where(digit, field - 48, 0).astype(np.int64)
    # Place value of each digit counted from the right, skipping the dot.
    place = np.cumsum(digit[:, ::-1], axis=1)[:, ::-1] - 1
    mantissa = (values * np.where(digit, 10 ** np.maximum(place, 0), 0)).sum(axis=1)
    columns = np.arange(field.shape[1])
    dot_col = np.where(dot.any(axis=1), np.argmax(dot, axis=1), field.shape[1])
    decimals = (digit & (columns > dot_col[:, None])).sum(axis=1)
    return np.where((field == 45).any(axis=1), -1.0, 1.0) * (mantissa / 10.0**decimals)


def _pdb_lines(path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes as uint8, line starts, line ends) of PDB text; UnreadableStructure if a coordinate record is shorter
    than the z column: a file cut off mid-line (gemmi refuses it too)."""
    buf = np.frombuffer(data + b"\n", dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], newlines[:-1] + 1))
    short = np.flatnonzero((newlines - starts >= 4) & (newlines - starts < _PDB_WIDTH))
    head = buf[starts[short, None] + np.arange(4)].view("S4").ravel()
    if (cut := short[np.isin(head, (b"ATOM", b"HETA"))]).size:
        raise UnreadableStructure(f"{path}: truncated: line {cut[0] + 1} is a coordinate record of "
                                  f"{newlines[cut[0]] - starts[cut[0]]} columns, fewer than {_PDB_WIDTH}")
    return buf, starts, newlines


def _extract_pdb_fast(path: Path):
    data = _read_bytes(path)
    end = data.find(b"\nENDMDL")  # first model only
    buf, starts, newlines = _pdb_lines(path, data[: end if end >= 0 else len(data)])
    starts = starts[newlines - starts >= _PDB_WIDTH]
    # Look at the record and atom-name columns of every line first, then gather only backbone lines into a
    # fixed-width matrix [n, 54] and cut fields out of it by column.
    record = buf[starts[:, None] + np.arange(6)].view("S6").ravel()
    name = buf[starts[:, None] + np.arange(12, 16)].view("S4").ravel()
    starts = starts[np.isin(record, _PDB_RECORDS) & np.isin(name, _PDB_NAMES)]
    lines = buf[starts[:, None] + np.arange(_PDB_WIDTH)]
    atom = np.searchsorted(np.array(_PDB_NAMES[::-1]), lines[:, 12:16].copy().view("S4").ravel())
    try:
        coords = _parse_fixed_decimal(lines[:, 30:54].reshape(-1, 8)).reshape(-1, 3)
        numbers = _parse_fixed_decimal(lines[:, 22:26]).astype(np.int64)
    except ValueError:  # hybrid-36 residue numbers (> 9999) or odd columns: let gemmi's full parser decide
        return _extract_gemmi(path)
    return (
        lines[:, 0] == ord("H"),
        lines[:, 21].copy().view("S1").astype(str),
        numbers,
        lines[:, 26].copy().view("S1").astype(str),
        np.char.strip(lines[:, 17:20].copy().view("S3").ravel().astype(str)),
        2 - atom,  # _PDB_NAMES reversed is sorted (" N  " > " CA " > " C  "), so this maps back to N0 CA1 C2
        coords,
    )


def _from_lists(atoms: list[tuple]):
    """Parallel arrays from (het, chain, number, icode, resname, atom index, x, y, z) tuples."""
    if not atoms:
        return (np.zeros(0, bool), np.zeros(0, str), np.zeros(0, np.int64), np.zeros(0, str), np.zeros(0, str),
                np.zeros(0, np.int64), np.zeros((0, 3)))
    het, chain, number, icode, resname, atom, x, y, z = zip(*atoms)
    return (np.array(het), np.array(chain), np.array(number, np.int64), np.array(icode), np.array(resname),
            np.array(atom, np.int64), np.array([x, y, z], np.float64).T)


def _extract_gemmi(path: Path):
    import gemmi

    try:
        if path.suffix == ".gz":  # decompressed here: gemmi reads a damaged archive as an empty or short file
            fmt = gemmi.CoorFormat.Pdb if _format(path) == "pdb" else gemmi.CoorFormat.Mmcif
            structure = gemmi.read_structure_string(_read_bytes(path), format=fmt)
        else:
            structure = gemmi.read_structure(str(path))
    except UnicodeDecodeError:
        raise  # read_structure says "not a text file"
    except (RuntimeError, ValueError) as error:  # gemmi's parse errors: "<path or 'string'>:<line>...: what"
        message = re.sub(rf"^({re.escape(str(path))}|string):", "line ", str(error))
        raise UnreadableStructure(f"{path}: cannot parse: {' '.join(message.split())}") from error
    atoms = []
    for chain in structure[0] if len(structure) else ():
        for residue in chain:
            key = (residue.het_flag == "H", chain.name, residue.seqid.num, residue.seqid.icode.strip(), residue.name)
            for index, name in enumerate(BACKBONE_ATOMS):
                atom = residue.find_atom(name, "*")  # "*": any altloc, the first in file order
                if atom is not None:
                    atoms.append((*key, index, atom.pos.x, atom.pos.y, atom.pos.z))
    return _from_lists(atoms)


def _extract_biopython(path: Path):
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.PDBExceptions import PDBConstructionException

    parser = MMCIFParser(QUIET=True) if _format(path) == "cif" else PDBParser(QUIET=True)
    data = _read_bytes(path)
    if _format(path) == "pdb":  # the other readers' rule for a file cut off mid-line
        _pdb_lines(path, data)
    text = data.decode()
    try:
        structure = parser.get_structure(path.name, io.StringIO(text))
    except (ValueError, KeyError, IndexError, PDBConstructionException) as error:  # Bio.PDB's parse errors
        raise UnreadableStructure(f"{path}: cannot parse: {type(error).__name__}: {error}") from error
    atoms = []
    for chain in next(iter(structure), ()):
        for residue in chain:
            hetfield, number, icode = residue.id
            key = (hetfield.startswith("H_"), chain.id, number, icode.strip(), residue.get_resname())
            for index, name in enumerate(BACKBONE_ATOMS):
                atom = residue.child_dict.get(name)
                if atom is None:
                    continue
                if atom.is_disordered():  # Bio.PDB selects the highest occupancy; the rule here is file order
                    atom = atom.disordered_get_list()[0]
                atoms.append((*key, index, *(float(v) for v in atom.coord)))
    return _from_lists(atoms)


def _format(path: Path) -> str:
    suffix = (Path(path.stem).suffix if path.suffix == ".gz" else path.suffix).lower()
    if suffix in (".pdb", ".ent"):
        return "pdb"
    if suffix in (".cif", ".mmcif"):
        return "cif"
    raise ValueError(f"{path}: unknown structure format {suffix!r}; expected .pdb/.ent or .cif/.mmcif (optionally .gz)")


# ---- assembly: one set of rules for all readers, vectorised ----------------------------------------------------


def _assemble(path: Path, het, chain, number, icode, resname, atom, coords, chain_id: str | None) -> Backbone:
    if len(atom) == 0:
        raise UnreadableStructure(f"{path}: no protein residues (no N/CA/C atoms) in the first model")
    keys = np.empty(len(atom), dtype=[("chain", chain.dtype), ("number", np.int64), ("icode", icode.dtype)])
    keys["chain"], keys["number"], keys["icode"] = chain, number, icode
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)  # residues in order of first appearance in the file
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    residue = rank[inverse.ravel()]
    first = first[order]
    # First alternate location wins: keep the first row of every (residue, atom) pair.
    _, rows = np.unique(residue * len(BACKBONE_ATOMS) + atom, return_index=True)
    present = np.zeros((len(first), len(BACKBONE_ATOMS)), dtype=bool)
    present[residue[rows], atom[rows]] = True
    keep = ~het[first] | present.all(axis=1)
    chains = list(dict.fromkeys(chain[first][keep].tolist()))
    if not chains:
        raise UnreadableStructure(f"{path}: no protein residues (no N/CA/C atoms) in the first model")
    if chain_id is None:
        chain_id = chains[0]
    elif chain_id not in chains:
        raise ValueError(f"{path}: chain {chain_id!r} not found; protein chains are {', '.join(chains)}")
    keep &= chain[first] == chain_id
    out = np.full((len(first), len(BACKBONE_ATOMS), 3), np.nan, dtype=np.float32)
    out[residue[rows], atom[rows]] = coords[rows]
    sequence = "".join(THREE_TO_ONE.get(name, "X") for name in resname[first][keep].tolist())
    return Backbone(sequence, out[keep], number[first][keep].astype(np.int32))


def read_structure(path: str | Path, chain: str | None = None, reader: str = "fast") -> Backbone:
    """Backbone of the first protein chain (or `chain`) in the first model of a PDB or mmCIF file (.gz too)."""
    path = Path(path)
    fmt = _format(path)
    if reader == "fast":
        # For mmCIF, gemmi's full reader beat a column-wise read of _atom_site through gemmi.cif (the Python
        # side of pulling columns cost more than building the model in C++), so "fast" means gemmi there.
        extract = _extract_pdb_fast if fmt == "pdb" else _extract_gemmi
    elif reader == "gemmi":
        extract = _extract_gemmi
    elif reader == "biopython":
        extract = _extract_biopython
    else:
        raise ValueError(f"unknown reader {reader!r}; choose one of {', '.join(READERS)}")
    _check_file(path)
    try:
        atoms = extract(path)
    except _READ_ERRORS as error:
        raise UnreadableStructure(f"{path}: {_describe(error)}") from error
    return _assemble(path, *atoms, chain_id=chain)


# ---- locating files ------------------------------------------------------------------------------------------------

_AF_NAME = re.compile(r"^AF-(.+)-F1-model_v(\d+)\.(pdb|cif)(\.gz)?$")
_PLAIN_NAME = re.compile(r"^(.+)\.(pdb|cif)(\.gz)?$")


@lru_cache(maxsize=8)
def _directory_index(directory: str, mtime_ns: int) -> dict[str, str]:
    """protein id -> best file name. Listing once per directory keeps `prepare` linear in the number of proteins;
    the directory's mtime is part of the cache key, so adding or removing files invalidates it."""
    best: dict[str, tuple] = {}
    for name in os.listdir(directory):
        # Rank: AlphaFold names before plain ones, then highest version, then .pdb before .cif, plain before .gz.
        if match := _AF_NAME.match(name):
            protein_id, rank = match[1], (1, int(match[2]), match[3] == "pdb", not match[4])
        elif match := _PLAIN_NAME.match(name):
            protein_id, rank = match[1], (0, 0, match[2] == "pdb", not match[3])
        else:
            continue
        if protein_id not in best or rank > best[protein_id][0]:
            best[protein_id] = (rank, name)
    return {protein_id: name for protein_id, (_, name) in best.items()}


def find_structure(directory: str | Path, protein_id: str) -> Path | None:
    """`AF-<ID>-F1-model_v<N>.pdb|cif[.gz]` (highest N wins) or `<ID>.pdb|cif[.gz]` in `directory`, else None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    name = _directory_index(str(directory.resolve()), directory.stat().st_mtime_ns).get(protein_id)
    return directory / name if name else None


# ---- alignment to the record's sequence ------------------------------------------------------------------------------


def _aligned_pairs(sequence: str, structure_sequence: str) -> tuple[np.ndarray, np.ndarray]:
    """Global alignment with free end gaps; returns matched (sequence index, structure index) pairs."""
    from Bio.Align import PairwiseAligner

    aligner = PairwiseAligner(mode="global", match_score=1.0, mismatch_score=-1.0)
    # Missing loops are common and long, so opening a gap costs more than extending it; overhangs are free.
    aligner.open_gap_score, aligner.extend_gap_score = -3.0, -0.1
    aligner.end_gap_score = 0.0
    seq_blocks, struct_blocks = aligner.align(sequence, structure_sequence)[0].aligned
    seq_idx = [np.arange(a, b) for a, b in seq_blocks]
    struct_idx = [np.arange(a, b) for a, b in struct_blocks]
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(seq_idx) if seq_idx else empty), (np.concatenate(struct_idx) if struct_idx else empty)


def _numbering_pairs(backbone: Backbone, length: int, seq_idx: np.ndarray, struct_idx: np.ndarray):
    """Pairs implied by residue numbering plus the offset most aligned pairs agree on, or None.

    A pairwise alignment cannot tell where a gap goes inside a run of equal letters (deleting one A of 'AAA');
    residue numbers can, so when they are consistent they place the gaps exactly."""
    if len(seq_idx) == 0:
        return None
    offsets, counts = np.unique(seq_idx - backbone.residue_numbers[struct_idx], return_counts=True)
    positions = backbone.residue_numbers.astype(np.int64) + offsets[np.argmax(counts)]
    inside = (positions >= 0) & (positions < length)
    if len(np.unique(positions[inside])) != inside.sum():  # duplicate numbers (insertion codes): not usable
        return None
    return positions[inside], np.flatnonzero(inside)


def align_to_sequence(
    backbone: Backbone,
    sequence: str,
    path: str | Path | None = None,
    protein_id: str | None = None,
    min_identity: float = 0.9,
    min_coverage: float = 0.5,
) -> np.ndarray:
    """Backbone coordinates [len(sequence), 3, 3] in sequence order; NaN rows for residues the structure lacks.

    Raises StructureMismatch when identity over aligned residues < min_identity or the fraction of the sequence
    covered < min_coverage, rather than ever transferring coordinates onto the wrong residues."""
    if backbone.sequence == sequence:  # AlphaFold models of the same UniProt entry: the common case
        return backbone.coords.copy()
    seq_idx, struct_idx = _aligned_pairs(sequence, backbone.sequence)
    seq_arr, struct_arr = np.frombuffer(sequence.encode(), np.uint8), np.frombuffer(backbone.sequence.encode(), np.uint8)

    def identical(s, t):
        return int((seq_arr[s] == struct_arr[t]).sum())

    numbered = _numbering_pairs(backbone, len(sequence), seq_idx, struct_idx)
    if numbered is not None and identical(*numbered) >= identical(seq_idx, struct_idx):
        seq_idx, struct_idx = numbered
    aligned = len(seq_idx)
    identity = identical(seq_idx, struct_idx) / aligned if aligned else 0.0
    coverage = aligned / len(sequence) if sequence else 0.0
    if identity < min_identity or coverage < min_coverage:
        where = str(path) if path is not None else "structure"
        who = f" for {protein_id}" if protein_id else ""
        raise StructureMismatch(
            f"{where}{who}: structure does not match the sequence: identity {identity:.1%} over {aligned} aligned "
            f"residues, coverage {coverage:.1%} of {len(sequence)} (need >= {min_identity:.0%} identity and >= "
            f"{min_coverage:.0%} coverage); check the file is this protein and isoform"
        )
    out = np.full((len(sequence), len(BACKBONE_ATOMS), 3), np.nan, dtype=np.float32)
    out[seq_idx] = backbone.coords[struct_idx]
    return out


def load_aligned_ca(directory: str | Path, record, reader: str = "fast") -> tuple[np.ndarray | None, str]:
    """(CA coordinates [L, 3] aligned to record.sequence, "structure"), or (None, why not) for the prepare summary:
    "no structure file ...", "mismatch: <file>: ..." or "unreadable: <file>: <what is wrong>; <what to do>".

    `record` is a records.ProteinRecord (anything with `.id` and `.sequence`). This is the one place a protein's
    file is read, so a bad file costs that protein its structure graph, never the run."""
    path = find_structure(directory, record.id)
    if path is None:
        return None, f"no structure file for {record.id} in {directory}"
    try:
        backbone = read_structure(path, reader=reader)
        coords = align_to_sequence(backbone, record.sequence, path=path, protein_id=record.id)
    except StructureMismatch as error:
        return None, f"mismatch: {error}"
    except UnreadableStructure as error:
        return None, f"unreadable: {error}; download it again or remove it (until then {record.id} gets the " \
                     f"sequence graph)"
    return coords[:, 1], "structure"
