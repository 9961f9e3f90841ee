"""The PNGs of an experiment report (protopo_ray.reporting.markdown): validation curves and gradient norms per
stage, per-type topology accuracy of the top trials, from the stage records. No Ray, no torch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from protopo_ray.search.results import StageRecord, TrialRecord

#: Per-type topology columns of the trial tables: (column title, metric suffix).
TOPO_COLUMNS = (("TM", "tm"), ("SP+TM", "sptm"), ("SP", "sp"), ("GLOB", "glob"), ("BETA", "beta"))


def as_number(value: object) -> float:
    """A float, NaN for anything missing or non-numeric."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _epochs(trial: TrialRecord) -> list[tuple[float, dict]]:
    """(epoch, metrics) per history entry; entries without an epoch count on from start_epoch."""
    out = []
    for i, entry in enumerate(trial.history):
        epoch = as_number(entry.get("epoch"))
        out.append((trial.start_epoch + i + 1 if math.isnan(epoch) else epoch, entry))
    return out


def _plot_curves(ax, trials: Sequence[TrialRecord], key: str) -> bool:
    drawn = False
    for trial in trials:
        points = [(x, as_number(m.get(key))) for x, m in _epochs(trial)]
        points = [(x, y) for x, y in points if not math.isnan(y)]
        if not points:
            continue
        stopped = trial.status != "completed"
        xs, ys = zip(*points)
        (line,) = ax.plot(xs, ys, "--" if stopped else "-", marker=".", label=trial.trial_id)
        if stopped:
            ax.plot(xs[-1], ys[-1], "x", color=line.get_color(), markersize=9, markeredgewidth=2)
        drawn = True
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="x-small", ncol=2)
    else:
        ax.text(0.5, 0.5, f"no {key} recorded", ha="center", va="center", transform=ax.transAxes)
    return drawn


def plot_val_curves(stage: StageRecord, path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    _plot_curves(ax, stage.trials, stage.metric)
    ax.set_title(f"{stage.stage}: {stage.metric} per epoch (dashed, x = stopped early / error)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_grad_norms(stage: StageRecord, path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    for ax, key in zip(fig.subplots(1, 2), ("train_grad_norm_mean", "train_grad_norm_max")):
        _plot_curves(ax, stage.trials, key)
        ax.set_title(f"{stage.stage}: {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_per_type_top(top: Sequence[tuple[str, TrialRecord]], metric: str, path: Path) -> None:
    """Bars of the best-epoch per-type topology accuracy of `top` ((stage name, trial) pairs, best first)."""
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    width = 0.8 / max(len(top), 1)
    for i, (_, trial) in enumerate(top):
        best = trial.best
        for j, (_, k) in enumerate(TOPO_COLUMNS):
            x = j + (i - (len(top) - 1) / 2) * width
            v = as_number(best.get(f"val_topo_{k}"))
            if math.isnan(v):  # absent type: no bar, a label instead of a misleading 0
                ax.text(x, 0.01, "n/a", ha="center", va="bottom", rotation=90, fontsize=7)
            else:
                ax.bar(x, v, width, color=f"C{i}")
    ax.set_xticks(range(len(TOPO_COLUMNS)), [t for t, _ in TOPO_COLUMNS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("topology accuracy (best epoch, val)")
    ax.set_title(f"Per-type topology accuracy, top {len(top)} trials by {metric}")
    if top:  # proxy handles: a trial whose every type is absent draws no bar to take its legend entry from
        ax.legend([Patch(color=f"C{i}") for i in range(len(top))],
                  [f"{name}/{trial.trial_id}" for name, trial in top], fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
