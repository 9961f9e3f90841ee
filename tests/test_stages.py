"""Stage kinds, the ensemble (fold rotation) above all: its folds as the experiment file gives them, each member's
config and plan, and the stage end to end on the shared local cluster (members trained by Tune, the ensemble built
out of fold, the winner an ensemble that beats its untrained self and predicts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protopo_ray.model.ensemble import PENALTIES
from protopo_ray.search import trials
from protopo_ray.search.experiment import parse_experiment
from protopo_ray.search.inventory import Inventory, node_from_resources
from protopo_ray.search.prices import PriceConfig
from protopo_ray.search.results import ExperimentDir
from protopo_ray.search.stages import ROTATION_KEY, PromotionStage
from protopo_ray.training.predictor import ENSEMBLE_FILE

REPO = Path(__file__).resolve().parents[1]
FOLDS = {"train_folds": ["cv0", "cv3", "cv4"], "val_folds": ["cv1"], "test_folds": ["cv2"]}


def experiment(stage: dict):
    return parse_experiment({"data": dict(FOLDS), "stages": [{"name": "ensemble", "kind": "ensemble", **stage}]},
                            source="exp.toml")


def test_ensemble_folds_default_to_every_train_and_val_fold_never_a_test_fold():
    assert experiment({}).stages[0].folds == ("cv0", "cv3", "cv4", "cv1")
    assert experiment({"folds": ["cv1", "cv0"]}).stages[0].folds == ("cv1", "cv0")
    with pytest.raises(ValueError, match=r"exp.toml.*folds \['cv2'\] are not train or val folds.*test folds never"):
        experiment({"folds": ["cv1", "cv2"]})
    with pytest.raises(ValueError, match="lists a fold twice"):
        experiment({"folds": ["cv1", "cv1"]})
    with pytest.raises(ValueError, match=r"unknown key 'folds' for a search stage \(a key of ensemble stages\)"):
        parse_experiment({"stages": [{"name": "a", "folds": ["cv1"], "grid": {"model.gc_size": [8]}}]}, source="x")


def test_members_are_planned_as_final_runs_ddp_where_gpus_outnumber_them():
    exp = experiment({})  # four members
    gpus = Inventory(tuple(node_from_resources(f"g{i}", {"CPU": 16, "GPU": 4, "accelerator_type:A10G": 1}) for i in range(2)))
    plan = exp.stages[0].plan(gpus, exp.base, 800, PriceConfig())
    assert (plan.kind, plan.num_workers, plan.gpus_per_worker, plan.max_concurrent_trials) == ("ensemble", 2, 1.0, 4)
    two_cores = Inventory((node_from_resources("n", {"CPU": 2}),))
    cpus = exp.stages[0].plan(two_cores, exp.base, 800, PriceConfig())
    assert (cpus.num_workers, cpus.max_concurrent_trials) == (2, 1)  # 4 members on 2 cores: in turn, DDP on both
    pair = experiment({"folds": ["cv1", "cv0"]}).stages[0]
    assert pair.plan(two_cores, exp.base, 800, PriceConfig()).max_concurrent_trials == 2


def test_each_member_validates_on_its_fold_and_trains_on_the_others(tmp_path):
    exp = experiment({"folds": ["cv1", "cv3"], "max_epochs": 3})
    stage = exp.stages[0]
    plan = stage.plan(Inventory((node_from_resources("n", {"CPU": 4}),)), exp.base, 600, PriceConfig())
    ctx = trials.StageContext(stage=stage, base=exp.base, plan=plan, train_storage=str(tmp_path), longest=600)
    assert stage.num_trials() == 2
    member = trials.trial_config(ctx, {ROTATION_KEY: "cv3"}, "m3")
    assert member.data.val_folds == ("cv3",) and member.data.train_folds == ("cv0", "cv4", "cv1")
    assert member.data.test_folds == ("cv2",) and (member.name, member.train.epochs) == ("ensemble_m3", 3)
    assert trials.trial_config(ctx, {ROTATION_KEY: "cv1"}, "m1").data.train_folds == ("cv0", "cv3", "cv4")


def run_smoke_search(stage_keys: str, ray_cluster: str, smoke_shards: Path, tmp_path: Path) -> None:
    """`python -m protopo_ray.tune` on smoke.toml's base config with one ensemble stage (`stage_keys` its TOML)."""
    toml = tmp_path / "ens.toml"
    toml.write_text((REPO / "experiments" / "smoke.toml").read_text().split("[[stages]]")[0]
                    + '[[stages]]\nname = "ensemble"\nkind = "ensemble"\n' + stage_keys)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "WANDB_MODE": "offline", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-m", "protopo_ray.tune", str(toml), "--data", str(smoke_shards),
                           "--storage", str(tmp_path), "--no-wandb"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.ray
