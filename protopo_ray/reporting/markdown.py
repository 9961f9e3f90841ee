"""Markdown report of a search's experiment directory (`protopo_ray.search.results.ExperimentDir`).

`write_report(exp_dir)` reads the experiment, its finished stages and its winner through the record classes
(whatever of them exists: a search that stopped half-way still gets a report of its finished stages) and writes
`report.md` with PNGs under `plots/` (protopo_ray.reporting.plots). No Ray, no torch. NaN means "type absent
from the fold" and is always shown as absent, never as 0 or 1; a missing key means "not recorded" and is shown
as a dash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from protopo_ray.config import Objective
from protopo_ray.model.metrics import TYPE_KEYS
from protopo_ray.reporting.plots import TOPO_COLUMNS, as_number, plot_grad_norms, plot_per_type_top, plot_val_curves
from protopo_ray.search.results import (
    ExperimentDir,
    ExperimentError,
    ExperimentRecord,
    StageRecord,
    TrialRecord,
    WinnerRecord,
    usd_text,
)

#: Types of the seed's batch-size table (the ones whose topology is hard to get right).
BATCH_TYPES = (("TM", "tm"), ("SP+TM", "sptm"), ("BETA", "beta"))
#: Config fields shown for the winner besides its searched params.
WINNER_FIELDS = (
    "data.batch_size", "model.gc_size", "model.gc_layers", "model.gc_operator", "model.lstm_size",
    "model.lstm_layers", "model.dropout", "train.lr", "train.weight_decay", "train.schedule", "train.epochs",
    "train.clip_grad_norm", "train.label_smoothing",
)
STATUS_TEXT = {"stopped": "stopped by {scheduler}", "completed": "completed", "error": "error",
               "budget": "stopped by the budget"}
SCHEDULER_TEXT = {"asha": "ASHA", "sha": "SHA", "none": "no scheduler"}

__all__ = ["ExperimentError", "write_report"]


def batch_size_table(stages: Sequence[StageRecord]) -> dict[int, dict[str, object]]:
    """{batch size: {"trials": n, type suffix: (best, mean)}} over the trials' best-epoch values of the stages
    that searched (a promotion or ensemble repeats configs already counted).

    best and mean skip NaN (a type absent from the validation fold); both are NaN when no trial has a value.
    """
    values: dict[int, dict[str, list[float]]] = {}
    counts: dict[int, int] = {}
    for stage in stages:
        if stage.kind != "search":
            continue
        for trial in stage.trials:
            size = trial.config.data.batch_size
            counts[size] = counts.get(size, 0) + 1
            per_type = values.setdefault(size, {k: [] for _, k in BATCH_TYPES})
            for _, k in BATCH_TYPES:
                v = as_number(trial.best.get(f"val_topo_{k}"))
                if not math.isnan(v):
                    per_type[k].append(v)
    return {
        size: {"trials": counts[size],
               **{k: (max(v), sum(v) / len(v)) if v else (math.nan, math.nan) for k, v in per_type.items()}}
        for size, per_type in sorted(values.items())
    }


def epochs_ratio(stage: StageRecord) -> tuple[int, int, float]:
    """(epochs run, epochs of a full run without early stopping, ratio)."""
    run, full = stage.epochs_run, stage.epochs_full
    return run, full, run / full if full else math.nan


def _fmt(value: object, digits: int = 4, absent: str = "n/a") -> str:
    if value is None:
        return "-"
    v = as_number(value)
    return absent if math.isnan(v) else f"{v:.{digits}f}"


def _fmt_param(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plan_line(stage: StageRecord) -> str:
    plan = stage.plan
    if plan is None:
        return "plan: not recorded"
    device = plan.device + (f" ({plan.accelerator_type})" if plan.accelerator_type else "")
    return (f"plan: {device}, {plan.num_workers} worker(s) per trial × {_fmt_param(plan.gpus_per_worker)} GPU + "
            f"{_fmt_param(plan.cpus_per_worker)} CPU, {plan.trials_per_gpu} trial(s) per GPU, at most "
            f"{plan.max_concurrent_trials} concurrent trials")


def price_text(stage: StageRecord) -> str:
    """What the stage cost in dollars, at the price its plan recorded."""
    plan = stage.plan
    if plan is None or plan.usd_per_device_hour is None:
        return "cost: no price recorded (the plan's pool has none: add it to the experiment's [prices])"
    unit = "GPU" if plan.device == "gpu" else "vCPU"
    pool = ", ".join(x for x in (plan.accelerator_type, plan.market) if x)
    return (f"cost: {usd_text(stage.cost().usd)} at ${plan.usd_per_device_hour:.3f} per {unit}-hour"
            + (f" ({pool})" if pool else ""))


def cost_section(stages: Sequence[StageRecord]) -> list[str]:
    """Per stage and in all: device-hours and dollars spent, and what early stopping saved in both."""
    header = ["stage", "scheduler", "pool", "USD / device-h", "accel-h", "USD", "saved accel-h", "saved USD",
              "wall min"]
    rows, totals = [], [0.0, 0.0, 0.0, 0.0]
    for stage in stages:
        plan, cost = stage.plan, stage.cost()
        pool = " ".join(x for x in (plan.device, plan.accelerator_type, plan.market) if x) if plan else ""
        values = [cost.accelerator_hours, cost.usd, cost.saved_accelerator_hours, cost.saved_usd]
        totals = [t + v for t, v in zip(totals, values)]
        rows.append([f"`{stage.stage}`", stage.scheduler, pool or "-",
                     _fmt(plan.usd_per_device_hour if plan else None, 3), f"{values[0]:.3f}", usd_text(values[1]),
                     f"{values[2]:.3f}", usd_text(values[3]), _fmt(stage.wall_time_s / 60, 1)])
    rows.append(["all", "", "", "", f"{totals[0]:.3f}", usd_text(totals[1]), f"{totals[2]:.3f}", usd_text(totals[3]),
                 _fmt(sum(s.wall_time_s for s in stages) / 60, 1)])
    return ["## Cost", "", *_table(header, rows), "",
            "Accelerator-hours: the GPU share (a vCPU on CPU plans) each trial held x its workers x its epochs' time; "
            "dollars at the stage plan's price (the experiment's `[prices]`, protopo_ray/search/prices.py). Saved: "
            "epochs a stopped trial did not run x that trial's own cost per epoch. n/a: no price for the pool.", ""]


def budget_lines(experiment: ExperimentRecord | None, stages: Sequence[StageRecord]) -> list[str]:
    """What the search's [budget] allowed and where it stopped the search starting trials (nothing when unbounded
    and never reached)."""
    budget = experiment.budget if experiment else None
    stops = [s for s in stages if s.budget_stop is not None]
    if not (budget and budget.bounded) and not stops:
        return []
    limits = []
    if budget and budget.max_usd is not None:
        limits.append(f"{usd_text(budget.max_usd)}")
    if budget and budget.max_hours is not None:
        limits.append(f"{budget.max_hours:g} h of wall time")
    lines = [f"Budget: {' and '.join(limits) or 'none recorded'} per search."]
    for stage in stops:
        stop = stage.budget_stop
        lines.append(f"Budget: stage `{stage.stage}` {stop.text()}; {len(stop.stopped_trials)} trial(s) stopped at "
                     f"the end of their epoch, {stop.unstarted_trials} not started.")
    lines += [f"Budget: stage `{name}` not started: {why}." for name, why in (experiment.skipped if experiment
                                                                             else {}).items()]
    if stops or (experiment and experiment.skipped):
        lines.append("The winner is chosen from the trials that finished.")
    return lines


def _param_keys(trials: Sequence[TrialRecord]) -> list[str]:
    keys: list[str] = []
    for trial in trials:
        keys += [k for k in trial.params if k not in keys]
    return keys


def stage_section(stage: StageRecord, plots: dict[str, str]) -> list[str]:
    metric, scheduler = stage.metric, SCHEDULER_TEXT.get(stage.scheduler, stage.scheduler)
    trials = stage.ranked()
    accelerator_hours = sum(t.accelerator_hours for t in stage.trials)
    lines = [
        f"## Stage `{stage.stage}` ({stage.kind})",
        "",
        f"- metric: `{metric}` ({stage.mode}); max_epochs {stage.max_epochs}, grace_epochs {stage.grace_epochs}, "
        f"scheduler {stage.scheduler}, search {stage.search}; best trial `{stage.best_trial or '-'}`",
        f"- {plan_line(stage)}",
        f"- wall time: {_fmt(stage.wall_time_s, 1)} s ({_fmt(stage.wall_time_s / 60, 1)} min); accelerator-hours: "
        f"{_fmt(accelerator_hours, 3)}; {price_text(stage)}",
    ]
    if stage.budget_stop is not None:
        stop = stage.budget_stop
        lines.append(f"- budget: {stop.text()}; trials stopped at the end of their epoch: "
                     f"{', '.join(f'`{t}`' for t in stop.stopped_trials) or 'none'}; {stop.unstarted_trials} not "
                     "started")
    cost = stage.cost()
    if cost.saved_accelerator_hours:
        lines.append(f"- saved by {scheduler}: {cost.saved_accelerator_hours:.3f} accelerator-hours, "
                     f"{usd_text(cost.saved_usd)} (epochs not run x each stopped trial's own measured cost per epoch)")
    run, full, ratio = epochs_ratio(stage)
    what = "ASHA saving" if stage.scheduler == "asha" else f"epochs (scheduler {stage.scheduler})"
    if math.isnan(ratio):
        lines.append(f"- {what}: {run} epochs run (full-run epoch count not recorded)")
    else:
        lines.append(f"- {what}: {run} / {full} epochs run = ratio {ratio:.3f} ({ratio:.1%} of a full run, "
                     f"{1 - ratio:.1%} saved)")
    if stage.ensemble is not None:
        ensemble = stage.ensemble
        members = ", ".join(f"{fold}: `{trial}`" for fold, trial in ensemble.members.items())
        d = ensemble.decoding
        lines.append(f"- ensemble `{ensemble.path}` (members by validation fold: {members}; rule {d.rule}); entry "
                     f"penalty {_fmt(d.entry_penalty, 1)}, beta offset {_fmt(d.beta_offset, 1)}, duration weight "
                     f"{_fmt(d.duration_weight, 1)}, chosen out of fold (pooled topo_mean "
                     f"{_fmt(ensemble.out_of_fold.get('topo_mean'))}, overlap acc "
                     f"{_fmt(ensemble.out_of_fold.get('overlap_acc'))})")
    lines.append("")
    params = _param_keys(trials)
    fixed = ["val_loss", *(f"val_topo_{k}" for _, k in TOPO_COLUMNS), "val_type_acc", "val_overlap_acc"]
    extra = [] if metric in fixed else [metric]
    continued = any(t.start_epoch for t in trials)  # promoted trials: where each one continued from
    header = ["#", "trial", *(["from epoch"] if continued else []), *params, *extra, "val loss",
              *(f"topo {t}" for t, _ in TOPO_COLUMNS), "type acc", "overlap acc", "epochs", "status", "accel-h", "USD",
              "saved accel-h", "saved USD"]
    rows = []
    for rank, trial in enumerate(trials, 1):
        cost = trial.cost(stage.plan, stage.max_epochs)
        rows.append([str(rank), f"`{trial.trial_id}`", *([str(trial.start_epoch)] if continued else []),
                     *(_fmt_param(trial.params.get(p)) for p in params),
                     *(_fmt(trial.best.get(k)) for k in (*extra, *fixed)),
                     str(trial.epochs), STATUS_TEXT.get(trial.status, trial.status).format(scheduler=scheduler),
                     _fmt(trial.accelerator_hours, 3), usd_text(cost.usd), f"{cost.saved_accelerator_hours:.3f}",
                     usd_text(cost.saved_usd)])
    lines += _table(header, rows)
    lines += ["", "Values at each trial's best epoch by the stage metric; n/a = type absent from the validation fold.", ""]
    lines += [f"![{title}]({path})" for title, path in plots.items()] + [""]
    return lines


def batch_size_section(stages: Sequence[StageRecord]) -> list[str]:
    table = batch_size_table(stages)
    lines = ["## Topology accuracy by batch size (search stages)", ""]
    if not table:
        return lines + ["No search trial records a batch size.", ""]
    header = ["batch size", *(f"{t} {w}" for t, _ in BATCH_TYPES for w in ("best", "mean")), "trials"]
    rows = []
    for size, per_type in table.items():
        row = [str(size)]
        for _, k in BATCH_TYPES:
            best, mean = per_type[k]
            row += [_fmt(best), _fmt(mean)]
        rows.append([*row, str(per_type["trials"])])
    return lines + _table(header, rows) + ["", "Best and mean over trials of their best-epoch validation values.", ""]


def metrics_rows(metrics: dict[str, float], prefix: str = "") -> list[list[str]]:
    """`metrics.format_metrics` as table rows: per type topology / type accuracy / count, then the totals."""
    absent = "n/a (absent)"
    rows = []
    for t, k in TYPE_KEYS.items():
        count = metrics.get(f"{prefix}n_{k}")
        rows.append([t, _fmt(metrics.get(f"{prefix}topo_{k}"), absent=absent),
                     _fmt(metrics.get(f"{prefix}type_{k}"), absent=absent), _fmt(count, 0)])
    for key in ("type_acc", "overlap_acc", "residue_acc", "loss"):
        if f"{prefix}{key}" in metrics:
            rows.append([key, _fmt(metrics[f"{prefix}{key}"], absent=absent), "", ""])
    return rows


def winner_section(winner: WinnerRecord | None) -> list[str]:
    lines = ["## Winner", ""]
    if winner is None:
        return lines + ["No `winner/winner.json`: the search has not finished (or failed before choosing).", ""]
    lines += [f"Trial `{winner.trial_id}` from stage `{winner.stage}`; checkpoint `{winner.checkpoint}`.", ""]
    rows = [[f"`{k}`", _fmt_param(v), "searched"] for k, v in winner.params.items()]
    config = winner.config.to_dict()
    for key in WINNER_FIELDS:
        section, _, name = key.partition(".")
        if key not in winner.params:
            rows.append([f"`{key}`", _fmt_param(config[section][name]), "config"])
    lines += _table(["field", "value", "from"], rows) + ["", "Test-fold metrics:", ""]
    lines += _table(["type", "topology", "type acc", "count"], metrics_rows(winner.test))
    if "fasta_n_proteins" in winner.test:  # the same proteins from sequence alone, as predict sees a FASTA
        lines += ["", "Test-fold metrics from sequence alone (every protein through its sequence-window graph):", ""]
        lines += _table(["type", "topology", "type acc", "count"], metrics_rows(winner.test, "fasta_"))
    lines += ["", "Validation metrics at the chosen epoch:", ""]
    lines += _table(["type", "topology", "type acc", "count"], metrics_rows(winner.val, "val_"))
    return lines + [""]


def ranking_objective(stages: Sequence[StageRecord]) -> Objective:
    """What ranks trials across stages: the last stage's objective, which is every stage's when they agree; when
    they differ one metric must rank all (an accuracy and a loss cannot be ranked against each other)."""
    return stages[-1].objective


def top_trials(stages: Sequence[StageRecord], count: int = 5) -> list[tuple[str, TrialRecord]]:
    """The `count` best (stage name, trial) across stages by `ranking_objective`; trials without a value left out."""
    objective = ranking_objective(stages)
    pool = [(stage.stage, trial) for stage in stages for trial in stage.trials]
    ranked = objective.ranked(pool, lambda item: item[1].best.get(objective.metric))
    return [item for item in ranked if not math.isnan(objective.value(item[1].best))][:count]


def write_report(exp_dir: str | Path) -> Path:
    """Write EXP/report.md and EXP/plots/*.png; return the report's path."""
    exp = ExperimentDir(Path(exp_dir))
    stages = exp.load_stages()
    if not stages:
        raise ExperimentError(f"{exp.root}: no finished stages (expected {exp.stages_dir}/<stage>.json); pass the "
                              "directory the tuner wrote, after at least one stage has finished")
    experiment, winner = exp.load_experiment(), exp.load_winner()
    exp.plots_dir.mkdir(exist_ok=True)
    finished = [s.stage for s in stages]
    missing = [s for s in (experiment.stages if experiment else []) if s not in finished]
    lines = [f"# Experiment `{experiment.name if experiment else exp.root.name}`", "",
             f"Stages finished: {', '.join(f'`{s}`' for s in finished)}."]
    lines += [f"Not finished: {', '.join(f'`{s}`' for s in missing)}."] if missing else []
    budget = budget_lines(experiment, stages)
    lines += ["", *budget] if budget else []
    lines += ["", *winner_section(winner), *cost_section(stages)]
    for stage in stages:
        slug = _slug(stage.stage)
        plots = {"validation curves": f"plots/val_curves_{slug}.png", "gradient norms": f"plots/grad_norms_{slug}.png"}
        plot_val_curves(stage, exp.root / plots["validation curves"])
        plot_grad_norms(stage, exp.root / plots["gradient norms"])
        lines += stage_section(stage, plots)
    lines += batch_size_section(stages)
    objective, top = ranking_objective(stages), top_trials(stages)
    plot_per_type_top(top, objective.metric, exp.plots_dir / "per_type_top5.png")
    names = ", ".join(f"`{name}/{trial.trial_id}`" for name, trial in top)
    lines += ["## Top trials per type", "", f"The five best trials across stages by `{objective.metric}` "
              f"({objective.mode}, best-epoch value): {names or 'none with a value'}.", "",
              "![per-type topology accuracy, top 5](plots/per_type_top5.png)", ""]
    exp.report_file.write_text("\n".join(lines))
    return exp.report_file
