"""Trials on hand-built Tune results: trial configs built in one place, stage records, promotion candidates with
their checkpoints' schemes; and the winner taken from a run's best/ checkpoint (search.run)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from pyarrow import fs as pafs
from ray.tune import Checkpoint, Result

from protopo_ray.config import Config
from protopo_ray.model.ensemble import MIN_LOOPS, PENALTIES, STRAND_PENALTIES
from protopo_ray.search import trials
from protopo_ray.search.inventory import GIB, Inventory, node_from_resources
from protopo_ray.search.plan import plan_promotion, plan_search
from protopo_ray.search.results import ExperimentDir, StageRecord, TrialRecord
from protopo_ray.search.run import pick_winner
from protopo_ray.search.stages import CONTINUE_KEY, PromotionStage, SearchStage, Stage
from protopo_ray.training.evaluation import evaluate_checkpoint
from protopo_ray.training.fit import fit
from protopo_ray.training.predictor import choose_checkpoint_decoding, load_predictor
from protopo_ray.training.session import LocalSession

SEARCH = SearchStage(name="architecture", metric="val_loss", mode="min", max_epochs=4,
                     grid={"model.lstm_size": [8, 512], "train.lr": [1e-3]})
PROMOTION = PromotionStage(name="promotion", metric="val_loss", mode="min", max_epochs=10, top_k=1)


def s3_checkpoint(path: str) -> Checkpoint:
    """What Tune hands back for a checkpoint on S3: the path inside the bucket filesystem, without a scheme."""
    return Checkpoint(path, filesystem=pafs.S3FileSystem(anonymous=True, region="us-east-1"))


def a10g(gpus: int = 1) -> Inventory:
    return Inventory((node_from_resources("g", {"CPU": 8, "GPU": gpus, "accelerator_type:A10G": 1}),))


def context(stage: Stage, storage: str, plan=None) -> trials.StageContext:
    base = Config().replace({"data.batch_size": 8, "model.gc_size": 8})
    plan = plan or plan_search(a10g(), [GIB // 10, 6 * GIB], num_trials=8)
    return trials.StageContext(stage=stage, base=base, plan=plan, train_storage=storage, longest=600)


def result(ctx, params, losses, *, trial_id, checkpoint=None, error=None) -> Result:
    frame = pd.DataFrame([{"epoch": i + 1, "val_loss": loss, "epoch_time_s": 36.0, "timestamp": 1000 + 10 * i,
                           "time_total_s": 10.0 * (i + 1), "trial_id": trial_id} for i, loss in enumerate(losses)])
    # Tune keeps a trial's config inside its latest metrics (Result.config reads it from there).
    return Result(metrics={"trial_id": trial_id, "epoch": len(losses), "config": params}, checkpoint=checkpoint,
                  error=error, path=f"/tmp/{trial_id}", metrics_dataframe=frame)


def test_trial_config_gives_each_config_its_own_gpu_share(tmp_path):
    ctx = context(SEARCH, str(tmp_path))
    small = trials.trial_config(ctx, {"model.lstm_size": 8}, "a")
    large = trials.trial_config(ctx, {"model.lstm_size": 512, "model.lstm_layers": 4, "data.batch_size": 64}, "b")
    assert small.resources.gpus_per_worker < large.resources.gpus_per_worker <= 1
    assert small.resources.accelerator_type == "A10G" and small.resources.num_workers == 1
    assert (small.name, small.train.epochs, small.train.metric, small.train.mode) == ("architecture_a", 4, "val_loss", "min")
    assert small.resources.storage == str(tmp_path)


def test_collect_stage_ranks_and_records_why_each_trial_ended(tmp_path):
    ctx = context(SEARCH, "s3://bucket/exp/train")
    results = [
        result(ctx, {"model.lstm_size": 8}, [0.9, 0.7, 0.6, 0.5], trial_id="t1",
               checkpoint=s3_checkpoint("bucket/exp/tune/architecture/t1/checkpoint_000003")),
        result(ctx, {"model.lstm_size": 512}, [1.0], trial_id="t2"),
        result(ctx, {"model.lstm_size": 8}, [], trial_id="t3", error=RuntimeError("worker died")),
    ]
    record = trials.collect_stage(results, ctx, wall_time_s=12.0)
    by_id = {t.trial_id: t for t in record.trials}
    assert record.best_trial == "t1" and record.best().best["val_loss"] == 0.5
    assert [by_id[t].status for t in ("t1", "t2", "t3")] == ["completed", "stopped", "error"]
    assert (record.epochs_run, record.epochs_full) == (5, 12)
    # Ray reports object-store paths without their scheme; the record keeps it, so promotion can open it.
    assert by_id["t1"].checkpoint == "s3://bucket/exp/tune/architecture/t1/checkpoint_000003"
    assert by_id["t1"].config.name == "architecture_t1" and by_id["t1"].running_unix == [1000 - 10.0, 1030]
    assert by_id["t1"].accelerator_hours == pytest.approx(4 * 36 / 3600 * by_id["t1"].config.resources.gpus_per_worker)
    assert (record.kind, record.scheduler, record.plan) == ("search", "asha", ctx.plan)
    # The record round-trips through its JSON file.
    exp = ExperimentDir(tmp_path)
    exp.save_stage(record)
    loaded = exp.load_stage("architecture")
    assert (loaded.trials, loaded.best_trial, loaded.epochs_run) == (record.trials, "t1", 5)


def test_promotion_continues_the_best_trial_and_records_where_it_came_from(tmp_path):
    ctx = context(SEARCH, "s3://bucket/exp/train")
    record = trials.collect_stage([
        result(ctx, {"model.lstm_size": 8}, [0.9, 0.4], trial_id="good",
               checkpoint=s3_checkpoint("bucket/exp/tune/architecture/good/checkpoint_000001")),
        result(ctx, {"model.lstm_size": 512}, [0.8, 0.7], trial_id="worse",
               checkpoint=s3_checkpoint("bucket/exp/tune/architecture/worse/checkpoint_000001")),
        result(ctx, {"model.lstm_size": 8}, [0.1], trial_id="no_checkpoint"),
    ], ctx, wall_time_s=1.0)
    (chosen,) = PROMOTION.candidates({"architecture": record})
    assert (chosen.from_trial, chosen.start_epoch, chosen.params) == ("good", 2, {"model.lstm_size": 8})
    assert chosen.checkpoint.startswith("s3://bucket/")
    plan = plan_promotion(a10g(gpus=4), 2 * GIB, num_trials=1, max_workers=8)
    pctx = context(PROMOTION, "s3://bucket/exp/train", plan)
    config = trials.trial_config(pctx, {CONTINUE_KEY: chosen.to_params()}, "p1")
    assert config.train.init_checkpoint == chosen.checkpoint and config.model.lstm_size == 8
    assert (config.resources.num_workers, config.resources.gpus_per_worker, config.train.epochs) == (4, 1.0, 10)
    promoted = trials.collect_stage([result(pctx, {CONTINUE_KEY: chosen.to_params()}, [0.3] * 10, trial_id="p1")],
                                    pctx, wall_time_s=1.0)
    trial = promoted.trials[0]
    assert (trial.start_epoch, trial.promoted_from, trial.resumed_from) == (2, "good", chosen.checkpoint)
    assert trial.params == {"model.lstm_size": 8} and promoted.epochs_run == 8


def test_promotion_without_a_checkpointed_trial_says_so(tmp_path):
    ctx = context(SEARCH, str(tmp_path))
    record = trials.collect_stage([result(ctx, {"model.lstm_size": 8}, [0.1], trial_id="t")], ctx, wall_time_s=1.0)
    with pytest.raises(RuntimeError, match="no trial with a checkpoint to promote"):
        PROMOTION.candidates({"architecture": record})


def test_pick_winner_takes_the_runs_best_checkpoint_and_beats_the_untrained_model(smoke_shards, tmp_path,
                                                                                  untrained_figures):
    ctx = context(SEARCH, str(tmp_path / "train"))
    config = trials.trial_config(ctx, {"model.lstm_size": 8}, "w").replace(
        {"data.path": str(smoke_shards), "train.epochs": 2, "train.device": "cpu", "resources.gpus_per_worker": 0.0,
         "resources.accelerator_type": "", "data.train_folds": ["train"], "data.val_folds": ["val"],
         "data.test_folds": ["test"]})
    fit(config, LocalSession(config))
    run_dir = tmp_path / "train" / "architecture_w"
    best_epoch = json.loads((run_dir / "best" / "meta.json").read_text())["epoch"]
    record = StageRecord(stage="architecture", kind="search", scheduler="asha", metric="val_loss", mode="min",
                         max_epochs=2, best_trial="w")
    record.trials.append(TrialRecord(trial_id="w", params={}, config=config, status="completed", epochs=2,
                                     best={"val_loss": 0.5}, checkpoint=str(run_dir / "checkpoint_epoch_0002")))
    exp = ExperimentDir(tmp_path / "exp")
    winner = pick_winner(record, exp)
    assert winner.source == exp.load_winner().source == str(run_dir / "best")
    assert json.loads((exp.winner_checkpoint / "meta.json").read_text())["epoch"] == best_epoch
    # Two epochs on 40 proteins already fit better than the same model untrained, on the held-out test split.
    assert winner.test["n_proteins"] == untrained_figures(config)["n_proteins"] > 0
    assert winner.test["loss"] < untrained_figures(config)["loss"]


def test_a_viterbi_winner_decodes_with_numbers_chosen_on_validation(smoke_shards, tmp_path):
    ctx = context(SEARCH, str(tmp_path / "train"))
    config = trials.trial_config(ctx, {"model.lstm_size": 8}, "v").replace(
        {"data.path": str(smoke_shards), "train.epochs": 1, "train.device": "cpu", "resources.gpus_per_worker": 0.0,
         "resources.accelerator_type": "", "data.train_folds": ["train"], "data.val_folds": ["val"],
         "data.test_folds": ["test"], "model.decoder": "viterbi", "model.entry_penalty": 3.0,
         "data.structure_dropout": 0.5})
    fit(config, LocalSession(config))
    run_dir = tmp_path / "train" / "architecture_v"
    record = StageRecord(stage="architecture", kind="search", scheduler="asha", metric="val_loss", mode="min",
                         max_epochs=1, best_trial="v")
    record.trials.append(TrialRecord(trial_id="v", params={}, config=config, status="completed", epochs=1,
                                     best={"val_loss": 0.5}, checkpoint=str(run_dir / "checkpoint_epoch_0001")))
    exp = ExperimentDir(tmp_path / "exp")
    winner = pick_winner(record, exp)
    chosen = winner.decoding
    # One of the values choose_decoding tries (3.0 is not), recorded, and what the winner checkpoint decodes with.
    assert chosen is not None and chosen.entry_penalty in PENALTIES and chosen.min_loop in MIN_LOOPS
    assert chosen.strand_penalty in STRAND_PENALTIES
    assert exp.load_winner().decoding == chosen
    model = load_predictor(exp.winner_checkpoint).module
    assert model.decoding == chosen and winner.config.model.entry_penalty == chosen.entry_penalty
    # The run's own checkpoint is left as it was trained.
    assert json.loads((run_dir / "best" / "meta.json").read_text())["config"]["model"]["entry_penalty"] == 3.0
    # Trained for both graph kinds, it is chosen on both: each validation protein through its structure graph and
    # again through the sequence-window graph a FASTA gets.
    copy = shutil.copytree(run_dir / "best", tmp_path / "copy")
    val_proteins = evaluate_checkpoint(copy, split="val")["n_proteins"]
    assert choose_checkpoint_decoding(copy).figures["n_proteins"] == 2 * val_proteins > 0
