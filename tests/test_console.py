"""The search console: trial events and the stage status from real Tune trials, a tiny real Tuner, the log route."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from protopo_ray.config import Config
from protopo_ray.model.grammar import Decoding
from protopo_ray.search.console import SearchConsole, StageView, describe_params, format_duration
from protopo_ray.search.results import WinnerRecord

pytest.importorskip("ray")


def plain_console() -> tuple:
    out = io.StringIO()
    from rich.console import Console

    return Console(file=out, width=200, force_terminal=False, color_system=None), out


def make_trial(tmp_path: Path, trial_id: str, config: dict):
    """A real Tune Trial with its own storage, as the Tune controller builds one (Ray must be running)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    trial = Trial("run_trial", config=config, trial_id=trial_id, stub=True,
                  storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="stage"))
    trial.init_local_path()
    return trial


def report(view: StageView, trial, result: dict) -> None:
    """What Tune does with a result: the trial's last result first, then the callbacks."""
    trial.update_last_result(result)
    view.on_trial_result(iteration=0, trials=[trial], trial=trial, result=result)


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 60, 754, 3600 + 125)] == ["0s", "59s", "1m00s", "12m34s", "1h02m"]


def test_describe_params_grid_point_and_promotion():
    assert describe_params({"model.gc_size": 16, "train.lr": 0.003}) == "gc_size=16 lr=0.003"
    promoted = {"continue": {"from_trial": "ab_00001", "from_stage": "architecture", "start_epoch": 6}}
    assert describe_params(promoted) == "from ab_00001 (architecture, epoch 6)"


def test_stage_view_counts_events_and_best(ray_cluster, tmp_path):
    console, out = plain_console()
    view = StageView(stage="architecture", metric="val_loss", mode="min", max_epochs=4, num_trials=3,
                     scheduler="ASHA", console=console, live=False)
    view.setup(total_num_samples=3)
    fast = make_trial(tmp_path, "t_00000", {"model.gc_size": 16})
    slow = make_trial(tmp_path, "t_00001", {"model.gc_size": 32})
    for trial in (fast, slow):
        view.on_trial_start(iteration=0, trials=[fast, slow], trial=trial)
    assert view.remaining_s() is None  # no epoch yet
    for epoch, (a, b) in enumerate([(0.9, 1.2), (0.7, 1.1)], start=1):
        report(view, fast, {"epoch": epoch, "val_loss": a, "time_this_iter_s": 2.0})
        report(view, slow, {"epoch": epoch, "val_loss": b, "time_this_iter_s": 4.0})
    view.on_trial_complete(iteration=0, trials=[fast, slow], trial=slow)  # ASHA stops it after epoch 2
    assert view.counts() == {"running": 1, "completed": 0, "stopped": 1, "errored": 0}
    # Run: 2 + 2; at most: the running trial's 4, the stopped one's 2 and the third, unstarted trial's 4.
    assert view.epochs() == (4, 10)
    # Left: 2 epochs x 2 s of the running trial, 4 x 3 s (the mean epoch) of the unstarted one, on 2 slots.
    assert view.remaining_s() == pytest.approx((2 * 2.0 + 4 * 3.0) / 2)
    for epoch, value in [(3, 0.75), (4, 0.6)]:  # a worse epoch leaves the trial's best alone
        report(view, fast, {"epoch": epoch, "val_loss": value})
    view.on_trial_complete(iteration=0, trials=[fast, slow], trial=fast)
    best = view.best()
    assert (best.trial_id, best.best) == ("t_00000", 0.6)
    assert "best val_loss 0.6 (t_00000)" in view.status_line()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # two starts, one stop, one completion: nothing per epoch
    assert "started" in lines[0] and "t_00000 gc_size=16" in lines[0]
    assert "stopped" in lines[2] and "early by ASHA at epoch 2, best val_loss 1.1" in lines[2]
    assert "completed" in lines[3] and "4 epochs, best val_loss 0.6" in lines[3]


def test_stage_view_promoted_trial_budget_and_error(ray_cluster, tmp_path):
    console, out = plain_console()
    view = StageView(stage="promotion", metric="val_loss", mode="min", max_epochs=10, num_trials=2,
                     start_epoch=6, console=console, live=False)
    assert view.epochs() == (0, 8)  # before any trial starts: each continues from epoch 6 to 10
    cont = {"from_trial": "a_00001", "from_stage": "architecture", "start_epoch": 6, "checkpoint": "/x",
            "params": {}, "overrides": {}}
    kept = make_trial(tmp_path, "p_00000", {"continue": cont})
    broken = make_trial(tmp_path, "p_00001", {"continue": {**cont, "from_trial": "a_00002"}})
    for trial in (kept, broken):
        view.on_trial_start(iteration=0, trials=[kept, broken], trial=trial)
    assert view.epochs() == (0, 8)  # started: each trial's own budget from its continuation
    for epoch in range(7, 11):
        report(view, kept, {"epoch": epoch, "val_loss": 1.0 / epoch})
    report(view, broken, {"epoch": 7, "val_loss": 0.5})
    view.on_trial_complete(iteration=0, trials=[kept, broken], trial=kept)
    broken.handle_error(RuntimeError("CUDA out of memory"))  # what Tune does before on_trial_error
    view.on_trial_error(iteration=0, trials=[kept, broken], trial=broken)
    assert view.counts() == {"running": 0, "completed": 1, "stopped": 0, "errored": 1}
    assert view.epochs() == (5, 5)
    lines = out.getvalue().splitlines()
    assert "from a_00001 (architecture, epoch 6)" in lines[0]
    assert "completed" in lines[2] and "10 epochs" in lines[2]  # promotion: no scheduler, it ran its budget
    assert "errored" in lines[3] and "at epoch 7: CUDA out of memory" in lines[3]
    assert broken.error_file in lines[3]


