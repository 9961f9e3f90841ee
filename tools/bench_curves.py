"""The halving rules replayed on a 36-config grid of the seed's shape (GC x LSTM size x LSTM layers x batch size).

    .venv/bin/python -m tools.bench_curves [--max-proteins 24] [--indices 0-17] [--out benchmarks/curves36.json]

Every config of the grid is trained in this process (runner.fit, no Ray) for max_epochs on the benchmark's
real-data subset (experiments/bench_asha.toml's data and base model), its validation loss recorded per epoch;
then synchronous halving and Ray's asynchronous rule (one trial at a time, in grid order and in 1000 random
orders) are replayed on those curves with the rungs the schedulers use (tools.bench_search). The grid keeps the
seed's shape (3 x 2 x 3 x 2) with sizes scaled to what 2 CPU cores train in minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The seed's grid shape: GCSize {64,128,512} x LSTMSize {128,512} x LSTM layers {1,2,4} x batch {32,64}, scaled.
GRID = {"model.gc_size": [16, 32, 64], "model.lstm_size": [16, 32], "model.lstm_layers": [1, 2, 4],
        "data.batch_size": [8, 16]}
RULE = {"grace": 1, "rf": 3, "max_t": 9}  # as experiments/bench_asha.toml: rungs at 1 and 3, max 9


def record_curves(max_proteins: int, run_dir: Path, indices: list[int] | None = None, metric: str = "val_loss") -> list[dict]:
    """Train the grid's configs (those in `indices`, default all) into `run_dir`/cNN; a config whose metrics.jsonl
    already holds every epoch is not trained again, so several processes can share the grid and a killed run
    continues. Returns the recorded curves of every finished config."""
    from protopo_ray.search.experiment import load_experiment
    from protopo_ray.training.fit import fit
    from protopo_ray.training.session import LocalSession

    base = load_experiment(ROOT / "experiments" / "bench_asha.toml").base
    base = base.replace({"data.path": str(ROOT / base.data.path), "data.max_proteins": max_proteins,
                         "train.epochs": RULE["max_t"], "train.keep_checkpoints": 1})
    points = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    for i in indices if indices is not None else range(len(points)):
        if len(_curve(run_dir, i, metric)) == RULE["max_t"]:
            continue
        shutil.rmtree(run_dir / f"c{i:02d}", ignore_errors=True)
        config = base.replace({**points[i], "resources.storage": str(run_dir), "name": f"c{i:02d}"})
        started = time.time()
        fit(config, LocalSession(config))
        print(f"[curves] c{i:02d} {points[i]} {metric} {_curve(run_dir, i, metric)[-1]:.4f} ({time.time() - started:.0f} s)",
              flush=True)
    return [{"params": point, "curve": _curve(run_dir, i, metric)} for i, point in enumerate(points)
            if len(_curve(run_dir, i, metric)) == RULE["max_t"]]


def _curve(run_dir: Path, index: int, metric: str) -> list[float]:
    path = run_dir / f"c{index:02d}" / "metrics.jsonl"
    return [json.loads(line)[metric] for line in path.read_text().splitlines()] if path.exists() else []


def replay(trials: list[dict]) -> dict:
    from tools.bench_search import replay_curves

    curves = [t["curve"] for t in trials]
    return replay_curves(curves, RULE["grace"], RULE["rf"], RULE["max_t"], listed_order=list(range(len(curves))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-proteins", type=int, default=24, help="first N proteins of each split")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench" / "curves36", help="the configs' runs")
    parser.add_argument("--indices", help="train only these configs (e.g. 0-17), to share the grid between processes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "curves36.json")
    args = parser.parse_args()
    indices = None
    if args.indices:
        low, _, high = args.indices.partition("-")
        indices = list(range(int(low), int(high or low) + 1))
    started, load = time.time(), os.getloadavg()
    trials = record_curves(args.max_proteins, args.run_dir, indices)
    recorded = {"grid": GRID, "rule": RULE, "max_proteins": args.max_proteins, "trials": trials,
                "wall_s": time.time() - started, "load_start": load, "load_end": os.getloadavg(),
                "finished": time.strftime("%Y-%m-%d %H:%M")}
    if len(trials) == 36:
        recorded["replay"] = replay(trials)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(recorded, indent=1) + "\n")
        print(json.dumps(recorded["replay"], indent=1))
    else:
        print(f"[curves] {len(trials)} of 36 configs recorded in {args.run_dir}; run again to finish the grid")


if __name__ == "__main__":
    main()
