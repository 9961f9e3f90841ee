"""Record readers: hand-written good and malformed files, then the real DeepTMHMM data when present."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from protopo_ray.data.records import (
    ProteinRecord,
    RecordError,
    label_type,
    read_3line,
    read_fasta,
    read_partitions_json,
    read_records,
)
from protopo_ray.model.metrics import protein_type

GOOD = ">P1|TM\nMKLVA\nIMMMO\n>P2|GLOBULAR\nACDE\nIIII\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def raises(path, reader=read_3line) -> RecordError:
    with pytest.raises(RecordError) as info:
        reader(path)
    return info.value


@pytest.mark.parametrize(
    "labels, expected",
    [("OOBBII", "BETA"), ("SSOMMI", "SP+TM"), ("IIMMOO", "TM"), ("SSOOO", "SP"), ("IIII", "GLOBULAR"), ("SB", "BETA"),
     ("IIOOPP", "INVALID"), ("OOO", "INVALID")],
)
def test_label_type_is_the_metrics_rule(labels, expected):
    assert label_type(labels) == protein_type(labels) == expected


@pytest.mark.parametrize("labels", ["OOOO", "IIOO", "PPPP"])
def test_truth_labels_without_a_type_are_rejected(tmp_path, labels):
    error = raises(write(tmp_path, "x.3line", f">Q1\nACDE\n{labels}\n"))
    assert error.protein_id == "Q1" and error.where == 3 and "make no protein type" in str(error)
    assert "A GLOBULAR protein is all I" in str(error)


def test_read_3line_good(tmp_path):
    result = read_3line(write(tmp_path, "good.3line", GOOD))
    assert result.skipped == []
    assert result.records == [
        ProteinRecord("P1", "MKLVA", "IMMMO", "TM", "", "good.3line:1"),
        ProteinRecord("P2", "ACDE", "IIII", "GLOBULAR", "", "good.3line:4"),
    ]


def test_read_3line_optional_fold_and_type_and_blank_lines(tmp_path):
    result = read_3line(write(tmp_path, "f.3line", ">A|SP|cv3\nMKU\nSSO\n\n>B\nMK\nII\n"))
    assert [(r.id, r.type, r.fold) for r in result.records] == [("A", "SP", "cv3"), ("B", "GLOBULAR", "")]
    assert result.records[0].sequence == "MKU"  # rare codes are kept as written


def test_gz_and_dispatch(tmp_path):
    path = tmp_path / "good.3line.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(GOOD)
    assert [r.id for r in read_records(path).records] == ["P1", "P2"]
    fasta = write(tmp_path, "x.fasta", ">sp|Q9XYZ1|NAME_HUMAN some protein\nMKL\nVA\n>P2|TM\nAC\n")
    result = read_records(fasta)
    assert [(r.id, r.sequence, r.labels, r.type) for r in result.records] == [("Q9XYZ1", "MKLVA", "", ""), ("P2", "AC", "", "")]
    assert raises(write(tmp_path, "x.csv", ""), read_records).problem.startswith("unknown file type")


# ---- malformed inputs: each message names the file, the line or JSON path, the id and a fix -----------------


def test_length_mismatch(tmp_path):
    error = raises(write(tmp_path, "len.3line", ">P1|TM\nMKLVA\nIMMO\n"))
    assert "len.3line:3" in str(error) and "'P1'" in str(error) and "label length 4 != sequence length 5" in str(error)
    assert error.where == 3 and error.protein_id == "P1"


def test_unknown_label_letter(tmp_path):
    error = raises(write(tmp_path, "lab.3line", ">P1|TM\nMKLVA\nIMXMO\n"))
    assert "lab.3line:3" in str(error) and "'P1'" in str(error) and "'X'" in str(error) and "position 3" in str(error)


def test_invalid_residue(tmp_path):
    error = raises(write(tmp_path, "seq.3line", ">P1|TM\nMK1VA\nIMMMO\n"))
    assert "seq.3line:2" in str(error) and "'P1'" in str(error) and "'1' at position 3" in str(error)


def test_stop_codon_rejected_with_hint(tmp_path):
    error = raises(write(tmp_path, "stop.fasta", ">P9\nMKLVA*\n"), read_fasta)
    assert "stop.fasta:1" in str(error) and "'P9'" in str(error) and "stop codon" in str(error)


def test_lowercase_rejected_with_hint(tmp_path):
    error = raises(write(tmp_path, "low.3line", ">P1|TM\nMKlva\nIMMMO\n"))
    assert "low.3line:2" in str(error) and "'P1'" in str(error) and "uppercase" in str(error)


def test_duplicate_id_names_first_location(tmp_path):
    error = raises(write(tmp_path, "dup.3line", GOOD + ">P1|TM\nMKLVA\nIMMMO\n"))
    assert "dup.3line:7" in str(error) and "'P1'" in str(error) and "first seen at dup.3line:1" in str(error)


def test_header_type_contradicts_labels(tmp_path):
    error = raises(write(tmp_path, "type.3line", ">P1|SP\nMKLVA\nIMMMO\n"))
    assert "type.3line:1" in str(error) and "'P1'" in str(error) and "'SP'" in str(error) and "TM" in str(error)


def test_empty_sequence(tmp_path):
    error = raises(write(tmp_path, "empty.json", json.dumps({"cv0": [{"id": "E1", "sequence": "", "labels": ""}]})),
                   read_partitions_json)
    assert "empty.json:$.cv0[0]" in str(error) and "'E1'" in str(error) and "empty sequence" in str(error)


def test_truncated_after_header(tmp_path):
    error = raises(write(tmp_path, "t1.3line", GOOD + ">P3|TM\n"))
    assert "t1.3line:7" in str(error) and "'P3'" in str(error) and "sequence and label lines missing" in str(error)


def test_truncated_after_sequence(tmp_path):
    error = raises(write(tmp_path, "t2.3line", ">P3|TM\nMKL\n" + GOOD))
    assert "t2.3line:1" in str(error) and "'P3'" in str(error) and "label line missing (line 3 is a header)" in str(error)


def test_header_without_marker(tmp_path):
    error = raises(write(tmp_path, "nohead.3line", "P1|TM\nMKLVA\nIMMMO\n"))
    assert "nohead.3line:1" in str(error) and "without id" in str(error) and "'>'" in str(error)


def test_empty_id(tmp_path):
    error = raises(write(tmp_path, "noid.3line", ">|TM\nMKLVA\nIMMMO\n"))
    assert "noid.3line:1" in str(error) and "empty protein id" in str(error)


def test_json_not_a_dict(tmp_path):
    error = raises(write(tmp_path, "list.json", "[1, 2]"), read_partitions_json)
    assert "list.json:$" in str(error) and "top level is a list" in str(error)


def test_json_missing_key_and_wrong_type(tmp_path):
    path = write(tmp_path, "keys.json", json.dumps({"cv1": [{"id": "K1", "sequence": "MK"}]}))
    error = raises(path, read_partitions_json)
    assert "keys.json:$.cv1[0]" in str(error) and "'K1'" in str(error) and "missing key(s) labels" in str(error)
    path = write(tmp_path, "types.json", json.dumps({"cv1": [{"id": "K2", "sequence": 5, "labels": "II"}]}))
    error = raises(path, read_partitions_json)
    assert "types.json:$.cv1[0]" in str(error) and "'K2'" in str(error) and "sequence is int" in str(error)


def test_json_fold_not_a_list_and_invalid_json(tmp_path):
    error = raises(write(tmp_path, "fold.json", '{"cv0": {"id": "x"}}'), read_partitions_json)
    assert "fold.json:$.cv0" in str(error) and "expected a list" in str(error)
    error = raises(write(tmp_path, "broken.json", '{"cv0": [\n{"id": '), read_partitions_json)
    assert "broken.json:2" in str(error) and "not valid JSON" in str(error)


def test_skip_invalid_keeps_good_records(tmp_path):
    text = (
        ">A|TM\nMKLVA\nIMMMO\n"  # good
        ">B|TM\nMKLVA\nIMMO\n"  # length mismatch
        "C|TM\nMK\nII\n"  # no '>' (resynchronises on the next header)
        ">D\nMKL\n"  # truncated by the next header
        ">A|GLOBULAR\nMK\nII\n"  # duplicate
        ">E|SP\nMKL\nSSO\n"  # good
        ">F|TM\n"  # truncated at end of file
    )
    result = read_3line(write(tmp_path, "mixed.3line", text), skip_invalid=True)
    assert [r.id for r in result.records] == ["A", "E"]
    assert [(e.protein_id, e.where) for e in result.skipped] == [("B", 6), (None, 7), ("D", 10), ("A", 12), ("F", 18)]


def test_skip_invalid_json(tmp_path):
    data = {
        "cv0": [{"id": "A", "sequence": "MK", "labels": "II"}, {"id": "B", "sequence": "MK", "labels": "I"}, 7],
        "cv1": "oops",
        "cv2": [{"id": "A", "sequence": "MK", "labels": "II"}, {"id": "C", "sequence": "MKL", "labels": "SSO"}],
    }
    result = read_partitions_json(write(tmp_path, "mixed.json", json.dumps(data)), skip_invalid=True)
    assert [(r.id, r.fold, r.source) for r in result.records] == [("A", "cv0", "mixed.json:$.cv0[0]"),
                                                                  ("C", "cv2", "mixed.json:$.cv2[1]")]
    assert [e.where for e in result.skipped] == ["$.cv0[1]", "$.cv0[2]", "$.cv1", "$.cv2[0]"]


# ---- the real data set ----------------------------------------------------------------------------------------


def test_real_partitions_json(partitions_json):
    result = read_partitions_json(partitions_json)
    assert result.skipped == [] and len(result.records) == 3576
    assert Counter(r.fold for r in result.records) == {"cv0": 717, "cv1": 716, "cv2": 715, "cv3": 714, "cv4": 714}
    assert Counter(r.type for r in result.records) == {"GLOBULAR": 2000, "SP": 1000, "TM": 387, "SP+TM": 106,
                                                       "BETA": 83}


def test_real_3line_agrees_with_json(partitions_json, three_line):
    from_json = read_partitions_json(partitions_json).records
    from_3line = read_3line(three_line)
    assert from_3line.skipped == [] and len(from_3line.records) == 3576
    for a, b in zip(from_json, from_3line.records, strict=True):
        assert (a.id, a.sequence, a.labels, a.type) == (b.id, b.sequence, b.labels, b.type)
