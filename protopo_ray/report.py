"""Markdown report and plots for a search experiment directory left by the tuner (layout: docs/results.md).

`write_report(exp_dir)` reads `experiment.json`, `stages/<stage>.json` and `winner/winner.json` (whatever of them
exists: a search that stopped half-way still gets a report of its finished stages) and writes `report.md` with
PNGs under `plots/`. Pure module: reads JSON, imports no Ray or torch. NaN means "type absent from the fold" and is
always shown as absent, never as 0 or 1; a missing key means "not recorded" and is shown as a dash.

    python -m protopo_ray.report EXP_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from protopo_ray.model.metrics import TYPE_KEYS
from protopo_ray.reporting.plots import (
    TOPO_COLUMNS,
    as_number,
    metric_key,
    plot_grad_norms,
    plot_per_type_top,
    plot_val_curves,
)
from protopo_ray.search.cost import stage_cost, trial_cost, usd_text

#: Types of the seed's batch-size table (the ones whose topology is hard to get right).
BATCH_TYPES = (("TM", "tm"), ("SP+TM", "sptm"), ("BETA", "beta"))
#: Config fields shown for the winner besides its searched params.
WINNER_FIELDS = (
    "data.batch_size", "model.gc_size", "model.gc_layers", "model.gc_operator", "model.lstm_size",
    "model.lstm_layers", "model.dropout", "train.lr", "train.weight_decay", "train.schedule", "train.epochs",
    "train.clip_grad_norm", "train.label_smoothing",
)
STATUS_TEXT = {"stopped": "stopped by {scheduler}", "completed": "completed", "error": "error"}
SCHEDULER_TEXT = {"asha": "ASHA", "sha": "SHA", "none": "no scheduler"}


class ExperimentError(ValueError):
    """The directory is not a (readable) experiment directory."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExperimentError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_experiment(exp_dir: str | Path) -> tuple[dict, list[dict], dict | None]:
    """(experiment, finished stages in run order, winner or None). Raises ExperimentError without stages/."""
    exp_dir = Path(exp_dir)
    stage_dir = exp_dir / "stages"
    files = sorted(stage_dir.glob("*.json")) if stage_dir.is_dir() else []
    if not files:
        raise ExperimentError(f"{exp_dir}: no finished stages (expected {stage_dir}/<stage>.json); pass the "
                              "directory the tuner wrote, after at least one stage has finished")
    experiment = _read_json(exp_dir / "experiment.json") if (exp_dir / "experiment.json").exists() else {}
    by_name = {}
    for path in files:
        stage = _read_json(path)
        stage.setdefault("stage", path.stem)
        stage["trials"] = [t for t in stage.get("trials") or [] if isinstance(t, dict)]
        by_name[str(stage["stage"])] = stage
    order = [s for s in experiment.get("stages", []) if s in by_name]
    order += [s for s in by_name if s not in order]
    winner_path = exp_dir / "winner" / "winner.json"
    winner = _read_json(winner_path) if winner_path.exists() else None
    return experiment, [by_name[s] for s in order], winner


def _is_max(stage: dict) -> bool:
    return stage.get("mode", "max") != "min"


def sort_trials(trials: Sequence[dict], metric: str, mode: str = "max") -> list[dict]:
    """Trials best first by `best[metric]`; NaN and missing values last, ties keep their order."""

    def key(trial: dict) -> tuple[bool, float]:
        value = as_number((trial.get("best") or {}).get(metric))
        if math.isnan(value):
            return True, 0.0
        return False, -value if mode == "max" else value

    return sorted(trials, key=key)


def batch_size_of(trial: dict) -> int | None:
    """The trial's batch size: the searched value, else the resolved config's."""
    value = (trial.get("params") or {}).get("data.batch_size")
    if value is None:
        value = ((trial.get("config") or {}).get("data") or {}).get("batch_size")
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def batch_size_table(stages: Sequence[dict]) -> dict[int, dict[str, object]]:
    """{batch size: {"trials": n, type suffix: (best, mean)}} over the search stages' best-epoch values.

    best and mean skip NaN (a type absent from the validation fold); both are NaN when no trial has a value.
    """
    values: dict[int, dict[str, list[float]]] = {}
    counts: dict[int, int] = {}
    for stage in stages:
        if stage.get("kind", "search") != "search":
            continue
        for trial in stage.get("trials", []):
            size = batch_size_of(trial)
            if size is None:
                continue
            counts[size] = counts.get(size, 0) + 1
            per_type = values.setdefault(size, {k: [] for _, k in BATCH_TYPES})
            for _, k in BATCH_TYPES:
                v = as_number((trial.get("best") or {}).get(f"val_topo_{k}"))
                if not math.isnan(v):
                    per_type[k].append(v)
    return {
        size: {"trials": counts[size],
               **{k: (max(v), sum(v) / len(v)) if v else (math.nan, math.nan) for k, v in per_type.items()}}
        for size, per_type in sorted(values.items())
    }


