"""Prepare shards once, so training never parses labels or structures: records -> residue graphs -> Parquet.

    python -m protopo_ray.prepare --labels DeepTMHMM.partitions.json [--structures DIR] --out data/deeptmhmm
    python -m protopo_ray.prepare --synthetic 2000 --out data/synthetic [--seed 0]
    python -m protopo_ray.prepare --synthetic 20000 --out s3://bucket/synthetic20k --ray   # on a Ray cluster

Graphs are built in `--workers` local processes, or with `--ray` in Ray Data tasks on a cluster (one task per
batch of up to 512 inputs, each writing its own shard files; protopo_ray.cluster.prepare_tasks). `--out` is a local
directory or an object-store URI (s3://, gs://). Local output is atomic: shards are written into
`<out>.tmp-<pid>` beside `out` and renamed into place only when the manifest is written, so a crash never
leaves a directory that looks complete, and `--overwrite` replaces an existing set only once the new one is
finished. On object storage (no rename) `--overwrite` deletes the old manifest first and writes the new one
last. Exit codes: 0 ok, 2 bad input (message, no traceback), which includes a labels file without a single
valid record.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from protopo_ray.config import Config, describe_keys, read_toml
from protopo_ray.data import shards, storage, synthetic
from protopo_ray.data.graphs import DEFAULT_K, build_graph
from protopo_ray.data.records import ProteinRecord, RecordError, read_records
from protopo_ray.data.structures import load_aligned_ca

GRAPH_BUILDER = "protopo_ray.data.graphs.build_graph"
_SHOWN_IDS = 5  # ids listed per fallback reason in the summary


class OutputExists(ValueError):
    """`out` already holds a complete shard set (or other files) and --overwrite was not given."""


@dataclass(slots=True)
class PrepareSummary:
    out: str
    num_read: int = 0
    num_written: int = 0
    num_structure: int = 0
    num_sequence: int = 0
    fallback: dict[str, list[str]] = field(default_factory=dict)
    """Why proteins got a sequence graph: reason -> protein ids."""
    skipped: list[str] = field(default_factory=list)
    """Invalid records left out (--skip-invalid): one located message each."""
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
        if self.task_cpu_s:
            lines.append(f"  Ray tasks: {self.task_cpu_s:.1f} CPU s ({self.num_written / self.task_cpu_s:.1f} "
                         f"proteins per CPU second)")
        if self.fallback:
            parts = []
            for reason, ids in sorted(self.fallback.items(), key=lambda item: -len(item[1])):
                shown = ", ".join(ids[:_SHOWN_IDS]) + (", ..." if len(ids) > _SHOWN_IDS else "")
                parts.append(f"{reason} ({len(ids)}: {shown})" if len(ids) <= _SHOWN_IDS else f"{reason} ({len(ids)})")
            lines.append("  sequence fallback: " + ", ".join(parts))
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


def _record_rows(records: list[ProteinRecord], structures: str | None, k: int) -> list[tuple[dict, str]]:
    """(shard row, graph source or fallback reason) per record; runs in a worker process for a whole chunk."""
    out = []
    for record in records:
        ca, why = load_aligned_ca(structures, record) if structures else (None, "no --structures given")
        graph = build_graph(record.sequence, ca, k=k)
        out.append((shards.record_to_row(record, graph), "structure" if graph.graph_source == "structure" else why))
    return out


def _synthetic_rows(jobs: list[tuple[int, str, str]], seed: int, k: int) -> list[tuple[dict, str]]:
    out = []
    for index, protein_type, fold in jobs:
        record, ca = synthetic.generate_protein(index, protein_type, seed, fold)
        out.append((shards.record_to_row(record, build_graph(record.sequence, ca, k=k)), "structure"))
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _run_chunks(fn: Callable, items: list, workers: int, args: tuple) -> Iterator[tuple[dict, str]]:
    """Apply `fn(chunk, *args)` over chunks of `items`, in order, in `workers` processes when > 1."""
    if workers <= 1 or len(items) < 2:
        for chunk in _chunks(items, 64):
            yield from fn(chunk, *args)
        return
    # Several chunks per worker balance long and short proteins; each chunk is one pickled task, not one per record.
    size = max(1, min(64, math.ceil(len(items) / (workers * 8))))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for rows in pool.map(fn, _chunks(items, size), *[[a] * math.ceil(len(items) / size) for a in args]):
            yield from rows


def _progress(total: int, what: str):
    """A rich progress bar on stderr, shown only on a terminal (logs and CI stay clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=not console.is_terminal, transient=True)
    return progress, progress.add_task(what, total=total)


def _count(summary: PrepareSummary, protein_id: str, source: str) -> None:
    """Account one written protein: its graph came from a structure, or why it fell back to the sequence."""
    if source == "structure":
        summary.num_structure += 1
    else:
        summary.num_sequence += 1
        summary.fallback.setdefault(_fallback_reason(source), []).append(protein_id)
    summary.num_written += 1


