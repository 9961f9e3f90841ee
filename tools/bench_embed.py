"""ESM-2 embedding throughput per CPU core, and what embeddings add to the shards, on synthetic proteins.

    python tools/bench_embed.py [--proteins 40] [--wide]

Random-weight ESM-2 models in fair-esm's file format (protopo_ray.data.embeddings.write_random_esm2): the tiny
one of the tests (2 layers, 16 wide) and, with --wide, one layer 1280 wide (the 650M model's width: its shards
have the real size, and one layer's cost x 33 approximates the 650M model's). Throughput is `Embedder.embed`
in this process with one torch thread (per core); shard bytes per residue come from `prepare_synthetic` with
and without embeddings (zstd Parquet, the manifest's file sizes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from protopo_ray.data import synthetic
from protopo_ray.data.build import prepare_synthetic
from protopo_ray.data.embeddings import Embedder, read_spec, write_random_esm2


def bytes_per_residue(manifest: dict) -> float:
    return sum(shard["num_bytes"] for shard in manifest["shards"]) / manifest["num_residues"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proteins", type=int, default=40)
    parser.add_argument("--wide", action="store_true", help="also a 1-layer, 1280-wide model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    types = synthetic.allocate_types(args.proteins, 0)
    sequences = [synthetic.generate_protein(i, t, 0, "train")[0].sequence for i, t in enumerate(types)]
    residues = sum(map(len, sequences))
    models = [("tiny 2 x 16", 2, 16, 2)] + ([("1 x 1280", 1, 1280, 20)] if args.wide else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = bytes_per_residue(prepare_synthetic(args.proteins, root / "plain", seed=0).manifest)
        print(f"{args.proteins} synthetic proteins, {residues} residues (mean {residues / args.proteins:.0f}); "
              f"torch threads 1")
        print(f"shards without embeddings: {plain:.1f} B/residue")
        for name, layers, dim, heads in models:
            spec = read_spec(write_random_esm2(root / f"esm2_t{layers}_{dim}.pt", layers, dim, heads))
            embedder = Embedder(spec, device="cpu")
            embedder.embed(sequences[:2])  # warm-up
            start = time.perf_counter()
            embedder.embed(sequences)
            elapsed = time.perf_counter() - start
            with_embeddings = bytes_per_residue(prepare_synthetic(args.proteins, root / name.replace(" ", ""),
                                                                  seed=0, embedding=spec).manifest)
            print(f"ESM-2 {name}: {args.proteins / elapsed:.1f} proteins/s, {residues / elapsed:.0f} residues/s per "
                  f"core; shards {with_embeddings:.1f} B/residue ({with_embeddings / plain:.1f}x, "
                  f"+{with_embeddings - plain:.1f} B = {(with_embeddings - plain) / dim:.2f} B per value)")


if __name__ == "__main__":
    main()