def asha_saving(stage: dict) -> tuple[int, int, float]:
    """(epochs run, epochs of a full run without early stopping, ratio); from the stage, else from its trials."""
    trials = stage.get("trials", [])
    run = stage.get("epochs_run")
    run = int(run) if run is not None else sum(int(t.get("epochs") or 0) for t in trials)
    full = stage.get("epochs_full")
    full = int(full) if full is not None else len(trials) * int(stage.get("max_epochs") or 0)
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


def plan_line(stage: dict) -> str:
    plan = stage.get("plan") or {}
    if not plan:
        return "plan: not recorded"
    device = str(plan.get("device", "?"))
    if plan.get("accelerator_type"):
        device += f" ({plan['accelerator_type']})"
    return (
        f"plan: {device}, {plan.get('num_workers', '?')} worker(s) per trial × "
        f"{_fmt_param(plan.get('gpus_per_worker', 0))} GPU + {_fmt_param(plan.get('cpus_per_worker', '?'))} CPU, "
        f"{plan.get('trials_per_gpu', '?')} trial(s) per GPU, at most {plan.get('max_concurrent_trials', '?')} "
        "concurrent trials"
    )


def price_text(stage: dict) -> str:
    """What the stage cost in dollars, at the price its plan recorded."""
    plan, cost = stage.get("plan") or {}, stage_cost(stage)
    price = as_number(plan.get("usd_per_device_hour"))
    if math.isnan(price):
        return "cost: no price recorded (the plan's pool has none: add it to the experiment's [prices])"
    unit = "GPU" if plan.get("device") == "gpu" else "vCPU"
    pool = ", ".join(str(x) for x in (plan.get("accelerator_type"), plan.get("market")) if x)
    return f"cost: {usd_text(cost.usd)} at ${price:.3f} per {unit}-hour" + (f" ({pool})" if pool else "")


def cost_section(stages: Sequence[dict]) -> list[str]:
    """Per stage and in all: device-hours and dollars spent, and what early stopping saved in both."""
    header = ["stage", "scheduler", "pool", "USD / device-h", "accel-h", "USD", "saved accel-h", "saved USD",
              "wall min"]
    rows, totals = [], [0.0, 0.0, 0.0, 0.0]
    for stage in stages:
        plan, cost = stage.get("plan") or {}, stage_cost(stage)
        pool = " ".join(str(x) for x in (plan.get("device"), plan.get("accelerator_type"), plan.get("market")) if x)
        values = [cost.accelerator_hours, cost.usd, cost.saved_accelerator_hours, cost.saved_usd]
        totals = [t + v for t, v in zip(totals, values)]
        scheduler = str(stage.get("scheduler", "?")) if stage.get("kind", "search") == "search" else "-"
        rows.append([f"`{stage['stage']}`", scheduler, pool or "-",
                     _fmt(plan.get("usd_per_device_hour"), 3), f"{values[0]:.3f}", usd_text(values[1]),
                     f"{values[2]:.3f}", usd_text(values[3]), _fmt(as_number(stage.get("wall_time_s")) / 60, 1)])
    rows.append(["all", "", "", "", f"{totals[0]:.3f}", usd_text(totals[1]), f"{totals[2]:.3f}", usd_text(totals[3]),
                 _fmt(sum(as_number(s.get("wall_time_s")) for s in stages) / 60, 1)])
    return ["## Cost", "", *_table(header, rows), "",
            "Accelerator-hours: the GPU share (a vCPU on CPU plans) each trial held x its workers x its epochs' time; "
            "dollars at the stage plan's price (the experiment's `[prices]`, protopo_ray/search/cost.py). Saved: epochs a "
            "stopped trial did not run x that trial's own cost per epoch. n/a: no price for the pool.", ""]


def _param_keys(trials: Sequence[dict]) -> list[str]:
    keys: list[str] = []
    for trial in trials:
        keys += [k for k in (trial.get("params") or {}) if k not in keys]
    return keys


