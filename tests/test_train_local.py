"""The in-process training path and the predict CLI, end to end on the tiny synthetic set."""

from __future__ import annotations

import json

import pytest
import torch

from protopo_ray import predict, train
from protopo_ray.data import collate, shards
from protopo_ray.model.metrics import protein_type
from protopo_ray.model.segments import segment_stats
from protopo_ray.training.checkpoint import ModelInputs, find_checkpoints, load_checkpoint, load_latest_valid
from protopo_ray.training.evaluation import evaluate_checkpoint
from protopo_ray.training.predictor import load_predictor


def run_local(smoke_shards, tmp_path, *extra):
    argv = ["--config", "experiments/smoke.toml", "--local", "--set", f"data.path='{smoke_shards}'",
            "--storage", str(tmp_path / "runs"), "--set", "name=local"] + list(extra)
    return train.main(argv)


def epochs(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_local_run_resume_and_checkpoint_predictions(smoke_shards, tmp_path):
    assert run_local(smoke_shards, tmp_path, "--set", "train.epochs=2") == 0
    run_dir = tmp_path / "runs" / "local"
    assert epochs(run_dir) == [1, 2]
    assert (run_dir / "config.json").exists()
    # Same name without --resume refuses instead of silently continuing.
    assert run_local(smoke_shards, tmp_path, "--set", "train.epochs=2") == 2
    # --resume continues from the latest checkpoint to the new total: epochs 3 and 4 only.
    assert run_local(smoke_shards, tmp_path, "--resume", "--set", "train.epochs=4") == 0
    assert epochs(run_dir) == [1, 2, 3, 4]
    latest = load_latest_valid(find_checkpoints(run_dir))
    assert latest.epoch == 4 and latest.path.name.endswith("0004")
    # Evaluating the checkpoint in a fresh process state gives the metrics reported for that epoch.
    reported = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = evaluate_checkpoint(latest.path, split="val")
    assert metrics["loss"] == pytest.approx(reported["val_loss"], rel=1e-5)
    assert metrics["residue_acc"] == pytest.approx(reported["val_residue_acc"])


def test_checkpoint_load_gives_identical_predictions_and_describes_its_inputs(smoke_shards, tmp_path):
    assert run_local(smoke_shards, tmp_path, "--set", "train.epochs=1") == 0
    checkpoint = find_checkpoints(tmp_path / "runs" / "local")[0]
    model_a, model_b = load_predictor(checkpoint).module, load_predictor(checkpoint).module
    batch = collate.table_to_batch(shards.read_table(smoke_shards, folds=["val"]))
    assert torch.equal(model_a(batch), model_b(batch))
    loaded = load_checkpoint(checkpoint)
    assert loaded.config.data.path == str(smoke_shards)
    # What new proteins need to be built like the training ones, from the shards' manifest, not from a guess.
    assert loaded.meta.inputs == ModelInputs.of_manifest(shards.read_manifest(smoke_shards))
    assert loaded.meta.inputs.graph_k == 16 and loaded.meta.inputs.graph_sources == {"structure": 60}
    # Its grammar is its training folds' (the synthetic set's segments and lengths, not DeepTMHMM's).
    train = shards.read_table(smoke_shards, folds=["train"], columns=["type", "labels"])
    assert loaded.meta.grammar == segment_stats(zip(train["type"].to_pylist(), train["labels"].to_pylist()))


def test_corrupt_checkpoint_is_skipped_for_the_previous_one(smoke_shards, tmp_path, caplog):
    assert run_local(smoke_shards, tmp_path, "--set", "train.epochs=3", "--set", "train.keep_checkpoints=3") == 0
    checkpoints = find_checkpoints(tmp_path / "runs" / "local")
    newest = max(checkpoints, key=lambda p: p.name)
    (newest / "state.pt").write_bytes(b"truncated")
    found = load_latest_valid(checkpoints)
    assert found.epoch == 2 and found.path != newest
    assert "unreadable checkpoint" in caplog.text


def test_predict_cli_writes_3line_and_metrics(smoke_shards, tmp_path, capsys):
    assert run_local(smoke_shards, tmp_path, "--set", "train.epochs=1") == 0
    checkpoint = find_checkpoints(tmp_path / "runs" / "local")[0]
    table = shards.read_table(smoke_shards, folds=["test"])
    source = tmp_path / "in.3line"
    source.write_text("".join(f">{r['id']}|{r['type']}\n{r['sequence']}\n{r['labels']}\n" for r in table.to_pylist()))
    out = tmp_path / "out.3line"
    # --allow-input-shift: the synthetic set's proteins all have structures, a file gets sequence graphs (issue 27)
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(source), "--out", str(out),
                         "--allow-input-shift"]) == 0
    lines = out.read_text().splitlines()
    headers, sequences, labels = lines[0::3], lines[1::3], lines[2::3]
    assert [h[1:].split("|")[0] for h in headers] == table.column("id").to_pylist()
    assert sequences == table.column("sequence").to_pylist()
    # The header carries the type read off the predicted labels (INVALID included: predictions can be).
    assert all(h.split("|")[1] == protein_type(lab) for h, lab in zip(headers, labels))
    assert all(len(lab) == len(seq) and set(lab) <= set("IOPSMB") for lab, seq in zip(labels, sequences))
    assert "residue_acc" in capsys.readouterr().out
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{r['id']}\n{r['sequence']}\n" for r in table.to_pylist()))
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(fasta), "--out", str(out),
                         "--allow-input-shift"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "model.lstm_sise=3"], "unknown key"),
        (["--set", "train.lr=-1"], "train.lr must be a positive number"),
        (["--set", "data.val_folds=['cv9']"], "fold(s) ['cv9'] not in the shards"),
        (["--set", "data.train_folds=[]"], "must list at least one fold"),
    ],
)
def test_bad_config_fails_before_training(smoke_shards, tmp_path, capsys, extra, message):
    assert run_local(smoke_shards, tmp_path, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs" / "local" / "metrics.jsonl").exists()


def test_best_never_regresses_after_a_resume(smoke_shards, tmp_path):
    # Two sane epochs, then a resume with an LR that wrecks the model: best/ stays an early epoch.
    common = ["--set", "train.metric='val_loss'", "--set", "train.mode='min'"]
    assert run_local(smoke_shards, tmp_path, "--set", "train.epochs=2", *common) == 0
    best_dir = tmp_path / "runs" / "local" / "best"
    before = json.loads((best_dir / "meta.json").read_text())
    assert run_local(smoke_shards, tmp_path, "--resume", "--set", "train.epochs=4", "--set", "train.lr=50.0",
                     "--set", "train.schedule='constant'", *common) == 0
    losses = [json.loads(line)["val_loss"] for line in (tmp_path / "runs" / "local" / "metrics.jsonl").read_text().splitlines()]
    after = json.loads((best_dir / "meta.json").read_text())
    assert after["metrics"]["val_loss"] == pytest.approx(min(losses))
    assert after["epoch"] == before["epoch"] or after["metrics"]["val_loss"] < before["metrics"]["val_loss"]
    assert load_checkpoint(best_dir).meta.best_value == pytest.approx(min(losses))
