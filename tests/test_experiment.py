"""Experiment files: every shipped one parses; bad ones fail with the file, stage and key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from protopo_ray.search.experiment import load_experiment, parse_experiment
from protopo_ray.search.plan import StagePlan
from protopo_ray.search.stages import EnsembleStage, PromotionStage, SearchStage

# Search experiments hold [[stages]]; the others (train_default, deeptmhmm_quality) are single-run configs.
EXPERIMENTS = sorted(p for p in (Path(__file__).parents[1] / "experiments").glob("*.toml") if "[[stages]]" in p.read_text())

BASE = {"data": {"path": "x"}}


def stage(**values):
    return {"stages": [{"name": "s", "grid": {"model.gc_size": [8, 16]}, **values}], **BASE}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_experiments_parse(path):
    experiment = load_experiment(path)
    assert experiment.stages and experiment.name


def test_seed_grid_has_36_trials():
    (architecture,) = load_experiment(Path(__file__).parents[1] / "experiments" / "architecture.toml").stages
    assert architecture.num_trials() == 36 and len(architecture.grid_points()) == 36


def test_each_stage_is_read_as_its_kind():
    experiment = load_experiment(Path(__file__).parents[1] / "experiments" / "full.toml")
    kinds = [type(stage) for stage in experiment.stages]
    assert kinds == [SearchStage, SearchStage, PromotionStage, EnsembleStage]
    promotion = experiment.stages[2]
    assert (promotion.top_k, promotion.from_stages) == (3, ("architecture", "regularization"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (stage(shceduler="asha"), r"stages\[0\] \(s\): unknown key 'shceduler' for a search stage \(known: "),
        (stage(top_k=2), r"unknown key 'top_k' for a search stage \(a key of promotion stages\)"),
        (stage(kind="sweep"), "kind must be one of search, promotion, ensemble, got 'sweep'"),
        ({"stages": [{"name": "s", "grid": {}}], **BASE}, "needs a non-empty \\[stages.grid\\]"),
        ({"stages": [{"name": "s", "grid": {"model.gc_size": []}}], **BASE}, "must be a non-empty list"),
        (stage(metric="val_f1"), "metric 'val_f1' is never reported by the trainer"),
        ({"stages": [{"name": "s", "grid": {"model.gc_sise": [8]}}], **BASE}, "searches 'model.gc_sise'.*unknown key"),
        ({"stages": [{"name": "s", "grid": {"train.lr": [-1.0]}}], **BASE}, "train.lr must be a positive number"),
        ({"stages": [{"name": "p", "kind": "promotion"}], **BASE}, "needs an earlier stage"),
        (stage(search="hyperopt"), "needs a non-empty \\[stages.space\\]"),
        ({"stages": [{"name": "s", "search": "hyperopt", "space": {"train.lr": {"dist": "normal"}}}], **BASE},
         "needs dist in"),
        ({**BASE}, "no \\[\\[stages\\]\\]"),
        ({"experiment": {"synthetc": 3}, **stage()}, "unknown key"),
        (stage(grace_epochs=9, max_epochs=3), "grace_epochs must be in"),
        (stage(order="random"), "order must be shuffled or listed"),
    ],
)
def test_bad_experiments_are_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        parse_experiment(values, source="bad.toml")


def test_overrides_apply_to_the_base():
    experiment = parse_experiment(stage(), overrides={"model.lstm_size": 7, "experiment.synthetic": 5})
    assert experiment.base.model.lstm_size == 7 and experiment.settings.synthetic == 5


def test_shuffled_grid_runs_every_point_once_seeded_and_at_most_max_concurrent_at_once(tmp_path):
    (architecture,) = load_experiment(Path(__file__).parents[1] / "experiments" / "architecture.toml").stages
    plan = StagePlan(kind="search", device="cpu", num_workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0,
                     accelerator_type="", trials_per_gpu=0, max_concurrent_trials=8, footprint_bytes=1)
    options = architecture.tune_options(plan, seed=0, halving_file=tmp_path / "h.json")
    points = options.search_alg._points_to_evaluate
    assert options.num_samples == len(points) == 36 and options.search_alg.max_concurrent == 8
    assert options.max_concurrent_trials is None  # the generator holds the limit: Tune ignores its own for it
    assert sorted(map(str, points)) == sorted(map(str, architecture.grid_points()))
    assert points != architecture.grid_points()  # shuffled, not as listed
    assert architecture.tune_options(plan, 0, tmp_path / "h.json").search_alg._points_to_evaluate == points


def test_prices_table_is_read_and_checked(tmp_path):
    text = (Path(__file__).parents[1] / "experiments" / "smoke.toml").read_text()
    path = tmp_path / "priced.toml"  # a top-level table after the [[stages]] array
    path.write_text(text + '\n[prices]\nnode_types = { search_a10g = 0.4 }\nspot_gpu_hour = { L4 = 0.2 }\n')
    prices = load_experiment(path).prices
    assert prices.node_types == {"search_a10g": 0.4} and prices.gpu_hour_price("L4", spot=True) == 0.2
    assert prices.gpu_hour_price("A10G", spot=False) == 1.212  # the defaults stay under what the table sets
    path.write_text(text + '\n[prices]\ngpu_hour = { A10G = "cheap" }\n')
    with pytest.raises(ValueError, match=r"priced.toml: \[prices\].*gpu_hour.A10G must be a price"):
        load_experiment(path)
