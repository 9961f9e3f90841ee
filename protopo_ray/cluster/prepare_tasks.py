"""`prepare --ray`: build graphs and write shards in Ray Data tasks, so preparation scales with the cluster.

The driver holds only the inputs (records, or synthetic indices) and the tasks' small reports. Inputs are cut
into batches of at most `shards.MAX_ROWS_PER_FILE`; each batch is one Ray Data task that builds its graphs
with the same row functions as the process-pool path (`build.record_rows` / `build.synthetic_rows`:
structures.load_aligned_ca, synthetic.generate_protein, graphs.build_graph) and writes its own shard files
`part-<task>-<n>.parquet` with a `shards.ShardWriter` (same schema, same streaming layout) straight into the
output: a directory (the driver's temp dir; on a multi-node cluster it must be shared by the nodes) or
object storage. The driver then writes the manifest of every task's files, in input order. A task that fails
and is retried rewrites the same files.

With embeddings (`prepare --embed-weights` for ESM-2, `--embed near` for NEAR) the pipeline has three stages:
tasks build the rows, a pool of `EmbedRows` actors (each holding the model the spec names once: a share of a GPU
where the cluster has GPUs, else CPU cores)
adds the embeddings, and tasks write the shard files as above. Such runs are resumable: the batches are
`output.resume_units` (the process-pool path's), each recorded in the driver's `output.ShardLedger` as its report
arrives, and a rerun submits only the batches not recorded yet.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import time
from typing import Any

import numpy as np
import ray
import ray.data

from protopo_ray.cluster.connect import ray_init, started_local_cluster
from protopo_ray.data import shards, storage
from protopo_ray.data.build import PrepareSummary, RowFunction, finish_set, progress_bar
from protopo_ray.data.embeddings import Embedder, EmbeddingSpec
from protopo_ray.data.output import ShardLedger, resume_units, write_unit

TASKS_PER_CPU = 4
"""Batches per CPU at least (smaller batches for small inputs), so long and short proteins even out."""


def connect(address: str | None = None, workers: int | None = None) -> None:
    """Join the cluster at `address` (else the project's rule: RAY_ADDRESS, a running `ray start`, else a new
    local cluster of `workers` CPUs)."""
    if address is not None:
        os.environ["RAY_ADDRESS"] = address
    # A new local cluster's dashboard on a free port, not Ray's default 8265 (another cluster's on a shared host).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local = {"dashboard_port": probe.getsockname()[1], **({"num_cpus": workers} if workers else {})}
    ray_init(log_to_driver=False, logging_level="WARNING", **local)


def disconnect() -> None:
    """Shut down the local cluster this process started (a joined cluster keeps running)."""
    if ray.is_initialized() and started_local_cluster():
        ray.shutdown()


def task_size(num_inputs: int, parallelism: int) -> int:
    """Inputs per task: one shard file's worth, fewer when that leaves under TASKS_PER_CPU tasks per CPU."""
    return max(1, min(shards.MAX_ROWS_PER_FILE, math.ceil(num_inputs / (TASKS_PER_CPU * max(1, parallelism)))))


def build_task(batch: dict[str, np.ndarray], *, rows_of: RowFunction, args: tuple, root: str,
               write_args: dict[str, Any]) -> dict[str, np.ndarray]:
    """The Ray Data task: rows of `rows_of(jobs, *args)` for each input batch, written as that batch's shard
    files; returns one JSON report per batch (output.write_unit's: shard entries, length histogram, (id, graph
    source or fallback reason) per protein, CPU seconds)."""
    reports = []
    for task, payload in zip(batch["task"], batch["payload"]):
        start = time.process_time()
        rows = rows_of(pickle.loads(payload), *args)
        reports.append(json.dumps(write_unit(root, int(task), rows, write_args["k"], time.process_time() - start)))
    return {"report": np.array(reports, dtype=object)}


def rows_task(batch: dict[str, np.ndarray], *, rows_of: RowFunction, args: tuple) -> dict[str, np.ndarray]:
    """Stage 1 with embeddings: the rows of each input batch, pickled, for the embedding actors."""
    rows, cpu_s = [], []
    for payload in batch["payload"]:
        start = time.process_time()
        rows.append(pickle.dumps(rows_of(pickle.loads(payload), *args)))
        cpu_s.append(time.process_time() - start)
    return {"task": batch["task"], "rows": np.array(rows, dtype=object), "cpu_s": np.array(cpu_s)}


