"""The experiment report on an experiment directory written through the real record classes (values chosen so
best / mean / ratios / costs are exact and computed by hand in the comments)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from protopo_ray.config import Config
from protopo_ray.report import main
from protopo_ray.reporting.markdown import batch_size_table, epochs_ratio, top_trials, write_report
from protopo_ray.search.budget import BudgetConfig
from protopo_ray.search.plan import StagePlan
from protopo_ray.search.results import (
    BudgetStop,
    ExperimentDir,
    ExperimentError,
    ExperimentRecord,
    StageRecord,
    TrialRecord,
    WinnerRecord,
)

NAN = math.nan
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]
PLAN = StagePlan(kind="search", device="gpu", num_workers=1, cpus_per_worker=4.0, gpus_per_worker=0.5,
                 accelerator_type="H100", trials_per_gpu=2, max_concurrent_trials=4, footprint_bytes=2**30,
                 usd_per_device_hour=4.0, market="spot")


def _metrics(overlap=0.5, loss=1.0, tm=NAN, sptm=NAN, sp=NAN, glob=NAN, beta=NAN, epoch=1.0) -> dict:
    return {
        "epoch": epoch, "val_loss": loss, "val_overlap_acc": overlap, "val_type_acc": 0.9,
        "val_topo_tm": tm, "val_topo_sptm": sptm, "val_topo_sp": sp, "val_topo_glob": glob, "val_topo_beta": beta,
        "train_loss": loss + 0.1, "train_grad_norm_mean": 1.0 / epoch, "train_grad_norm_max": 3.0 / epoch,
    }


def _trial(trial_id, params, best, *, status="completed", epochs=4, batch_size=None, start_epoch=0,
           **fields) -> TrialRecord:
    history = [{**best, "epoch": float(start_epoch + e + 1), "train_grad_norm_mean": 2.0 / (e + 1),
                "val_overlap_acc": best["val_overlap_acc"] * (e + 1) / epochs,
                "val_loss": best["val_loss"] + (epochs - e - 1) * 0.1} for e in range(epochs)]
    batch_size = batch_size if batch_size is not None else params.get("data.batch_size", 32)
    config = Config().replace({"name": trial_id, "data.batch_size": batch_size, "model.gc_size": 64})
    return TrialRecord(trial_id=trial_id, params=params, config=config, status=status, epochs=epochs,
                       start_epoch=start_epoch, best=best, last=history[-1] if history else {}, history=history,
                       checkpoint=f"/ckpt/{trial_id}" if epochs else None, accelerator_hours=0.125, **fields)


def _stage(name, trials, best_trial, *, kind="search", metric="val_overlap_acc", mode="max", max_epochs=4, run=0,
           full=0) -> StageRecord:
    return StageRecord(stage=name, kind=kind, metric=metric, mode=mode, max_epochs=max_epochs, grace_epochs=1,
                       scheduler="asha" if kind == "search" else "none", search="grid", plan=PLAN, wall_time_s=600.0,
                       best_trial=best_trial, trials=trials, epochs_run=run, epochs_full=full)


# Architecture (max overlap): order a2 (0.80), a1 (0.70), a4 (0.65), a3 (0.50). BETA absent everywhere.
ARCH = [
    _trial("a1", {"model.gc_size": 32, "data.batch_size": 16}, _metrics(0.70, tm=0.6, sptm=0.5, sp=0.9, glob=0.95)),
    _trial("a2", {"model.gc_size": 64, "data.batch_size": 32}, _metrics(0.80, tm=0.8, sptm=0.4, sp=0.9, glob=0.9)),
    _trial("a3", {"model.gc_size": 64, "data.batch_size": 16}, _metrics(0.50, tm=0.3, sptm=0.2), status="stopped",
           epochs=1),
    _trial("a4", {"model.gc_size": 32, "data.batch_size": 32}, _metrics(0.65, tm=0.5, sptm=0.7), status="stopped",
           epochs=1),
]
# Regularisation (min val_loss), batch size only in the config: order r2 (0.30), r1 (0.40), r3 (0.55), r4 (error).
REG = [
    _trial("r1", {"train.lr": 1e-3}, _metrics(0.6, loss=0.40, tm=0.85, sptm=0.6, beta=0.75), epochs=3, batch_size=32),
    _trial("r2", {"train.lr": 3e-4}, _metrics(0.7, loss=0.30, tm=0.9, sptm=0.5, beta=0.25), epochs=3, batch_size=32),
    _trial("r3", {"train.lr": 1e-2}, _metrics(0.2, loss=0.55, tm=0.2, sptm=0.1), status="stopped", epochs=1,
           batch_size=32),
    _trial("r4", {"train.lr": 1.0}, {"val_overlap_acc": NAN, "val_loss": NAN}, status="error", epochs=0,
           batch_size=32),
]
# Promotion continues a2 from epoch 4; its batch size 32 and TM 0.99 must not enter the (search-only) batch table.
PROMO = [_trial("p1", {"model.gc_size": 64, "data.batch_size": 32}, _metrics(0.9, tm=0.99, sptm=0.9), epochs=4,
                start_epoch=4, resumed_from="/ckpt/a2", promoted_from="a2")]


def _build(root: Path) -> Path:
    exp = ExperimentDir(root)
    stages = [
        _stage("architecture", ARCH, "a2", run=10, full=16),
        _stage("regularisation", REG, "r2", metric="val_loss", mode="min", max_epochs=3, run=7, full=12),
        _stage("promotion", PROMO, "p1", kind="promotion", max_epochs=8, run=4, full=4),
    ]
    exp.save_experiment(ExperimentRecord(name="toy", source="toy.toml", stages=[s.stage for s in stages],
                                         base=Config()))
    for stage in stages:
        exp.save_stage(stage)  # NaN -> JSON NaN, as Python writes
    exp.save_winner(WinnerRecord(
        stage="promotion", trial_id="p1", params=PROMO[0].params, config=PROMO[0].config, val=PROMO[0].best,
        test={"topo_tm": 0.75, "topo_sptm": 0.5, "topo_sp": 0.875, "topo_glob": 1.0, "topo_beta": NAN,
              "type_tm": 0.8, "type_sptm": 0.6, "type_sp": 0.9, "type_glob": 1.0, "type_beta": NAN,
              "type_acc": 0.825, "overlap_acc": 0.7, "residue_acc": 0.9, "loss": 0.35,
              "n_tm": 4, "n_sptm": 2, "n_sp": 8, "n_glob": 10, "n_beta": 0},
        checkpoint=str(exp.winner_checkpoint), source="/ckpt/p1/best", promoted_from="a2"))
    return root


@pytest.fixture
def exp_dir(tmp_path: Path) -> Path:
    return _build(tmp_path / "exp")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, str]:
    """One experiment directory with its report written once (plots take a second or two)."""
    exp = _build(tmp_path_factory.mktemp("written") / "exp")
    return exp, write_report(exp).read_text()


def _section(report: str, title: str) -> str:
    start = report.index(title)
    end = report.find("\n## ", start + 1)
    return report[start:] if end < 0 else report[start:end]


def _row(section: str, first_cells: str) -> str:
    return next(line for line in section.splitlines() if line.startswith(first_cells))


def test_batch_size_table_best_and_mean_over_search_stages(exp_dir):
    stages = ExperimentDir(exp_dir).load_stages()
    table = batch_size_table(stages)
    assert list(table) == [16, 32]
    assert table[16]["trials"] == 2 and table[32]["trials"] == 6  # a2 a4 r1-r4; promotion excluded
    assert table[16]["tm"] == pytest.approx((0.6, 0.45))
    assert table[16]["sptm"] == pytest.approx((0.5, 0.35))
    assert all(math.isnan(v) for v in table[16]["beta"])
    assert table[32]["tm"] == pytest.approx((0.9, (0.8 + 0.5 + 0.85 + 0.9 + 0.2) / 5))
    assert table[32]["sptm"] == pytest.approx((0.7, (0.4 + 0.7 + 0.6 + 0.5 + 0.1) / 5))
    assert table[32]["beta"] == pytest.approx((0.75, 0.5))


def test_top_trials_ranked_by_one_metric_across_stages(exp_dir):
    # Stages disagree (val_loss for regularisation): all ranked by the last stage's val_overlap_acc, max.
    stages = ExperimentDir(exp_dir).load_stages()
    top = [(name, trial.trial_id) for name, trial in top_trials(stages)]
    assert top == [("promotion", "p1"), ("architecture", "a2"), ("architecture", "a1"), ("regularisation", "r2"),
                   ("architecture", "a4")]


def test_epochs_ratio_of_the_recorded_counts():
    assert epochs_ratio(_stage("s", [], None, run=10, full=16)) == (10, 16, 0.625)
    run, full, ratio = epochs_ratio(_stage("s", [], None))
    assert (run, full) == (0, 0) and math.isnan(ratio)


def test_report_lists_trials_in_metric_order(written):
    _, report = written
    for trial_id in ["a1", "a2", "a3", "a4", "r1", "r2", "r3", "r4", "p1"]:
        assert f"`{trial_id}`" in report
    arch = _section(report, "## Stage `architecture`")
    positions = [arch.index(f"| `{t}`") for t in ("a2", "a1", "a4", "a3")]
    assert positions == sorted(positions)
    reg = _section(report, "## Stage `regularisation`")
    positions = [reg.index(f"| `{t}`") for t in ("r2", "r1", "r3", "r4")]
    assert positions == sorted(positions)
    # Stages in the experiment's order, not alphabetical.
    assert report.index("`architecture` (") < report.index("`regularisation` (") < report.index("`promotion` (")


def test_report_rows_status_absent_types_and_asha(written):
    _, report = written
    arch = _section(report, "## Stage `architecture`")
    # #, trial, gc_size, batch, val loss, TM, SP+TM, SP, GLOB, BETA, type acc, overlap, epochs, status, accel-h,
    # USD (0.125 h x $4), saved accel-h, saved USD
    assert _row(arch, "| 1 | `a2` |") == (
        "| 1 | `a2` | 64 | 32 | 1.0000 | 0.8000 | 0.4000 | 0.9000 | 0.9000 | n/a | 0.9000 | 0.8000 | 4 | completed "
        "| 0.125 | $0.5000 | 0.000 | $0.0000 |"
    )
    # Stopped after 1 of 4 epochs: 3 epochs not run x 0.125 accelerator-hours per epoch, x $4.
    assert _row(arch, "| 4 | `a3` |").endswith("| 1 | stopped by ASHA | 0.125 | $0.5000 | 0.375 | $1.50 |")
    assert "error" in _row(_section(report, "## Stage `regularisation`"), "| 4 | `r4` |")
    assert "ratio 0.625 (62.5% of a full run, 37.5% saved)" in arch
    assert "plan: gpu (H100), 1 worker(s) per trial × 0.5 GPU + 4 CPU" in arch
    assert "600.0 s (10.0 min); accelerator-hours: 0.500; cost: $2.00 at $4.000 per GPU-hour (H100, spot)" in arch
    assert "saved by ASHA: 0.750 accelerator-hours, $3.00" in arch and "best trial `a2`" in arch
    promo = _section(report, "## Stage `promotion`")
    assert "from epoch" in promo and _row(promo, "| 1 | `p1` | 4 |")


def test_report_batch_size_table(written):
    batch = _section(written[1], "## Topology accuracy by batch size")
    assert _row(batch, "| 16 |") == "| 16 | 0.6000 | 0.4500 | 0.5000 | 0.3500 | n/a | n/a | 2 |"
    assert _row(batch, "| 32 |") == "| 32 | 0.9000 | 0.6500 | 0.7000 | 0.4600 | 0.7500 | 0.5000 | 6 |"


def test_report_winner_config_and_test_metrics(written):
    winner = _section(written[1], "## Winner")
    assert "Trial `p1` from stage `promotion`" in winner
    assert "| `model.gc_size` | 64 | searched |" in winner
    assert "| `model.lstm_size` | 128 | config |" in winner and "| `train.lr` | 0.001 | config |" in winner
    test_table = winner[winner.index("Test-fold"):winner.index("Validation metrics")]
    assert "| TM | 0.7500 | 0.8000 | 4 |" in test_table
    assert "| BETA | n/a (absent) | n/a (absent) | 0 |" in test_table
    assert "| overlap_acc | 0.7000 |" in test_table


def test_report_of_unfinished_search(exp_dir):
    (exp_dir / "winner" / "winner.json").unlink()
    (exp_dir / "stages" / "promotion.json").unlink()
    report = write_report(exp_dir).read_text()
    assert "search has not finished" in report and "Not finished: `promotion`." in report
    assert "## Stage `promotion`" not in report and "## Stage `regularisation`" in report


def test_report_says_where_the_budget_stopped_the_search(exp_dir):
    assert "Budget" not in write_report(exp_dir).read_text()  # unbounded and never reached: not a word
    exp = ExperimentDir(exp_dir)
    (exp_dir / "stages" / "promotion.json").unlink()
    record = exp.load_stage("regularisation")
    record.budget_stop = BudgetStop(limit="usd", usd=2.5, max_usd=3.0, wall_s=1800, max_wall_s=None,
                                    stopped_trials=["r1", "r2"], unstarted_trials=5)
    exp.save_stage(record)
    experiment = exp.load_experiment()
    experiment.budget, experiment.skipped = BudgetConfig(max_usd=3.0, max_hours=2), {"promotion": "it ran out"}
    exp.save_experiment(experiment)
    report = write_report(exp_dir).read_text()
    stop = "stopped starting trials at $2.50 of $3.00 (wall 0.50 h; the usd limit would be exceeded)"
    assert "Budget: $3.00 and 2 h of wall time per search." in report
    assert f"Budget: stage `regularisation` {stop}; 2 trial(s) stopped at the end of their epoch, 5 not started." in report
    assert "Budget: stage `promotion` not started: it ran out." in report
    assert f"- budget: {stop}; trials stopped at the end of their epoch: `r1`, `r2`; 5 not started" in _section(
        report, "## Stage `regularisation`")


def test_plots_exist_are_png_and_linked(written):
    exp_dir, report = written
    names = ["per_type_top5.png"] + [f"{kind}_{s}.png" for kind in ("val_curves", "grad_norms")
                                     for s in ("architecture", "regularisation", "promotion")]
    for name in names:
        path = exp_dir / "plots" / name
        assert path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert f"](plots/{name})" in report


def test_main_prints_report_path(exp_dir, capsys):
    assert main([str(exp_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(exp_dir / "report.md")


def test_main_without_stages_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no finished stages" in capsys.readouterr().err
    (tmp_path / "stages").mkdir()
    assert main([str(tmp_path)]) == 2


def test_broken_stage_json_names_the_file(exp_dir):
    (exp_dir / "stages" / "architecture.json").write_text("{not json")
    with pytest.raises(ExperimentError, match=r"architecture\.json: not valid JSON \(line 1"):
        write_report(exp_dir)


def test_module_entry_point_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "protopo_ray.report", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no finished stages" in proc.stderr


def test_sparse_stage_without_experiment_json_still_reports(tmp_path):
    """A stage with little in it (no plan, no epoch counts, a trial with almost nothing) and no experiment.json
    must not take the report down."""
    trials = [TrialRecord(trial_id="t1", params={}, config=Config(), status="completed", epochs=2,
                          best={"val_overlap_acc": 0.5, "val_topo_tm": NAN},
                          history=[{"val_overlap_acc": 0.4}, {"val_overlap_acc": 0.5}]),
              TrialRecord(trial_id="t2", params={}, config=Config(), status="error")]
    ExperimentDir(tmp_path).save_stage(StageRecord(stage="only", kind="search", metric="val_overlap_acc", mode="max",
                                                   max_epochs=2, scheduler="asha", trials=trials))
    report = write_report(tmp_path).read_text()
    assert "# Experiment `" in report and "## Stage `only`" in report and "plan: not recorded" in report
    assert "0 epochs run (full-run epoch count not recorded)" in report
    # One n/a among the metrics (the cost columns: no price recorded)
    assert _row(report, "| 1 | `t1` |").split("| completed")[0].count("n/a") == 1 and "| 2 | `t2` |" in report
    assert (tmp_path / "plots" / "val_curves_only.png").read_bytes()[:8] == PNG_MAGIC


def test_report_cost_table_per_stage_and_in_all(written):
    cost = _section(written[1], "## Cost")
    # architecture: 4 trials x 0.125 h = 0.5 h ($2); a3 and a4 stopped after 1 of 4 epochs: 6 x 0.125 h saved ($3).
    assert _row(cost, "| `architecture` |") == ("| `architecture` | asha | gpu H100 spot | 4.000 | 0.500 | $2.00 | "
                                                "0.750 | $3.00 | 10.0 |")
    # regularisation: r3 stopped after 1 of 3 epochs (2 x 0.125 h); the errored r4 saves nothing.
    assert _row(cost, "| `regularisation` |").endswith("| 0.500 | $2.00 | 0.250 | $1.00 | 10.0 |")
    assert _row(cost, "| all |").startswith("| all |  |  |  | 1.") and "| 1.000 | $4.00 | 30.0 |" in cost
