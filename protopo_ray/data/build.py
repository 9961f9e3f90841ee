"""Building shard sets, so training never parses labels or structures: records -> residue graphs -> Parquet.

`prepare_records` (a labels file, optional structures) and `prepare_synthetic` (the embedded generator) turn their
inputs into jobs; a *builder* runs a row function over the jobs and writes the shards: `LocalBuilder` in this
machine's processes, or `protopo_ray.cluster.prepare_tasks.RayBuilder` in Ray Data tasks on a cluster (the
entry point `python -m protopo_ray.prepare` chooses). Either way the set lands through
`protopo_ray.data.output.write_output` (atomically, or resumably for embedding runs).

`ensure_data` is the one rule every entry point (tune, train, predict) follows for the embedded synthetic set.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from protopo_ray.data import output, shards, storage, synthetic
from protopo_ray.data.embeddings import EmbeddingSpec, embed_rows
from protopo_ray.data.graphs import DEFAULT_K, build_graph
from protopo_ray.data.output import (
    OutputExists,
    ShardLedger,
    check_out,
    resume_units,
    write_output,
    write_unit,
)
from protopo_ray.data.records import ProteinRecord, read_records
from protopo_ray.data.structures import load_aligned_ca

GRAPH_BUILDER = "protopo_ray.data.graphs.build_graph"
SYNTHETIC_MODULE = "protopo_ray.data.synthetic"
_SHOWN_IDS = 5  # ids listed per fallback reason in the summary


@dataclass(slots=True)
class PrepareSummary:
    out: str
    num_read: int = 0
    num_written: int = 0
    num_structure: int = 0
    num_sequence: int = 0
    fallback: dict[str, list[str]] = field(default_factory=dict)
    """Why proteins got a sequence graph: reason -> protein ids."""
    unreadable: list[str] = field(default_factory=list)
    """Structure files that could not be read, "<id>: <file>: <what is wrong>; <what to do>" each; those proteins
    got the sequence graph."""
    skipped: list[str] = field(default_factory=list)
    """Invalid records left out (--skip-invalid): one located message each."""
    shards_reused: int = 0
    """Shard units taken over from an interrupted run (resumable embedding runs)."""
    shard_units: int = 0
    """Shard units of a resumable run, reused or written."""
    elapsed_s: float = 0.0
    task_cpu_s: float | None = None
    """CPU seconds the Ray tasks spent building and writing (--ray only): proteins / task_cpu_s is per core."""
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def proteins_per_s(self) -> float:
        return self.num_written / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def format(self) -> str:
        lines = [f"prepared {self.out}: {self.num_written} of {self.num_read} records written in "
                 f"{self.elapsed_s:.1f} s ({self.proteins_per_s:.1f} proteins/s)",
                 f"  graphs: {self.num_structure} from structure, {self.num_sequence} sequence fallback"]
        if self.shards_reused:
            lines.append(f"  resumed: {self.shards_reused} of {self.shard_units} shards reused from an interrupted run")
        if self.task_cpu_s:
            lines.append(f"  Ray tasks: {self.task_cpu_s:.1f} CPU s ({self.num_written / self.task_cpu_s:.1f} "
                         f"proteins per CPU second)")
        if self.fallback:
            parts = []
            for reason, ids in sorted(self.fallback.items(), key=lambda item: -len(item[1])):
                shown = ", ".join(ids[:_SHOWN_IDS]) + (", ..." if len(ids) > _SHOWN_IDS else "")
                parts.append(f"{reason} ({len(ids)}: {shown})" if len(ids) <= _SHOWN_IDS else f"{reason} ({len(ids)})")
            lines.append("  sequence fallback: " + ", ".join(parts))
        if self.unreadable:
            lines.append(f"  unreadable structure files ({len(self.unreadable)}; those proteins got the sequence graph):")
            lines += [f"    {message}" for message in self.unreadable]
        if self.skipped:
            lines.append(f"  invalid records skipped ({len(self.skipped)}):")
            lines += [f"    {message}" for message in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ graph building


def _fallback_reason(reason: str) -> str:
    """Group structures.load_aligned_ca's per-protein messages into a few summary categories."""
    if reason.startswith("no structure file"):
        return "no structure file"
    if reason.startswith("mismatch"):
        return "structure mismatch"
    if reason.startswith("unreadable"):
        return "unreadable structure"
    return reason


