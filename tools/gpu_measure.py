"""What tools/gpu_check.py measures inside one process (one import of torch and PyG): the Ray-free imports, the
training-step microbenchmark, the ESM-2 embedding; each written to OUT/<name>.json as soon as it is done.

    python -m tools.gpu_measure --device cuda --out OUT --shards OUT/work/shards [--tiny]   (gpu_check runs it)
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from tools.gpu_check import ABSENT_ON_GPU, FOLDS, IN_PROCESS, SEED_MODEL, installed, write_json

#: the microbenchmark's precisions: (name, train.bf16, model.lstm_bf16)
PRECISIONS = (("fp32", False, False), ("bf16, LSTM fp32", True, False), ("bf16, LSTM bf16", True, True))


def bench_stage(args: argparse.Namespace) -> dict:
    import itertools

    import torch

    from protopo_ray.config import Config
    from protopo_ray.training import loop
    from protopo_ray.training.splits import local_split
    from tools import bench_step

    device = torch.device(args.device)
    base = Config().replace({"data.path": str(args.shards), **{f"data.{k}": tuple(v) for k, v in FOLDS.items()},
                             **{f"model.{k}": v for k, v in SEED_MODEL.items()}, "train.device": args.device})
    sizes, steps = ((4,), 4) if args.tiny else ((32, 64, 128), 12)
    precisions = PRECISIONS if device.type == "cuda" else PRECISIONS[:1]  # autocast is CUDA-only in the loop
    results, batches_by_size = [], {}
    for size in sizes:
        config = base.replace({"data.batch_size": size})
        _, tables = local_split(config, "train", mode="memory").train_epoch(0, 0, 1)
        # pinned up front, as fit's prefetch thread pins them (collated(pin=True)): the step is what is timed
        batches_by_size[size] = list(loop.collated(itertools.islice(tables, steps), depth=0,
                                                   pin=device.type == "cuda"))
        for (precision, bf16, lstm_bf16), impl in itertools.product(precisions, ("padded", "packed")):
            run = config.replace({"train.bf16": bf16, "model.lstm_bf16": lstm_bf16, "model.lstm_impl": impl})
            row = {"batch_size": size, "precision": precision, "lstm_impl": impl}
            try:
                row.update(bench_step.device_step(run, batches_by_size[size], device, warmup=1 if args.tiny else 2))
            except torch.cuda.OutOfMemoryError as error:  # a figure too: this size does not fit
                row["error"] = f"out of memory: {str(error).splitlines()[0]}"
                torch.cuda.empty_cache()
            results.append(row)
            print(json.dumps(row), flush=True)
            write_json(args.out / "bench.json", {"status": "partial", "device": args.device, "steps": results})
    middle = sizes[len(sizes) // 2]
    before = bench_step.syncs_per_step(base.replace({"data.batch_size": middle}), batches_by_size[middle][:4], device)
    cpu = None
    if device.type == "cuda":  # the per-core CPU figure of the same model, on batches of 4 (~3 k residues/s)
        torch.set_num_threads(1)
        small = base.replace({"data.batch_size": 4, "train.device": "cpu"})
        _, tables = local_split(small, "train", mode="memory").train_epoch(0, 0, 1)
        cpu = bench_step.device_step(small, list(loop.collated(itertools.islice(tables, 3), depth=0)),
                                     torch.device("cpu"), warmup=1, sync_steps=0)
    return {"device": args.device, "steps": results, "host_syncs_before_vs_now": before, "cpu_one_thread": cpu,
            "note": "max_memory_allocated is the steady-state peak (AdamW moments exist); planned_bytes is "
                    "footprint.trial_footprint's formula for the largest timed batch"}


def embed_stage(args: argparse.Namespace) -> dict:
    import pkgutil
    import tempfile

    import torch

    import protopo_ray.data
    from protopo_ray.data import embeddings
    from protopo_ray.data import shards as shard_io

    if not installed("esm"):
        return {"status": "skipped", "reason": "fair-esm is not installed (stage it with --stage-carry)"}
    device = torch.device(args.device)
    table = shard_io.read_table(args.shards, folds=FOLDS["test_folds"], columns=["sequence"])
    sequences = table["sequence"].to_pylist()[: 8 if args.tiny else 256]
    near = [m.name for m in pkgutil.iter_modules(protopo_ray.data.__path__) if "near" in m.name.lower()]
    out = {"device": args.device, "proteins": len(sequences), "residues": sum(map(len, sequences)),
           "max_tokens_per_batch": embeddings.MAX_TOKENS_PER_BATCH,
           "near": {"available": bool(near), "modules": near,
                    "note": "not exercised by this check" if near else "not available in protopo_ray.data"}}
    shapes = {"tiny_2x16": (2, 16, 2)} if args.tiny else {"tiny_2x16": (2, 16, 2), "t6_320": (6, 320, 20)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (layers, dim, heads) in shapes.items():
            weights = embeddings.write_random_esm2(Path(tmp) / f"esm2_{name}.pt", layers, dim, heads)
            embedder = embeddings.Embedder(embeddings.read_spec(weights), device=args.device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            began = time.perf_counter()
            vectors = embedder.embed(sequences)
            seconds = time.perf_counter() - began
            out[name] = {"seconds": seconds, "residues_per_s": out["residues"] / seconds if seconds else 0.0,
                         "model_dtype": str(next(embedder.model.parameters()).dtype),
                         "output_dtype": str(vectors[0].dtype), "dim": int(vectors[0].shape[1]),
                         "finite": bool(all(torch.isfinite(torch.from_numpy(v.astype("float32"))).all() for v in vectors)),
                         "max_memory_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    return out


def imports_stage(args: argparse.Namespace) -> dict:
    """What this check runs imports without the modules the GPU image lacks (first thing in a fresh process)."""
    for module in ("protopo_ray.train", "protopo_ray.predict", "protopo_ray.prepare", "protopo_ray.training.fit",
                   "tools.bench_step"):
        importlib.import_module(module)
    loaded = [name for name in ABSENT_ON_GPU if name in sys.modules]
    if loaded:
        raise RuntimeError(f"importing the Ray-free path loaded {loaded}; the GPU image has none of them")
    return {"loaded_of_absent_on_gpu": loaded}


def in_process_stage(args: argparse.Namespace) -> int:
    """imports, bench, embed in one process (one import of torch and PyG); an error in one is written as its
    JSON and the next still runs."""
    failed = 0
    for name, measure in zip(IN_PROCESS, (imports_stage, bench_stage, embed_stage), strict=True):
        began = time.monotonic()
        try:
            figures = {"status": "ok", **measure(args)}
        except Exception as error:  # noqa: BLE001 - recorded, and the other measurements still run
            figures, failed = {"status": "failed", "error": f"{type(error).__name__}: {error}"}, failed + 1
        figures["seconds"] = round(time.monotonic() - began, 2)
        write_json(args.out / f"{name}.json", figures)
        print(f"{name}: {figures['status']} in {figures['seconds']} s", flush=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    return in_process_stage(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
