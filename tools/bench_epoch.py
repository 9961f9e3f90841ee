"""Epoch throughput on real sequences: Ray Train (1 and 2 workers) vs the in-process loop vs a naive loop.

    .venv/bin/python -m tools.bench_epoch [--quick] [--data data/deeptmhmm] [--storage runs/bench]

A CPU-sized model (GC 32, LSTM 64 x 2 bidirectional, batch 32, one torch thread per worker) on the first
`data.max_proteins` training proteins. Every figure uses steady-state epochs only (epoch 1, with its start-up,
is left out) and train residues/s = labelled residues / seconds inside `loop.train_epoch` (validation excluded).

* Ray vs local: `python -m protopo_ray.train` with `--num-workers 1`, then `--local`, same config, back to back;
  figures read from each run's metrics.jsonl.
* DDP scaling: `--num-workers 2` right after; each rank trains half the batches, so the aggregate rate is
  rank 0's residues x world size / rank 0's train seconds (ranks step in lockstep through the all-reduce).
* Naive loop: the reference student project's way — random batches (no length bucketing) and, every step,
  one PyG `Data` per protein (`collate.table_to_data_list`) merged by `Batch.from_data_list`, no prefetch —
  against this project's loop (bucketed plan, vectorised `table_to_batch`, prefetch thread), same model,
  optimiser and step (`loop.train_epoch`), epochs interleaved in one process so both see the same load.
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

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "experiments/train_default.toml"
MODEL = {"model.gc_size": 32, "model.lstm_size": 64, "model.lstm_layers": 2, "data.batch_size": 32,
         "train.num_threads": 1, "train.keep_checkpoints": 1, "train.schedule": "constant"}


def overrides(quick: bool) -> dict:
    return {**MODEL, "data.max_proteins": 120 if quick else 300, "train.epochs": 3}


def train_command(name: str, storage: str, values: dict, workers: int | None) -> list[str]:
    """`python -m protopo_ray.train` for one run: `workers=None` is the in-process path (--local)."""
    cmd = [sys.executable, "-m", "protopo_ray.train", "--config", CONFIG, "--storage", storage]
    cmd += ["--local"] if workers is None else ["--num-workers", str(workers)]
    for key, value in {**values, "name": name}.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def shell(cmd: list[str]) -> str:
    """The command as a user would type it (paths relative to the repository, as in the docs)."""
    return " ".join([".venv/bin/python", *cmd[1:]]).replace(str(ROOT) + "/", "")


def run_training(cmd: list[str], run_dir: Path, timeout_s: float) -> dict:
    """Run one training command; its steady-state metrics from metrics.jsonl."""
    # RAY_ADDRESS=local: a private Ray instance, never another job's cluster on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.time() - started
    path = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not path.exists():
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}", "command": shell(cmd)}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"command": shell(cmd), "wall_s": wall, "epochs": rows}


def steady(run: dict, world_size: int = 1) -> dict:
    rows = [r for r in run.get("epochs", []) if r["epoch"] >= 2]
    if not rows:
        return {}
    rates = [world_size * r["train_num_residues"] / r["train_seconds"] for r in rows]
    return {
        "train_residues_per_s": float(np.mean(rates)),
        "rank0_residues_per_s": float(np.mean([r["train_residues_per_s"] for r in rows])),
        "data_wait_share": float(np.mean([r["train_data_wait_share"] for r in rows])),
        "train_seconds": float(np.mean([r["train_seconds"] for r in rows])),
        "epoch_time_s": float(np.mean([r["epoch_time_s"] for r in rows])),
        "padding_efficiency": float(np.mean([r["train_padding_efficiency"] for r in rows])),
        "steady_epochs": len(rows),
        "first_epoch_time_s": float(run["epochs"][0]["epoch_time_s"]),
    }


def naive_batches(table, plan):
    """The reference project's collation: one Data per protein, merged per step, in the training thread."""
    import pyarrow as pa
    from torch_geometric.data import Batch

    from protopo_ray.data import collate

    for indices in plan:
        yield Batch.from_data_list(collate.table_to_data_list(table.take(pa.array(indices))))


