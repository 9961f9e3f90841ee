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


def test_bad_records_are_rejected_with_their_reason_and_the_rest_predicted(checkpoint, tmp_path, capsys):
    """One bad record never costs the others: illegal letters, an empty sequence and a duplicate id are named in
    rejects.tsv; lowercase and a terminal '*' are what the field's tools accept, repaired and counted."""
    bad = write(tmp_path, "bad.fasta", ">ok\nMKV\n>x1\nMK#L\n>empty\n>ok\nMKVL\n>soft\nmkvLLA\n>stop\nMKVA*\n")
    out = tmp_path / "o"
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(bad), "--out-dir", str(out)]) == 0
    captured = capsys.readouterr()
    lines = (out / "predicted.3line").read_text().splitlines()
    assert [h[1:].split("|")[0] for h in lines[0::3]] == ["ok", "soft", "stop"]
    assert lines[1::3] == ["MKV", "MKVLLA", "MKVA"]
    with (out / "rejects.tsv").open() as handle:
        rejects = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["id"], r["source"]) for r in rejects] == [("x1", "bad.fasta:3"), ("empty", "bad.fasta:5"),
                                                         ("ok", "bad.fasta:6")]
    assert "invalid residue" in rejects[0]["reason"] and "empty sequence" in rejects[1]["reason"]
    assert "duplicate id, first seen at bad.fasta:1" in rejects[2]["reason"]
    assert "rejected 3 record(s)" in captured.err
    assert "repaired: 1 upper-cased (lowercase residues), 1 terminal '*' dropped" in captured.out


def test_a_file_without_a_valid_record_is_an_error(checkpoint, tmp_path, capsys):
    bad = write(tmp_path, "bad.fasta", ">x1\nMK#L\n")
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert "none of its record(s) is valid" in error and "bad.fasta:1: record 'x1'" in error