#: A row function: (a chunk of jobs, *its args) -> (shard row, graph source or fallback reason) per job. It runs in
#: worker processes or Ray tasks, so it is a module-level function, picklable by reference.
RowFunction = Callable[..., list[tuple[dict, str]]]


def record_rows(records: list[ProteinRecord], structures: str | None, k: int) -> list[tuple[dict, str]]:
    """Rows of labelled records: a structure graph where `structures` holds an aligned model, else the sequence
    window (and why)."""
    out = []
    for record in records:
        ca, why = load_aligned_ca(structures, record) if structures else (None, "no --structures given")
        graph = build_graph(record.sequence, ca, k=k)
        out.append((shards.record_to_row(record, graph), "structure" if graph.graph_source == "structure" else why))
    return out


def synthetic_rows(jobs: list[tuple[int, str, str]], seed: int, k: int) -> list[tuple[dict, str]]:
    """Rows of generated proteins: jobs are (index, protein type, fold)."""
    out = []
    for index, protein_type, fold in jobs:
        record, ca = synthetic.generate_protein(index, protein_type, seed, fold)
        out.append((shards.record_to_row(record, build_graph(record.sequence, ca, k=k)), "structure"))
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def progress_bar(total: int, what: str):
    """A rich progress bar on stderr, shown only on a terminal (logs and CI stay clean)."""
    console = Console(stderr=True)
    progress = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=not console.is_terminal, transient=True)
    return progress, progress.add_task(what, total=total)


def count_row(summary: PrepareSummary, protein_id: str, source: str) -> None:
    """Account one written protein: its graph came from a structure, or why it fell back to the sequence."""
    if source == "structure":
        summary.num_structure += 1
    else:
        summary.num_sequence += 1
        summary.fallback.setdefault(_fallback_reason(source), []).append(protein_id)
        if source.startswith("unreadable: "):  # every bad file by name: the user has to replace each one
            summary.unreadable.append(f"{protein_id}: {source.removeprefix('unreadable: ')}")
    summary.num_written += 1


def finish_set(reports: list[dict[str, Any]], target: str, summary: PrepareSummary, *, k: int,
               sources: dict[str, str] | None, extra: dict[str, Any] | None,
               embedding: EmbeddingSpec | None) -> dict[str, Any]:
    """Count every unit's proteins into `summary` and write the manifest of all units' files, in unit order
    (whatever order they finished in)."""
    reports = sorted(reports, key=lambda report: report["task"])
    for report in reports:
        for protein_id, source in report["sources"]:
            count_row(summary, protein_id, source)
    manifest = shards.build_manifest([entry for report in reports for entry in report["shards"]],
                                     [report["histogram"] for report in reports], k=k, sources=sources,
                                     extra=extra, embedding=embedding.to_json() if embedding else None)
    shards.write_manifest(*storage.filesystem(target), manifest)
    return manifest


EMBED_CHUNK = 64
"""Proteins embedded per call on the local path (the model batches their windows by tokens inside)."""


