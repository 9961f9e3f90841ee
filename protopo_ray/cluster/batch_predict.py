"""`predict --ray`: whole proteomes on Ray Data, streamed, sharded and resumable.

One row per input unit (`inference.inputs`: up to 256 records of one file) travels through five stages, each a
Ray Data `map_batches` over one row at a time, so a unit is never split between blocks:

1. read (CPU tasks, one per input file): the file streamed record by record (local, s3://, gs://; plain or .gz),
   cut into units; units an interrupted run finished are skipped;
2. graphs (CPU tasks): each protein's pieces and graphs, as the checkpoint's training graphs were built;
3. embeddings (an actor pool, GPUs where the cluster has them; only for a predictor trained on them);
4. posteriors (an `ActorPoolStrategy` pool of network actors, each holding the predictor once, an ensemble's
   members together: a GPU share each where the cluster has GPUs, else a CPU), batches planned by a residue budget;
5. decode and write (CPU tasks): the grammar's Viterbi over each protein's posteriors, then the unit's result
   shard (`inference.results`), so an accelerator never waits on decoding.

Stages 2-5 are the functions the in-process path calls (`inference.predictions`), on the same units, so the two
paths give the same predictions. The driver holds only the shard reports; when every unit is written it
assembles predicted.3line, predicted.gff3, summary.tsv and rejects.tsv in input order from the shards.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from protopo_ray.cluster.prepare_tasks import connect
from protopo_ray.data import storage
from protopo_ray.data.embeddings import Embedder, EmbeddingSpec
from protopo_ray.inference.inputs import read_units, unit_residues
from protopo_ray.inference.predictions import (
    Batching,
    build_inputs,
    compute_posteriors,
    decode_posteriors,
    with_embeddings,
)
from protopo_ray.inference.results import (
    SHARDS_DIR,
    ShardReport,
    assemble_outputs,
    prepare_shard_dir,
    shard_repairs,
    write_shard,
)
from protopo_ray.training.predictor import Predictor, load_predictor

#: Seconds between the quiet progress lines.
PROGRESS_EVERY_S = 60.0
#: Logical CPUs of the read and graph tasks: a read task streams a whole file (mostly waiting on the consumers);
#: graphs of sequence windows are cheap. Whole CPUs would leave the network actors and the decoder none.
READ_CPUS, GRAPH_CPUS = 0.1, 0.25


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What the plan (`search.predict_plan`) gives each stage."""

    network_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    embed_actors: int
    embed_gpus: float
    embed_cpus: float
    devices: float
    device: str
    usd_per_device_hour: float | None


def _rows(**columns: list) -> dict[str, np.ndarray]:
    return {name: np.array(values, dtype=object) for name, values in columns.items()}


def read_stage(batch: dict[str, np.ndarray], *, residues: int):
    """Stage 1: each input file's units, one output row each (pickled), streamed as they are cut."""
    for path, index, skip in zip(batch["path"], batch["file"], batch["skip"]):
        for unit in read_units(str(path), int(index), residues, frozenset(json.loads(skip))):
            yield _rows(payload=[pickle.dumps(unit)])


def graph_stage(batch: dict[str, np.ndarray], *, structures: str | None, k: int, cut: Batching):
    """Stage 2: the unit's proteins with their pieces and graphs."""
    out = []
    for payload in batch["payload"]:
        unit = pickle.loads(payload)
        out.append(pickle.dumps((unit, build_inputs(unit.records, structures, k, cut))))
    return _rows(payload=out)