class EmbedRows:
    """Stage 2: a Ray Data actor holding one embedding model (ESM-2 or NEAR, as the spec says; on its GPU where
    it was given one); fills in the rows' `embedding` column."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.embedder = Embedder(EmbeddingSpec.from_json(spec))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for payload in batch["rows"]:
            items = pickle.loads(payload)
            for (row, _), vector in zip(items, self.embedder.embed([row["sequence"] for row, _ in items])):
                row["embedding"] = vector.reshape(-1)
            rows.append(pickle.dumps(items))
        return {**batch, "rows": np.array(rows, dtype=object)}


def write_task(batch: dict[str, np.ndarray], *, root: str, write_args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Stage 3: each batch's rows written as its shard files; the same report as `build_task`."""
    reports = [json.dumps(write_unit(root, int(task), pickle.loads(payload), write_args["k"], float(cpu_s)))
               for task, payload, cpu_s in zip(batch["task"], batch["rows"], batch["cpu_s"])]
    return {"report": np.array(reports, dtype=object)}


class RayBuilder:
    """Builds rows and writes shards in Ray Data tasks, at most `workers` at once (default: every CPU of the
    cluster); the same call as `build.LocalBuilder`. `summary.task_cpu_s` gets the tasks' CPU time.

    With embeddings, `embed_actors` actors hold the model (default: one per GPU of the cluster, else one), each
    with `embed_gpus` of a GPU (default 1 where the cluster has GPUs, else 0) or `embed_cpus` CPU cores."""

    def __init__(self, workers: int | None = None, embed_actors: int | None = None, embed_gpus: float | None = None,
                 embed_cpus: float = 1.0) -> None:
        self.workers = workers
        self.embed_actors, self.embed_gpus, self.embed_cpus = embed_actors, embed_gpus, embed_cpus

    def _embed_stage(self, ds: ray.data.Dataset, spec: EmbeddingSpec) -> ray.data.Dataset:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        share = self.embed_gpus if self.embed_gpus is not None else (1.0 if gpus else 0.0)
        actors = self.embed_actors or (max(1, int(gpus / share)) if share else 1)
        return ds.map_batches(EmbedRows, batch_size=1, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=actors),
                              fn_constructor_kwargs={"spec": spec.to_json()},
                              num_gpus=share or None, num_cpus=self.embed_cpus)

    def __call__(self, rows_of: RowFunction, jobs: list, args: tuple, target: str, summary: PrepareSummary, *,
                 what: str, k: int, sources: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None, embedding: EmbeddingSpec | None = None) -> dict[str, Any]:
        if not ray.is_initialized():
            connect(None, self.workers)
        fs, root = storage.filesystem(target)
        fs.create_dir(root, recursive=True)
        parallelism = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        if embedding is None:
            size = task_size(len(jobs), parallelism)
            units = [jobs[start:start + size] for start in range(0, len(jobs), size)]
            ledger, done = None, {}
        else:  # resumable: output.resume_units, the units an interrupted run finished skipped
            units, ledger = resume_units(jobs), ShardLedger(target)
            done = ledger.finished()
            summary.shard_units, summary.shards_reused = len(units), sum(i in done for i in range(len(units)))
        items = [{"task": i, "payload": pickle.dumps(unit)} for i, unit in enumerate(units) if i not in done]
        # Our own bar counts proteins; Ray Data's operator bars would draw over it.
        context = ray.data.DataContext.get_current()
        shown, context.enable_progress_bars = context.enable_progress_bars, False
        compute = ray.data.TaskPoolStrategy(size=self.workers) if self.workers else None
        try:
            reports = self._pipeline(items, rows_of, args, root, k, compute, embedding) if items else None
            progress, bar = progress_bar(len(jobs), f"{what} (Ray, {len(items)} tasks)")
            with progress:
                progress.advance(bar, sum(len(units[i]) for i in done))  # reused from an interrupted run
                for row in reports.iter_rows() if reports is not None else ():
                    report = json.loads(row["report"])
                    done[report["task"]] = ledger.record(report) if ledger else report
                    progress.advance(bar, len(report["sources"]))
        finally:
            context.enable_progress_bars = shown
        summary.task_cpu_s = sum(report["cpu_s"] for report in done.values())
        manifest = finish_set(list(done.values()), target, summary, k=k, sources=sources, extra=extra,
                              embedding=embedding)
        if ledger:
            ledger.clear()
        return manifest

    def _pipeline(self, items: list[dict[str, Any]], rows_of: RowFunction, args: tuple, root: str, k: int,
                  compute: Any, embedding: EmbeddingSpec | None) -> ray.data.Dataset:
        inputs = ray.data.from_items(items, override_num_blocks=len(items))
        if embedding is None:
            return inputs.map_batches(build_task, batch_size=1, batch_format="numpy", num_cpus=1, compute=compute,
                                      fn_kwargs={"rows_of": rows_of, "args": args, "root": root,
                                                 "write_args": {"k": k}})
        rows = inputs.map_batches(rows_task, batch_size=1, batch_format="numpy", num_cpus=1, compute=compute,
                                  fn_kwargs={"rows_of": rows_of, "args": args})
        return self._embed_stage(rows, embedding).map_batches(write_task, batch_size=1, batch_format="numpy",
                                                              num_cpus=1, compute=compute,
                                                              fn_kwargs={"root": root, "write_args": {"k": k}})
