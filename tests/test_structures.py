"""Structure readers and sequence alignment: small backbones written by hand, then the real BamA model."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from protopo_ray.data.records import ProteinRecord
from protopo_ray.data.structures import (
    READERS,
    StructureMismatch,
    UnreadableStructure,
    align_to_sequence,
    find_structure,
    load_aligned_ca,
    read_structure,
)

ONE_TO_THREE = {"A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS", "I": "ILE",
                "K": "LYS", "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN", "R": "ARG", "S": "SER",
                "T": "THR", "V": "VAL", "W": "TRP", "Y": "TYR"}
SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"


def backbone_xyz(length: int) -> np.ndarray:
    """Deterministic coordinates [L, 3, 3] with 3 decimals, as a PDB file stores them."""
    return np.round(np.random.default_rng(0).uniform(-99, 99, size=(length, 3, 3)), 3)


def atom_line(serial, name, resname, chain, number, xyz, record="ATOM", altloc=" ", element=None):
    element = element or name[0]
    return (f"{record:<6}{serial:>5} {name:<4}{altloc}{resname:>3} {chain}{number:>4}    "
            f"{xyz[0]:>8.3f}{xyz[1]:>8.3f}{xyz[2]:>8.3f}  1.00 50.00          {element:>2}")


def pdb_text(sequence=SEQUENCE, numbers=None, chain="A", skip=(), xyz=None) -> str:
    """Backbone-plus-CB PDB text; residues at indices in `skip` are left out."""
    xyz = backbone_xyz(len(sequence)) if xyz is None else xyz
    numbers = range(1, len(sequence) + 1) if numbers is None else numbers
    lines, serial = [], 1
    for i, (aa, number) in enumerate(zip(sequence, numbers)):
        if i in skip:
            continue
        for j, name in enumerate((" N", " CA", " C", " CB")):
            lines.append(atom_line(serial, name, ONE_TO_THREE[aa], chain, number, xyz[i, j % 3] + (j == 3)))
            serial += 1
    return "\n".join(lines + ["TER", "END"]) + "\n"


def write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def to_cif(pdb_path: Path, cif_path: Path) -> Path:
    import gemmi

    structure = gemmi.read_structure(str(pdb_path))
    structure.setup_entities()
    return write(cif_path, structure.make_mmcif_document().as_string())


@pytest.mark.parametrize("name", ["x.pdb", "x.pdb.gz", "x.cif", "x.cif.gz"])
@pytest.mark.parametrize("reader", READERS)
def test_readers_agree_on_written_files(tmp_path, name, reader):
    pdb = write(tmp_path / "src.pdb", pdb_text())
    path = to_cif(pdb, tmp_path / name) if ".cif" in name else write(tmp_path / name, pdb_text())
    backbone = read_structure(path, reader=reader)
    assert backbone.sequence == SEQUENCE
    assert backbone.coords.dtype == np.float32 and backbone.coords.shape == (len(SEQUENCE), 3, 3)
    np.testing.assert_array_equal(backbone.coords, backbone_xyz(len(SEQUENCE)).astype(np.float32))
    np.testing.assert_array_equal(backbone.residue_numbers, np.arange(1, len(SEQUENCE) + 1))


@pytest.mark.parametrize("reader", READERS)
def test_hetatm_altloc_models_and_chains(tmp_path, reader):
    xyz = backbone_xyz(4)
    lines = [
        atom_line(1, " N", "MET", "A", 1, xyz[0, 0]),
        atom_line(2, " CA", "MET", "A", 1, xyz[0, 1], altloc="A"),
        atom_line(3, " CA", "MET", "A", 1, xyz[0, 1] + 5, altloc="B"),  # second altloc: ignored
        atom_line(4, " C", "MET", "A", 1, xyz[0, 2]),
        *[atom_line(5 + j, n, "MSE", "A", 2, xyz[1, j], record="HETATM") for j, n in enumerate((" N", " CA", " C"))],
        atom_line(8, " N", "GLY", "A", 3, xyz[2, 0]),  # CA and C missing -> NaN
        atom_line(9, "CA", "CA", "A", 101, xyz[3, 0], record="HETATM", element="CA"),  # calcium ion: not a residue
        atom_line(10, " O", "HOH", "A", 102, xyz[3, 1], record="HETATM"),
        *[atom_line(11 + j, n, "TRP", "B", 7, xyz[3, j]) for j, n in enumerate((" N", " CA", " C"))],
        "ENDMDL", "MODEL        2",
        atom_line(14, " CA", "LYS", "A", 9, xyz[3, 1]),  # second model: ignored
        "ENDMDL",
    ]
    path = write(tmp_path / "het.pdb", "MODEL        1\n" + "\n".join(lines) + "\n")
    backbone = read_structure(path, reader=reader)
    assert backbone.sequence == "MMG"  # MSE is read as M
    np.testing.assert_array_equal(backbone.residue_numbers, [1, 2, 3])
    np.testing.assert_array_equal(backbone.coords[0], xyz[0].astype(np.float32))
    assert np.isnan(backbone.coords[2, 1:]).all() and not np.isnan(backbone.coords[2, 0]).any()
    other = read_structure(path, chain="B", reader=reader)
    assert other.sequence == "W" and other.residue_numbers.tolist() == [7]
    with pytest.raises(ValueError, match="chain 'Z' not found; protein chains are A, B"):
        read_structure(path, chain="Z", reader=reader)


def test_bad_reader_and_format(tmp_path):
    path = write(tmp_path / "x.pdb", pdb_text())
    with pytest.raises(ValueError, match="unknown reader 'fastest'"):
        read_structure(path, reader="fastest")
    with pytest.raises(ValueError, match="unknown structure format '.xyz'"):
        read_structure(tmp_path / "x.xyz")
    with pytest.raises(ValueError, match="no protein residues"):
        read_structure(write(tmp_path / "empty.pdb", "END\n"))


# ---- alignment -------------------------------------------------------------------------------------------------


def test_exact_match_is_identity(tmp_path):
    backbone = read_structure(write(tmp_path / "x.pdb", pdb_text()))
    np.testing.assert_array_equal(align_to_sequence(backbone, SEQUENCE), backbone.coords)


def test_missing_residues_become_nan_rows(tmp_path):
    skip = {0, 5, 6, 7, 20}
    backbone = read_structure(write(tmp_path / "gap.pdb", pdb_text(skip=skip)))
    assert len(backbone.sequence) == len(SEQUENCE) - len(skip)
    coords = align_to_sequence(backbone, SEQUENCE)
    expected = backbone_xyz(len(SEQUENCE)).astype(np.float32)
    expected[sorted(skip)] = np.nan
    np.testing.assert_array_equal(coords, expected)


def test_gap_inside_a_repeat_is_placed_by_numbering(tmp_path):
    # Deleting one of four alanines is ambiguous for an alignment; residue numbers say it was the third.
    sequence = "MKLVWAAAAGHRESTDYFPQ"
    backbone = read_structure(write(tmp_path / "rep.pdb", pdb_text(sequence, skip={7})))
    coords = align_to_sequence(backbone, sequence)
    assert np.isnan(coords[7]).all() and not np.isnan(np.delete(coords, 7, axis=0)).any()
    np.testing.assert_array_equal(coords[8], backbone_xyz(len(sequence))[8].astype(np.float32))


def test_structure_starting_later_with_own_numbering(tmp_path):
    # A fragment for residues 11.. numbered from 1, plus a missing residue inside it.
    xyz = backbone_xyz(len(SEQUENCE))
    fragment = SEQUENCE[10:]
    text = pdb_text(fragment, numbers=range(1, len(fragment) + 1), skip={4}, xyz=xyz[10:])
    coords = align_to_sequence(read_structure(write(tmp_path / "frag.pdb", text)), SEQUENCE)
    assert np.isnan(coords[:10]).all() and np.isnan(coords[14]).all()
    np.testing.assert_array_equal(coords[10:14], xyz[10:14].astype(np.float32))
    np.testing.assert_array_equal(coords[15:], xyz[15:].astype(np.float32))


def test_mismatching_sequence_raises(tmp_path):
    path = write(tmp_path / "other.pdb", pdb_text("MKLVWHHGGSSEERTDYFPQ"))
    with pytest.raises(StructureMismatch) as info:
        align_to_sequence(read_structure(path), SEQUENCE, path=path, protein_id="P99999")
    message = str(info.value)
    assert "other.pdb" in message and "P99999" in message and "identity" in message and "coverage" in message


def test_low_coverage_raises(tmp_path):
    backbone = read_structure(write(tmp_path / "short.pdb", pdb_text(SEQUENCE[:10])))
    with pytest.raises(StructureMismatch, match=r"coverage 30\.3% of 33"):
        align_to_sequence(backbone, SEQUENCE)
    assert align_to_sequence(backbone, SEQUENCE, min_coverage=0.3).shape == (33, 3, 3)


# ---- finding files ---------------------------------------------------------------------------------------------


def test_find_structure_naming_rules(tmp_path):
    for name in ["AF-P1-F1-model_v1.pdb", "AF-P1-F1-model_v4.cif.gz", "AF-P1-F1-model_v2.pdb", "P12.pdb",
                 "Q5.cif", "Q5.pdb.gz", "notes.txt", "AF-P3-F1-model_v3.pdb.gz", "AF-P3-F1-model_v3.cif"]:
        (tmp_path / name).write_text("")
    assert find_structure(tmp_path, "P1").name == "AF-P1-F1-model_v4.cif.gz"  # highest version wins
    assert find_structure(tmp_path, "P12").name == "P12.pdb"  # not confused with P1
    assert find_structure(tmp_path, "Q5").name == "Q5.pdb.gz"  # .pdb preferred over .cif
    assert find_structure(tmp_path, "P3").name == "AF-P3-F1-model_v3.pdb.gz"
    assert find_structure(tmp_path, "P2") is None
    assert find_structure(tmp_path / "absent", "P1") is None
    (tmp_path / "AF-P2-F1-model_v1.pdb").write_text("")  # a new file is seen despite the directory cache
    assert find_structure(tmp_path, "P2").name == "AF-P2-F1-model_v1.pdb"


def test_load_aligned_ca(tmp_path):
    write(tmp_path / "AF-P1-F1-model_v4.pdb", pdb_text(skip={3}))
    write(tmp_path / "P2.pdb", pdb_text("MKLVWHHGGSSEERTDYFPQ"))
    (tmp_path / "P3.pdb").write_text("garbage\n")
    ca, reason = load_aligned_ca(tmp_path, ProteinRecord("P1", SEQUENCE))
    assert reason == "structure" and ca.shape == (len(SEQUENCE), 3) and np.isnan(ca[3]).all()
    np.testing.assert_array_equal(ca[4], backbone_xyz(len(SEQUENCE))[4, 1].astype(np.float32))
    ca, reason = load_aligned_ca(tmp_path, ProteinRecord("P2", SEQUENCE))
    assert ca is None and reason.startswith("mismatch:") and "P2.pdb" in reason
    assert load_aligned_ca(tmp_path, ProteinRecord("P3", SEQUENCE))[1].startswith("unreadable:")
    assert load_aligned_ca(tmp_path, ProteinRecord("P4", SEQUENCE)) == (None, f"no structure file for P4 in {tmp_path}")


# ---- bad files: each costs its protein's structure graph, named with what is wrong --------------------------------

GOOD_GZ = gzip.compress(pdb_text().encode())
BAD_FILES = {  # file name -> (how to make it, what the reason says after the file name)
    "truncated.pdb.gz": (lambda path: path.write_bytes(GOOD_GZ[: len(GOOD_GZ) // 2]), "truncated: the compressed"),
    "corrupt.pdb.gz": (lambda path: path.write_bytes(GOOD_GZ[:20] + b"\x00junk" * 40 + GOOD_GZ[-8:]),
                       "corrupt compressed data"),
    "plain.pdb.gz": (lambda path: path.write_text(pdb_text()), "not gzip data although named .gz"),
    "empty.pdb": (lambda path: path.write_bytes(b""), "empty file (0 bytes)"),
    "empty.cif.gz": (lambda path: path.write_bytes(b""), "empty file (0 bytes)"),
    "folder.pdb": (lambda path: path.mkdir(), "a directory, not a structure file"),
    "cut.pdb": (lambda path: path.write_text(pdb_text()[:2000]), "line 26"),  # cut mid-line
    "latin1.pdb": (lambda path: path.write_bytes(pdb_text().encode().replace(b"ALA", b"\xc4LA")), "not a text file"),
    "binary.pdb": (lambda path: path.write_bytes(bytes(range(256)) * 20), ""),
    "noatoms.cif.gz": (lambda path: path.write_bytes(gzip.compress(b"data_x\nloop_\n_atom_site.id\n1\n")), ""),
    # (biopython's parser refuses the last two, gemmi's reads no atoms: the reasons differ by reader)
    "garbage.cif": (lambda path: path.write_text("this is not mmCIF\n"), "cannot parse"),
}


@pytest.mark.parametrize("name", BAD_FILES)
@pytest.mark.parametrize("reader", READERS)
def test_a_bad_file_is_unreadable_with_its_name_and_reason(tmp_path, reader, name):
    make, says = BAD_FILES[name]
    make(tmp_path / name)
    protein_id = name.split(".")[0]
    with pytest.raises(UnreadableStructure, match=f"^{re.escape(str(tmp_path / name))}: .*{re.escape(says)}"):
        read_structure(tmp_path / name, reader=reader)
    ca, reason = load_aligned_ca(tmp_path, ProteinRecord(protein_id, SEQUENCE), reader=reader)
    assert ca is None and reason.startswith(f"unreadable: {tmp_path / name}: ") and says in reason
    assert reason.endswith(f"download it again or remove it (until then {protein_id} gets the sequence graph)")
    assert "\n" not in reason  # one line in the prepare summary


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_a_file_without_read_permission_is_unreadable(tmp_path):
    path = write(tmp_path / "P1.pdb", pdb_text())
    path.chmod(0)
    for reader in READERS:
        ca, reason = load_aligned_ca(tmp_path, ProteinRecord("P1", SEQUENCE), reader=reader)
        assert ca is None and reason.startswith(f"unreadable: {path}: permission denied"), reader


def test_a_read_the_system_refuses_is_unreadable(tmp_path, monkeypatch):
    """What a user other than root meets on a chmod 000 file, simulated so the test also runs as root."""
    from protopo_ray.data import structures

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(structures, "_read_bytes", refuse)
    path = write(tmp_path / "P1.pdb", pdb_text())
    ca, reason = load_aligned_ca(tmp_path, ProteinRecord("P1", SEQUENCE))
    assert ca is None and reason.startswith(f"unreadable: {path}: permission denied (make it readable: chmod a+r)")


def test_a_file_cut_anywhere_never_raises(tmp_path):
    for cut in range(0, len(GOOD_GZ), 37):
        for name, payload in (("P1.pdb.gz", GOOD_GZ[:cut]), ("P2.pdb", pdb_text().encode()[: cut * 5])):
            (tmp_path / name).write_bytes(payload)
            reason = load_aligned_ca(tmp_path, ProteinRecord(name.split(".")[0], SEQUENCE))[1]
            assert reason.split(":")[0] in ("structure", "unreadable", "mismatch"), (name, cut)


# ---- the real AlphaFold model ----------------------------------------------------------------------------------


def test_bama_readers_identical_and_match_record(bama_pdb, partitions_json, tmp_path):
    entries = [e for fold in json.loads(partitions_json.read_text()).values() for e in fold]
    sequence = next(e["sequence"] for e in entries if e["id"] == "B7MBF8")
    cif = to_cif(bama_pdb, tmp_path / "AF-B7MBF8-F1-model_v2.cif.gz")
    reference = read_structure(bama_pdb, reader="biopython")
    assert len(reference.sequence) == 810 and reference.sequence == sequence
    assert not np.isnan(reference.coords).any()
    for path in (bama_pdb, cif):
        for reader in READERS:
            backbone = read_structure(path, reader=reader)
            assert backbone.sequence == reference.sequence, (path, reader)
            np.testing.assert_array_equal(backbone.coords, reference.coords, err_msg=f"{path} {reader}")
            np.testing.assert_array_equal(backbone.residue_numbers, reference.residue_numbers)
    ca, reason = load_aligned_ca(bama_pdb.parent, ProteinRecord("B7MBF8", sequence))
    assert reason == "structure" and ca.shape == (810, 3)