class LocalBuilder:
    """Builds rows in `workers` local processes (1: this process) and writes shards as the rows come, in order.
    With `embedding`, this process embeds the rows as they come (the model loaded once; torch uses every core)."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.workers = workers

    def __call__(self, rows_of: RowFunction, jobs: list, args: tuple, target: str, summary: PrepareSummary, *,
                 what: str, embedding: EmbeddingSpec | None = None, **write_args: Any) -> dict[str, Any]:
        """Shards + manifest of `rows_of`'s rows over `jobs` under `target` (with `embedding`'s per-residue
        embeddings); returns the manifest."""
        if embedding is not None:
            return self._resumable(rows_of, jobs, args, target, summary, what=what, embedding=embedding,
                                   **write_args)
        rows = self._rows(rows_of, jobs, args)
        return shards.write_shards(self._counted(rows, summary, len(jobs), what), target, **write_args)

    def _resumable(self, rows_of: RowFunction, jobs: list, args: tuple, target: str, summary: PrepareSummary, *,
                   what: str, embedding: EmbeddingSpec, k: int, sources: dict[str, str] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Embedding runs: unit by unit, skipping the units an interrupted run finished (ShardLedger)."""
        ledger = ShardLedger(target)
        done, units = ledger.finished(), resume_units(jobs)
        summary.shard_units, summary.shards_reused = len(units), sum(i in done for i in range(len(units)))
        progress, task = progress_bar(len(jobs), what)
        with progress:
            for i, unit in enumerate(units):
                if i not in done:
                    rows = self._embedded(self._rows(rows_of, unit, args), embedding)
                    done[i] = ledger.record(write_unit(target, i, rows, k))
                progress.advance(task, len(unit))
        manifest = finish_set([done[i] for i in range(len(units))], target, summary, k=k, sources=sources,
                              extra=extra, embedding=embedding)
        ledger.clear()
        return manifest

    @staticmethod
    def _embedded(rows: Iterable[tuple[dict, str]], spec: EmbeddingSpec) -> Iterator[tuple[dict, str]]:
        chunk: list[tuple[dict, str]] = []
        for item in rows:
            chunk.append(item)
            if len(chunk) == EMBED_CHUNK:
                yield from embed_rows(chunk, spec)
                chunk = []
        if chunk:
            yield from embed_rows(chunk, spec)

    def _rows(self, rows_of: RowFunction, jobs: list, args: tuple) -> Iterator[tuple[dict, str]]:
        if self.workers <= 1 or len(jobs) < 2:
            for chunk in _chunks(jobs, 64):
                yield from rows_of(chunk, *args)
            return
        # Several chunks per worker balance long and short proteins; each chunk is one pickled task, not one per record.
        size = max(1, min(64, math.ceil(len(jobs) / (self.workers * 8))))
        # forkserver, not fork: a fork copies whatever threads the parent runs (a Ray driver's core worker among
        # them), and a child touching that copy can break the parent's connection to its raylet.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=context) as pool:
            for rows in pool.map(rows_of, _chunks(jobs, size), *[[a] * math.ceil(len(jobs) / size) for a in args]):
                yield from rows

    @staticmethod
    def _counted(rows: Iterable[tuple[dict, str]], summary: PrepareSummary, total: int, what: str) -> Iterator[dict]:
        progress, task = progress_bar(total, what)
        with progress:
            for row, source in rows:
                count_row(summary, row["id"], source)
                progress.advance(task)
                yield row


#: What builds a shard set: LocalBuilder, or protopo_ray.cluster.prepare_tasks.RayBuilder (same call).
Builder = Callable[..., dict[str, Any]]


# --------------------------------------------------------------------------------------------- entry points


def _resume_key(sources: dict[str, str], extra: dict[str, Any], k: int,
                embedding: EmbeddingSpec | None) -> dict[str, Any] | None:
    """What a resumable run's shards are made from (the input's identity, the prepare arguments, the embedding
    spec, the unit size); None (not resumable) without embeddings."""
    if embedding is None:
        return None
    return {"sources": sources, "arguments": {"k": k, **extra}, "embedding": embedding.to_json(),
            "rows_per_shard": output.RESUME_UNIT}


