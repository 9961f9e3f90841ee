"""Padding efficiency of the batch plans on the real DeepTMHMM length distribution (train folds cv0+cv3+cv4).

    .venv/bin/python -m tools.bench_padding [--data data/deeptmhmm] [--batch-size 32]

Padding efficiency = real residues / LSTM positions (proteins x longest protein per batch). Bucketed plans
(`plan_batches`, default bucket_batches=16) against random batches (bucket_batches=1) of the same size, both
averaged over several epochs' plans; the whole-split sort of `eval_batches` is the upper bound for fixed-size
batches. Also: plans with a residue budget per batch (`data.max_residues_per_batch`), keyed "bucket_batches/budget".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from protopo_ray.data import batching

TRAIN_FOLDS = ("cv0", "cv3", "cv4")


def load_lengths(data: str | Path, folds=TRAIN_FOLDS) -> np.ndarray | None:
    from protopo_ray.data import shards

    try:
        table = shards.read_table(data, folds=list(folds), columns=["length"])
    except (FileNotFoundError, ValueError):
        return None
    return table.column("length").to_numpy()


def mean_efficiency(lengths: np.ndarray, batch_size: int, bucket_batches: int, epochs: int,
                    max_residues: int = 0) -> float:
    return float(np.mean([batching.padding_efficiency(lengths, batching.plan_batches(
        lengths, batch_size, max_residues=max_residues, bucket_batches=bucket_batches, seed=0, epoch=epoch))
        for epoch in range(epochs)]))


def run(data: str | Path, batch_size: int = 32, epochs: int = 10) -> dict:
    lengths = load_lengths(data)
    if lengths is None:
        return {"skipped": f"no DeepTMHMM shards with folds {TRAIN_FOLDS} at {data} "
                           f"(python -m protopo_ray.prepare --labels ../shared/data/deeptmhmm/DeepTMHMM.partitions.json --out {data})"}
    random = mean_efficiency(lengths, batch_size, 1, epochs)
    sweep = {str(b): mean_efficiency(lengths, batch_size, b, epochs) for b in (4, 16, 64)}
    # data.max_residues_per_batch closes a batch before proteins x longest exceeds the budget: long proteins
    # then travel in smaller batches instead of padding 31 short ones to their length.
    budget = {f"{b}/{r}": mean_efficiency(lengths, batch_size, b, epochs, max_residues=r)
              for b, r in ((16, 8192), (16, 16384), (64, 16384))}
    sorted_split = batching.padding_efficiency(lengths, batching.eval_batches(lengths, batch_size))
    return {
        "num_proteins": int(len(lengths)),
        "length_min": int(lengths.min()), "length_median": float(np.median(lengths)), "length_max": int(lengths.max()),
        "batch_size": batch_size, "epochs_averaged": epochs,
        "random": random, "bucketed_16": sweep["16"], "eval_sorted": sorted_split,
        "bucket_sweep": sweep,
        "token_budget": budget,
        "bucketed_over_random": sweep["16"] / random,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/deeptmhmm")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(run(args.data, args.batch_size), indent=1))


if __name__ == "__main__":
    main()
