"""prepare: CLI end to end on real labels + the BamA structure, refusal/overwrite, invalid records, atomicity."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protopo_ray import prepare
from protopo_ray.data import build, shards
from protopo_ray.data.build import LocalBuilder, OutputExists, ensure_synthetic, prepare_records, prepare_synthetic
from protopo_ray.data.structures import THREE_TO_ONE
from protopo_ray.data.synthetic_sequences import GENERATOR_VERSION

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protopo_ray.prepare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def subset(tmp_path, partitions_json, bama_pdb) -> tuple[Path, Path]:
    """A 3-line file of 99 real records plus BamA (B7MBF8), and a structures dir holding only BamA."""
    data = json.loads(partitions_json.read_text())
    entries = [e for fold in data.values() for e in fold]
    bama = next(e for e in entries if e["id"] == "B7MBF8")
    chosen = [e for e in entries if e["id"] != "B7MBF8"][:99] + [bama]
    labels = tmp_path / "subset.3line"
    labels.write_text("".join(f">{e['id']}\n{e['sequence']}\n{e['labels']}\n" for e in chosen))
    structures = tmp_path / "structures"
    structures.mkdir()
    shutil.copy(bama_pdb, structures / bama_pdb.name)
    return labels, structures


def test_cli_end_to_end_on_real_labels(subset, tmp_path):
    labels, structures = subset
    out = tmp_path / "shards"
    done = run_cli("--labels", labels, "--structures", structures, "--out", out, "--workers", "2")
    assert done.returncode == 0, done.stderr
    manifest = shards.read_manifest(out)
    assert manifest["num_proteins"] == 100
    assert manifest["counts"]["graph_source"] == {"sequence": 99, "structure": 1}
    assert manifest["sources"] == {"subset.3line": shards.sha256_file(labels)}
    assert manifest["k"] == 16 and manifest["extra"]["graph_builder"] == build.GRAPH_BUILDER
    table = shards.read_table(out)
    assert table.num_rows == 100
    assert dict(zip(table["id"].to_pylist(), table["graph_source"].to_pylist()))["B7MBF8"] == "structure"
    assert "1 from structure, 99 sequence fallback" in done.stdout and "no structure file (99)" in done.stdout
    assert not list(tmp_path.glob("shards.tmp-*"))

    again = run_cli("--labels", labels, "--structures", structures, "--out", out)
    assert again.returncode == 2 and "already holds a complete shard set" in again.stderr
    assert "Traceback" not in again.stderr

    replaced = run_cli("--labels", labels, "--out", out, "--overwrite", "--k", "8")
    assert replaced.returncode == 0, replaced.stderr
    assert shards.read_manifest(out)["k"] == 8
    assert shards.read_manifest(out)["counts"]["graph_source"] == {"sequence": 100}


def test_invalid_record_is_reported_or_fails_with_location(subset, tmp_path):
    labels, _ = subset
    lines = labels.read_text().splitlines()
    lines[5] = lines[5][:-1] + "Z"  # record 2's labels (line 6 of the file): unknown label letter
    bad = tmp_path / "bad.3line"
    bad.write_text("\n".join(lines) + "\n")
    bad_id = lines[3][1:]

    failed = run_cli("--labels", bad, "--out", tmp_path / "a")
    assert failed.returncode == 2 and "bad.3line:6" in failed.stderr and bad_id in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "a").exists()

    skipped = run_cli("--labels", bad, "--out", tmp_path / "b", "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert "invalid records skipped (1)" in skipped.stdout and bad_id in skipped.stdout
    manifest = shards.read_manifest(tmp_path / "b")
    assert manifest["num_proteins"] == 99 and len(manifest["extra"]["skipped"]) == 1


SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"


def pdb_text(sequence: str = SEQUENCE) -> str:
    """N, CA, C of each residue on a straight line, 3.8 A apart: enough for a structure graph."""
    three = {one: three for three, one in THREE_TO_ONE.items() if three not in ("MSE",)}
    return "".join(f"ATOM  {3 * i + j + 1:>5}  {name:<3} {three[aa]} A{i + 1:>4}    {3.8 * i + j:8.3f}{0:8.3f}{0:8.3f}"
                   f"  1.00 90.00           {name[0]}\n"
                   for i, aa in enumerate(sequence) for j, name in enumerate(("N", "CA", "C"))) + "END\n"


def bad_structures(directory: Path) -> tuple[Path, dict[str, str]]:
    """A labels file of 8 proteins and `directory/structures`: two good files, five bad ones, one missing.
    Returns the labels and the bad file of each protein that must fall back -> what its reason says."""
    structures = directory / "structures"
    structures.mkdir()
    good = gzip.compress(pdb_text().encode())
    (structures / "GOOD1.pdb").write_text(pdb_text())
    (structures / "AF-GOOD2-F1-model_v4.pdb.gz").write_bytes(good)
    (structures / "AF-TRUNC-F1-model_v4.pdb.gz").write_bytes(good[: len(good) // 2])
    (structures / "CORRUPT.pdb.gz").write_bytes(good[:20] + b"\x00junk" * 40 + good[-8:])
    (structures / "EMPTY.pdb").write_bytes(b"")
    (structures / "FOLDER.pdb").mkdir()
    (structures / "GARBAGE.cif").write_text("not an mmCIF file\n")
    bad = {"TRUNC": "AF-TRUNC-F1-model_v4.pdb.gz: truncated", "CORRUPT": "CORRUPT.pdb.gz: corrupt compressed data",
           "EMPTY": "EMPTY.pdb: empty file", "FOLDER": "FOLDER.pdb: a directory", "GARBAGE": "GARBAGE.cif: cannot parse"}
    labels = directory / "eight.3line"
    labels.write_text("".join(f">{protein_id}\n{SEQUENCE}\n{'I' * len(SEQUENCE)}\n"
                              for protein_id in ["GOOD1", "GOOD2", *bad, "NOFILE"]))
    return labels, bad


def test_bad_structure_files_fall_back_and_are_named(tmp_path, capsys):
    labels, bad = bad_structures(tmp_path)
    assert prepare.main(["--labels", str(labels), "--structures", str(tmp_path / "structures"),
                         "--out", str(tmp_path / "out"), "--workers", "2"]) == 0  # the process pool
    printed = capsys.readouterr().out
    manifest = shards.read_manifest(tmp_path / "out")
    assert manifest["num_proteins"] == 8 and manifest["counts"]["graph_source"] == {"structure": 2, "sequence": 6}
    table = shards.read_table(tmp_path / "out")
    assert dict(zip(table["id"].to_pylist(), table["graph_source"].to_pylist())) == {
        "GOOD1": "structure", "GOOD2": "structure", **{protein_id: "sequence" for protein_id in [*bad, "NOFILE"]}}
    assert "8 of 8 records written" in printed and "unreadable structure files (5;" in printed
    for protein_id, says in bad.items():  # one line per bad file: protein, file, what is wrong, what to do
        line = next(line for line in printed.splitlines() if line.strip().startswith(f"{protein_id}: "))
        assert f"{tmp_path / 'structures'}/{says}" in line and "download it again or remove it" in line
    assert "NOFILE" not in printed.split("unreadable structure files")[1]  # a missing file is not a bad one


def test_missing_labels_file_is_bad_input(tmp_path):
    done = run_cli("--labels", tmp_path / "nope.3line", "--out", tmp_path / "out")
    assert done.returncode == 2 and "not found" in done.stderr and "Traceback" not in done.stderr


def test_synthetic_prepare_writes_a_readable_set(tmp_path):
    done = run_cli("--synthetic", "40", "--out", tmp_path / "syn", "--seed", "5")
    assert done.returncode == 0, done.stderr
    manifest = shards.read_manifest(tmp_path / "syn")
    assert manifest["num_proteins"] == 40 and manifest["counts"]["graph_source"] == {"structure": 40}
    assert manifest["extra"]["generator"] == {"module": "protopo_ray.data.synthetic", "version": GENERATOR_VERSION,
                                              "n": 40, "seed": 5}
    assert set(manifest["counts"]["fold"]) == {"train", "val", "test"}
    table = shards.read_table(tmp_path / "syn", folds=["train"])
    assert 0 < table.num_rows < 40 and table["id"][0].as_py().startswith("SYN")


def test_parallel_and_serial_synthetic_shards_match(tmp_path):
    serial = prepare_synthetic(12, tmp_path / "a", seed=1)
    parallel = prepare_synthetic(12, tmp_path / "b", seed=1, builder=LocalBuilder(2))
    assert serial.num_written == parallel.num_written == 12
    assert shards.read_table(tmp_path / "a").drop(["fold"]).equals(shards.read_table(tmp_path / "b").drop(["fold"]))


def test_crash_mid_run_leaves_previous_set_intact(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    prepare_synthetic(10, out, seed=0)
    before = shards.read_table(out)
    calls = {"n": 0}
    real = build.build_graph

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "build_graph", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_synthetic(20, out, seed=1, overwrite=True)
    assert shards.read_table(out).equals(before)  # the old complete set, untouched
    assert not list(tmp_path.glob("syn.tmp-*")) and not list(tmp_path.glob("syn.old-*"))

    fresh = tmp_path / "fresh"
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        prepare_synthetic(20, fresh, seed=1)
    assert not (fresh / shards.MANIFEST).exists()


def test_ensure_synthetic_prepares_once(tmp_path):
    out = tmp_path / "syn"
    assert ensure_synthetic(out, 10, seed=2) == out
    created = shards.read_manifest(out)["created_at"]
    mtime = (out / shards.MANIFEST).stat().st_mtime_ns
    ensure_synthetic(out, 10, seed=2)
    assert (out / shards.MANIFEST).stat().st_mtime_ns == mtime and shards.read_manifest(out)["created_at"] == created
    with pytest.raises(OutputExists, match="different shard set"):
        ensure_synthetic(out, 11, seed=2)


def test_records_api_refuses_non_shard_directory(tmp_path, subset):
    labels, _ = subset
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExists, match="not a complete shard set"):
        prepare_records(labels, out)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "text, skip, message",
    [("", False, "no records (the file is empty"),
     ("\n\n", True, "no records (the file is empty"),
     (">A|SP\nMK\nZZ\n>B\nMK\nIO\n", True, "none of its 2 record(s) is valid"),
     (">A|SP\nMK\nZZ\n", False, "bad.3line:3: record 'A'")],
)
def test_labels_without_a_valid_record_are_bad_input(tmp_path, capsys, text, skip, message):
    labels = tmp_path / "bad.3line"
    labels.write_text(text)
    args = ["--labels", str(labels), "--out", str(tmp_path / "out")] + (["--skip-invalid"] if skip else [])
    assert prepare.main(args) == 2
    error = capsys.readouterr().err
    assert message in error and str(labels) in error
    assert not (tmp_path / "out").exists()


def test_ensure_data_prepares_the_synthetic_set_only_when_absent(tmp_path, capsys):
    out = tmp_path / "syn"
    manifest = build.ensure_data(out, synthetic=8, seed=1)
    assert manifest["num_proteins"] == 8 and "preparing the embedded synthetic set (8 proteins, seed 1)" in (
        capsys.readouterr().out)
    assert build.ensure_data(out, synthetic=8, seed=1) == manifest and capsys.readouterr().out == ""


def test_an_embedded_set_made_with_other_numbers_is_made_again(tmp_path, capsys):
    """An experiment whose synthetic size, seed or mix changed trains on what its file says, not on the old set."""
    out = tmp_path / "syn"
    build.ensure_data(out, synthetic=8, seed=1)
    capsys.readouterr()
    manifest = build.ensure_data(out, synthetic=12, seed=1, mix={"TM": 1, "BETA": 1})
    assert manifest["num_proteins"] == 12 and set(manifest["counts"]["type"]) == {"TM", "BETA"}
    said = capsys.readouterr().out
    assert f"made with generator v{GENERATOR_VERSION} n=8 seed=1 mix=DeepTMHMM's proportions" in said
    assert "TM 0.5, BETA 0.5" in said
    assert build.ensure_data(out, synthetic=12, seed=1, mix={"TM": 1, "BETA": 1}) == manifest


def test_an_embedded_set_of_an_older_generator_is_made_again(tmp_path, capsys):
    """A set made before the generator's sequences changed (no version in its manifest) is not trained on as if new."""
    out = tmp_path / "syn"
    manifest = build.ensure_data(out, synthetic=8, seed=1)
    manifest["extra"]["generator"].pop("version")
    (out / shards.MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    again = build.ensure_data(out, synthetic=8, seed=1)
    assert "made with generator v1 n=8" in capsys.readouterr().out
    assert again["extra"]["generator"]["version"] == GENERATOR_VERSION


def test_a_set_of_real_records_is_used_as_it_is_whatever_synthetic_says(tmp_path, subset):
    labels, _ = subset
    out = tmp_path / "real"
    prepare_records(labels, out)
    manifest = shards.read_manifest(out)
    assert build.ensure_data(out, synthetic=50, seed=9) == manifest


def test_ensure_data_without_synthetic_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m protopo_ray.prepare"):
        build.ensure_data(tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_help_lists_the_data_keys_with_their_docs(capsys):
    with pytest.raises(SystemExit):
        prepare.main(["--help"])
    out = capsys.readouterr().out
    assert 'data.path = "data/synthetic"' in out and "Shard directory written by `protopo_ray.prepare`" in out
    assert 'data.val_folds = ["val"]' in out and "model.lstm_size" not in out


def test_object_store_output_without_ray(tmp_path):
    uri = f"file://{tmp_path}/bucket/syn"  # the object-store branch (manifest last, no rename) on local disk
    prepare_synthetic(6, uri, seed=0, builder=LocalBuilder(2))
    assert shards.read_manifest(uri)["num_proteins"] == 6 and shards.read_table(uri).num_rows == 6
    with pytest.raises(OutputExists, match="already holds a complete shard set"):
        prepare_synthetic(6, uri, seed=0)
    assert prepare_synthetic(2, uri, seed=0, overwrite=True).manifest["num_proteins"] == 2
    assert shards.read_table(uri).num_rows == 2


def test_ensure_data_makes_the_named_mix_and_refuses_a_set_of_another_mix(tmp_path):
    mix = {"TM": 1.0, "BETA": 1.0}
    manifest = build.ensure_data(tmp_path / "syn", synthetic=10, seed=2, mix=mix)
    assert manifest["counts"]["type"] == {"BETA": 5, "TM": 5}
    assert manifest["extra"]["generator"]["mix"] == {"TM": 0.5, "BETA": 0.5}
    assert build.ensure_synthetic(tmp_path / "syn", 10, 2, mix=mix) == tmp_path / "syn"
    with pytest.raises(OutputExists, match=f"not synthetic generator v{GENERATOR_VERSION} n=10 seed=2 mix="):
        build.ensure_synthetic(tmp_path / "syn", 10, 2, mix={"TM": 1.0})
    assert prepare.main(["--synthetic", "5", "--mix", "TM=two", "--out", str(tmp_path / "x")]) == 2
