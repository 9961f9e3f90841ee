"""Halving efficiency (ASHA and synchronous SHA) and trial start-up overhead, from one run of bench_asha.toml.

    .venv/bin/python -m tools.bench_search [--storage runs/bench] [--from runs/bench/bench_asha_1458]

The experiment searches the same 12-config grid three times on the same data: stage "asha" (Ray's ASHA,
grace 1, reduction factor 3), stage "sha" (protopo_ray.search.halving's synchronous halving, same rungs) and stage
"full" (no scheduler, every trial to max_epochs). From the stage records (`EXP/stages/<stage>.json`): epochs
each scheduler trained / epochs of the full grid, whether its winner is the full grid's (same config; same
seeds give the same curves) and each stage's wall time. Trial overhead: for every trial, its start (first Tune
result's `timestamp - time_total_s`, from Tune's result.json) to the end of its first optimiser step
(`train_first_step_unix` of epoch 1), split where the trial recorded its start-up (`startup_*_unix`,
protopo_ray.search.trials): imports, then splits + model + first step; and how long its process had lived before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The rung rule the search's schedulers use (ASHA's milestones for one bracket; SynchronousHalving's rungs).
from protopo_ray.search.halving import rungs, survivors

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "experiments/bench_asha.toml"
# RAY_ADDRESS=local: the search starts its own private Ray instance (protopo_ray.cluster.connect.ray_init) even where
# another session's cluster runs on this machine. A longer worker-group start-up timeout than Ray Train's 60 s,
# which expired for trials on the 2-core machine under load (searches then stalled, docs/benchmarks.md);
# `--asha-from` summarises whatever a search left.
ENV = {"RAY_ADDRESS": "local", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
HALVING_STAGES = ("asha", "sha")



def tune_command(storage: str, name: str) -> list[str]:
    return [sys.executable, "-m", "protopo_ray.tune", EXPERIMENT, "--storage", storage, "--no-wandb",
            "--set", f"name={name}"]


def run_search(storage: str, timeout_s: float) -> tuple[Path, str, float]:
    name = f"bench_asha_{time.strftime('%H%M%S')}"
    cmd = tune_command(storage, name)
    command = " ".join([*(f"{k}={v}" for k, v in ENV.items()), ".venv/bin/python", *cmd[1:]])
    print(f"[search] {command}", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return ROOT / storage / name, command, time.time() - started


def trial_overheads(exp_dir: Path, stage: str) -> list[dict]:
    """Per trial: seconds from the trial's start to the end of its first training step, and where they went."""
    out = []
    for result_file in sorted((exp_dir / "tune" / stage).glob("*/result.json")):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        first = next((r for r in rows if r.get("epoch") == 1 and r.get("train_first_step_unix")), None)
        if first is None:
            continue
        start = first["timestamp"] - first["time_total_s"]
        row = {"trial": result_file.parent.name, "stage": stage, "start_unix": start,
               "first_step_s": first["train_first_step_unix"] - start, "first_epoch_end_s": first["time_total_s"]}
        if first.get("startup_imported_unix"):
            row.update(process_age_s=start - first["startup_process_unix"],
                       imports_s=first["startup_imported_unix"] - first["startup_entered_unix"],
                       data_model_step_s=first["train_first_step_unix"] - first["startup_imported_unix"])
        out.append(row)
    return out


def overhead_summary(overheads: list[dict]) -> dict:
    """Median / range of the start-up, and the medians of its parts for trials in a fresh and a reused process."""
    seconds = [o["first_step_s"] for o in overheads]
    if not seconds:
        return {}
    out = {"median": float(np.median(seconds)), "min": float(np.min(seconds)), "max": float(np.max(seconds)),
           "count": len(seconds)}
    timed = [o for o in overheads if "imports_s" in o]
    # A process that imported torch already (imports < 1 s) ran an earlier trial: Tune reused its actor.
    for label, group in (("fresh", [o for o in timed if o["imports_s"] >= 1]),
                         ("reused", [o for o in timed if o["imports_s"] < 1])):
        if group:
            out[label] = {"count": len(group), **{k: float(np.median([o[k] for o in group]))
                                                  for k in ("first_step_s", "imports_s", "data_model_step_s")}}
    return out


