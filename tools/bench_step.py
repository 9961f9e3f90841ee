"""Residues per second per core of a training step on the quality run's model, and the validation decode's cost.

    .venv/bin/python -m tools.bench_step [--proteins 320] [--repeats 3] [--out benchmarks/bench_step.json] [--issue30]

The model and features of experiments/deeptmhmm_ensemble.toml (GC 64 x 2, BiLSTM 64 x 2, hydropathy, charge,
BLOSUM) on the first `--proteins` training proteins of data/deeptmhmm (sequence-window graphs), batched as the
run batches them. The same batches go through `loop.train_epoch` with the GC layers as sparse message passing
(the path before the dense window pass; `batch.window = -1` forces it) and as dense window sums, interleaved
`--repeats` times in one process so both see the same load; then the window path on two torch threads. Each
figure is labelled residues / seconds inside `loop.train_epoch`, from a fresh model with the same seed.
Validation decode: the grammar Viterbi over the cv1 proteins' posteriors (what a decoder = "viterbi" epoch
adds), against the forward pass that makes them.
Host syncs per step (issue 30): the step as it was (`legacy_step`: three reads back per step, plus the forward
pass's longest-length read) and as it is (`loop.train_step` after `loop.to_device`), counted by
`training.syncs.count_syncs` (on CPU: the reads that would sync on CUDA; tools/gpu_check.py counts on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from protopo_ray.config import load_config
from protopo_ray.data.alphabet import IGNORE_LABEL
from protopo_ray.model.network import TopologyModel
from protopo_ray.training import loop, syncs
from protopo_ray.training.checkpoint import unwrap
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


def legacy_step(model, batch, optimizer, scheduler, loss_fn, cfg, device: torch.device) -> tuple[float, int, float]:
    """The training step of `loop.train_epoch` before issue 30, reads and all: (loss, residues, grad norm)."""
    batch = copy.copy(batch).to(device, non_blocking=True)  # a copy: the caller's batch stays on the host
    with loop._autocast(device, cfg.bf16):
        logits = model(batch)
    loss = unwrap(model).loss(batch, logits, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    optimizer.step()
    scheduler.step()
    residues = int((batch.y != IGNORE_LABEL).sum())
    return float(loss.detach()), residues, norm


def syncs_per_step(config, batches: list, device: torch.device) -> dict[str, dict[str, float]]:
    """Host syncs per training step, before (`legacy_step`) and now (`loop.train_step`), on the same batches;
    the first step of each (optimiser state being created) is left out."""
    loop.set_seed(0)
    model = TopologyModel(config.model).to(device)
    optimizer = loop.build_optimizer(model, config.train)
    loss_fn = loop.build_loss(config.train).to(device)
    totals = loop.StepTotals(device, config.train.clip_grad_norm)
    legacy_step(model, batches[0], optimizer, _NoSchedule(), loss_fn, config.train, device)
    counted = {"before": [], "now": []}
    for batch in batches[1:]:
        with syncs.count_syncs(device, syncs.optimizer_steps(optimizer)) as count:
            legacy_step(model, batch, optimizer, _NoSchedule(), loss_fn, config.train, device)
        counted["before"].append(count)
        moved = loop.to_device(batch, device)  # host-side reads before the step, by design
        with syncs.count_syncs(device, syncs.optimizer_steps(optimizer)) as count:
            loop.train_step(model, moved, optimizer, _NoSchedule(), loss_fn, config.train, totals)
        counted["now"].append(count)
    result = {}
    for name, counts in counted.items():
        calls: dict[str, int] = {}
        for count in counts:
            for call, n in count.by_call.items():
                calls[call] = calls.get(call, 0) + n
        result[name] = {"per_step": sum(c.total for c in counts) / max(1, len(counts)), "steps": len(counts),
                        "by_call": calls}
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_step(config, batches: list, device: torch.device, *, warmup: int = 2, sync_steps: int = 2) -> dict:
    """One configuration's training step on `device` (tools/gpu_check.py's microbenchmark): `warmup` steps, then
    the rest of `batches` timed (ms per step, labelled residues/s), the steady-state peak of
    torch.cuda.max_memory_allocated (CUDA) against the planner's estimate for the largest batch, and the host
    syncs of `sync_steps` more steps (`count_syncs`)."""
    from protopo_ray.model.footprint import MEASURED_ACTIVATION_SCALE, footprint

    loop.set_seed(0)
    model = TopologyModel(config.model).to(device)
    optimizer = loop.build_optimizer(model, config.train)
    loss_fn = loop.build_loss(config.train).to(device)
    totals = loop.StepTotals(device, config.train.clip_grad_norm)
    timed = batches[warmup:]
    for batch in batches[:warmup]:
        loop.train_step(model, loop.to_device(batch, device), optimizer, _NoSchedule(), loss_fn, config.train, totals)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    for batch in timed:
        loop.train_step(model, loop.to_device(batch, device), optimizer, _NoSchedule(), loss_fn, config.train, totals)
    _sync(device)
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    count = []
    for batch in batches[:sync_steps]:
        moved = loop.to_device(batch, device)
        with syncs.count_syncs(device, syncs.optimizer_steps(optimizer)) as counted:
            loop.train_step(model, moved, optimizer, _NoSchedule(), loss_fn, config.train, totals)
        count.append(counted.total)
    positions = max(int(b.num_graphs) * int(b.lengths.max()) for b in timed)
    estimate = footprint(config.model, batch_size=1, max_len=positions)
    # as footprint.trial_footprint plans a trial: weights + AdamW + max(measured share of activations, grads)
    planned = estimate.weights_bytes + estimate.optimizer_bytes + max(
        MEASURED_ACTIVATION_SCALE * estimate.batch_activation_bytes, estimate.grads_bytes)
    residues = sum(int((b.y != IGNORE_LABEL).sum()) for b in timed)
    return {"steps": len(timed), "ms_per_step": 1000 * seconds / max(1, len(timed)),
            "residues_per_s": residues / seconds if seconds > 0 else 0.0, "residues": residues,
            "peak_padded_positions": positions, "planned_bytes": int(planned),
            "analytic_total_bytes": estimate.total_bytes, "max_memory_allocated": peak,
            "measured_over_planned": peak / planned if peak else None,
            "syncs_per_step": sum(count) / max(1, len(count)),
            "lstm_path": unwrap(model).lstm.path(device)}


def legacy_rate(config, batches: list) -> float:
    """Residues/s of the step before issue 30 (`legacy_step`) over `batches`, from a fresh seeded model."""
    loop.set_seed(0)
    model = TopologyModel(config.model)
    optimizer = loop.build_optimizer(model, config.train)
    loss_fn = loop.build_loss(config.train)
    model.train()
    began, residues = time.perf_counter(), 0
    for batch in batches:
        residues += legacy_step(model, batch, optimizer, _NoSchedule(), loss_fn, config.train, torch.device("cpu"))[1]
    return residues / (time.perf_counter() - began)


def issue30_rates(config, batches: list, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Residues/s on one thread, interleaved `repeats` times: the step before issue 30 and now (padded LSTM), and
    now with the packed LSTM path (what auto picks on CUDA)."""
    packed = config.replace({"model.lstm_impl": "packed"})
    rates: dict[str, list[float]] = {"before (per-step reads)": [], "now, padded LSTM": [], "now, packed LSTM": []}
    for _ in range(repeats):
        rates["before (per-step reads)"].append(legacy_rate(config, batches))
        rates["now, padded LSTM"].append(step_rate(config, batches, window=True, threads=1))
        rates["now, packed LSTM"].append(step_rate(packed, batches, window=True, threads=1))
    return {"rates": rates}


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
    parser.add_argument("--issue30", action="store_true", help="only issue 30's CPU figures: host syncs per step, "
                        "the step before / now and the LSTM paths (1 thread, --repeats interleaved)")
    args = parser.parse_args()
    config = load_config(CONFIG, {"data.max_proteins": args.proteins, "model.decoder": "argmax"})
    steps, tables = local_split(config, "train").train_epoch(0, 0, 1)
    batches = list(loop.collated(tables, depth=0))
    assert all(b.window > 0 for b in batches), "expected sequence-window graphs"
    if args.issue30:
        torch.set_num_threads(1)
        figures = {"host_syncs": syncs_per_step(config, batches[:6], torch.device("cpu")),
                   **issue30_rates(config, batches, args.repeats), "proteins": args.proteins,
                   "batches": len(batches), "load_before": os.getloadavg()}
        print(json.dumps(figures, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
        return 0
    rates: dict[str, list[float]] = {"sparse GC, 1 thread": [], "window GC, 1 thread": [],
                                     "window GC, 2 threads": []}
    for _ in range(args.repeats):
        rates["sparse GC, 1 thread"].append(step_rate(config, batches, window=False, threads=1))
        rates["window GC, 1 thread"].append(step_rate(config, batches, window=True, threads=1))
        rates["window GC, 2 threads"].append(step_rate(config, batches, window=True, threads=2))
    for name, values in rates.items():
        print(f"{name}: {', '.join(f'{v:,.0f}' for v in values)} residues/s (median {sorted(values)[len(values) // 2]:,.0f})")
    host_syncs = syncs_per_step(config, batches[:6], torch.device("cpu"))
    print(f"host syncs per step (CPU count of the reads that sync on CUDA): before {host_syncs['before']['per_step']:g} "
          f"{host_syncs['before']['by_call']}, now {host_syncs['now']['per_step']:g} {host_syncs['now']['by_call']}")
    decode = decode_cost(load_config(CONFIG, {"model.decoder": "viterbi"}))
    print(f"validation ({decode['val_proteins']} proteins, {decode['val_residues']} residues, 1 thread): forward "
          f"{decode['forward_s']:.1f} s, grammar Viterbi {decode['viterbi_s']:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rates": rates, "decode": decode, "host_syncs": host_syncs, "proteins": args.proteins,
                                          "batches": len(batches), "cpu": platform.processor() or platform.machine(),
                                          "load_before": os.getloadavg()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
