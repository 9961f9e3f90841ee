"""Streaming vs in-memory splits: memory at 1x / 20x data, and epoch throughput on DeepTMHMM.

    .venv/bin/python -m tools.bench_stream memory [--small data/synthetic1k --large data/synthetic20k]
    .venv/bin/python -m tools.bench_stream throughput [--data data/deeptmhmm --pairs 2]
    .venv/bin/python -m tools.bench_stream padding [--data data/deeptmhmm --budget 65536]
    .venv/bin/python -m tools.bench_stream quality [--data data/deeptmhmm --epochs 3]

memory: one 2-worker Ray Train epoch (DDP, gloo) of the smoke model over each shard set, per loading path;
peak RSS of the driver (this tool's child, joined to a Ray instance this tool started, so Ray's daemons are
not its children: `wait4` gives the driver's own peak) and of every rank (`workers.json`: `getrusage` peak
RSS, which counts the object-store pages a rank maps, and the sampled peak of its private memory, RssAnon;
see protopo_ray/training/memory.py). Growth = large / small.
throughput: in-process runs (the path one-worker search trials take) of bench_asha.toml's model on the real split with
`data.loading` memory and stream, epochs interleaved; residues/s, data-wait share, padding efficiency, and
the validation metrics of both (the stream's batches differ, so they agree within noise, not exactly). On a
shared machine the wall-clock ratio swings with other jobs' load; the CPU-seconds ratio (this process's CPU
time for the whole run, every thread) is the figure to read there.
Writes benchmarks/stream_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "experiments/smoke.toml"


def memory(small: str, large: str, storage: str, budget: int, loadings: tuple[str, ...] = ("stream", "memory")) -> dict:
    """A residue budget bounds the largest batch: without one the larger set's longer tail alone makes the
    biggest batch (and its activations) larger, which is the model's footprint, not the data path's."""
    import ray

    os.environ["RAY_worker_niceness"] = "0"  # Ray's default nice 15 starves its workers on a shared machine
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    env = {**os.environ, "RAY_ADDRESS": context.address_info["address"], "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    out: dict = {"runs": []}
    try:
        for loading in loadings:
            for label, data in (("1x", small), ("20x", large)):
                name = f"mem_{loading}_{label}_{int(time.time())}"
                cmd = [sys.executable, "-m", "protopo_ray.train", "--config", SMOKE, "--num-workers", "2",
                       "--storage", storage, "--set", f"name={name}", "--set", f"data.path='{data}'",
                       "--set", "train.epochs=1", "--set", "train.num_threads=1", "--set", "data.batch_size=16",
                       "--set", f"data.loading='{loading}'", "--set", f"data.max_residues_per_batch={budget}"]
                probe = [sys.executable, "-c", PROBE, *cmd]
                proc = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                driver_peak = json.loads(proc.stdout.strip().splitlines()[-1])["driver_peak_rss_bytes"]
                run_dir = Path(storage) / name
                workers = json.loads((run_dir / "workers.json").read_text())
                metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
                row = {"loading": loading, "size": label, "data": data,
                       "proteins": json.loads((Path(data) / "manifest.json").read_text())["num_proteins"],
                       "driver_peak_rss_bytes": driver_peak,
                       "rank_peak_rss_bytes": [w["peak_rss_bytes"] for w in sorted(workers, key=lambda w: w["rank"])],
                       "rank_peak_anon_bytes": [w["peak_anon_bytes"] for w in sorted(workers, key=lambda w: w["rank"])],
                       "rank_peak_shmem_bytes": [w["peak_shmem_bytes"] for w in sorted(workers, key=lambda w: w["rank"])],
                       "epoch_time_s": metrics["epoch_time_s"], "train_proteins_all_ranks": metrics["train_proteins_all_ranks"],
                       "train_rank_overlap": metrics["train_rank_overlap"],
                       "command": " ".join(["RAY_ADDRESS=<local>", ".venv/bin/python", *cmd[1:]])}
                print(json.dumps(row), flush=True)
                out["runs"].append(row)
    finally:
        ray.shutdown()
    for loading in loadings:
        rows = {r["size"]: r for r in out["runs"] if r["loading"] == loading}
        out[f"{loading}_growth"] = {
            "driver": rows["20x"]["driver_peak_rss_bytes"] / rows["1x"]["driver_peak_rss_bytes"],
            "ranks_rss": [b / a for a, b in zip(rows["1x"]["rank_peak_rss_bytes"], rows["20x"]["rank_peak_rss_bytes"])],
            "ranks_anon": [b / a for a, b in zip(rows["1x"]["rank_peak_anon_bytes"], rows["20x"]["rank_peak_anon_bytes"])]}
    return out


# Runs the driver as its only child and prints that child's own peak RSS (wait4), so figures never mix.
PROBE = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=sys.stderr)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"driver_peak_rss_bytes": usage.ru_maxrss * 1024}))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def throughput(data: str, pairs: int, storage: str, budget: int) -> dict:
    import torch

    from protopo_ray.config import load_config
    from protopo_ray.training.fit import fit
    from protopo_ray.training.session import LocalSession

    torch.set_num_threads(1)
    # bench_asha.toml's small model (GC 32 x 2, biLSTM 32 x 2) on the whole real split: a small model makes the
    # data path's share of an epoch larger than a real trial's, so the ratio is a lower bound.
    base = load_config("experiments/bench_asha.toml", {"data.path": data, "data.max_proteins": 0,
                                                       "data.max_residues_per_batch": budget, "train.num_threads": 1})
    out: dict = {"data": data, "pairs": pairs, "max_residues_per_batch": budget, "runs": {"memory": [], "stream": []}}
    for pair in range(pairs):  # one-epoch runs, alternating which path goes first: load drifts cancel
        for loading in (("memory", "stream") if pair % 2 == 0 else ("stream", "memory")):
            name = f"thr_{loading}_{pair}_{int(time.time())}"
            config = base.replace({"data.loading": loading, "name": name, "resources.storage": storage,
                                   "train.epochs": 1})
            cpu = time.process_time()  # this process's CPU seconds (every thread): fair under a shared machine's load
            fit(config, LocalSession(config))
            row = json.loads((Path(storage) / name / "metrics.jsonl").read_text().splitlines()[-1])
            row["run_cpu_s"] = time.process_time() - cpu
            out["runs"][loading].append(row)
            print(loading, json.dumps({k: row[k] for k in ("train_residues_per_s", "train_data_wait_share",
                                                           "train_padding_efficiency", "train_steps", "run_cpu_s", "val_loss",
                                                           "val_overlap_acc")}), flush=True)
    mem, st = out["runs"]["memory"], out["runs"]["stream"]
    out["throughput_ratio_per_pair"] = [s["train_residues_per_s"] / m["train_residues_per_s"] for m, s in zip(mem, st)]
    out["throughput_ratio"] = sum(out["throughput_ratio_per_pair"]) / pairs
    # Residues per CPU second of the whole run (read, epoch, validation): what the wall clock shows on an idle machine.
    out["cpu_ratio_per_pair"] = [m["run_cpu_s"] / s["run_cpu_s"] for m, s in zip(mem, st)]
    out["cpu_ratio"] = sum(out["cpu_ratio_per_pair"]) / pairs
    out["stream_data_wait_share"] = max(r["train_data_wait_share"] for r in st)
    out["memory_data_wait_share"] = max(r["train_data_wait_share"] for r in mem)
    out["stream_padding_efficiency"] = min(r["train_padding_efficiency"] for r in st)
    out["memory_padding_efficiency"] = min(r["train_padding_efficiency"] for r in mem)
    return out


def padding(data: str, budget: int) -> dict:
    """Padding efficiency of the stream's bucketing vs the in-memory plan on the real train split, per window size
    (bucket_batches), under the residue budget: pure batching, no training."""
    import numpy as np

    from protopo_ray.config import load_config
    from protopo_ray.data import batching, shards
    from protopo_ray.training import splits

    config = load_config("experiments/bench_asha.toml", {"data.path": data, "data.max_proteins": 0})
    table = shards.read_table(data, folds=config.data.train_folds, columns=["id", "length"])
    lengths = table.column("length").to_numpy()
    out: dict = {"data": data, "proteins": len(lengths), "max_residues_per_batch": budget, "batch_size": 32,
                 "length_percentiles_50_90_99_max": [*np.percentile(lengths, [50, 90, 99]).tolist(), int(lengths.max())],
                 "sweep": {}}
    for bucket in (16, 32, 64, 128):
        plan = batching.plan_batches(lengths, 32, max_residues=budget, bucket_batches=bucket, seed=0)
        row_groups = [table.slice(i, 64) for i in range(0, table.num_rows, 64)]  # what a stream delivers
        batches = list(splits.bucketed(row_groups, np.random.default_rng(0), batch_size=32, max_residues=budget,
                                       window=32 * bucket, pool_rows=64 * bucket))
        real = sum(int(b.column("length").to_numpy().sum()) for b in batches)
        padded = sum(b.num_rows * int(b.column("length").to_numpy().max()) for b in batches)
        out["sweep"][bucket] = {"memory": batching.padding_efficiency(lengths, plan), "stream": real / padded,
                                "window_proteins": 32 * bucket}
        print(bucket, json.dumps(out["sweep"][bucket]), flush=True)
    return out


def quality(data: str, epochs: int, storage: str, budget: int) -> dict:
    """Same seed, memory vs stream, beside the memory path at another seed: is the stream's difference noise?"""
    import torch

    from protopo_ray.config import load_config
    from protopo_ray.training.evaluation import evaluate_checkpoint
    from protopo_ray.training.fit import fit
    from protopo_ray.training.session import LocalSession

    torch.set_num_threads(1)
    base = load_config("experiments/bench_asha.toml", {"data.path": data, "data.max_proteins": 0,
                                                       "data.max_residues_per_batch": budget, "train.num_threads": 1,
                                                       "train.epochs": epochs})
    out: dict = {"data": data, "epochs": epochs, "runs": []}
    for loading, seed in (("memory", 0), ("stream", 0), ("memory", 1)):
        name = f"q_{loading}_{seed}_{int(time.time())}"
        config = base.replace({"data.loading": loading, "train.seed": seed, "name": name, "resources.storage": storage})
        fit(config, LocalSession(config))
        rows = [json.loads(line) for line in (Path(storage) / name / "metrics.jsonl").read_text().splitlines()]
        test = evaluate_checkpoint(Path(storage) / name / "best", config, split="test")
        run = {"loading": loading, "seed": seed, "val": {k: rows[-1][f"val_{k}"] for k in QUALITY_KEYS},
               "test": {k: test[k] for k in QUALITY_KEYS}}
        print(json.dumps(run), flush=True)
        out["runs"].append(run)
    return out