def test_trials_the_budget_stopped_or_left_untrained_say_so(ray_cluster, tmp_path):
    from protopo_ray.search.guard import BUDGET_KEY
    from protopo_ray.search.results import BudgetStop, StageRecord

    console, out = plain_console()
    view = StageView(stage="architecture", metric="val_loss", mode="min", max_epochs=4, num_trials=3,
                     scheduler="ASHA", console=console, live=False)
    view.stop_reason = lambda trial_id: "the budget" if trial_id == "b_00000" else None
    ran, late = make_trial(tmp_path, "b_00000", {"model.gc_size": 16}), make_trial(tmp_path, "b_00001", {})
    for trial in (ran, late):
        view.on_trial_start(iteration=0, trials=[ran, late], trial=trial)
    report(view, ran, {"epoch": 1, "val_loss": 0.9})
    report(view, late, {"epoch": 0, "val_loss": float("nan"), BUDGET_KEY: 1.0})
    for trial in (ran, late):
        view.on_trial_complete(iteration=0, trials=[ran, late], trial=trial)
    lines = out.getvalue().splitlines()
    assert "stopped" in lines[2] and "early by the budget at epoch 1" in lines[2]
    assert "skipped" in lines[3] and "the budget ran out before it trained" in lines[3]
    search, out = plain_console()
    display = SearchConsole(console=search)
    record = StageRecord(stage="architecture", kind="search", metric="val_loss", mode="min", max_epochs=4,
                         budget_stop=BudgetStop(limit="wall", usd=0.0, max_usd=None, wall_s=3600, max_wall_s=3600,
                                                stopped_trials=["b_00000"], unstarted_trials=2))
    display.stage_done(record)
    display.stage_skipped("promotion", "stage architecture stopped starting trials")
    text = out.getvalue()
    assert ("budget: stage architecture stopped starting trials at $0.0000 (wall 1.00 h of 1 h; the wall limit would "
            "be exceeded); 1 trial(s) stopped at the end of their epoch, 2 not started") in text
    assert "budget: stage promotion not started: stage architecture stopped starting trials" in text


def test_a_trial_restored_by_resume_keeps_its_best_from_before(ray_cluster, tmp_path):
    """--resume: Tune restores a trial with the results it had; the console's best counts them too."""
    console, out = plain_console()
    before = make_trial(tmp_path, "r_00000", {"model.gc_size": 16})
    for epoch, value in [(1, 0.5), (2, 0.68), (3, 0.66)]:  # reported before the interruption
        before.update_last_result({"epoch": epoch, "val_topo_mean": value})
    view = StageView(stage="ensemble", metric="val_topo_mean", mode="max", max_epochs=5, num_trials=1,
                     console=console, live=False)
    view.on_trial_start(iteration=0, trials=[before], trial=before)
    assert view.epochs() == (3, 5)
    report(view, before, {"epoch": 4, "val_topo_mean": 0.67})
    view.on_trial_complete(iteration=0, trials=[before], trial=before)
    assert view.best().best == pytest.approx(0.68)
    assert "best val_topo_mean 0.68" in out.getvalue().splitlines()[-1]


def test_stage_view_pickles_without_its_terminal():
    """Tune pickles the run config with its callbacks (tuner.pkl): the view must survive that."""
    import ray.cloudpickle as cloudpickle

    view = StageView(stage="architecture", metric="val_loss", mode="min", max_epochs=6, num_trials=4)
    copy = cloudpickle.loads(cloudpickle.dumps(view))
    assert (copy.stage, copy.max_epochs, copy.num_trials, copy.trials) == ("architecture", 6, 4, {})