def prepare_records(labels_path: str | os.PathLike, out: str | os.PathLike, *, structures: str | os.PathLike | None = None,
                    k: int = DEFAULT_K, skip_invalid: bool = False, overwrite: bool = False,
                    builder: Builder | None = None, embedding: EmbeddingSpec | None = None) -> PrepareSummary:
    """Read a labels file (.3line / .json / .fasta), build one graph per protein, write shards to `out` (a local
    directory or an s3:// / gs:// URI) with `builder` (default: this process), adding `embedding`'s per-residue
    embeddings when given. With Ray tasks `structures` must be a directory every node sees."""
    start = time.perf_counter()
    out, labels_path = out if storage.is_uri(out) else Path(out), Path(labels_path)
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    check_out(out, overwrite)
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path}: labels file not found")
    if structures is not None and not Path(structures).is_dir():
        raise FileNotFoundError(f"{structures}: structures directory not found")
    result = read_records(labels_path, skip_invalid=skip_invalid, allow_empty=False)
    summary = PrepareSummary(out=str(out), num_read=len(result.records) + len(result.skipped),
                             skipped=[str(error) for error in result.skipped])
    # Absolute: Ray tasks run in other working directories.
    args = (str(Path(structures).resolve()) if structures else None, k)
    extra = {"graph_builder": GRAPH_BUILDER, "labels_file": labels_path.name,
             "structures": str(structures) if structures else None, "skipped": summary.skipped}
    build = builder or LocalBuilder()
    sources = {labels_path.name: shards.sha256_file(labels_path)}
    summary.manifest = write_output(
        lambda target: build(record_rows, result.records, args, target, summary, what="graphs", k=k,
                             sources=sources, extra=extra, **({"embedding": embedding} if embedding else {})),
        out, overwrite, resume=_resume_key(sources, extra, k, embedding))
    summary.elapsed_s = time.perf_counter() - start
    return summary


def prepare_synthetic(n: int, out: str | os.PathLike, *, seed: int = 0, k: int = DEFAULT_K, overwrite: bool = False,
                      builder: Builder | None = None, mix: dict[str, float] | None = None,
                      embedding: EmbeddingSpec | None = None) -> PrepareSummary:
    """Generate `n` synthetic proteins (protopo_ray.data.synthetic; types in DeepTMHMM's proportions or `mix`) with
    structure graphs and write shards to `out` with `builder` (default: this process), adding `embedding`'s
    per-residue embeddings when given."""
    start = time.perf_counter()
    out = out if storage.is_uri(out) else Path(out)
    if n < 1:
        raise ValueError(f"--synthetic must be >= 1, got {n}")
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    check_out(out, overwrite)
    types = synthetic.allocate_types(n, seed, mix)
    jobs = list(zip(range(n), types, synthetic.assign_folds(types, seed)))
    summary = PrepareSummary(out=str(out), num_read=n)
    generator = {"module": SYNTHETIC_MODULE, "version": synthetic.GENERATOR_VERSION, "n": n, "seed": seed,
                 **({"mix": synthetic.check_mix(mix)} if mix else {})}
    build = builder or LocalBuilder()
    sources = {"synthetic": f"{SYNTHETIC_MODULE} n={n} seed={seed}"}
    extra = {"graph_builder": GRAPH_BUILDER, "generator": generator}
    summary.manifest = write_output(
        lambda target: build(synthetic_rows, jobs, (seed, k), target, summary, what="synthetic", k=k,
                             sources=sources, extra=extra, **({"embedding": embedding} if embedding else {})),
        out, overwrite, resume=_resume_key(sources, extra, k, embedding))
    summary.elapsed_s = time.perf_counter() - start
    return summary


