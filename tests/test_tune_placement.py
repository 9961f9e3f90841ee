"""The hardware plan applied on a real Ray cluster with logical GPUs: trials share a GPU as planned and land
on the GPU node, never on the CPU-only one. Compute is forced to the CPU by config (train.device = "cpu").

Runs in a subprocess: it needs its own multi-node cluster (`ray.cluster_utils.Cluster`), and this pytest
process may already be connected to the shared test cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys
import ray
from ray.cluster_utils import Cluster

shards, out, experiment = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 4, "num_gpus": 1, "resources": {"accelerator_type:A10G": 1, "gpu_memory_gb": 24, "driver": 8}})
gpu_node = cluster.head_node
cluster.add_node(num_cpus=2)  # CPU-only: search trials must not land here
ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
from protopo_ray import tune

# Two nodes on one disk: the storage path is shared (a local one is refused on a multi-node cluster).
rc = tune.main([experiment, "--data", shards, "--storage", out, "--shared-storage", "--no-wandb",
                "--set", "train.device='cpu'"])
print(json.dumps({"rc": rc, "gpu_node": gpu_node.node_id}))
ray.shutdown()
cluster.shutdown()
"""

EXPERIMENT = """
name = "placement"
[data]
batch_size = 8
[model]
gc_size = 8
gc_layers = 1
lstm_size = 8
lstm_layers = 1
aa_embed_dim = 8
[train]
num_threads = 1
[[stages]]
name = "search"
search = "grid"
scheduler = "none"
metric = "val_loss"
mode = "min"
max_epochs = 1
[stages.grid]
"train.lr" = [1e-3, 2e-3, 3e-3, 4e-3]
"""


@pytest.mark.ray
def test_search_trials_share_the_logical_gpu_as_planned(smoke_shards, tmp_path):
    experiment = tmp_path / "placement.toml"
    experiment.write_text(EXPERIMENT)
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(smoke_shards), str(tmp_path), str(experiment)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rc"] == 0, done.stdout[-3000:]

    record = json.loads((tmp_path / "placement" / "stages" / "search.json").read_text())
    plan = record["plan"]
    # 4 tiny trials on one 24 GiB A10G with 4 CPUs: 4 per GPU, a quarter GPU and one CPU each, one worker.
    assert (plan["device"], plan["accelerator_type"], plan["num_workers"]) == ("gpu", "A10G", 1)
    assert plan["gpus_per_worker"] == 0.25 and plan["max_concurrent_trials"] == 4
    # The grid ran in shuffled order (the stage default): still every point exactly once.
    assert sorted(t["params"]["train.lr"] for t in record["trials"]) == [1e-3, 2e-3, 3e-3, 4e-3]
    windows = []
    for trial in record["trials"]:
        assert trial["status"] == "completed"
        run_dir = tmp_path / "placement" / "train" / trial["config"]["name"]
        (worker,) = json.loads((run_dir / "workers.json").read_text())
        assert worker["node_id"] == summary["gpu_node"] and len(worker["gpu_ids"]) == 1  # on the GPU node
        windows.append(trial["running_unix"])
    # How many trials Tune ran at once: the most overlapping trial windows (at most the planned 4). Not training
    # windows: on a 2-core machine worker start-up (tens of seconds) dwarfs one tiny epoch and keeps those apart.
    most = max(sum(start <= t <= end for start, end in windows) for t, _ in windows)
    assert 2 <= most <= 4
