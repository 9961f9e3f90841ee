"""predict: a tiny untrained checkpoint written here, run through the CLI and the functions behind it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from protopo_ray import predict  # noqa: E402
from protopo_ray.config import Config  # noqa: E402
from protopo_ray.data.collate import records_to_batch  # noqa: E402
from protopo_ray.data.graphs import DEFAULT_K, build_graph  # noqa: E402
from protopo_ray.data.records import ProteinRecord  # noqa: E402
from protopo_ray.data.shards import read_manifest, record_to_row, write_shards  # noqa: E402
from protopo_ray.model.network import TopologyModel  # noqa: E402
from protopo_ray.training import loop  # noqa: E402
from protopo_ray.training.checkpoint import TrainState, save_checkpoint  # noqa: E402

TINY = {"gc_size": 8, "gc_layers": 1, "lstm_size": 8, "lstm_layers": 1, "aa_embed_dim": 4}
#: Labelled inputs of four lengths (batched by length, so the output order must be restored).
INPUT_3LINE = (">long|TM\nMKLVAGILLAVLLAGCSSQE\nIIIIMMMMMMMMMMOOOOOO\n"
               ">short|GLOBULAR\nMKV\nIII\n"
               ">mid|SP\nMKKLLAVSSAQE\nSSSSSSOOOOOO\n"
               ">tiny|GLOBULAR\nMK\nII\n")


def make_checkpoint(directory, data_path) -> None:
    torch.manual_seed(0)
    config = Config.from_dict({"data": {"path": str(data_path)}, "model": TINY})
    model = TopologyModel(config.model)
    save_checkpoint(directory, TrainState(model=model.state_dict(), optimizer=None, epoch=1, config=config.to_dict()))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint whose data.path holds shards built with k=4 (so predict must build k=4 graphs too)."""
    root = tmp_path_factory.mktemp("predict")
    record = ProteinRecord(id="d1", sequence="MKV", labels="III", type="GLOBULAR", fold="train")
    write_shards([record_to_row(record, build_graph(record.sequence, k=4))], root / "shards", k=4)
    make_checkpoint(root / "checkpoint", root / "shards")
    return root / "checkpoint"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_out_dir_writes_3line_gff3_summary_and_plots(checkpoint, tmp_path, capsys):
    source = write(tmp_path, "in.3line", INPUT_3LINE)
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(source), "--out-dir", str(out), "--plots",
                         "--batch-size", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 predictions" in printed and "residue_acc" in printed  # labelled input: metrics too
    lines = (out / "predicted.3line").read_text().splitlines()
    ids, sequences, labels = [h[1:].split("|")[0] for h in lines[0::3]], lines[1::3], lines[2::3]
    assert ids == ["long", "short", "mid", "tiny"] and sequences == INPUT_3LINE.splitlines()[1::3]
    assert all(len(lab) == len(seq) and set(lab) <= set("IOPSMB") for lab, seq in zip(labels, sequences))
    with (out / "summary.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["id"], r["length"]) for r in rows] == [("long", "20"), ("short", "3"), ("mid", "12"), ("tiny", "2")]
    assert all(1 / 6 <= float(r["mean_confidence"]) <= 1 for r in rows)
    # Every GFF3 region line reproduces the 3-line labels (the full GFF3 checks are in test_outputs.py).
    names = {"signal": "S", "inside": "I", "outside": "O", "periplasm": "P", "TMhelix": "M", "TMbeta": "B"}
    rebuilt: dict[str, str] = {}
    for line in (out / "predicted.gff3").read_text().splitlines():
        if not line.startswith("#"):
            seqid, _, kind, start, end = line.split("\t")[:5]
            rebuilt[seqid] = rebuilt.get(seqid, "") + names[kind] * (int(end) - int(start) + 1)
    assert rebuilt == dict(zip(ids, labels))
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["long.png", "mid.png", "short.png", "tiny.png"]


def test_out_alone_still_writes_the_3line(checkpoint, tmp_path):
    fasta = write(tmp_path, "in.fasta", ">b\nMKVLA\n>a\nMK\n")
    out = tmp_path / "pred.3line"
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(fasta), "--out", str(out)]) == 0
    assert [line.split("|")[0] for line in out.read_text().splitlines()[0::3]] == [">b", ">a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fasta", "pred.3line"]