def ensure_synthetic(out: str | os.PathLike, n: int, seed: int = 0, k: int = DEFAULT_K,
                     mix: dict[str, float] | None = None) -> Path:
    """The synthetic shard set at `out`, prepared only when no complete set exists there (the tuner's default)."""
    out = Path(out)
    for _ in range(2):
        if (out / shards.MANIFEST).exists():
            made = _synthetic_generator(shards.read_manifest(out))
            if made != _synthetic_params(n, seed, mix):
                raise OutputExists(f"{out} holds a different shard set ({_describe(made) if made else 'not synthetic'}),"
                                   f" not synthetic {_describe(_synthetic_params(n, seed, mix))}; prepare it with "
                                   f"--overwrite or use another path")
            return out
        try:
            prepare_synthetic(n, out, seed=seed, k=k, mix=mix)
            return out
        except OutputExists:  # a concurrent caller finished first: use theirs (checked on the next pass)
            continue
    return out


def _synthetic_generator(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The parameters (n, seed, mix) of an embedded synthetic set, None for any other shard set."""
    generator = manifest.get("extra", {}).get("generator") or {}
    # Sets made before the package moved into subpackages name the generator "protopo_ray.synthetic".
    if generator.get("module") not in (SYNTHETIC_MODULE, "protopo_ray.synthetic"):
        return None
    # Sets made before the generator had a version are version 1 (the sequences before issue 27).
    return {"n": generator.get("n"), "seed": generator.get("seed"), "mix": generator.get("mix"),
            "version": generator.get("version", 1)}


def _synthetic_params(n: int, seed: int, mix: dict[str, float] | None) -> dict[str, Any]:
    """What a manifest records of the embedded set these arguments make (`_synthetic_generator`'s form)."""
    return {"n": n, "seed": seed, "mix": synthetic.check_mix(mix) if mix else None,
            "version": synthetic.GENERATOR_VERSION}


def _describe(generator: dict[str, Any]) -> str:
    mix = generator["mix"]
    return f"generator v{generator['version']} n={generator['n']} seed={generator['seed']} mix=" + (
        ", ".join(f"{t} {f:g}" for t, f in mix.items()) if mix else "DeepTMHMM's proportions")


def ensure_data(path: str | os.PathLike, synthetic: int = 0, seed: int = 0, k: int = DEFAULT_K,
                mix: dict[str, float] | None = None) -> dict[str, Any]:
    """The manifest of the shard set at `path`, preparing the embedded synthetic set there first when `path`
    holds no shards and `synthetic` > 0 (an experiment's `[experiment] synthetic = N`, `seed`, `synthetic_mix`).

    The one rule for every entry point (tune, train). Without shards and with `synthetic` = 0 it
    raises read_manifest's FileNotFoundError, which says what to run; a set of another kind already at `path`
    is used as it is. An embedded set made with other parameters (another `synthetic`, `seed` or `synthetic_mix`
    than the experiment's now) is made again: it is reproducible from those numbers, so nothing is lost, and
    training on it would quietly be another experiment than the file says.
    """
    try:
        manifest = shards.read_manifest(path)
    except FileNotFoundError:
        if synthetic < 1:
            raise
    else:
        made = _synthetic_generator(manifest)
        wanted = _synthetic_params(synthetic, seed, mix)
        if synthetic < 1 or made is None or storage.is_uri(path) or made == wanted:
            return manifest
        print(f"the embedded synthetic set at {path} was made with {_describe(made)}; the experiment asks for "
              f"{_describe(wanted)}: making it again", flush=True)
        prepare_synthetic(synthetic, path, seed=seed, k=k, mix=mix, overwrite=True)
        return shards.read_manifest(path)
    if storage.is_uri(path):
        raise FileNotFoundError(f"{path}: no shards there, and the embedded synthetic set is generated into local "
                                f"directories only; run `python -m protopo_ray.prepare --synthetic {synthetic} "
                                f"--seed {seed} --out DIR`, upload DIR to {path}, or point data.path at DIR")
    print(f"preparing the embedded synthetic set ({synthetic} proteins, seed {seed}) at {path}", flush=True)
    ensure_synthetic(path, synthetic, seed, k, mix)
    return shards.read_manifest(path)