class EmbedUnits:
    """Stage 3: one embedding model per actor; adds each protein's [L, D] embedding."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.embedder = Embedder(EmbeddingSpec.from_json(spec))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for payload in batch["payload"]:
            unit, inputs = pickle.loads(payload)
            vectors = self.embedder.embed([i.record.sequence for i in inputs]) if inputs else None
            out.append(pickle.dumps((unit, with_embeddings(inputs, vectors))))
        return _rows(payload=out)


class PosteriorActor:
    """Stage 4: the predictor (a network or an ensemble, every member on the same batch) on this actor's device."""

    def __init__(self, checkpoint: str, cut: Batching, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        self.module = load_predictor(checkpoint, self.device).module
        self.cut = cut

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for payload in batch["payload"]:
            unit, inputs = pickle.loads(payload)
            out.append(pickle.dumps((unit, compute_posteriors(self.module, inputs, self.device, self.cut))))
        return _rows(payload=out)


@functools.lru_cache(maxsize=2)
def _decoder(checkpoint: str) -> torch.nn.Module:
    """One CPU copy of the predictor per worker process (the decoder's scores are part of it)."""
    torch.set_num_threads(1)
    return load_predictor(checkpoint, "cpu").module


def decode_stage(batch: dict[str, np.ndarray], *, checkpoint: str, root: str, cut: Batching,
                 probabilities: bool) -> dict[str, np.ndarray]:
    """Stage 5: the Viterbi over each unit's posteriors, then its result shard; returns the shard's report."""
    reports = []
    for payload in batch["payload"]:
        unit, posteriors = pickle.loads(payload)
        predictions = decode_posteriors(_decoder(checkpoint), posteriors, cut)
        reports.append(json.dumps(asdict(write_shard(root, unit, predictions, probabilities))))
    return _rows(report=reports)


def build_pipeline(files: list[str], done: dict[str, str], predictor: Predictor, args: argparse.Namespace,
                   cut: Batching, resources: Resources, root: str) -> ray.data.Dataset:
    skip = {i: sorted(int(key.split("-")[1]) for key in done if int(key.split("-")[0]) == i) for i in range(len(files))}
    checkpoint = str(storage.resolve(args.checkpoint))
    structures = str(storage.resolve(args.structures)) if args.structures else None
    items = [{"file": i, "path": path, "skip": json.dumps(skip[i])} for i, path in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_stage, batch_size=1, num_cpus=READ_CPUS,
                        fn_kwargs={"residues": unit_residues(predictor.inputs.embedding_dim)})
    ds = ds.map_batches(graph_stage, batch_size=1, num_cpus=GRAPH_CPUS,
                        fn_kwargs={"structures": structures, "k": predictor.inputs.graph_k, "cut": cut})
    if predictor.inputs.embedding:
        spec = dict(predictor.inputs.embedding)
        if args.embed_weights:
            spec["weights"] = str(storage.resolve(args.embed_weights))
        ds = ds.map_batches(EmbedUnits, batch_size=1, compute=ray.data.ActorPoolStrategy(size=resources.embed_actors),
                            fn_constructor_kwargs={"spec": spec}, num_gpus=resources.embed_gpus or None,
                            num_cpus=resources.embed_cpus)
    ds = ds.map_batches(PosteriorActor, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=resources.network_actors),
                        fn_constructor_kwargs={"checkpoint": checkpoint, "cut": cut,
                                               "threads": int(resources.cpus_per_actor)},
                        num_gpus=resources.gpus_per_actor or None, num_cpus=resources.cpus_per_actor)
    return ds.map_batches(decode_stage, batch_size=1, num_cpus=1,
                          fn_kwargs={"checkpoint": checkpoint, "root": root, "cut": cut,
                                     "probabilities": args.probabilities})


def _input_bytes(files: list[str]) -> int:
    """Bytes of the uncompressed inputs (0 when any is compressed: no estimate of what is left)."""
    if any(path.endswith(".gz") for path in files):
        return 0
    total = 0
    for path in files:
        fs, inner = storage.filesystem(path)
        total += fs.get_file_info(inner).size or 0
    return total


def run(args: argparse.Namespace, predictor: Predictor, files: list[str], cut: Batching,
        resources: Resources) -> int:
    start = time.perf_counter()
    root = storage.join(str(storage.resolve(args.out_dir)), SHARDS_DIR)
    key = {"checkpoint": str(storage.resolve(args.checkpoint)), "inputs": files, "structures": args.structures,
           "embed_weights": args.embed_weights, "batching": asdict(cut), "probabilities": args.probabilities}
    done = prepare_shard_dir(root, key, args.overwrite)
    if done:
        print(f"resuming: {len(done)} finished shard(s) in {root} kept, predicting the rest", flush=True)
    if not ray.is_initialized():
        connect(args.address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "0"
    reports: list[ShardReport] = []
    total_bytes, last = _input_bytes(files), time.perf_counter()
    for row in build_pipeline(files, done, predictor, args, cut, resources, root).iter_rows():
        reports.append(ShardReport(**json.loads(row["report"])))
        if time.perf_counter() - last >= PROGRESS_EVERY_S:
            last = time.perf_counter()
            print(progress_line(reports, last - start, total_bytes), flush=True)
    keys = sorted({*done, *(r.key for r in reports)})
    assembled = assemble_outputs(root, keys, str(args.out_dir), args.out)
    wall = time.perf_counter() - start
    fixed = shard_repairs(root, keys)
    hours = wall / 3600 * resources.devices
    cost = "" if resources.usd_per_device_hour is None else f", ${hours * resources.usd_per_device_hour:.4f}"
    shown = Counter({name: count for name, count in fixed.items() if count})
    repaired = "; repaired: " + ", ".join(f"{c} {n}" for n, c in sorted(shown.items())) if shown else ""
    rejected = f"; {len(assembled.rejects)} rejected (rejects.tsv)" if assembled.rejects else ""
    new = sum(r.num_predicted for r in reports)
    print(f"wrote {assembled.num_predicted} predictions to {args.out_dir} ({len(keys)} shards, {len(done)} reused): "
          f"{new / wall:.1f} proteins/s in {wall:.1f} s on Ray ({resources.network_actors} network actor(s) on "
          f"{resources.device}), {hours:.4f} {resources.device.upper()}-hours{cost}{rejected}{repaired}")
    if assembled.rejects:
        print(f"rejected {len(assembled.rejects)} record(s); the first: {assembled.rejects[0].reason}",
              file=sys.stderr)
    return 0


def progress_line(reports: list[ShardReport], elapsed_s: float, total_bytes: int) -> str:
    proteins = sum(r.num_predicted + r.num_rejected for r in reports)
    residues = sum(r.residues for r in reports)
    rate = proteins / max(elapsed_s, 1e-9)
    eta = ""
    if total_bytes and residues:
        # ~1 byte per residue plus a header line per protein: what is left of the input, at the rate so far
        left = max(0.0, total_bytes - residues - 30 * proteins)
        eta = f", ETA ~{left / (residues / elapsed_s) / 60:.0f} min"
    return f"predict: {proteins} proteins done ({len(reports)} shards), {rate:.1f} proteins/s{eta}"
