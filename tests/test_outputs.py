"""Predictor outputs: hand-built predictions -> 3-line, GFF3 (checked against the GFF3 specification and read
back into the labels), TSV summary and PNG plots."""

from __future__ import annotations

import csv
import re
from urllib.parse import unquote

import numpy as np
import pytest

from protopo_ray.data.alphabet import LABELS
from protopo_ray.data.records import read_3line
from protopo_ray.inference.outputs import (
    LABEL_OF_REGION,
    SUMMARY_COLUMNS,
    Prediction,
    gff3_seqid,
    plot_file_name,
    regions,
    write_3line,
    write_gff3,
    write_outputs,
    write_summary,
)


def prediction(protein_id: str, labels: str, confidence: float | list[float] = 0.9) -> Prediction:
    """Probabilities that put `confidence` on the decoded label and spread the rest evenly over the others."""
    conf = np.broadcast_to(np.asarray(confidence, dtype=np.float64), (len(labels),))
    probabilities = np.repeat(((1 - conf) / (len(LABELS) - 1))[:, None], len(LABELS), axis=1)
    probabilities[np.arange(len(labels)), [LABELS.index(c) for c in labels]] = conf
    return Prediction(protein_id, "A" * len(labels), labels, probabilities)


#: One protein of every type, P and B (outer-membrane barrel) included.
PREDICTIONS = [
    prediction("TM1", "IIIMMMMMOOOMMMMMII"),
    prediction("SPTM1", "SSSOOMMMMII", 0.6),
    prediction("SP1", "SSSSOOOO"),
    prediction("GLOB1", "IIIIII", 0.99),
    prediction("BETA1", "SSPPBBBBOOBBBBPP"),
]


# ---- a strict GFF3 reader (GFF3 specification 1.26), independent of the writer -------------------------------

_SEQID = re.compile(r"^(?:[a-zA-Z0-9.:^*$@!+_?\-|]|%[0-9A-F]{2})+$")
_ESCAPED = re.compile(r"^(?:[^\t\n\r%;=&,\x00-\x1f\x7f]|%[0-9A-F]{2})*$")


def read_gff3_strict(text: str) -> tuple[dict[str, int], list[dict]]:
    """(sequence-region lengths, features) of a GFF3 file; any departure from the specification fails the test."""
    lines = text.split("\n")
    assert lines[-1] == "", "the file ends with a newline"
    lines = lines[:-1]
    assert re.fullmatch(r"##gff-version 3(\.\d+){0,2}", lines[0]), f"first line must be ##gff-version 3: {lines[0]!r}"
    sizes: dict[str, int] = {}
    features, ids = [], set()
    for number, line in enumerate(lines[1:], start=2):
        assert line, f"line {number}: blank line"
        if line.startswith("##"):
            words = line[2:].split()
            if words[0] == "sequence-region":
                seqid, start, end = words[1], int(words[2]), int(words[3])
                assert _SEQID.match(seqid) and seqid not in sizes and 1 <= start <= end, f"line {number}: {line!r}"
                sizes[seqid] = end
            continue
        if line.startswith("#"):
            continue
        columns = line.split("\t")
        assert len(columns) == 9, f"line {number}: {len(columns)} columns, GFF3 has 9: {line!r}"
        seqid, source, kind, start, end, score, strand, phase, attributes = columns
        assert all(columns), f"line {number}: an empty column (undefined fields are '.')"
        assert _SEQID.match(seqid) and not seqid.startswith(">"), f"line {number}: seqid {seqid!r} not escaped"
        assert _ESCAPED.match(source) and _ESCAPED.match(kind), f"line {number}: source/type not escaped"
        assert start.isdigit() and end.isdigit() and 1 <= int(start) <= int(end), f"line {number}: positions"
        if seqid in sizes:
            assert int(end) <= sizes[seqid], f"line {number}: past the sequence-region end"
        if score != ".":
            float(score)
        assert strand in "+-.?" and len(strand) == 1, f"line {number}: strand {strand!r}"
        assert phase in (".", "0", "1", "2") and (kind != "CDS" or phase != "."), f"line {number}: phase"
        tags: dict[str, str] = {}
        if attributes != ".":
            for pair in attributes.split(";"):
                tag, sep, value = pair.partition("=")
                assert sep and tag and _ESCAPED.match(tag) and tag not in tags, f"line {number}: attribute {pair!r}"
                assert all(_ESCAPED.match(v) for v in value.split(",")), f"line {number}: value {value!r}"
                tags[tag] = value
        if "ID" in tags:
            assert tags["ID"] not in ids, f"line {number}: ID {tags['ID']!r} is not unique in the file"
            ids.add(tags["ID"])
        features.append({"seqid": unquote(seqid), "source": source, "type": kind, "start": int(start),
                         "end": int(end), "score": score, "attributes": tags})
    return sizes, features


def labels_from_gff3(features: list[dict]) -> dict[str, str]:
    """Per-protein label strings rebuilt from the regions (which must tile each protein without gaps)."""
    labels: dict[str, str] = {}
    for feature in features:
        so_far = labels.get(feature["seqid"], "")
        assert feature["start"] == len(so_far) + 1, f"gap or overlap before {feature}"
        labels[feature["seqid"]] = so_far + LABEL_OF_REGION[feature["type"]] * (feature["end"] - feature["start"] + 1)
    return labels


# ---- tests ----------------------------------------------------------------------------------------------------


def test_regions_are_one_based_and_inclusive():
    assert regions("SSOOMMMII") == [("S", 1, 2), ("O", 3, 4), ("M", 5, 7), ("I", 8, 9)]
    assert regions("I") == [("I", 1, 1)]


