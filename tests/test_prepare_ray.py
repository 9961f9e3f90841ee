"""prepare --ray: Ray Data tasks write the same shards and manifest as the process-pool path, atomically."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protopo_ray.cluster import prepare_tasks
from protopo_ray.cluster.prepare_tasks import RayBuilder
from protopo_ray.data import shards
from protopo_ray.data.build import (
    LocalBuilder,
    OutputExists,
    PrepareSummary,
    prepare_records,
    prepare_synthetic,
    synthetic_rows,
    write_output,
)
from tests.test_prepare import bad_structures

REPO = Path(__file__).resolve().parents[1]


def same_manifest(a: dict, b: dict) -> bool:
    """Equal but for the file list (the Ray path names files per task) and the time of writing."""
    def drop(manifest: dict) -> dict:
        return {key: value for key, value in manifest.items() if key not in ("shards", "created_at")}
    return drop(a) == drop(b)


def test_task_size_is_one_file_at_most_and_spreads_small_inputs():
    assert prepare_tasks.task_size(20000, 2) == shards.MAX_ROWS_PER_FILE
    assert prepare_tasks.task_size(30, 2) == 4  # ceil(30 / (4 tasks per CPU x 2 CPUs))
    assert prepare_tasks.task_size(1, 8) == 1


def test_ray_synthetic_shards_equal_the_process_pool_shards(tmp_path, ray_cluster):
    serial = prepare_synthetic(30, tmp_path / "pool", seed=3)
    summary = prepare_synthetic(30, tmp_path / "ray", seed=3, builder=RayBuilder(2))
    assert summary.num_written == summary.num_structure == 30 and summary.task_cpu_s > 0
    assert shards.read_table(tmp_path / "ray").equals(shards.read_table(tmp_path / "pool"))
    manifest = shards.read_manifest(tmp_path / "ray")
    assert same_manifest(manifest, serial.manifest) and manifest == summary.manifest
    # 8 tasks of <= 4 proteins, one file each, listed in input order.
    assert [s["file"] for s in manifest["shards"]] == [f"part-{i:05d}-00000.parquet" for i in range(8)]
    assert sum(s["num_rows"] for s in manifest["shards"]) == 30
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(
        [s["file"] for s in manifest["shards"]] + [shards.MANIFEST])
    assert not list(tmp_path.glob("ray.tmp-*"))


def test_ray_records_with_structures_equal_the_process_pool(tmp_path, ray_cluster, partitions_json, bama_pdb,
                                                            monkeypatch):
    entries = [e for fold in json.loads(partitions_json.read_text()).values() for e in fold]
    chosen = [e for e in entries if e["id"] != "B7MBF8"][:5] + [e for e in entries if e["id"] == "B7MBF8"]
    labels = tmp_path / "six.3line"
    labels.write_text("".join(f">{e['id']}\n{e['sequence']}\n{e['labels']}\n" for e in chosen))
    (tmp_path / "structures").mkdir()
    shutil.copy(bama_pdb, tmp_path / "structures" / bama_pdb.name)
    monkeypatch.chdir(tmp_path)  # a relative --structures must still reach the tasks
    pool = prepare_records(labels, "pool", structures="structures")
    summary = prepare_records(labels, "ray", structures="structures", builder=RayBuilder(2))
    assert summary.manifest["counts"]["graph_source"] == {"sequence": 5, "structure": 1}
    assert summary.fallback.keys() == {"no structure file"} and len(summary.fallback["no structure file"]) == 5
    assert shards.read_table("ray").equals(shards.read_table("pool"))
    assert same_manifest(summary.manifest, pool.manifest)


def test_ray_bad_structure_files_fall_back_and_are_named_as_in_the_process_pool(tmp_path, ray_cluster):
    labels, bad = bad_structures(tmp_path)
    pool = prepare_records(labels, tmp_path / "pool", structures=tmp_path / "structures", builder=LocalBuilder(2))
    summary = prepare_records(labels, tmp_path / "ray", structures=tmp_path / "structures", builder=RayBuilder(2))
    assert summary.num_written == 8 and summary.manifest["counts"]["graph_source"] == {"structure": 2, "sequence": 6}
    assert shards.read_table(tmp_path / "ray").equals(shards.read_table(tmp_path / "pool"))
    assert summary.unreadable == pool.unreadable and [m.split(":")[0] for m in summary.unreadable] == list(bad)
    for message, says in zip(summary.unreadable, bad.values()):
        assert f"{tmp_path / 'structures'}/{says}" in message
    assert "unreadable structure files (5;" in summary.format()


def test_a_failing_task_leaves_the_previous_set_intact(tmp_path, ray_cluster):
    out = tmp_path / "syn"
    prepare_synthetic(6, out, seed=0)
    before = shards.read_table(out)

    def boom(jobs, seed, k):  # pickled by value into the Ray task
        if any(index == 5 for index, _, _ in jobs):
            raise RuntimeError("simulated task crash")
        return synthetic_rows(jobs, seed, k)

    jobs = [(i, "GLOBULAR", "train") for i in range(10)]
    summary = PrepareSummary(out=str(out))
    with pytest.raises(Exception, match="simulated task crash"):
        write_output(lambda target: RayBuilder(2)(boom, jobs, (1, 16), target, summary, what="x", k=16), out,
                     overwrite=True)
    assert shards.read_table(out).equals(before)
    assert not list(tmp_path.glob("syn.tmp-*")) and not list(tmp_path.glob("syn.old-*"))


def test_object_store_uri_gets_the_manifest_last_and_refuses_without_overwrite(tmp_path, ray_cluster):
    uri = f"file://{tmp_path}/bucket/syn"  # the object-store branch (no temp dir, no rename), on local disk
    prepare_synthetic(20, uri, seed=0, builder=RayBuilder(2))
    assert shards.read_manifest(uri)["num_proteins"] == 20 and shards.read_table(uri).num_rows == 20
    with pytest.raises(OutputExists, match="already holds a complete shard set"):
        prepare_synthetic(20, uri, seed=0, builder=RayBuilder())
    prepare_synthetic(3, uri, seed=1, builder=RayBuilder(2), overwrite=True)
    manifest = shards.read_manifest(uri)
    assert manifest["num_proteins"] == 3 and shards.read_table(uri).num_rows == 3
    # the old set's files are gone, not just unlisted
    assert sorted(p.name for p in (tmp_path / "bucket" / "syn").iterdir()) == sorted(
        [s["file"] for s in manifest["shards"]] + [shards.MANIFEST])
    assert not list((tmp_path / "bucket").glob("syn.tmp-*"))


def test_cli_ray_joins_the_cluster_and_reports_per_core_rate(tmp_path, ray_cluster):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    done = subprocess.run([sys.executable, "-m", "protopo_ray.prepare", "--synthetic", "12", "--out",
                           str(tmp_path / "cli"), "--ray", "--workers", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "12 of 12 records written" in done.stdout and "proteins per CPU second" in done.stdout
    assert shards.read_manifest(tmp_path / "cli")["counts"]["graph_source"] == {"structure": 12}