def test_labels_come_from_predict_labels_and_probabilities_are_the_softmax(checkpoint):
    model, _, k = predict.load_model(checkpoint, torch.device("cpu"))
    assert k == 4  # read from the training shards' manifest
    records = [ProteinRecord(id="p", sequence="MKLVAGILLA"), ProteinRecord(id="q", sequence="ACDEF")]
    graphs = predict.build_graphs(records, None, k)
    predictions = predict.predict_records(model, records, graphs, torch.device("cpu"), batch_size=1)
    batch = records_to_batch(records, graphs)
    ((proteins, _, _),) = loop.predict_labels(model, [batch], torch.device("cpu"))
    assert [(p.id, p.labels) for p in predictions] == [(pid, pred) for pid, _, _, pred in proteins]
    with torch.no_grad():
        expected = torch.softmax(model(batch), dim=-1).numpy()
    np.testing.assert_allclose(np.concatenate([p.probabilities for p in predictions]), expected, atol=1e-5)
    np.testing.assert_allclose(predictions[0].probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_an_empty_input_is_an_error_naming_the_file(checkpoint, tmp_path, capsys):
    empty = write(tmp_path, "empty.fasta", "\n\n")
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(empty), "--out-dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert f"{empty}: no records" in error and "FASTA" in error and not (tmp_path / "o").exists()


def test_an_invalid_record_is_an_error_with_its_line(checkpoint, tmp_path, capsys):
    bad = write(tmp_path, "bad.fasta", ">ok\nMKV\n>x1\nMK*L\n")
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:3: record 'x1'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [([], "--out-dir DIR"), (["--out", "x.3line", "--plots"], "give --out-dir")])
def test_output_flags_are_checked(checkpoint, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(checkpoint), "--input", "in.fasta", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_falls_back_to_the_default_k(tmp_path, capsys):
    make_checkpoint(tmp_path / "checkpoint", tmp_path / "nowhere")
    assert predict.load_model(tmp_path / "checkpoint", torch.device("cpu"))[2] == DEFAULT_K
    assert f"no manifest at {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_a_searchs_synthetic_data_is_made_when_absent(tmp_path, capsys):
    """EXP/experiment.json names the experiment file; its [experiment] synthetic set is prepared at data.path."""
    experiment = write(tmp_path, "exp.toml", "[experiment]\nsynthetic = 12\nseed = 3\n")
    (tmp_path / "EXP").mkdir()
    (tmp_path / "EXP" / "experiment.json").write_text(json.dumps({"name": "x", "source": str(experiment)}))
    make_checkpoint(tmp_path / "EXP" / "winner" / "checkpoint", tmp_path / "data")
    assert predict.search_experiment_file(tmp_path / "EXP" / "winner" / "checkpoint") == experiment
    assert predict.load_model(tmp_path / "EXP" / "winner" / "checkpoint", torch.device("cpu"))[2] == DEFAULT_K
    manifest = read_manifest(tmp_path / "data")
    assert manifest["num_proteins"] == 12 and manifest["extra"]["generator"]["seed"] == 3
    assert "preparing the embedded synthetic set (12 proteins, seed 3)" in capsys.readouterr().out


def test_an_ensemble_directory_predicts_like_its_members(checkpoint, tmp_path):
    from protopo_ray.model.ensemble import write_ensemble

    fasta = write(tmp_path, "in.fasta", ">P1\nMKTLLILAVVAAALAVPSFA\n>P2\nMSDNQKSLLEKAKELLG\n")
    write_ensemble(tmp_path / "ensemble", [checkpoint, checkpoint])
    assert predict.main(["--checkpoint", str(tmp_path / "ensemble"), "--input", str(fasta), "--out-dir",
                         str(tmp_path / "out")]) == 0
    lines = (tmp_path / "out" / "predicted.3line").read_text().splitlines()
    assert [line.split("|")[0] for line in lines[::3]] == [">P1", ">P2"]
    assert all(set(labels) <= set("IOPSMB") for labels in lines[2::3])