def stage_section(stage: dict, plots: dict[str, str]) -> list[str]:
    name, metric, is_max = str(stage["stage"]), metric_key(stage), _is_max(stage)
    kind, wall_s = stage.get("kind", "search"), as_number(stage.get("wall_time_s"))
    trials = sort_trials(stage.get("trials", []), metric, "max" if is_max else "min")
    lines = [
        f"## Stage `{name}` ({kind})",
        "",
        f"- metric: `{metric}` ({'max' if is_max else 'min'}); max_epochs {stage.get('max_epochs', '?')}, "
        f"grace_epochs {stage.get('grace_epochs', '?')}, scheduler {stage.get('scheduler', '?')}, "
        f"search {stage.get('search', '?')}; best trial `{stage.get('best_trial', '-')}`",
        f"- {plan_line(stage)}",
        f"- wall time: {_fmt(wall_s, 1)} s ({_fmt(wall_s / 60, 1)} min); accelerator-hours: "
        f"{_fmt(sum(as_number(t.get('accelerator_hours') or 0) for t in stage.get('trials', [])), 3)}; {price_text(stage)}",
    ]
    cost = stage_cost(stage)
    if cost.saved_accelerator_hours:
        lines.append(f"- saved by {SCHEDULER_TEXT.get(str(stage.get('scheduler')), stage.get('scheduler'))}: "
                     f"{cost.saved_accelerator_hours:.3f} accelerator-hours, {usd_text(cost.saved_usd)} (epochs not "
                     "run x each stopped trial's own measured cost per epoch)")
    run, full, ratio = asha_saving(stage)
    what = "ASHA saving" if stage.get("scheduler") == "asha" else f"epochs (scheduler {stage.get('scheduler', '?')})"
    if math.isnan(ratio):
        lines.append(f"- {what}: {run} epochs run (full-run epoch count not recorded)")
    else:
        lines.append(f"- {what}: {run} / {full} epochs run = ratio {ratio:.3f} ({ratio:.1%} of a full run, "
                     f"{1 - ratio:.1%} saved)")
    ensemble = stage.get("ensemble") or {}
    if ensemble:
        members = ", ".join(f"{fold}: `{trial}`" for fold, trial in (ensemble.get("members") or {}).items())
        lines.append(f"- ensemble `{ensemble.get('path', '?')}` (members by validation fold: {members}); entry penalty "
                     f"{_fmt(ensemble.get('entry_penalty'), 1)}, chosen out of fold (pooled topo_mean "
                     f"{_fmt((ensemble.get('out_of_fold') or {}).get('topo_mean'))}, overlap acc "
                     f"{_fmt((ensemble.get('out_of_fold') or {}).get('overlap_acc'))})")
    lines.append("")
    params = _param_keys(trials)
    fixed = ["val_loss", *(f"val_topo_{k}" for _, k in TOPO_COLUMNS), "val_type_acc", "val_overlap_acc"]
    extra = [] if metric in fixed else [metric]
    header = ["#", "trial", *params, *extra, "val loss", *(f"topo {t}" for t, _ in TOPO_COLUMNS),
              "type acc", "overlap acc", "epochs", "status", "accel-h", "USD", "saved accel-h", "saved USD"]
    if kind == "promotion":
        header.insert(2, "from epoch")
    rows = []
    for rank, trial in enumerate(trials, 1):
        best = trial.get("best") or {}
        row = [str(rank), f"`{trial.get('trial_id', '?')}`", *(_fmt_param((trial.get("params") or {}).get(p))
                                                             for p in params)]
        row += [_fmt(best.get(k)) for k in (*extra, *fixed)]
        status, cost = str(trial.get("status", "?")), trial_cost(trial, stage)
        scheduler = SCHEDULER_TEXT.get(str(stage.get("scheduler")), str(stage.get("scheduler")))
        row += [str(trial.get("epochs", "-")), STATUS_TEXT.get(status, status).format(scheduler=scheduler),
                _fmt(trial.get("accelerator_hours"), 3), usd_text(cost.usd), f"{cost.saved_accelerator_hours:.3f}",
                usd_text(cost.saved_usd)]
        if kind == "promotion":
            row.insert(2, str(trial.get("start_epoch", 0)))
        rows.append(row)
    lines += _table(header, rows)
    lines += ["", "Values at each trial's best epoch by the stage metric; n/a = type absent from the validation fold.", ""]
    lines += [f"![{title}]({path})" for title, path in plots.items()] + [""]
    return lines