def summarize(exp_dir: Path) -> dict:
    stage_names = [s for s in (*HALVING_STAGES, "full") if (exp_dir / "stages" / f"{s}.json").exists()]
    records = {s: json.loads((exp_dir / "stages" / f"{s}.json").read_text()) for s in stage_names}
    asha, full = records["asha"], records["full"]
    from protopo_ray.search.experiment import load_experiment

    source = json.loads((exp_dir / "experiment.json").read_text())["source"]
    spec = next(s for s in load_experiment(ROOT / source).stages if s.name == "asha")
    asha.setdefault("reduction_factor", spec.reduction_factor)  # records written before stage records kept it
    metric, mode = asha["metric"], asha["mode"]

    def best(record):
        trial = next(t for t in record["trials"] if t["trial_id"] == record["best_trial"])
        return trial, trial["best"][metric]

    def key(trial):
        return tuple(sorted((k, v) for k, v in trial["params"].items()))

    full_trial, full_best = best(full)
    # Where a scheduler's winning config ranks in the full grid (1 = the full grid's own winner).
    ranked = sorted(full["trials"], key=lambda t: t["best"].get(metric, np.nan), reverse=mode == "max")
    out = {
        "experiment": str(exp_dir.relative_to(ROOT)) if exp_dir.is_relative_to(ROOT) else str(exp_dir),
        "metric": metric, "mode": mode, "num_trials": len(full["trials"]), "max_epochs": full["max_epochs"],
        "max_concurrent_trials": asha["plan"]["max_concurrent_trials"], "full_epochs_run": full["epochs_run"],
        "grid_epochs": full["epochs_full"], "full_wall_s": full["wall_time_s"], "full_best": full_best,
        "full_winner": full_trial["params"],
    }
    for name in HALVING_STAGES:
        if name not in records:
            continue
        record = records[name]
        trial, value = best(record)
        gap = (value - full_best) / abs(full_best) * (1 if mode == "min" else -1)  # > 0: worse than the full grid's
        prefix = "" if name == "asha" else f"{name}_"  # ASHA's keys keep their names (tools/bench.py reads them)
        out.update({
            f"{name}_epochs_run": record["epochs_run"], f"{prefix}epoch_fraction": record["epochs_run"] / full["epochs_full"],
            f"{name}_wall_s": record["wall_time_s"], f"{prefix}wall_fraction": record["wall_time_s"] / full["wall_time_s"],
            f"{name}_best": value, f"{name}_gap": gap, f"{prefix}within_1pct": gap <= 0.01,
            f"{name}_winner": trial["params"], f"{name}_exact_winner": key(trial) == key(full_trial),
            f"{name}_winner_rank_in_full": next((i + 1 for i, t in enumerate(ranked) if key(t) == key(trial)), None),
            f"{name}_trials_completed": sum(t["status"] == "completed" for t in record["trials"]),
            f"{name}_epochs_per_trial": sorted(t["epochs"] for t in record["trials"]),
        })
    overheads = [o for name in stage_names for o in trial_overheads(exp_dir, name)]
    out.update(overhead_s=overhead_summary(overheads), overheads=overheads,
               replay=replays(full, asha, tune_listed_order(spec)))
    return out


def tune_listed_order(spec) -> list[dict]:
    """The grid points in the order Tune starts a listed grid (order = "listed"): keys sorted by name, the
    first varying fastest (checked against the listed benchmark run's trial ids)."""
    return sorted(spec.grid_points(), key=lambda p: [spec.grid[k].index(p[k]) for k in sorted(spec.grid, reverse=True)])


def replay_asha(curves: list[list[float]], order: list[int], grace: int, rf: int, max_t: int) -> tuple[int, int]:
    """Ray's asynchronous rule, one trial at a time in `order`: at each rung a trial goes on only if its
    metric (lower is better) beats the (1 - 1/rf) quantile of the trials recorded there before it.
    Returns (epochs run, index of the best trial by its best metric)."""
    recorded: dict[int, list[float]] = {m: [] for m in rungs(grace, rf, max_t)}
    epochs, best = 0, None
    for i in order:
        ran = max_t
        for m in recorded:
            value = curves[i][m - 1]
            cutoff = np.nanpercentile(recorded[m], (1 - 1 / rf) * 100, method="linear") if recorded[m] else None
            recorded[m].append(-value)
            if cutoff is not None and -value < cutoff:
                ran = m
                break
        epochs += ran
        score = min(curves[i][:ran])
        if best is None or score < best[0]:
            best = (score, i)
    return epochs, best[1]


def replay_sha(curves: list[list[float]], grace: int, rf: int, max_t: int) -> tuple[int, int]:
    """Synchronous successive halving as protopo_ray.search.halving runs it: all trials to the first rung, the best
    1/rf of them (rounded up, `survivors`) to the next, ..."""
    alive, epochs, done = list(range(len(curves))), 0, 0
    for m in [*rungs(grace, rf, max_t), max_t]:
        epochs += (m - done) * len(alive)
        done = m
        if m < max_t:
            alive = sorted(alive, key=lambda i: curves[i][m - 1])[: survivors(len(alive), rf)]
    best = min(alive, key=lambda i: min(curves[i]))
    return epochs, best


