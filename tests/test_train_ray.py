"""Ray Train path on the shared local cluster: 2-worker DDP, exact validation, resume, a killed worker."""

from __future__ import annotations

import json
import threading
import time

import psutil
import pytest

from protopo_ray import train
from protopo_ray.data import shards
from protopo_ray.training.checkpoint import find_checkpoints, load_latest_valid
from protopo_ray.training.evaluation import evaluate_checkpoint
from protopo_ray.training.fit import fit
from protopo_ray.training.session import LocalSession

pytestmark = [pytest.mark.ray]


def run(smoke_shards, storage, name, *extra):
    return train.main(["--config", "experiments/smoke.toml", "--set", f"data.path='{smoke_shards}'",
                       "--storage", str(storage), "--set", f"name={name}", "--set", "train.num_threads=1", *extra])


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_workers_disjoint_exact_validation_and_resume(ray_cluster, smoke_shards, tmp_path):
    assert run(smoke_shards, tmp_path, "ddp", "--num-workers", "2", "--set", "train.epochs=3") == 0
    run_dir = tmp_path / "ddp"
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    num_train = shards.read_table(smoke_shards, folds=["train"]).num_rows
    for row in rows:
        assert row["train_rank_overlap"] == 0  # the two ranks trained on disjoint proteins
        assert row["train_proteins_all_ranks"] > num_train // 2
    # Validation was computed over the whole split across both ranks: it equals one process evaluating
    # the same checkpoint on the same split.
    latest = load_latest_valid(find_checkpoints(run_dir))
    assert latest.epoch == 3
    single = evaluate_checkpoint(latest.path, split="val")
    assert single["n_proteins"] == rows[-1]["val_n_proteins"] == shards.read_table(smoke_shards, folds=["val"]).num_rows
    assert single["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-4)
    assert single["residue_acc"] == pytest.approx(rows[-1]["val_residue_acc"])
    assert single["overlap_acc"] == pytest.approx(rows[-1]["val_overlap_acc"])

    # Resume continues the same run from its checkpoint to the new total.
    assert run(smoke_shards, tmp_path, "ddp", "--num-workers", "2", "--resume", "--set", "train.epochs=4") == 0
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["resumed_from_epoch"] == 3


def test_ddp_two_workers_on_ray_data_streams(ray_cluster, smoke_shards, tmp_path):
    """data.loading = stream: read tasks on the cluster (0 CPUs: the two workers hold both), one streaming split
    per rank; ranks disjoint and in step, validation exact over the whole split, each rank's memory recorded."""
    assert run(smoke_shards, tmp_path, "streamed", "--num-workers", "2", "--set", "train.epochs=2",
               "--set", "data.loading='stream'") == 0
    run_dir = tmp_path / "streamed"
    rows = history(run_dir)
    num_train = shards.read_table(smoke_shards, folds=["train"]).num_rows
    for row in rows:
        assert row["train_rank_overlap"] == 0
        # equal=True splits and lockstep drop at most a couple of batches' tail per rank
        assert num_train - 2 * 8 <= row["train_proteins_all_ranks"] <= num_train
    single = evaluate_checkpoint(load_latest_valid(find_checkpoints(run_dir)).path, split="val")
    assert single["n_proteins"] == rows[-1]["val_n_proteins"]
    assert single["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-4)
    assert single["overlap_acc"] == pytest.approx(rows[-1]["val_overlap_acc"])
    workers = json.loads((run_dir / "workers.json").read_text())
    assert sorted(w["rank"] for w in workers) == [0, 1] and all(w["peak_rss_bytes"] >= w["peak_anon_bytes"] > 0 for w in workers)


def train_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, smoke_shards, tmp_path):
    run_dir = tmp_path / "killed"
    killed: dict[str, int] = {}

    def kill_one_worker_mid_run() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            path = run_dir / "metrics.jsonl"
            done = len(path.read_text().splitlines()) if path.exists() else 0
            workers = train_workers()
            if done >= 3 and workers:
                killed["after_epoch"], killed["pid"] = done, workers[0].pid
                workers[0].kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_mid_run, daemon=True)
    killer.start()
    rc = run(smoke_shards, tmp_path, "killed", "--num-workers", "2", "--set", "train.epochs=10",
             "--set", "resources.max_failures=3")
    killer.join(timeout=5)
    assert rc == 0 and "pid" in killed, killed
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == list(range(1, 11))  # every epoch once, the run finished
    resumed = {r["resumed_from_epoch"] for r in rows} - {0}
    assert len(resumed) == 1
    # Restarted from the last checkpoint before the kill. Rank 0 appends an epoch to metrics.jsonl just before
    # Ray Train persists that epoch's checkpoint, so a kill seen after N lines may land between the two (seen once
    # in CI, 2026-12-02: resumed from 2 after 3 lines): at most the epoch being reported and the one in flight lost.
    assert resumed.pop() >= killed["after_epoch"] - 1


def test_continuation_from_one_worker_to_two_keeps_lr_and_best(ray_cluster, smoke_shards, tmp_path):
    """A run searched on one worker continues on two: its linear schedule spans its own new budget (LR > 0 on
    every epoch), it keeps the searched global batch (same steps per epoch), and best/ never regresses."""
    config = train.resolve(train.build_parser().parse_args([
        "--config", "experiments/smoke.toml", "--set", f"data.path='{smoke_shards}'", "--storage", str(tmp_path),
        "--set", "name=searched", "--set", "train.epochs=2", "--set", "train.schedule='linear'",
        "--set", "train.num_threads=1", "--set", "train.metric='val_loss'", "--set", "train.mode='min'"]))
    fit(config, LocalSession(config))
    searched = history(tmp_path / "searched")
    start = load_latest_valid(find_checkpoints(tmp_path / "searched")).path
    assert run(smoke_shards, tmp_path, "promoted", "--num-workers", "2", "--set", "train.epochs=6",
               "--set", "train.schedule='linear'", "--set", f"train.init_checkpoint='{start}'",
               "--set", "train.metric='val_loss'", "--set", "train.mode='min'") == 0
    rows = history(tmp_path / "promoted")
    assert [r["epoch"] for r in rows] == [3, 4, 5, 6]
    assert all(r["train_lr"] > 0 for r in rows)  # the old step-count schedule put this at 0 from the start
    assert rows[0]["train_lr"] > rows[-1]["train_lr"]
    assert {r["train_steps"] for r in rows} == {searched[0]["train_steps"]}  # global batch kept on 2 ranks
    best = json.loads((tmp_path / "promoted" / "best" / "meta.json").read_text())
    seen = [searched[-1]["val_loss"]] + [r["val_loss"] for r in rows]
    assert best["metrics"]["val_loss"] == pytest.approx(min(seen)) and best["best_value"] == pytest.approx(min(seen))
