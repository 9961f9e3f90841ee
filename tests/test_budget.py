"""The search's budget: the `[budget]` table, the guard that stops starting trials (hand-fed epochs, then a real
smoke search on the shared local cluster), retries per pool, and node types that never come up."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from protopo_ray.search.budget import BudgetConfig
from protopo_ray.search.experiment import parse_experiment
from protopo_ray.search.results import ExperimentDir

pytest.importorskip("ray")

from rich.console import Console  # noqa: E402

from protopo_ray.search import trials  # noqa: E402
from protopo_ray.search.guard import BudgetGuard, NodeWatch, pool_node_types  # noqa: E402
from protopo_ray.search.plan import StagePlan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRID = {"name": "a", "grid": {"model.gc_size": [8, 16]}}


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=300, force_terminal=False, color_system=None), out


def test_budget_table_is_read_and_checked():
    exp = parse_experiment({"budget": {"max_usd": 2.5, "max_hours": 0.5}, "stages": [GRID]}, source="x.toml")
    assert (exp.budget.max_usd, exp.budget.max_wall_s, exp.budget.node_wait_s) == (2.5, 1800, 900)
    assert parse_experiment({"stages": [GRID]}, source="x.toml").budget == BudgetConfig()  # unbounded
    for table, message in [({"max_usd": 0}, "max_usd must be a number > 0"), ({"max_hours": True}, "max_hours"),
                           ({"node_wait_s": -1}, "node_wait_s"), ({"max_dollars": 1}, r"unknown key\(s\) \['max_dollars'\]")]:
        with pytest.raises(ValueError, match=rf"x.toml: \[budget\].*{message}"):
            parse_experiment({"budget": table, "stages": [GRID]}, source="x.toml")
    assert BudgetConfig(max_usd=1.0).exceeded(0.99, 10**6) is None
    assert BudgetConfig(max_usd=1.0, max_hours=1).exceeded(1.0, 0) == "usd"
    assert BudgetConfig(max_hours=1).exceeded(5.0, 3600) == "wall"


def trial(trial_id: str, status: str = "RUNNING"):
    return SimpleNamespace(trial_id=trial_id, status=status, config={"model.gc_size": 8})


def test_guard_lets_running_trials_end_their_epoch_then_starts_no_other():
    console, out = plain_console()
    # $3.60 per trial-hour: a 100 s epoch costs $0.10. Earlier stages spent $0.50 of $0.85.
    guard = BudgetGuard(BudgetConfig(max_usd=0.85), stage="a", rate=lambda params: 3.6, spent_usd=0.5, console=console)
    guard.setup()
    a, b, c = trial("a"), trial("b"), trial("c", "PENDING")
    guard.on_step_begin(0, [a, b, c])
    guard.on_trial_start(0, [a, b, c], a)
    guard.on_trial_start(0, [a, b, c], b)
    # $0.60 spent; a's next epoch + b's (0 measured yet) + a new trial's epoch = $0.80: within it.
    assert guard("a", {"epoch": 1, "epoch_time_s": 100}) is False
    assert not guard.stop_all()
    # b reports: $0.70 spent, + a's and b's epochs under way + a new one's = $1.00 > $0.85: b stops after its epoch.
    assert guard("b", {"epoch": 1, "epoch_time_s": 100}) is True
    assert guard.stop.limit == "usd" and abs(guard.stop.usd - 0.7) < 1e-9 and guard.stop.stopped_trials == ["b"]
    guard.on_trial_complete(0, [a, b, c], b)
    assert not guard.stop_all()  # a still runs its epoch: the stage goes on until it has reported and ended
    assert guard("a", {"epoch": 2, "epoch_time_s": 100}) is True
    assert not guard.stop_all()  # Tune registers a's checkpoint after the stop decision
    a.status = "TERMINATED"
    guard.on_step_begin(1, [a, b, c])
    assert guard.stop_all()  # nothing runs on: the pending trial c never starts
    assert guard.stop.stopped_trials == ["b", "a"] and abs(guard.spent() - 0.8) < 1e-9
    text = out.getvalue()
    assert "budget: stopped starting trials at $0.7000 of $0.8500" in text and "no new trial starts" in text


def test_trials_started_after_the_stop_find_its_marker_and_wall_time_counts_earlier_stages(tmp_path):
    marker = tmp_path / "budget" / "a.stop"
    guard = BudgetGuard(BudgetConfig(max_usd=1.0), stage="a", rate=lambda params: 36.0, marker=str(marker),
                        console=plain_console()[0])
    a, b, c = trial("a"), trial("b"), trial("c")
    guard.on_trial_start(0, [a], a)
    guard.on_trial_start(0, [a, b], b)
    assert guard("a", {"epoch_time_s": 100})  # $1.00 spent: a stops, b ends its epoch
    assert "stopped starting trials at $1.00 of $1.00" in marker.read_text()  # what trials.run_trial checks
    guard.on_trial_start(0, [a, b, c], c)  # Tune filled a's slot: c returns at the marker, the stage waits for b only
    guard.on_trial_complete(0, [a, b, c], a)
    assert not guard.stop_all()
    assert guard("b", {"epoch_time_s": 100}) and not guard.stop_all()
    guard.on_trial_complete(0, [a, b, c], b)
    assert guard.stop_all()
    wall = BudgetGuard(BudgetConfig(max_hours=1), stage="b", rate=lambda params: None, spent_wall_s=3590,
                       console=plain_console()[0])
    wall.setup()
    wall.on_trial_start(0, [a], a)
    assert wall("a", {"epoch_time_s": 20}) is True and wall.stop.limit == "wall"  # 3590 s + 20 s epoch > 1 h
    assert wall.spent() == 0.0  # no price: no dollars, the wall limit still holds


def test_retries_per_pool_spot_more_than_on_demand(tmp_path):
    exp = parse_experiment({"resources": {"spot_max_failures": 6}, "stages": [GRID]}, source="x.toml")
    plan = StagePlan(kind="search", device="cpu", num_workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0,
                     accelerator_type="", trials_per_gpu=0, max_concurrent_trials=2, footprint_bytes=1,
                     usd_per_device_hour=0.048, market="on-demand")
    ctx = trials.StageContext(stage=exp.stages[0], base=exp.base, plan=plan, train_storage=str(tmp_path), longest=100)
    assert trials.trial_retries(ctx) == 1
    for market in ("spot", "mixed"):
        spot = dataclasses.replace(ctx, plan=dataclasses.replace(plan, market=market))
        assert trials.trial_retries(spot) == 6
    # The live budget prices a trial as its record will: 1 CPU x $0.048 per vCPU-hour.
    assert trials.trial_usd_per_hour(ctx, {"model.gc_size": 8}) == pytest.approx(0.048)
    with pytest.raises(ValueError, match="resources.spot_max_failures must be >= -1"):
        parse_experiment({"resources": {"spot_max_failures": -2}, "stages": [GRID]}, source="x.toml")


@pytest.mark.ray
def test_a_trial_that_starts_after_the_marker_trains_nothing(ray_cluster, tmp_path):
    from ray import tune

    from protopo_ray.search.guard import BUDGET_KEY, write_marker

    exp = parse_experiment({"stages": [{**GRID, "metric": "val_loss", "mode": "min"}]}, source="x.toml")
    plan = StagePlan(kind="search", device="cpu", num_workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0,
                     accelerator_type="", trials_per_gpu=0, max_concurrent_trials=1, footprint_bytes=1)
    marker = str(tmp_path / "budget" / "a.stop")
    write_marker(marker, "stopped starting trials")
    ctx = trials.StageContext(stage=exp.stages[0], base=exp.base.replace({"data.path": str(tmp_path / "none")}),
                              plan=plan, train_storage=str(tmp_path / "train"), longest=100, budget_marker=marker)
    tuner = tune.Tuner(tune.with_parameters(trials.run_trial, ctx=ctx), param_space={"model.gc_size": 8},
                       tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))
    (result,) = tuner.fit()
    # No data at data.path: had it trained, the trial would have failed.
    assert result.error is None and result.metrics[BUDGET_KEY] == 1.0 and result.metrics["epoch"] == 0


NODE_TYPES = {"cpu_worker": {"resources": {"CPU": 8}},
              "search_a10g": {"resources": {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}},
              "promotion_a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}}}


def test_a_node_type_of_the_pool_that_never_comes_up_is_named_once_while_trials_wait():
    plan = StagePlan(kind="search", device="gpu", num_workers=1, cpus_per_worker=1.0, gpus_per_worker=0.25,
                     accelerator_type="A10G", trials_per_gpu=4, max_concurrent_trials=4, footprint_bytes=1)
    assert list(pool_node_types(plan, NODE_TYPES)) == ["search_a10g"]
    assert list(pool_node_types(StagePlan(**{**plan.to_json(), "accelerator_type": ""}), NODE_TYPES)) == [
        "search_a10g", "promotion_a100"]
    assert list(pool_node_types(StagePlan(**{**plan.to_json(), "device": "cpu"}), NODE_TYPES)) == ["cpu_worker"]
    console, out = plain_console()
    live = {"search_a10g": 0}
    watch = NodeWatch(pool_node_types(plan, NODE_TYPES), stage="architecture", wait_s=30, console=console,
                      every_s=0.0, count_live=lambda types: live)
    watch.setup()
    watch.on_step_end(0, [trial("a", "PENDING")])  # before wait_s: a node may still be launching
    assert out.getvalue() == ""
    watch.started -= 60  # a minute into the stage
    watch.on_step_end(0, [trial("a", "RUNNING")])  # nothing waits for a node: nothing to say
    assert out.getvalue() == ""
    watch.on_step_end(1, [trial("a", "PENDING"), trial("b", "PENDING")])
    watch.on_step_end(2, [trial("a", "PENDING")])
    assert out.getvalue().count("nodes: no search_a10g node has come up") == 1 and "(2 trial(s) waiting)" in out.getvalue()


@pytest.mark.ray
def test_smoke_search_stops_starting_trials_at_its_budget_and_picks_the_winner_from_what_ran(ray_cluster, smoke_shards,
                                                                                             tmp_path):
    toml = tmp_path / "budget.toml"
    # A grid of four on a 2-CPU cluster (two at once) and a promotion; any epoch costs more than the budget.
    toml.write_text((REPO / "experiments" / "smoke.toml").read_text().split("[[stages]]")[0]
                    + "[budget]\nmax_usd = 1e-9\n"
                    + '[[stages]]\nname = "architecture"\nmetric = "val_loss"\nmode = "min"\nmax_epochs = 2\n'
                      'scheduler = "none"\n[stages.grid]\n"model.lstm_size" = [16, 8]\n"train.lr" = [3e-3, 1e-3]\n'
                    + '[[stages]]\nname = "promotion"\nkind = "promotion"\ntop_k = 1\nmetric = "val_loss"\n'
                      'mode = "min"\nmax_epochs = 3\n')
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "WANDB_MODE": "offline", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-m", "protopo_ray.tune", str(toml), "--data", str(smoke_shards),
                           "--storage", str(tmp_path), "--no-wandb"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp = ExperimentDir(tmp_path / "smoke")
    record = exp.load_stage("architecture")
    stop = record.budget_stop
    assert stop is not None and stop.limit == "usd" and stop.max_usd == 1e-9
    # The trials running when the budget ran out (both, unless one was still starting) ended their first epoch,
    # checkpoint kept; the rest of the grid trained nothing.
    assert len(record.trials) in (1, 2) and all(t.epochs == 1 and t.checkpoint and t.status == "budget"
                                                for t in record.trials), done.stdout
    assert stop.unstarted_trials == 4 - len(record.trials) and set(stop.stopped_trials) >= {t.trial_id for t in record.trials}
    # Spent when it stopped: the first epoch, priced as the record prices it (which holds every epoch that ran).
    assert 0 < stop.usd <= record.cost().usd * (1 + 1e-9)
    assert not exp.stage_file("promotion").exists()
    assert "promotion" in exp.load_experiment().skipped
    winner = exp.load_winner()
    assert winner.stage == "architecture" and winner.trial_id == record.best_trial
    assert "budget: stopped starting trials at $" in done.stdout
    assert "budget: stage promotion not started" in done.stdout
    report = (exp.root / "report.md").read_text()
    assert "Budget: stage `architecture` stopped starting trials at $" in report and "not started" in report
    assert "| stopped by the budget |" in report