def batch_size_section(stages: Sequence[dict]) -> list[str]:
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


def metrics_rows(metrics: dict, prefix: str = "") -> list[list[str]]:
    """format_metrics as table rows: per type topology / type accuracy / count, then the totals."""
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


def winner_section(winner: dict | None) -> list[str]:
    lines = ["## Winner", ""]
    if winner is None:
        return lines + ["No `winner/winner.json`: the search has not finished (or failed before choosing).", ""]
    lines += [f"Trial `{winner.get('trial_id', '?')}` from stage `{winner.get('stage', '?')}`; "
              f"checkpoint `{winner.get('checkpoint', '-')}`.", ""]
    params, config = winner.get("params") or {}, winner.get("config") or {}
    rows = [[f"`{k}`", _fmt_param(v), "searched"] for k, v in params.items()]
    for key in WINNER_FIELDS:
        section, _, field = key.partition(".")
        if key not in params and field in (config.get(section) or {}):
            rows.append([f"`{key}`", _fmt_param(config[section][field]), "config"])
    lines += _table(["field", "value", "from"], rows) + ["", "Test-fold metrics:", ""]
    lines += _table(["type", "topology", "type acc", "count"], metrics_rows(winner.get("test") or {}))
    lines += ["", "Validation metrics at the chosen epoch:", ""]
    lines += _table(["type", "topology", "type acc", "count"], metrics_rows(winner.get("val") or {}, "val_"))
    return lines + [""]


def ranking_metric(stages: Sequence[dict]) -> tuple[str, bool]:
    """(metric, is_max) ranking trials across stages: the last stage's, which is every stage's when they agree;
    when they differ one metric must rank all (an accuracy and a loss cannot be ranked against each other)."""
    return metric_key(stages[-1]), _is_max(stages[-1])


def top_trials(stages: Sequence[dict], count: int = 5) -> list[tuple[str, dict]]:
    """The `count` best (stage name, trial) across stages by `ranking_metric`; trials without a value left out."""
    metric, is_max = ranking_metric(stages)
    scored = []
    for stage in stages:
        for trial in stage.get("trials", []):
            v = as_number((trial.get("best") or {}).get(metric))
            if not math.isnan(v):
                scored.append((v if is_max else -v, str(stage["stage"]), trial))
    scored.sort(key=lambda s: -s[0])  # stable: ties keep stage and trial order
    return [(name, trial) for _, name, trial in scored[:count]]


def write_report(exp_dir: str | Path) -> Path:
    """Write EXP/report.md and EXP/plots/*.png; return the report's path."""
    exp_dir = Path(exp_dir)
    experiment, stages, winner = load_experiment(exp_dir)
    plot_dir = exp_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    name = experiment.get("name", exp_dir.name)
    finished = [str(s["stage"]) for s in stages]
    missing = [str(s) for s in experiment.get("stages", []) if str(s) not in finished]
    lines = [f"# Experiment `{name}`", "", f"Stages finished: {', '.join(f'`{s}`' for s in finished)}."]
    lines += [f"Not finished: {', '.join(f'`{s}`' for s in missing)}."] if missing else []
    lines += ["", *winner_section(winner), *cost_section(stages)]
    for stage in stages:
        slug = _slug(str(stage["stage"]))
        plots = {"validation curves": f"plots/val_curves_{slug}.png", "gradient norms": f"plots/grad_norms_{slug}.png"}
        plot_val_curves(stage, exp_dir / plots["validation curves"])
        plot_grad_norms(stage, exp_dir / plots["gradient norms"])
        lines += stage_section(stage, plots)
    lines += batch_size_section(stages)
    metric, is_max = ranking_metric(stages)
    plot_per_type_top(top_trials(stages), metric, plot_dir / "per_type_top5.png")
    top = ", ".join(f"`{name}/{trial.get('trial_id')}`" for name, trial in top_trials(stages))
    lines += ["## Top trials per type", "", f"The five best trials across stages by `{metric}` "
              f"({'max' if is_max else 'min'}, best-epoch value): {top or 'none with a value'}.", "",
              "![per-type topology accuracy, top 5](plots/per_type_top5.png)", ""]
    path = exp_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.report", description=__doc__.splitlines()[0])
    parser.add_argument("exp_dir", type=Path, help="experiment directory written by the tuner")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.exp_dir)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