def test_prediction_properties():
    p = PREDICTIONS[0]
    assert (p.type, p.num_membrane_segments) == ("TM", 2)
    assert PREDICTIONS[4].type == "BETA" and PREDICTIONS[4].num_membrane_segments == 2
    assert prediction("X", "OOOO").type == "INVALID"  # predictions may have no valid type
    np.testing.assert_allclose(prediction("Y", "IIM", [0.5, 0.7, 0.9]).confidence, [0.5, 0.7, 0.9])


def test_prediction_rejects_probabilities_of_another_shape():
    with pytest.raises(ValueError, match="'Z'.*shape \\(2, 6\\) for 3 residues"):
        Prediction("Z", "ACD", "III", np.zeros((2, 6)))


def test_gff3_hand_computed(tmp_path):
    path = write_gff3(tmp_path / "one.gff3", [prediction("Q1", "SSOOMMMII", [0.5, 0.7] + [0.9] * 7)])
    assert path.read_text() == (
        "##gff-version 3\n"
        "##sequence-region Q1 1 9\n"
        "# Q1 Length: 9\n"
        "# Q1 Number of predicted TMRs: 1\n"
        "Q1\tprotopo_ray\tsignal\t1\t2\t0.600\t.\t.\tID=Q1_1\n"
        "Q1\tprotopo_ray\toutside\t3\t4\t0.900\t.\t.\tID=Q1_2\n"
        "Q1\tprotopo_ray\tTMhelix\t5\t7\t0.900\t.\t.\tID=Q1_3\n"
        "Q1\tprotopo_ray\tinside\t8\t9\t0.900\t.\t.\tID=Q1_4\n"
    )


def test_gff3_follows_the_spec_and_its_regions_reproduce_the_3line(tmp_path):
    odd = prediction("sp P1/x=y;z", "IIMMMOO")  # an id (from a JSON file) that needs escaping in every column
    predictions = [*PREDICTIONS, odd]
    gff3, three_line = write_gff3(tmp_path / "p.gff3", predictions), write_3line(tmp_path / "p.3line", predictions)
    sizes, features = read_gff3_strict(gff3.read_text())
    assert sizes == {gff3_seqid(p.id): len(p.sequence) for p in predictions}
    assert gff3_seqid(odd.id) == "sp%20P1%2Fx%3Dy%3Bz"
    assert {f["type"] for f in features} == {"signal", "inside", "outside", "periplasm", "TMhelix", "TMbeta"}
    # The round trip: regions -> labels equal the 3-line file's labels, read with the project's own reader.
    records = read_3line(three_line).records
    assert labels_from_gff3(features) == {r.id: r.labels for r in records} == {p.id: p.labels for p in predictions}
    assert [r.type for r in records] == ["TM", "SP+TM", "SP", "GLOBULAR", "BETA", "TM"]
    # DeepTMHMM's per-protein comment lines.
    assert "# TM1 Length: 18\n# TM1 Number of predicted TMRs: 2\n" in gff3.read_text()
    assert "# BETA1 Number of predicted TMRs: 2\n" in gff3.read_text()


def test_gff3_parses_with_bcbio_gff(tmp_path):
    """A third-party GFF3 reader, where installed (`pip install bcbio-gff`)."""
    gff = pytest.importorskip("BCBio.GFF")
    path = write_gff3(tmp_path / "p.gff3", PREDICTIONS)
    with path.open() as handle:
        parsed = {record.id: record for record in gff.parse(handle)}
    assert sorted(parsed) == sorted(p.id for p in PREDICTIONS)
    tm = parsed["TM1"].features
    assert [(f.type, int(f.location.start) + 1, int(f.location.end)) for f in tm] == [
        ("inside", 1, 3), ("TMhelix", 4, 8), ("outside", 9, 11), ("TMhelix", 12, 16), ("inside", 17, 18)]


def test_summary_tsv(tmp_path):
    path = write_summary(tmp_path / "s.tsv", PREDICTIONS[:2])
    with path.open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert path.read_text().split("\n")[0] == "\t".join(SUMMARY_COLUMNS)
    assert rows == [
        {"id": "TM1", "length": "18", "predicted_type": "TM", "num_membrane_segments": "2", "mean_confidence": "0.9"},
        {"id": "SPTM1", "length": "11", "predicted_type": "SP+TM", "num_membrane_segments": "1",
         "mean_confidence": "0.6"},
    ]


def test_write_outputs_with_plots_gives_valid_pngs(tmp_path):
    chosen = [PREDICTIONS[1], PREDICTIONS[4]]  # signal, helix, barrel strands, periplasm: every drawing path
    written = write_outputs(tmp_path / "out", chosen, plots=True)
    assert {name: path.name for name, path in written.items()} == {
        "3line": "predicted.3line", "gff3": "predicted.gff3", "summary": "summary.tsv", "plots": "plots"}
    pngs = sorted(p.name for p in (tmp_path / "out" / "plots").iterdir())
    assert pngs == ["BETA1.png", "SPTM1.png"]
    from PIL import Image

    for name in pngs:
        data = (tmp_path / "out" / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(tmp_path / "out" / "plots" / name) as image:
            image.verify()
            assert image.size[0] > 600 and image.size[1] > 300


def test_plot_file_names_are_safe():
    assert plot_file_name("sp|P12345|NAME_HUMAN") == "sp_P12345_NAME_HUMAN.png"
    assert plot_file_name("../x") == ".._x.png"
