"""`prepare` at scale: structures per second per core, and with Ray workers, on the synthetic set.

    .venv/bin/python -m tools.bench_prepare [--n 20000] [--workers 2] [--serial-n 2000] [--out data/synthetic20k]

1. Per core: `prepare_synthetic(serial_n)` in this process (graphs built and shards written serially); the rate
   is over this process's CPU time (time.process_time), so it is not flattered or penalised by other jobs on a
   shared machine.
2. Ray: `prepare_synthetic(n, builder=RayBuilder(workers))` on a new private local cluster of `workers` CPUs (RAY_ADDRESS=local),
   writing the set to `--out` (left there for the streaming scale test). Wall-clock rate (Ray start-up excluded,
   Ray Data's start included), the tasks' own CPU time (proteins per CPU second inside Ray), and the speed-up
   over one core, and the CPUs the tasks actually got (task CPU s / wall s: below `workers` when other jobs
   share the machine). Then the shard layout: files, row groups, sizes.
3. With `--compare-n M`: M proteins through the process pool (`--workers` processes) and through Ray, back to
   back into temporary directories, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from protopo_ray.data import shards
from protopo_ray.data.build import LocalBuilder, prepare_synthetic


def per_core(n: int, seed: int) -> dict[str, float]:
    prepare_synthetic(5, Path(tempfile.mkdtemp()) / "warm", seed=seed)  # imports and first-call costs
    with tempfile.TemporaryDirectory() as tmp:
        cpu, wall = time.process_time(), time.perf_counter()
        summary = prepare_synthetic(n, Path(tmp) / "serial", seed=seed)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    residues = summary.manifest["num_residues"]
    return {"n": n, "cpu_s": cpu, "wall_s": wall, "proteins_per_cpu_s": n / cpu, "residues_per_cpu_s": residues / cpu}


def with_ray(n: int, workers: int, out: Path, seed: int, overwrite: bool) -> dict[str, float]:
    from protopo_ray.cluster import prepare_tasks

    os.environ["RAY_ADDRESS"] = "local"  # a private cluster: never another session's
    start = time.perf_counter()
    prepare_tasks.connect(None, workers)
    ray_start_s = time.perf_counter() - start
    try:
        summary = prepare_synthetic(n, out, seed=seed, builder=prepare_tasks.RayBuilder(workers), overwrite=overwrite)
    finally:
        prepare_tasks.disconnect()
    residues = summary.manifest["num_residues"]
    return {"n": n, "workers": workers, "ray_start_s": ray_start_s, "wall_s": summary.elapsed_s,
            "proteins_per_s": n / summary.elapsed_s, "residues_per_s": residues / summary.elapsed_s,
            "task_cpu_s": summary.task_cpu_s, "proteins_per_task_cpu_s": n / summary.task_cpu_s,
            "cpus_used": summary.task_cpu_s / summary.elapsed_s}


def compare(n: int, workers: int, seed: int) -> dict[str, float]:
    """Wall-clock proteins/s of the process pool and of Ray on the same `n`, back to back."""
    with tempfile.TemporaryDirectory() as tmp:
        pool = prepare_synthetic(n, Path(tmp) / "pool", seed=seed, builder=LocalBuilder(workers))
        print(f"process pool, {workers} workers, {n} proteins: {n / pool.elapsed_s:.1f} structures/s", flush=True)
        ray_run = with_ray(n, workers, Path(tmp) / "ray", seed, False)
    return {"n": n, "workers": workers, "pool_proteins_per_s": n / pool.elapsed_s,
            "ray_proteins_per_s": ray_run["proteins_per_s"], "ray_cpus_used": ray_run["cpus_used"]}


def layout(out: Path) -> dict[str, float]:
    manifest = shards.read_manifest(out)
    files = manifest["shards"]
    groups = [pq.ParquetFile(out / f["file"]).metadata for f in files]
    group_rows = [m.row_group(i).num_rows for m in groups for i in range(m.num_row_groups)]
    total = sum(f["num_bytes"] for f in files)
    return {"files": len(files), "file_mb_mean": total / len(files) / 1e6,
            "file_mb_max": max(f["num_bytes"] for f in files) / 1e6, "rows_per_file_max": max(f["num_rows"] for f in files),
            "row_groups": len(group_rows), "rows_per_row_group_max": max(group_rows), "total_mb": total / 1e6,
            "bytes_per_residue": total / manifest["num_residues"], "mean_length": manifest["num_residues"] / manifest["num_proteins"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="proteins of the Ray run (default 20000)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local cluster)")
    parser.add_argument("--serial-n", type=int, default=2000, help="proteins of the per-core run (default 2000)")
    parser.add_argument("--out", type=Path, default=Path("data/synthetic20k"), help="where the Ray run writes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing set at --out")
    parser.add_argument("--compare-n", type=int, default=0, help="also time M proteins: process pool vs Ray")
    parser.add_argument("--skip-main", action="store_true", help="only the per-core and --compare-n runs")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    serial = per_core(args.serial_n, args.seed)
    print(f"per core ({serial['n']} proteins, one process): {serial['proteins_per_cpu_s']:.1f} structures per CPU "
          f"second ({serial['residues_per_cpu_s'] / 1e3:.1f} k residues/CPU s; {serial['cpu_s']:.1f} CPU s, "
          f"{serial['wall_s']:.1f} s wall)", flush=True)
    if args.compare_n:
        both = compare(args.compare_n, args.workers, args.seed)
        print(f"same load, {both['n']} proteins, {both['workers']} workers: process pool "
              f"{both['pool_proteins_per_s']:.1f} structures/s, Ray {both['ray_proteins_per_s']:.1f} structures/s "
              f"(Ray tasks got {both['ray_cpus_used']:.2f} CPUs)", flush=True)
    if args.skip_main:
        return 0
    ray_run = with_ray(args.n, args.workers, args.out, args.seed, args.overwrite)
    speedup = ray_run["proteins_per_s"] / serial["proteins_per_cpu_s"]
    print(f"Ray, {ray_run['workers']} workers ({ray_run['n']} proteins -> {args.out}): "
          f"{ray_run['proteins_per_s']:.1f} structures/s wall ({ray_run['residues_per_s'] / 1e3:.1f} k residues/s; "
          f"{ray_run['wall_s']:.1f} s, Ray start {ray_run['ray_start_s']:.1f} s not counted), "
          f"{speedup:.2f}x one core; inside the tasks {ray_run['proteins_per_task_cpu_s']:.1f} structures per CPU "
          f"second ({ray_run['task_cpu_s']:.0f} CPU s; the tasks got {ray_run['cpus_used']:.2f} CPUs on average)")
    shape = layout(args.out)
    print(f"layout: {shape['files']} files ({shape['file_mb_mean']:.1f} MB mean, {shape['file_mb_max']:.1f} MB max, "
          f"<= {shape['rows_per_file_max']} rows), {shape['row_groups']} row groups of <= "
          f"{shape['rows_per_row_group_max']} rows; {shape['total_mb']:.0f} MB in all, "
          f"{shape['bytes_per_residue']:.1f} B/residue on disk, mean length {shape['mean_length']:.0f}")
    load_end = os.getloadavg()
    print(f"load average {' '.join(f'{x:.1f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.1f}' for x in load_end)} at the end; {os.cpu_count()} CPUs")
    print(json.dumps({"per_core": serial, "ray": ray_run, "layout": shape, "load_start": load_start,
                      "load_end": load_end, "speedup": speedup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