def test_ensemble_stage_trains_a_member_per_fold_and_its_ensemble_is_the_winner(ray_cluster, smoke_shards, tmp_path,
                                                                                 untrained_figures):
    run_smoke_search('metric = "val_topo_mean"\nmax_epochs = 2\n', ray_cluster, smoke_shards, tmp_path)
    exp_dir = tmp_path / "smoke"
    exp = ExperimentDir(exp_dir)
    record = exp.load_stage("ensemble")
    # smoke's folds are train / val / test: one member validates on val, the other on train.
    by_fold = {t.params[ROTATION_KEY]: t for t in record.trials}
    assert set(by_fold) == {"train", "val"} and all(t.status == "completed" for t in record.trials)
    assert by_fold["train"].config.data.train_folds == ("val",)
    assert record.ensemble.members == {f: t.trial_id for f, t in by_fold.items()}
    assert record.ensemble.decoding.entry_penalty in PENALTIES and record.ensemble.decoding.rule == "mean"
    assert {f"penalty={p:g} loop=1 beta=0" for p in PENALTIES} <= set(record.ensemble.topo_mean_by_setting)
    spec = json.loads((exp_dir / "ensemble" / ENSEMBLE_FILE).read_text())
    assert sorted(spec["members"]) == ["members/train", "members/val"]
    winner = exp.load_winner()
    assert winner.trial_id == "ensemble" and winner.ensemble == record.ensemble
    # The members' test split, which neither trained on: the ensemble beats its (first) member's model untrained.
    untrained = untrained_figures(winner.config)
    assert winner.test["n_proteins"] == untrained["n_proteins"] > 0 and winner.test["loss"] < untrained["loss"]
    assert "ensemble `" in (exp_dir / "report.md").read_text()
    # What a user takes home: predict reads the winner's ensemble directory.
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">p1\nMKTLLILAVLAAALAGCSSEKKPQWERTYLLLIVVAFAGSSKKR\n")
    out = tmp_path / "pred"
    subprocess.run([sys.executable, "-m", "protopo_ray.predict", "--checkpoint", str(exp_dir / "winner" / "checkpoint"),
                    "--input", str(fasta), "--out-dir", str(out), "--allow-input-shift"], cwd=REPO, check=True, capture_output=True, timeout=120)
    assert (out / "predicted.3line").read_text().startswith(">p1")


@pytest.mark.ray
@pytest.mark.long  # ~2 min on 2 cores (a Ray Train start-up): run by hand; the stage path above runs in CI
def test_a_member_with_the_cluster_to_itself_is_a_ray_train_ddp_run(ray_cluster, smoke_shards, tmp_path):
    run_smoke_search('folds = ["val"]\nmetric = "val_loss"\nmode = "min"\nmax_epochs = 1\n', ray_cluster, smoke_shards,
                     tmp_path)
    record = ExperimentDir(tmp_path / "smoke").load_stage("ensemble")
    (member,) = record.trials
    config = member.config
    # one member on the 2-CPU cluster gets both cores as two DDP workers (promotion's plan), training on train only
    assert (config.resources.num_workers, config.data.train_folds, config.data.val_folds) == (2, ("train",), ("val",))
    workers = json.loads((Path(member.run_uri) / "workers.json").read_text())
    assert len(workers) == 2
    assert json.loads((tmp_path / "smoke" / "ensemble" / ENSEMBLE_FILE).read_text())["members"] == ["members/val"]


def test_promotion_and_ensemble_stages_run_every_trial_to_its_budget(tmp_path):
    exp = parse_experiment({"data": dict(FOLDS), "stages": [
        {"name": "a", "grid": {"model.gc_size": [8, 16]}, "scheduler": "sha"},
        {"name": "p", "kind": "promotion", "top_k": 2}, {"name": "e", "kind": "ensemble"}]}, source="x.toml")
    search, promotion, ensemble = exp.stages
    assert isinstance(promotion, PromotionStage) and promotion.num_trials() == 2 and ensemble.num_trials() == 4
    plan = promotion.plan(Inventory((node_from_resources("n", {"CPU": 4}),)), exp.base, 600, PriceConfig())
    for stage in (promotion, ensemble):
        options = stage.tune_options(plan, 0, tmp_path / "h.json")
        assert (options.scheduler, options.search_alg, options.max_concurrent_trials) == (None, None, 2)
        assert stage.stopper is None and stage.record_fields() == {"scheduler": "none"}
    # Synchronous halving waits for whole cohorts: no concurrency limit from Tune, or a rung would never fill.
    options = search.tune_options(plan, 0, tmp_path / "h.json")
    assert options.max_concurrent_trials is None and search.stopper == "halving"
    assert "halving from epoch 1" in search.describe() and promotion.describe() == "continued from their checkpoints"
