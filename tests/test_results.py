"""The experiment directory's records: round trips through the layout, costs by hand, the winner's best
checkpoint, records written before promoted_from had its own field."""

from __future__ import annotations

import json
import math

import pytest

from protopo_ray.config import Config
from protopo_ray.model.grammar import Decoding
from protopo_ray.search.budget import BudgetConfig
from protopo_ray.search.plan import StagePlan
from protopo_ray.search.results import (
    BudgetStop,
    EnsembleRecord,
    ExperimentDir,
    ExperimentError,
    ExperimentRecord,
    StageRecord,
    TrialRecord,
    WinnerRecord,
)

PLAN = StagePlan(kind="search", device="gpu", num_workers=1, cpus_per_worker=4.0, gpus_per_worker=0.5,
                 accelerator_type="A10G", trials_per_gpu=2, max_concurrent_trials=4, footprint_bytes=2**30,
                 notes=("a note",), num_trials=4, usd_per_device_hour=2.0, market="spot")


def trial(trial_id: str, status: str, epochs: int, hours: float, value: float = math.nan, **fields) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, params={"model.lstm_size": 8}, config=Config(), status=status,
                       epochs=epochs, accelerator_hours=hours, best={} if math.isnan(value) else {"val_loss": value},
                       **fields)


def stage(trials: list[TrialRecord], plan: StagePlan | None = PLAN) -> StageRecord:
    return StageRecord(stage="search", kind="search", metric="val_loss", mode="min", max_epochs=9, scheduler="asha",
                       plan=plan, trials=trials, best_trial="t1", epochs_run=14, epochs_full=36)


TRIALS = [
    trial("t0", "completed", 9, 0.9, 0.5),
    trial("t1", "stopped", 3, 0.6, 0.4),  # 0.2 h per epoch, 6 epochs not run: saves 1.2 h = $2.40
    trial("t2", "stopped", 1, 0.1, 0.7),  # 0.1 h per epoch, 8 not run: saves 0.8 h
    trial("t3", "error", 1, 0.1),         # an error saves nothing
]


def test_saving_is_epochs_not_run_times_the_trials_own_cost_per_epoch():
    record = stage(TRIALS)
    stopped = TRIALS[1].cost(record.plan, record.max_epochs)
    assert (stopped.accelerator_hours, stopped.usd) == (0.6, 1.2)
    assert stopped.saved_accelerator_hours == pytest.approx(1.2) and stopped.saved_usd == pytest.approx(2.4)
    total = record.cost()
    assert total.accelerator_hours == pytest.approx(1.7) and total.usd == pytest.approx(3.4)
    assert total.saved_accelerator_hours == pytest.approx(2.0) and total.saved_usd == pytest.approx(4.0)


def test_unknown_price_gives_hours_but_no_dollars():
    cost = stage(TRIALS, plan=None).cost()
    assert cost.accelerator_hours == pytest.approx(1.7) and math.isnan(cost.usd) and math.isnan(cost.saved_usd)


def test_trials_rank_by_the_stage_objective_with_missing_values_last():
    assert [t.trial_id for t in stage(TRIALS).ranked()] == ["t1", "t0", "t2", "t3"]


def test_records_round_trip_through_the_experiment_directory(tmp_path):
    exp = ExperimentDir(tmp_path / "exp")
    record = stage(TRIALS)
    record.ensemble = EnsembleRecord(path="/e", members={"cv1": "t0"}, out_of_fold={"topo_mean": 0.5},
                                     decoding=Decoding(entry_penalty=16.0, beta_offset=4.0, rule="vote"))
    exp.save_stage(record)
    assert exp.load_stage("search") == record
    base = Config().replace({"name": "exp"})
    exp.save_experiment(ExperimentRecord(name="exp", source="x.toml", stages=["search"], base=base))
    assert exp.load_experiment().base == base and exp.load_stages() == [record]
    winner = WinnerRecord(stage="search", trial_id="t1", params={}, config=base, val={"val_loss": 0.4},
                          test={"loss": math.nan}, checkpoint=str(exp.winner_checkpoint), source="/t1/best",
                          decoding=Decoding(entry_penalty=4.0, min_loop=3))
    exp.save_winner(winner)
    loaded = exp.load_winner()
    assert loaded.config == base and math.isnan(loaded.test["loss"])  # NaN: a type absent from the fold
    assert loaded.decoding == Decoding(entry_penalty=4.0, min_loop=3)