QUALITY_KEYS = ("loss", "residue_acc", "overlap_acc", "type_acc", "topo_mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("memory", "throughput", "padding", "quality"))
    parser.add_argument("--small", default="data/synthetic1k")
    parser.add_argument("--large", default="data/synthetic20k")
    parser.add_argument("--data", default="data/deeptmhmm")
    parser.add_argument("--pairs", type=int, default=2, help="memory/stream pairs of one-epoch runs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each quality run")
    parser.add_argument("--loadings", default="stream,memory", help="memory part: which loading paths to run")
    parser.add_argument("--memory-budget", type=int, default=4096, help="data.max_residues_per_batch for memory")
    parser.add_argument("--budget", type=int, default=65536, help="data.max_residues_per_batch for throughput")
    parser.add_argument("--storage", default="/tmp/protopo_bench_stream")
    args = parser.parse_args()
    if args.part == "memory":
        result = memory(str(ROOT / args.small), str(ROOT / args.large), args.storage, args.memory_budget,
                        tuple(args.loadings.split(",")))
    elif args.part == "padding":
        result = padding(str(ROOT / args.data), args.budget)
    elif args.part == "throughput":
        result = throughput(str(ROOT / args.data), args.pairs, args.storage, args.budget)
    else:
        result = quality(str(ROOT / args.data), args.epochs, args.storage, args.budget)
    target = ROOT / "benchmarks" / f"stream_{args.part}.json"
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