@pytest.mark.parametrize("flags, message", [([], "--out-dir DIR"), (["--out", "x.3line", "--plots"], "give --out-dir")])
def test_output_flags_are_checked(checkpoint, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(checkpoint), "--input", "in.fasta", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def pdb_text(sequence: str) -> str:
    """N, CA, C of each residue on a gentle helix: enough for a structure graph."""
    from protopo_ray.data.structures import THREE_TO_ONE

    three = {one: three for three, one in THREE_TO_ONE.items() if three not in ("MSE",)}
    return "".join(f"ATOM  {3 * i + j + 1:>5}  {name:<3} {three[aa]} A{i + 1:>4}{2.3 * np.cos(i) + j:8.3f}"
                   f"{2.3 * np.sin(i):8.3f}{1.5 * i:8.3f}  1.00 90.00           {name[0]}\n"
                   for i, aa in enumerate(sequence) for j, name in enumerate(("N", "CA", "C"))) + "END\n"


def test_structures_for_a_model_that_never_saw_one_are_refused_unless_allowed(checkpoint, tmp_path, capsys):
    """Trained on sequence graphs only, given structures: refused with what to do; --allow-input-shift goes on."""
    sequence = "MKTLLILAVVAAALAVPSFA"
    fasta = write(tmp_path, "in.fasta", f">P1\n{sequence}\n>P2\nMSDNQKSLLEKAKELLG\n")
    (tmp_path / "structures").mkdir()
    (tmp_path / "structures" / "P1.pdb").write_text(pdb_text(sequence))
    argv = ["--checkpoint", str(checkpoint), "--input", str(fasta), "--out", str(tmp_path / "o.3line"),
            "--structures", str(tmp_path / "structures")]
    assert predict.main(argv) == 2
    error = capsys.readouterr().err
    assert "1 of 2 protein(s) get structure graphs" in error and "never saw one" in error
    assert "leave out --structures" in error and "--allow-input-shift" in error
    assert not (tmp_path / "o.3line").exists()
    assert predict.main([*argv, "--allow-input-shift"]) == 0
    assert "warning: 1 of 2 protein(s) get structure graphs" in capsys.readouterr().err
    # Without --structures the same proteins get the sequence graphs it trained on: nothing to say.
    assert predict.main(argv[:-2]) == 0 and "warning" not in capsys.readouterr().err


def test_sequence_graphs_for_a_structure_trained_model_are_refused_and_dropout_passes(tmp_path, write_checkpoint,
                                                                                     capsys):
    """The issue-27 trap: trained on structures only, given a FASTA. A model that also saw sequence graphs
    (structure dropout records them under "sequence") passes; one that saw few gets a warning."""
    fasta = write(tmp_path, "in.fasta", ">P1\nMKTLLILAVVAAALAVPSFA\n>P2\nMSDNQKSLLEKAKELLG\n")
    config = Config.from_dict({"data": {"path": str(tmp_path / "gone")}, "model": TINY})
    outcomes = {}
    for name, sources in {"structure": {"structure": 400}, "dropout": {"structure": 400, "sequence": 120},
                          "rare": {"structure": 400, "sequence": 4}}.items():
        path = write_checkpoint(tmp_path / name, config, graph_k=4, graph_sources=sources)
        code = predict.main(["--checkpoint", str(path), "--input", str(fasta), "--out", str(tmp_path / f"{name}.3l")])
        outcomes[name] = (code, capsys.readouterr().err)
    code, error = outcomes["structure"]
    assert code == 2 and "2 of 2 protein(s) get sequence graphs" in error and "400 structure graph(s)" in error
    assert "--structures DIR" in error and "structure dropout" in error
    assert outcomes["dropout"] == (0, "")
    code, error = outcomes["rare"]
    assert code == 0 and "warning: 2 of 2 protein(s) get sequence graphs" in error and "saw 4 of 404" in error


def test_the_input_shift_rule_reads_counts():
    from protopo_ray.training.checkpoint import ModelInputs
    from protopo_ray.training.input_shift import find_input_shifts, refusal

    inputs = ModelInputs(graph_k=16, graph_sources={"structure": 400}, node_features=(), edge_features=())
    (shift,) = find_input_shifts(inputs, ["sequence"] * 3 + ["structure"])
    assert (shift.kind, shift.num_proteins, shift.num_total, shift.unseen) == ("graph:sequence", 3, 4, True)
    assert "--allow-input-shift" in refusal([shift])
    assert find_input_shifts(inputs, ["structure"] * 5) == []
    embedded = find_input_shifts(inputs, ["structure"], embedding={"model": "esm2", "layer": 2, "dim": 16})
    assert [s.kind for s in embedded] == ["embedding"]


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


def test_evaluation_names_the_input_shift_of_a_split(smoke_shards, tmp_path, write_checkpoint, caplog):
    """The synthetic split's proteins have structure graphs; a model trained on sequence graphs only is evaluated
    with a warning saying so (evaluation goes on: its figures are of that shift)."""
    from protopo_ray.training.evaluation import evaluate_checkpoint

    config = Config.from_dict({"data": {"path": str(smoke_shards)}, "model": TINY})
    path = write_checkpoint(tmp_path / "ckpt", config, graph_sources={"sequence": 50})
    with caplog.at_level("WARNING"):
        metrics = evaluate_checkpoint(path, split="val")
    assert metrics["n_proteins"] > 0 and "get structure graphs" in caplog.text and "never saw one" in caplog.text


def test_a_window_split_long_protein_gets_a_grammatical_topology(tmp_path_factory, write_checkpoint):
    """A protein past --max-length goes through the network in overlapping windows, stitched, and the Viterbi
    over the whole protein: one topology the grammar accepts, as long as the protein."""
    from protopo_ray.inference.predictions import Batching, build_inputs, predict_inputs, stitch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("viterbi")
    config = Config.from_dict({"data": {"path": str(root / "gone")}, "model": {**TINY, "decoder": "viterbi"}})
    predictor = load_predictor(write_checkpoint(root / "checkpoint", config, graph_k=4,
                                                graph_sources={"sequence": 10}))
    rng = np.random.default_rng(1)
    sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=1500))
    cut = Batching(max_length=400, overlap=100, max_residues=800)
    (item,) = build_inputs([ProteinRecord(id="titin-like", sequence=sequence)], None, 4, cut)
    assert len(item.windows) == 5 and item.windows[-1][1] == 1500
    (prediction,) = predict_inputs(predictor.module, [item], torch.device("cpu"), cut)
    assert len(prediction.labels) == 1500 and predictor.module.grammar.accepts(prediction.labels)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # Stitching: every residue from the window it is most central in.
    values = [np.full(b - a, j) for j, (a, b) in enumerate(item.windows)]
    stitched = stitch(item.windows, values)
    assert len(stitched) == 1500 and stitched[0] == 0 and stitched[-1] == 4 and (np.diff(stitched) >= 0).all()
    assert stitched[(item.windows[1][0] + item.windows[0][1]) // 2] == 1


def test_a_batch_out_of_device_memory_is_split_and_retried():
    from protopo_ray.inference.predictions import forward_splitting

    calls = []

    def forward(indices):  # a device that holds two proteins at a time
        calls.append(len(indices))
        if len(indices) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [i * 10 for i in indices]

    assert forward_splitting(forward, list(range(7))) == [i * 10 for i in range(7)]
    assert calls == [7, 3, 1, 2, 4, 2, 2]
    with pytest.raises(torch.OutOfMemoryError, match="lower --max-length"):
        forward_splitting(lambda indices: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), [0])
