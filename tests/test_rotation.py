"""Fold-rotation ensembles: the stage's folds as the experiment file gives them, each member's config, and the
stage end to end on the shared local cluster (members trained by Tune, the ensemble built out of fold, the winner
an ensemble that predicts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protopo_ray import tune
from protopo_ray.config import Config
from protopo_ray.model.ensemble import ENSEMBLE_FILE, PENALTIES
from protopo_ray.search import trials
from protopo_ray.search.experiment import parse_experiment
from protopo_ray.search.inventory import Inventory, node_from_resources
from protopo_ray.search.rotation import ROTATION_KEY

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
    with pytest.raises(ValueError, match="folds is a key of ensemble stages only"):
        parse_experiment({"stages": [{"name": "a", "folds": ["cv1"], "grid": {"model.gc_size": [8]}}]}, source="x")


def test_members_are_planned_as_final_runs_ddp_where_gpus_outnumber_them():
    exp = experiment({})  # four members
    gpus = Inventory(tuple(node_from_resources(f"g{i}", {"CPU": 16, "GPU": 4, "accelerator_type:A10G": 1}) for i in range(2)))
    plan = tune.plan_stage(exp.stages[0], exp.base, gpus, longest=800)
    assert (plan.num_workers, plan.gpus_per_worker, plan.max_concurrent_trials) == (2, 1.0, 4)
    cpus = tune.plan_stage(exp.stages[0], exp.base, Inventory((node_from_resources("n", {"CPU": 2}),)), longest=800)
    assert (cpus.num_workers, cpus.max_concurrent_trials) == (2, 1)  # 4 members on 2 cores: in turn, DDP on both
    assert tune.plan_stage(experiment({"folds": ["cv1", "cv0"]}).stages[0], exp.base,
                           Inventory((node_from_resources("n", {"CPU": 2}),)), longest=800).max_concurrent_trials == 2


def test_each_member_validates_on_its_fold_and_trains_on_the_others(tmp_path):
    exp = experiment({"folds": ["cv1", "cv3"], "max_epochs": 3})
    stage = exp.stages[0]
    plan = tune.plan_stage(stage, exp.base, Inventory((node_from_resources("n", {"CPU": 4}),)), longest=600)
    ctx = trials.StageContext.of(stage, exp.base, plan, str(tmp_path), longest=600)
    assert trials.num_trials(stage) == 2
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
@pytest.mark.slow
def test_ensemble_stage_trains_a_member_per_fold_and_its_ensemble_is_the_winner(ray_cluster, smoke_shards, tmp_path):
    run_smoke_search('metric = "val_topo_mean"\nmax_epochs = 2\n', ray_cluster, smoke_shards, tmp_path)
    exp_dir = tmp_path / "smoke"
    record = trials.StageRecord.load(exp_dir / "stages" / "ensemble.json")
    # smoke's folds are train / val / test: one member validates on val, the other on train.
    by_fold = {t.params[ROTATION_KEY]: t for t in record.trials}
    assert set(by_fold) == {"train", "val"} and all(t.status == "completed" for t in record.trials)
    assert Config.from_dict(by_fold["train"].config).data.train_folds == ("val",)
    assert record.ensemble.members == {f: t.trial_id for f, t in by_fold.items()}
    assert record.ensemble.entry_penalty in PENALTIES
    assert set(record.ensemble.topo_mean_by_penalty) == {str(p) for p in PENALTIES}
    spec = json.loads((exp_dir / "ensemble" / ENSEMBLE_FILE).read_text())
    assert sorted(spec["members"]) == ["members/train", "members/val"]
    winner = json.loads((exp_dir / "winner" / "winner.json").read_text())
    assert winner["trial_id"] == "ensemble" and 0 <= winner["test"]["overlap_acc"] <= 1
    assert winner["test"]["n_proteins"] > 0
    assert "ensemble `" in (exp_dir / "report.md").read_text()
    # What a user takes home: predict reads the winner's ensemble directory.
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">p1\nMKTLLILAVLAAALAGCSSEKKPQWERTYLLLIVVAFAGSSKKR\n")
    out = tmp_path / "pred"
    subprocess.run([sys.executable, "-m", "protopo_ray.predict", "--checkpoint", str(exp_dir / "winner" / "checkpoint"),
                    "--input", str(fasta), "--out-dir", str(out)], cwd=REPO, check=True, capture_output=True, timeout=120)
    assert (out / "predicted.3line").read_text().startswith(">p1")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.long  # ~2 min on 2 cores (a Ray Train start-up): run by hand; the stage path above runs in CI
def test_a_member_with_the_cluster_to_itself_is_a_ray_train_ddp_run(ray_cluster, smoke_shards, tmp_path):
    run_smoke_search('folds = ["val"]\nmetric = "val_loss"\nmode = "min"\nmax_epochs = 1\n', ray_cluster, smoke_shards,
                     tmp_path)
    record = trials.StageRecord.load(tmp_path / "smoke" / "stages" / "ensemble.json")
    (member,) = record.trials
    config = Config.from_dict(member.config)
    # one member on the 2-CPU cluster gets both cores as two DDP workers (promotion's plan), training on train only
    assert (config.resources.num_workers, config.data.train_folds, config.data.val_folds) == (2, ("train",), ("val",))
    workers = json.loads((Path(member.run_uri) / "workers.json").read_text())
    assert len(workers) == 2
    assert json.loads((tmp_path / "smoke" / "ensemble" / ENSEMBLE_FILE).read_text())["members"] == ["members/val"]