def replay_curves(curves: list[list[float]], grace: int, rf: int, max_t: int, run_order: list[int] | None = None,
                  listed_order: list[int] | None = None) -> dict:
    """Epochs / grid epochs and the winner's gap (lower is better) of each halving rule on the same curves."""
    finals = [min(c) for c in curves]
    best = min(finals)
    grid = len(curves) * max_t

    def gap(i: int) -> float:
        return (finals[i] - best) / abs(best)

    sha_epochs, sha_best = replay_sha(curves, grace, rf, max_t)
    out = {"rule": f"grace {grace}, reduction factor {rf}, max {max_t}", "num_trials": len(curves),
           "sha_epoch_fraction": sha_epochs / grid, "sha_gap": gap(sha_best), "sha_exact_winner": finals[sha_best] == best}
    for label, order in (("run", run_order), ("grid", listed_order)):
        if order is not None:
            epochs, winner = replay_asha(curves, order, grace, rf, max_t)
            out[f"asha_sequential_{label}_order_fraction"] = epochs / grid
            out[f"asha_sequential_{label}_order_gap"] = gap(winner)
    rng = np.random.default_rng(0)
    shuffled = [replay_asha(curves, list(rng.permutation(len(curves))), grace, rf, max_t) for _ in range(1000)]
    out["asha_sequential_random_order_fraction_mean"] = float(np.mean([e for e, _ in shuffled]) / grid)
    out["asha_sequential_random_order_within_1pct"] = float(np.mean([gap(i) <= 0.01 for _, i in shuffled]))
    return out


def replays(full: dict, asha: dict, listed: list[dict]) -> dict:
    """What the halving rules would have spent on the full grid's own curves (deterministic: the same seeds
    give the same curves in both stages), to tell the rule from the way Ray applied it (async, several trials at
    a time). `listed`: the grid points in the order Tune starts them with order = "listed"."""
    metric = full["metric"]
    trials = sorted(full["trials"], key=lambda t: t["trial_id"])  # the order Tune started them in
    curves = [[row[metric] for row in t["history"]] for t in trials]
    position = {json.dumps(point, sort_keys=True): i for i, point in enumerate(listed)}
    listed_order = sorted(range(len(trials)), key=lambda i: position[json.dumps(trials[i]["params"], sort_keys=True)])
    return replay_curves(curves, asha["grace_epochs"], asha["reduction_factor"], full["max_epochs"],
                         run_order=list(range(len(curves))), listed_order=listed_order)


def partial(exp_dir: Path) -> dict:
    """What an unfinished search still tells: per-trial epochs and best metric from Tune's result files, overheads."""
    stages = {}
    for stage_dir in sorted((exp_dir / "tune").glob("*")):
        trials = []
        for result_file in sorted(stage_dir.glob("*/result.json")):
            rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
            if rows:
                trials.append({"trial": "_".join(result_file.parent.name.split("_")[2:4]), "epochs": int(rows[-1]["epoch"]),
                               "best_val_loss": min(r["val_loss"] for r in rows)})
        stages[stage_dir.name] = {"trials_reporting": len(trials), "epochs_run": sum(t["epochs"] for t in trials),
                                  "trials": trials}
    overheads = [o for stage in stages for o in trial_overheads(exp_dir, stage)]
    return {"experiment": str(exp_dir), "partial_stages": stages, "overheads": overheads,
            "overhead_s": overhead_summary(overheads)}


def run(storage: str, existing: str | None = None, timeout_s: float = 3600) -> dict:
    from protopo_ray.config import load_config
    from protopo_ray.data.shards import read_manifest

    data = load_config(ROOT / EXPERIMENT).data.path
    if existing:
        exp_dir = Path(existing).resolve()
        experiment = json.loads((exp_dir / "experiment.json").read_text())
        command = " ".join([*(f"{k}={v}" for k, v in ENV.items()), ".venv/bin/python", *tune_command(
            storage, experiment["name"])[1:]])
        wall = None
    else:
        try:
            read_manifest(ROOT / data)
        except FileNotFoundError:
            return {"skipped": f"no shards at {data}; prepare them from ../shared/data/deeptmhmm first"}
        exp_dir, command, wall = run_search(storage, timeout_s)
    missing = [s for s in ("asha", "full") if not (exp_dir / "stages" / f"{s}.json").exists()]
    if missing:
        out = {"command": command, "incomplete": f"stage record(s) {missing} missing: the search did not finish",
               **partial(exp_dir)}
        if "asha" not in missing:  # ASHA's share of the grid's epochs needs only its own record
            asha = json.loads((exp_dir / "stages" / "asha.json").read_text())
            out.update(asha_epochs_run=asha["epochs_run"], grid_epochs=asha["epochs_full"], asha_wall_s=asha["wall_time_s"],
                       epoch_fraction=asha["epochs_run"] / asha["epochs_full"], metric=asha["metric"],
                       asha_epochs_per_trial=sorted(t["epochs"] for t in asha["trials"]),
                       asha_winner=next(t["params"] for t in asha["trials"] if t["trial_id"] == asha["best_trial"]))
        return out
    return {"command": command, "search_wall_s": wall, **summarize(exp_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="runs/bench")
    parser.add_argument("--from", dest="existing", help="summarise this finished experiment directory instead")
    args = parser.parse_args()
    print(json.dumps(run(args.storage, args.existing), indent=1, default=str))


if __name__ == "__main__":
    main()
