"""Footprint calibration: the planner's memory estimate of a training step against a measured peak.

    .venv/bin/python -m tools.bench_footprint            # CPU: peak resident memory of one step, per config
    .venv/bin/python -m tools.bench_footprint --cuda     # on a GPU machine: torch.cuda.max_memory_allocated

Each config runs in a fresh process: model, AdamW and one batch are built and one training step is taken (it
creates AdamW's moments); then the peak is reset and a second, steady-state step (forward, loss, backward, clip,
AdamW step) is measured. On the CPU the
peak is the process's high-water mark of resident memory (VmHWM, reset through /proc/self/clear_refs) with
glibc's mmap threshold lowered so freed tensors go back to the OS at once; the weights were resident before the
reset, so they (and AdamW's two moments) are added back. On CUDA the peak of allocated bytes (the caching
allocator's view, weights and moments included) is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

#: (gc_operator, gc_size, lstm_size, lstm_layers, proteins, length): the seed's grid corners and the final choice.
CONFIGS = [
    ("gcn", 64, 128, 1, 8, 500),
    ("gcn", 64, 128, 4, 8, 500),
    ("gcn", 128, 512, 2, 4, 500),
    ("gcn", 512, 512, 4, 2, 500),
    ("cfconv", 64, 128, 2, 4, 500),
]

CHILD = r"""
import json, sys, torch
from protopo_ray.config import Config
from protopo_ray.model.footprint import trial_footprint
from protopo_ray.training.loop import build_loss, build_optimizer
from protopo_ray.model.network import TopologyModel
from tools.bench_model import synthetic_batch

operator, gc, lstm, layers, proteins, length, device = sys.argv[1:8]
proteins, length = int(proteins), int(length)
torch.set_num_threads(1)
torch.manual_seed(0)
config = Config().replace({"model.gc_operator": operator, "model.gc_size": int(gc), "model.lstm_size": int(lstm),
                           "model.lstm_layers": int(layers), "data.batch_size": proteins})
estimate = trial_footprint(config, longest=length)
model = TopologyModel(config.model).to(device)
optimizer = build_optimizer(model, config.train)
loss_fn = build_loss(config.train).to(device)
batch = synthetic_batch([length] * proteins).to(device)
weights = sum(p.numel() * 4 for p in model.parameters())

def hwm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def step():
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = model(batch)
    loss = loss_fn(logits.float(), batch.y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
    optimizer.step()

step()  # the first step creates AdamW's moments; every later step is the steady state measured here
optimizer.zero_grad(set_to_none=True)
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    base = rss_bytes()
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
step()
if device == "cuda":
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()  # weights and AdamW moments included (allocated before)
else:
    # resident before the reset: the interpreter, torch, the weights, AdamW's moments and the batch; the
    # step adds gradients and activations. The weights and moments count toward the training footprint.
    measured = hwm_bytes() - base + 3 * weights
print(json.dumps({"estimate": estimate.total_bytes, "measured": measured, "weights": weights,
                  "positions": estimate.padded_positions}))
"""


def measure(config: tuple, device: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, config), device], capture_output=True, text=True,
                          env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="measure on the GPU (torch.cuda.max_memory_allocated)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = "cuda" if args.cuda else "cpu"
    print(f"| operator | GC | LSTM | layers | batch | positions | estimate MiB | measured MiB ({device}) | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for config in CONFIGS:
        row = measure(config, device)
        error = row["estimate"] / row["measured"] - 1
        rows.append({"config": config, **row, "error": error})
        operator, gc, lstm, layers, proteins, _ = config
        print(f"| {operator} | {gc} | {lstm} | {layers} | {proteins} | {row['positions']} | "
              f"{row['estimate'] / 2**20:.0f} | {row['measured'] / 2**20:.0f} | {error:+.0%} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