def interleaved_loops(data: str, values: dict, epochs: int = 3) -> dict:
    """This project's loop vs the naive loop, epochs alternating (A B B A ...) in one process, same model init."""
    import torch

    from protopo_ray.config import load_config
    from protopo_ray.data import batching, shards
    from protopo_ray.model.network import TopologyModel
    from protopo_ray.training import loop
    from protopo_ray.training.loop import iter_batches
    from protopo_ray.training.schedule import EpochSchedule
    from protopo_ray.training.splits import MemorySplit

    config = load_config(ROOT / CONFIG, {**values, "data.path": data})
    torch.set_num_threads(1)
    table = MemorySplit(shards.read_table(data, folds=config.data.train_folds), config).table
    lengths = table.column("length").to_numpy()
    device = torch.device("cpu")
    sides = {}
    for name in ("protopo", "naive"):
        loop.set_seed(config.train.seed)
        model = TopologyModel(config.model)
        optimizer = loop.build_optimizer(model, config.train)
        scheduler = EpochSchedule(optimizer, config.train)
        sides[name] = (model, optimizer, scheduler, loop.build_loss(config.train), [])
    for epoch in range(epochs):
        order = ("protopo", "naive") if epoch % 2 == 0 else ("naive", "protopo")
        for name in order:
            model, optimizer, scheduler, loss_fn, history = sides[name]
            bucket = config.data.bucket_batches if name == "protopo" else 1
            plan = batching.plan_batches(lengths, config.data.batch_size, bucket_batches=bucket, seed=0, epoch=epoch)
            batches = iter_batches(table, plan) if name == "protopo" else naive_batches(table, plan)
            stats = loop.train_epoch(model, batches, optimizer, scheduler, loss_fn, config.train, device)
            history.append({"epoch": epoch + 1, "residues_per_s": stats.residues_per_s, "seconds": stats.seconds,
                            "data_wait_share": stats.data_wait_share,
                            "padding_efficiency": batching.padding_efficiency(lengths, plan)})
    out = {}
    for name, (*_, history) in sides.items():
        rows = history[1:]
        out[name] = {"train_residues_per_s": float(np.mean([r["residues_per_s"] for r in rows])),
                     "data_wait_share": float(np.mean([r["data_wait_share"] for r in rows])),
                     "padding_efficiency": float(np.mean([r["padding_efficiency"] for r in rows])),
                     "steady_epochs": len(rows), "history": history}
    out["protopo_over_naive"] = out["protopo"]["train_residues_per_s"] / out["naive"]["train_residues_per_s"]
    return out


def run(data: str, storage: str, quick: bool = False, parts: tuple[str, ...] = ("throughput", "scaling"),
        timeout_s: float = 900) -> dict:
    from protopo_ray.data.shards import read_manifest

    try:
        read_manifest(data)
    except FileNotFoundError:
        return {"skipped": f"no shards at {data} (python -m protopo_ray.prepare --labels "
                           f"../shared/data/deeptmhmm/DeepTMHMM.partitions.json --out {data})"}
    # Absolute paths: Ray Train workers run in Ray's session directory, where a relative storage path would put
    # metrics.jsonl (protopo_ray.train passes resources.storage through to the workers as given).
    storage = str((ROOT / storage).resolve())
    values = {**overrides(quick), "data.path": str((ROOT / data).resolve())}
    tag = time.strftime("%H%M%S")
    out: dict = {"config": CONFIG, "overrides": values}
    runs = {}
    # Back to back: Ray 1 worker, local, (Ray 2 workers); each ratio's two sides are neighbours in time.
    plan = [("ray1", 1)] + [("local", None)] + ([("ray2", 2)] if "scaling" in parts else [])
    for label, workers in plan:
        name = f"bench_{label}_{tag}"
        cmd = train_command(name, storage, values, workers)
        print(f"[epoch] {label}: {shell(cmd)}", flush=True)
        runs[label] = run_training(cmd, Path(storage) / name, timeout_s)
        runs[label]["steady"] = steady(runs[label], world_size=workers or 1)
        print(f"[epoch] {label}: {runs[label]['steady'] or runs[label].get('error')}", flush=True)
    out["runs"] = runs
    local, ray1 = runs["local"]["steady"], runs["ray1"]["steady"]
    if local and ray1:
        out["ray1_over_local"] = ray1["train_residues_per_s"] / local["train_residues_per_s"]
    if "ray2" in runs and runs["ray2"]["steady"] and ray1:
        ray2 = runs["ray2"]["steady"]
        out["ray2_over_ray1"] = ray2["train_residues_per_s"] / ray1["train_residues_per_s"]
        out["ray2_epoch_speedup"] = ray1["epoch_time_s"] / ray2["epoch_time_s"]
    if "throughput" in parts:
        print("[epoch] naive vs protopo loop, interleaved in-process", flush=True)
        out["loops"] = interleaved_loops(data, values)
        if ray1:
            # Ray path over the naive loop: the Ray/local ratio (adjacent runs) times the interleaved loop ratio.
            out["ray1_over_naive"] = out.get("ray1_over_local", float("nan")) * out["loops"]["protopo_over_naive"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/deeptmhmm")
    parser.add_argument("--storage", default="runs/bench")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.data, args.storage, args.quick), indent=1, default=str))


if __name__ == "__main__":
    main()