def _counted(rows: Iterable[tuple[dict, str]], summary: PrepareSummary, total: int, what: str) -> Iterator[dict]:
    progress, task = _progress(total, what)
    with progress:
        for row, source in rows:
            _count(summary, row["id"], source)
            progress.advance(task)
            yield row


# ------------------------------------------------------------------------------------------------ output


def _check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse (OutputExists) to write over a complete shard set or a non-empty directory without --overwrite."""
    fs, root = storage.filesystem(str(out))
    if overwrite or fs.get_file_info(root).type == pafs.FileType.NotFound:
        return
    if fs.get_file_info(f"{root}/{shards.MANIFEST}").type == pafs.FileType.File:
        try:
            manifest = shards.read_manifest(out)
        except ValueError:  # unreadable or another schema version: still a set we must not clobber silently
            manifest = {}
        raise OutputExists(f"{out} already holds a complete shard set ({manifest.get('num_proteins', '?')} proteins, "
                           f"written {manifest.get('created_at', '?')}); pass --overwrite to replace it, or choose "
                           f"another --out")
    if fs.get_file_info(root).type != pafs.FileType.Directory or fs.get_file_info(pafs.FileSelector(root)):
        raise OutputExists(f"{out} exists and is not a complete shard set; pass --overwrite to replace it, or "
                           f"choose another --out")


def _remove_stale_temps(out: Path) -> None:
    """Delete `<out>.tmp-<pid>` directories left by killed runs (their process no longer exists)."""
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _write_atomic(write: Callable[[str], dict], out: Path, overwrite: bool) -> dict[str, Any]:
    """`write(dir)` shards into a temp dir beside `out`, then rename it into place (replacing `out` only when
    complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = write(str(tmp))
        if out.exists():
            _check_out(out, overwrite)  # another run may have finished first
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_output(write: Callable[[str], dict], out: str | os.PathLike, overwrite: bool) -> dict[str, Any]:
    """Run `write(target)` for `out`: atomically via a temp dir when local; on object storage straight into
    `out` after deleting an old set's manifest (first) and part files, the new manifest written last."""
    if not storage.is_uri(out):
        return _write_atomic(write, Path(out), overwrite)
    _check_out(out, overwrite)
    shards.clear_shards(*storage.filesystem(str(out)))
    return write(str(out))


def _build_and_write(fn: Callable, jobs: list, args: tuple, out: str | os.PathLike, summary: PrepareSummary, *,
                     what: str, overwrite: bool, workers: int | None, use_ray: bool, **write_args: Any) -> dict:
    """Rows of `fn(chunk, *args)` over `jobs` -> shards at `out`: in local processes, or in Ray Data tasks."""
    if use_ray:
        from protopo_ray.cluster import prepare_tasks

        def write(target: str) -> dict:
            return prepare_tasks.write_shards_ray(fn, jobs, args, target, summary, what=what, workers=workers,
                                                **write_args)
    else:
        def write(target: str) -> dict:
            rows = _run_chunks(fn, jobs, workers or 1, args)
            return shards.write_shards(_counted(rows, summary, len(jobs), what), target, **write_args)
    return _write_output(write, out, overwrite)


# --------------------------------------------------------------------------------------------- entry points


def prepare_records(labels_path: str | os.PathLike, out: str | os.PathLike, *, structures: str | os.PathLike | None = None,
                    k: int = DEFAULT_K, skip_invalid: bool = False, workers: int | None = None,
                    overwrite: bool = False, use_ray: bool = False) -> PrepareSummary:
    """Read a labels file (.3line / .json / .fasta), build one graph per protein, write shards to `out` (a local
    directory or an s3:// / gs:// URI). `workers`: local processes (default 1), or with `use_ray` the most Ray
    tasks at once (default: every CPU of the cluster); `structures` must then be a directory every node sees."""
    start = time.perf_counter()
    out, labels_path = out if storage.is_uri(out) else Path(out), Path(labels_path)
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    _check_out(out, overwrite)
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
    summary.manifest = _build_and_write(_record_rows, result.records, args, out, summary, what="graphs",
                                        overwrite=overwrite, workers=workers, use_ray=use_ray, k=k,
                                        sources={labels_path.name: shards.sha256_file(labels_path)}, extra=extra)
    summary.elapsed_s = time.perf_counter() - start
    return summary


def prepare_synthetic(n: int, out: str | os.PathLike, *, seed: int = 0, k: int = DEFAULT_K, overwrite: bool = False,
                      workers: int | None = None, use_ray: bool = False) -> PrepareSummary:
    """Generate `n` synthetic proteins (protopo_ray.data.synthetic) with structure graphs and write shards to `out`
    (`workers`, `use_ray`: as prepare_records)."""
    start = time.perf_counter()
    out = out if storage.is_uri(out) else Path(out)
    if n < 1:
        raise ValueError(f"--synthetic must be >= 1, got {n}")
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    _check_out(out, overwrite)
    types = synthetic.allocate_types(n, seed)
    jobs = list(zip(range(n), types, synthetic.assign_folds(types, seed)))
    summary = PrepareSummary(out=str(out), num_read=n)
    generator = {"module": "protopo_ray.data.synthetic", "n": n, "seed": seed}
    summary.manifest = _build_and_write(_synthetic_rows, jobs, (seed, k), out, summary, what="synthetic",
                                        overwrite=overwrite, workers=workers, use_ray=use_ray, k=k,
                                        sources={"synthetic": f"protopo_ray.data.synthetic n={n} seed={seed}"},
                                        extra={"graph_builder": GRAPH_BUILDER, "generator": generator})
    summary.elapsed_s = time.perf_counter() - start
    return summary


def ensure_synthetic(out: str | os.PathLike, n: int, seed: int = 0, k: int = DEFAULT_K) -> Path:
    """The synthetic shard set at `out`, prepared only when no complete set exists there (the tuner's default)."""
    out = Path(out)
    for _ in range(2):
        if (out / shards.MANIFEST).exists():
            generator = shards.read_manifest(out).get("extra", {}).get("generator")
            if generator != {"module": "protopo_ray.data.synthetic", "n": n, "seed": seed}:
                raise OutputExists(f"{out} holds a different shard set ({generator or 'not synthetic'}), not "
                                   f"synthetic n={n} seed={seed}; prepare it with --overwrite or use another path")
            return out
        try:
            prepare_synthetic(n, out, seed=seed, k=k)
            return out
        except OutputExists:  # a concurrent caller finished first: use theirs (checked on the next pass)
            continue
    return out


def ensure_data(path: str | os.PathLike, synthetic: int = 0, seed: int = 0, k: int = DEFAULT_K) -> dict[str, Any]:
    """The manifest of the shard set at `path`, preparing the embedded synthetic set there first when `path`
    holds no shards and `synthetic` > 0 (an experiment's `[experiment] synthetic = N`, `seed`).

    The one rule for every entry point (tune, train, predict). Without shards and with `synthetic` = 0 it
    raises read_manifest's FileNotFoundError, which says what to run; a set of another kind already at `path`
    is used as it is.
    """
    try:
        return shards.read_manifest(path)
    except FileNotFoundError:
        if synthetic < 1:
            raise
    if storage.is_uri(path):
        raise FileNotFoundError(f"{path}: no shards there, and the embedded synthetic set is generated into local "
                                f"directories only; run `python -m protopo_ray.prepare --synthetic {synthetic} "
                                f"--seed {seed} --out DIR`, upload DIR to {path}, or point data.path at DIR")
    print(f"preparing the embedded synthetic set ({synthetic} proteins, seed {seed}) at {path}", flush=True)
    ensure_synthetic(path, synthetic, seed, k)
    return shards.read_manifest(path)


def experiment_synthetic(config_file: str | os.PathLike | None) -> tuple[int, int]:
    """(synthetic, seed) from a TOML's `[experiment]` table: how many synthetic proteins to generate into
    data.path when it holds no shards (0 = never), and their seed. (0, 0) without a file or table."""
    if not config_file:
        return 0, 0
    table = read_toml(config_file).get("experiment", {})
    synthetic, seed = table.get("synthetic", 0), table.get("seed", 0)
    for key, value in (("synthetic", synthetic), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{config_file}: [experiment] {key} must be an integer >= 0, got {value!r}")
    return synthetic, seed


def ensure_run_data(config: Config, config_file: str | os.PathLike | None) -> dict[str, Any]:
    """`ensure_data` for a run config loaded from `config_file` (train): its data.path, its [experiment] table."""
    return ensure_data(config.data.path, *experiment_synthetic(config_file))


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--skip-invalid", action="store_true", help="leave out invalid records (reported)")
    parser.add_argument("--workers", type=int, help="processes building graphs (default 1); with --ray the most "
                        "Ray tasks at once (default: all the cluster's CPUs)")
    parser.add_argument("--ray", action="store_true", help="build graphs and write shards in Ray Data tasks on the "
                        "cluster this process joins (RAY_ADDRESS, else a running `ray start` cluster, else a new "
                        "local one); --structures must then be visible to every node")
    parser.add_argument("--ray-address", metavar="ADDRESS", help="the Ray cluster for --ray (implies it): 'auto', "
                        "host:port, ray://host:10001, or 'local' for a new private local cluster")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard set at --out")
    args = parser.parse_args(argv)
    use_ray = args.ray or args.ray_address is not None
    try:
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        if use_ray:
            from protopo_ray.cluster import prepare_tasks

            prepare_tasks.connect(args.ray_address, args.workers)
        if args.synthetic is not None:
            if args.structures or args.skip_invalid:
                raise ValueError("--structures and --skip-invalid apply to --labels, not --synthetic")
            summary = prepare_synthetic(args.synthetic, args.out, seed=args.seed, k=args.k,
                                        overwrite=args.overwrite, workers=args.workers, use_ray=use_ray)
        else:
            summary = prepare_records(args.labels, args.out, structures=args.structures, k=args.k,
                                      skip_invalid=args.skip_invalid, workers=args.workers,
                                      overwrite=args.overwrite, use_ray=use_ray)
    except (RecordError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if use_ray:
            prepare_tasks.disconnect()
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