def test_tiny_tuner_with_the_view(ray_cluster, tmp_path):
    """A real 3-trial ASHA grid reports through the view: one start and one end line per trial, the right best."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    def trainable(config):
        for epoch in range(1, 4):
            tune.report({"epoch": epoch, "val_loss": config["x"] + 1.0 / epoch})

    console, out = plain_console()
    view = StageView(stage="grid", metric="val_loss", mode="min", max_epochs=3, num_trials=3, scheduler="ASHA",
                     console=console, live=False)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.5}),
        param_space={"x": tune.grid_search([0.0, 1.0, 2.0])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", max_concurrent_trials=2,
                                    scheduler=ASHAScheduler(time_attr="epoch", max_t=3, grace_period=1,
                                                            reduction_factor=2)),
        run_config=tune.RunConfig(name="grid", storage_path=str(tmp_path), callbacks=[view], verbose=0),
    )
    with view:
        results = tuner.fit()
    assert not results.errors
    counts = view.counts()
    assert counts["running"] == 0 and counts["completed"] + counts["stopped"] == 3 and counts["completed"] >= 1
    assert view.best().best == pytest.approx(1 / 3)  # x = 0 at epoch 3
    assert describe_params(results.get_best_result().config) == view.best().label == "x=0"
    lines = out.getvalue().splitlines()
    assert sum("started" in line for line in lines) == 3
    assert sum(("completed" in line) or ("stopped" in line) for line in lines) == 3


def test_summary_names_winner_test_metrics_report_and_logs(tmp_path):
    console, out = plain_console()
    display = SearchConsole(log_path=tmp_path / "logs" / "ray.log", console=console)
    winner = WinnerRecord(stage="promotion", trial_id="p_00000", params={"model.gc_size": 32}, promoted_from="a_1",
                          config=Config(), val={"val_loss": 0.41234, "epoch": 9}, source="/a_1/best",
                          checkpoint=str(tmp_path / "winner" / "checkpoint"),
                          test={"loss": 0.5, "residue_acc": 0.875, "type_acc": 0.75, "topo_mean": 0.5,
                                "overlap_acc": 0.5, "n_proteins": 40, "topo_tm": 0.7, "n_tm": 10, "topo_beta": 0.4,
                                "n_beta": 5}, decoding=Decoding(entry_penalty=4.0, min_loop=3, strand_penalty=-2.0))
    display.summary(winner=winner, report=tmp_path / "report.md", metric="val_loss")
    text = out.getvalue()
    assert "p_00000 (promotion, from a_1)  gc_size=32" in text
    assert "val_loss 0.4123 at epoch 9" in text
    assert "loss 0.5, residue acc 0.875, type acc 0.75, topology acc (mean) 0.5, overlap acc 0.5, on 40 proteins" in text
    assert str(tmp_path / "report.md") in text and "ray.log" in text
    assert "TM 0.7 (10), BETA 0.4 (5)  (per type, test proteins in brackets)" in text
    assert "entry penalty 4, strand penalty -2, helix loops >= 3, beta offset 0, length priors x1, rule mean" in text
    assert "test FASTA" not in text  # no from-sequence figures recorded: no such row


def test_summary_shows_the_winner_from_sequence_beside_its_shard_graphs(tmp_path):
    """search.run records the test split from sequence alone as fasta_*: the console shows both, each per type."""
    console, out = plain_console()
    display = SearchConsole(console=console)
    test = {"overlap_acc": 0.9, "n_proteins": 40, "topo_tm": 0.8, "n_tm": 10}
    test.update({f"fasta_{k}": v for k, v in {"overlap_acc": 0.55, "n_proteins": 40, "topo_tm": 0.4, "n_tm": 10}.items()})
    winner = WinnerRecord(stage="promotion", trial_id="p_00000", params={}, config=Config(), val={}, source="/s",
                          checkpoint=str(tmp_path / "ckpt"), test=test)
    display.summary(winner=winner, report=tmp_path / "report.md")
    lines = out.getvalue().splitlines()
    shards_row = next(line for line in lines if line.startswith("test ") and "FASTA" not in line)
    fasta_row = next(line for line in lines if line.startswith("test FASTA"))
    assert "overlap acc 0.9, on 40 proteins" in shards_row and "0.55" not in shards_row
    assert "overlap acc 0.55, on 40 proteins" in fasta_row
    assert any("TM 0.8 (10)  (per type, test proteins" in line for line in lines)
    assert any("TM 0.4 (10)  (per type, from sequence alone, test proteins" in line for line in lines)


def test_route_logs_keeps_python_stderr_and_files_the_rest(tmp_path):
    """Ray's logger, warnings and native writes to fd 2 go to the file; Python's sys.stderr stays the terminal."""
    log = tmp_path / "logs" / "ray.log"
    script = textwrap.dedent(f"""
        import logging, os, sys, warnings
        from protopo_ray.cluster.logs import route_logs
        logging.basicConfig(level=logging.WARNING)
        route_logs({str(log)!r})
        logging.getLogger("ray.tune").warning("from ray.tune")
        logging.getLogger("wandb").warning("from a library")
        warnings.warn("a warning")
        os.write(2, b"from native code\\n")
        print("for the user", file=sys.stderr)
        raise SystemExit("an error the user sees")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "for the user" in proc.stderr and "an error the user sees" in proc.stderr
    assert "from" not in proc.stderr and "warning" not in proc.stderr
    text = log.read_text()
    for expected in ("from ray.tune", "from a library", "a warning", "from native code"):
        assert expected in text
