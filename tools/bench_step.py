"""Residues per second per core of a training step on the quality run's model, and the validation decode's cost.

    .venv/bin/python -m tools.bench_step [--proteins 320] [--repeats 3] [--out benchmarks/bench_step.json]

The model and features of experiments/deeptmhmm_ensemble.toml (GC 64 x 2, BiLSTM 64 x 2, hydropathy, charge,
BLOSUM) on the first `--proteins` training proteins of data/deeptmhmm (sequence-window graphs), batched as the
run batches them. The same batches go through `loop.train_epoch` with the GC layers as sparse message passing
(the path before the dense window pass; `batch.window = -1` forces it) and as dense window sums, interleaved
`--repeats` times in one process so both see the same load; then the window path on two torch threads. Each
figure is labelled residues / seconds inside `loop.train_epoch`, from a fresh model with the same seed.
Validation decode: the grammar Viterbi over the cv1 proteins' posteriors (what a decoder = "viterbi" epoch
adds), against the forward pass that makes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from protopo_ray.config import load_config
from protopo_ray.model.network import TopologyModel
from protopo_ray.training import loop
from protopo_ray.training.splits import local_split

CONFIG = "experiments/deeptmhmm_ensemble.toml"


class _NoSchedule:
    def step(self) -> None:
        pass


def step_rate(config, batches: list, window: bool, threads: int) -> float:
    torch.set_num_threads(threads)
    run = []
    for batch in batches:
        batch = batch.clone()
        if not window:
            batch.window = -1
        run.append(batch)
    loop.set_seed(0)
    model = TopologyModel(config.model)
    optimizer = loop.build_optimizer(model, config.train)
    stats = loop.train_epoch(model, run, optimizer, _NoSchedule(), loop.build_loss(config.train), config.train,
                             torch.device("cpu"))
    return stats.residues_per_s


def decode_cost(config) -> dict[str, float]:
    torch.set_num_threads(1)
    val = local_split(config.replace({"data.max_proteins": 0}), "val", mode="memory")
    batches = list(loop.collated(val.eval_batches(0, 1), depth=0))
    loop.set_seed(0)
    model = TopologyModel(config.model).eval()
    forward = decode = 0.0
    residues = 0
    with torch.no_grad():
        for batch in batches:
            began = time.perf_counter()
            logits = model(batch).float()
            forward += time.perf_counter() - began
            began = time.perf_counter()
            model.decode(batch, logits)
            decode += time.perf_counter() - began
            residues += int(batch.num_nodes)
    return {"val_proteins": sum(int(b.num_graphs) for b in batches), "val_residues": residues,
            "forward_s": forward, "viterbi_s": decode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proteins", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/bench_step.json")
    args = parser.parse_args()
    config = load_config(CONFIG, {"data.max_proteins": args.proteins, "model.decoder": "argmax"})
    steps, tables = local_split(config, "train").train_epoch(0, 0, 1)
    batches = list(loop.collated(tables, depth=0))
    assert all(b.window > 0 for b in batches), "expected sequence-window graphs"
    rates: dict[str, list[float]] = {"sparse GC, 1 thread": [], "window GC, 1 thread": [],
                                     "window GC, 2 threads": []}
    for _ in range(args.repeats):
        rates["sparse GC, 1 thread"].append(step_rate(config, batches, window=False, threads=1))
        rates["window GC, 1 thread"].append(step_rate(config, batches, window=True, threads=1))
        rates["window GC, 2 threads"].append(step_rate(config, batches, window=True, threads=2))
    for name, values in rates.items():
        print(f"{name}: {', '.join(f'{v:,.0f}' for v in values)} residues/s (median {sorted(values)[len(values) // 2]:,.0f})")
    decode = decode_cost(load_config(CONFIG, {"model.decoder": "viterbi"}))
    print(f"validation ({decode['val_proteins']} proteins, {decode['val_residues']} residues, 1 thread): forward "
          f"{decode['forward_s']:.1f} s, grammar Viterbi {decode['viterbi_s']:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rates": rates, "decode": decode, "proteins": args.proteins,
                                          "batches": len(batches), "cpu": platform.processor() or platform.machine(),
                                          "load_before": os.getloadavg()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