def test_a_budget_stop_and_the_stages_it_skipped_round_trip(tmp_path):
    exp = ExperimentDir(tmp_path)
    record = stage(TRIALS[:2])
    record.budget_stop = BudgetStop(limit="usd", usd=0.41, max_usd=0.5, wall_s=720, max_wall_s=3600,
                                    stopped_trials=["t1"], unstarted_trials=2)
    exp.save_stage(record)
    assert exp.load_stage("search") == record
    assert record.budget_stop.text() == ("stopped starting trials at $0.4100 of $0.5000 (wall 0.20 h of 1 h; the usd "
                                         "limit would be exceeded)")
    budget = BudgetConfig(max_usd=0.5, max_hours=1)
    exp.save_experiment(ExperimentRecord(name="e", source="", stages=["search", "p"], base=Config(), budget=budget,
                                         skipped={"p": "stage search stopped starting trials"}))
    loaded = exp.load_experiment()
    assert loaded.budget == budget and loaded.skipped == {"p": "stage search stopped starting trials"}
    # Records written before budgets existed: unbounded, nothing skipped.
    old = json.loads(exp.experiment_file.read_text())
    del old["budget"], old["skipped"]
    exp.experiment_file.write_text(json.dumps(old))
    assert exp.load_experiment().budget == BudgetConfig() and exp.load_experiment().skipped == {}


def test_stages_load_in_the_experiment_order_then_by_name(tmp_path):
    exp = ExperimentDir(tmp_path)
    for name in ("b", "a", "z"):
        exp.save_stage(StageRecord(stage=name, kind="search", metric="val_loss", mode="min", max_epochs=1))
    assert [s.stage for s in exp.load_stages()] == ["a", "b", "z"]
    exp.save_experiment(ExperimentRecord(name="e", source="", stages=["z", "b"], base=Config()))
    assert [s.stage for s in exp.load_stages()] == ["z", "b", "a"]


def test_a_record_of_the_old_layout_keeps_its_promotion_origin(tmp_path):
    old = {"trial_id": "p1", "params": {"model.lstm_size": 8, "promoted_from": "a2"}, "config": {"name": "x"},
           "status": "completed", "epochs": 4}
    record = TrialRecord.from_json(old)
    assert record.promoted_from == "a2" and record.params == {"model.lstm_size": 8}


def test_malformed_records_name_the_file(tmp_path):
    exp = ExperimentDir(tmp_path)
    exp.stages_dir.mkdir()
    exp.stage_file("broken").write_text("{not json")
    with pytest.raises(ExperimentError, match=r"broken.json: not valid JSON"):
        exp.load_stages()
    exp.stage_file("broken").write_text(json.dumps({"stage": "broken"}))
    with pytest.raises(ExperimentError, match="missing kind, metric, mode, max_epochs"):
        exp.load_stages()


def test_best_checkpoint_is_best_dir_when_complete_else_the_latest(tmp_path):
    config = Config().replace({"name": "run", "resources.storage": str(tmp_path)})
    record = TrialRecord(trial_id="t", params={}, config=config, status="completed", checkpoint="/latest")
    assert record.best_checkpoint() == "/latest"
    (tmp_path / "run" / "best").mkdir(parents=True)
    assert record.best_checkpoint() == "/latest"  # an interrupted copy: no meta.json yet
    (tmp_path / "run" / "best" / "meta.json").write_text("{}")
    assert record.best_checkpoint() == str(tmp_path / "run" / "best")
