"""Synchronous halving on real Tune runs: every trial reaches the rung, the best 1/rf continue from their
checkpoints, the rest stop; paused trials free their resources; a killed driver's stage, restored, keeps every
rung decision it had made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protopo_ray.search.halving import rungs

REPO = Path(__file__).resolve().parents[1]

# A trainable with known curves: trial `x` reports val_loss = x / epoch, one checkpoint per epoch, and resumes
# from its checkpoint (as protopo_ray's trials do), so the halving decisions can be checked by hand.
SCRIPT = r"""
import json, os, sys, tempfile, time
import ray
from ray import tune
from protopo_ray.config import Objective
from protopo_ray.search.halving import SynchronousHalving

storage, state, mode, slow = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def trainable(config):
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = json.load(open(os.path.join(d, "epoch.json")))["epoch"]
    for epoch in range(start + 1, 10):
        time.sleep(slow)
        with tempfile.TemporaryDirectory() as d:
            json.dump({"epoch": epoch}, open(os.path.join(d, "epoch.json"), "w"))
            tune.report({"epoch": epoch, "val_loss": config["x"] / epoch, "resumed_at": start},
                        checkpoint=tune.Checkpoint.from_directory(d))

ray.init(address=os.environ.get("RAY_ADDRESS") or None, num_cpus=None if os.environ.get("RAY_ADDRESS") else 2,
         logging_level="ERROR", log_to_driver=False)
trainable = tune.with_resources(trainable, {"CPU": 1})
if mode == "restore":
    tuner = tune.Tuner.restore(os.path.join(storage, "sha"), trainable=trainable, resume_unfinished=True)
else:
    scheduler = SynchronousHalving(time_attr="epoch", objective=Objective("val_loss", "min"), grace=1, reduction_factor=3,
                                   max_t=9, num_trials=9, state_file=state)
    tuner = tune.Tuner(trainable, param_space={"x": tune.grid_search([5, 1, 8, 3, 9, 2, 7, 4, 6])},
                       # reuse_actors as the search's one-worker stages run (trials.build_tuner): paused trials resume
                       # in processes other trials ran in
                       tune_config=tune.TuneConfig(scheduler=scheduler, metric="val_loss", mode="min", reuse_actors=True),
                       run_config=tune.RunConfig(name="sha", storage_path=storage, verbose=0))
tuner.fit()
# Epochs each trial trained over every session, from the result.json files Tune appends to in the trial
# directories (a trial stopped right after a restore has no result of this session in the ResultGrid).
epochs = {}
for root, _, files in os.walk(os.path.join(storage, "sha")):
    if "result.json" in files:
        for line in open(os.path.join(root, "result.json")):
            row = json.loads(line)
            key = str(int(row["config"]["x"]))
            epochs[key] = max(epochs.get(key, 0), int(row["epoch"]))
print(json.dumps(epochs))
"""


def test_rungs_by_hand():
    assert rungs(1, 3, 9) == [1, 3]
    assert rungs(2, 2, 16) == [2, 4, 8]
    assert rungs(5, 3, 5) == []


def run(tmp_path, mode, slow=0.0, **popen):
    cmd = [sys.executable, "-c", SCRIPT, str(tmp_path / "tune"), str(tmp_path / "sha.json"), mode, str(slow)]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def epochs_of(done) -> dict[str, int]:
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.ray
def test_halving_keeps_the_best_third_at_each_rung(ray_cluster, tmp_path):
    epochs = epochs_of(run(tmp_path, "fresh"))
    # rung 1: all 9; best 3 (x = 1, 2, 3) go on; rung 3: the best of those (x = 1) runs to 9.
    assert epochs == {"1": 9, "2": 3, "3": 3, "4": 1, "5": 1, "6": 1, "7": 1, "8": 1, "9": 1}
    assert sum(epochs.values()) == 21  # of the grid's 81 epochs: 0.26
    state = json.loads((tmp_path / "sha.json").read_text())
    assert sorted(map(len, state["promoted"].values())) == [1, 3] and len(state["stopped"]) == 8


@pytest.mark.long  # two Tune runs with a kill between: minutes on 2 cores (passes: 301 s under load 16)
def test_a_killed_stage_restored_keeps_its_rung_decisions(ray_cluster, tmp_path):
    first = run(tmp_path, "fresh", slow=1.0, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill the driver once the first rung is decided, mid-way to the second
        state = json.loads((tmp_path / "sha.json").read_text()) if (tmp_path / "sha.json").exists() else {}
        if state.get("promoted", {}).get("1"):
            break
        time.sleep(0.2)
    decided = json.loads((tmp_path / "sha.json").read_text())
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert decided["promoted"]["1"]
    epochs = epochs_of(run(tmp_path, "restore"))
    after = json.loads((tmp_path / "sha.json").read_text())
    assert after["promoted"]["1"] == decided["promoted"]["1"]  # the decision stood
    assert epochs["1"] == 9 and all(epochs[x] <= 1 for x in ("4", "5", "6", "7", "8", "9")), (epochs, decided, after)
