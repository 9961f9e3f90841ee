"""predict: a tiny untrained checkpoint written here, run through the CLI and the functions behind it (inference)."""

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
from protopo_ray.data.graphs import build_graph  # noqa: E402
from protopo_ray.data.records import ProteinRecord  # noqa: E402
from protopo_ray.inference.predictions import build_graphs, predict_records  # noqa: E402
from protopo_ray.training import loop  # noqa: E402
from protopo_ray.training.predictor import load_predictor, write_ensemble  # noqa: E402

TINY = {"gc_size": 8, "gc_layers": 1, "lstm_size": 8, "lstm_layers": 1, "aa_embed_dim": 4}
#: Labelled inputs of four lengths (batched by length, so the output order must be restored).
INPUT_3LINE = (">long|TM\nMKLVAGILLAVLLAGCSSQE\nIIIIMMMMMMMMMMOOOOOO\n"
               ">short|GLOBULAR\nMKV\nIII\n"
               ">mid|SP\nMKKLLAVSSAQE\nSSSSSSOOOOOO\n"
               ">tiny|GLOBULAR\nMK\nII\n")


@pytest.fixture
def checkpoint(tmp_path_factory, write_checkpoint):
    """A checkpoint of a model trained on k=4 graphs of sequence windows (so predict must build k=4 graphs too),
    whose training data is nowhere: it describes itself."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("model")
    config = Config.from_dict({"data": {"path": str(root / "gone")}, "model": TINY})
    return write_checkpoint(root / "checkpoint", config, graph_k=4, graph_sources={"sequence": 100})


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
    predictor = load_predictor(checkpoint)
    model, k = predictor.module, predictor.inputs.graph_k
    assert k == 4  # the checkpoint's own record of its training graphs
    records = [ProteinRecord(id="p", sequence="MKLVAGILLA"), ProteinRecord(id="q", sequence="ACDEF")]
    graphs = build_graphs(records, None, k)
    assert graphs[0].num_edges == build_graph("MKLVAGILLA", k=4).num_edges < build_graph("MKLVAGILLA").num_edges
    predictions = predict_records(model, records, graphs, torch.device("cpu"), batch_size=1)
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


def test_structures_for_a_sequence_trained_model_get_a_warning(checkpoint, tmp_path, capsys):
    fasta = write(tmp_path, "in.fasta", ">P1\nMKTLLILAVVAAALAVPSFA\n")
    (tmp_path / "structures").mkdir()
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(fasta), "--out", str(tmp_path / "o.3line"),
                         "--structures", str(tmp_path / "structures")]) == 0
    assert "trained on sequence-window graphs only" in capsys.readouterr().err


def test_a_checkpoint_of_the_old_format_is_refused_with_what_to_do(checkpoint, tmp_path, capsys):
    (checkpoint / "meta.json").write_text(json.dumps({"epoch": 1, "metrics": {}}))
    fasta = write(tmp_path, "in.fasta", ">P1\nMKTL\n")
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(fasta), "--out", str(tmp_path / "o")]) == 2
    assert "written by an older protopo_ray" in capsys.readouterr().err


def test_an_ensemble_directory_predicts_like_its_members(checkpoint, tmp_path):
    fasta = write(tmp_path, "in.fasta", ">P1\nMKTLLILAVVAAALAVPSFA\n>P2\nMSDNQKSLLEKAKELLG\n")
    write_ensemble(tmp_path / "ensemble", [checkpoint, checkpoint])
    assert predict.main(["--checkpoint", str(tmp_path / "ensemble"), "--input", str(fasta), "--out-dir",
                         str(tmp_path / "out")]) == 0
    lines = (tmp_path / "out" / "predicted.3line").read_text().splitlines()
    assert [line.split("|")[0] for line in lines[::3]] == [">P1", ">P2"]
    assert all(set(labels) <= set("IOPSMB") for labels in lines[2::3])


def test_a_viterbi_checkpoint_writes_only_topologies_its_grammar_accepts(tmp_path_factory, write_checkpoint, tmp_path):
    """The embedded default's winner decodes with the grammar: whatever its (here untrained, so arbitrary)
    posteriors say, every written topology is one a protein can have. An argmax checkpoint gives no such promise
    (the untrained one writes some the grammar refuses)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    sequences = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=n)) for n in (30, 75, 140, 260, 9)]
    source = write(tmp_path, "in.fasta", "".join(f">p{i}\n{s}\n" for i, s in enumerate(sequences)))
    written = {}
    for decoder in ("argmax", "viterbi"):
        root = tmp_path_factory.mktemp(decoder)
        config = Config.from_dict({"data": {"path": str(root / "gone")}, "model": {**TINY, "decoder": decoder}})
        path = write_checkpoint(root / "checkpoint", config, graph_k=4, graph_sources={"sequence": 100})
        out = tmp_path / f"{decoder}.3line"
        assert predict.main(["--checkpoint", str(path), "--input", str(source), "--out", str(out)]) == 0
        written[decoder] = out.read_text().splitlines()[2::3]
    grammar = load_predictor(path).module.grammar
    assert len(written["viterbi"]) == len(sequences)
    assert all(grammar.accepts(labels) for labels in written["viterbi"])
    assert not all(grammar.accepts(labels) for labels in written["argmax"])
