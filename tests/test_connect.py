"""What a run requires of the cluster it joins: storage every node sees, no placement group left reserved, and no
GPU trial silently on the CPU (`cluster/connect.py`, `cluster/sessions.py`, `search/fatal_errors.py`).

The cluster cases run once, in a subprocess with its own two-node cluster (`ray.cluster_utils.Cluster`: a head
with one logical A10G and a CPU node), which it shuts down itself; this pytest process may already be connected to
the shared test cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protopo_ray.cluster.connect import SharedStorageError, require_shared_storage

REPO = Path(__file__).resolve().parents[1]


def test_local_storage_is_refused_on_more_than_one_node():
    with pytest.raises(SharedStorageError, match=r"cluster of 2 nodes.*--storage s3://.*--shared-storage"):
        require_shared_storage("/home/me/runs", shared=False, num_nodes=2)


@pytest.mark.parametrize("storage, shared, num_nodes", [
    ("/home/me/runs", False, 1),  # one machine: its disk is every node's
    ("/mnt/nfs/runs", True, 3),  # declared a mount every node has
    ("s3://bucket/runs", False, 3),  # object storage
    ("gs://bucket/runs", False, 3),
])
def test_storage_every_node_sees_passes(storage, shared, num_nodes):
    require_shared_storage(storage, shared=shared, num_nodes=num_nodes)


SCRIPT = r"""
import contextlib, io, json, subprocess, sys, time
started = time.time()
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group

shards, out, experiment = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "num_gpus": 1, "resources": {"accelerator_type:A10G": 1, "gpu_memory_gb": 24, "driver": 8}})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
from protopo_ray import train, tune
from protopo_ray.cluster.connect import release_leaked_placement_groups, reserved_placement_groups

summary = {"nodes": sum(n["Alive"] for n in ray.nodes()), "cluster_up_s": time.time() - started}

def run(main, argv):  # tune --verbose: its console output stays on sys.stderr (else it keeps the terminal's fd)
    stderr = io.StringIO()
    begun = time.time()
    with contextlib.redirect_stderr(stderr):
        rc = main(argv)
    return {"rc": rc, "stderr": stderr.getvalue(), "seconds": time.time() - begun}

# Local storage on two nodes: refused by the search and by a Train run before anything runs.
summary["tune_local"] = run(tune.main, [experiment, "--data", shards, "--storage", f"{out}/local", "--no-wandb",
                                        "--verbose"])
summary["train_local"] = run(train.main, ["--config", "experiments/smoke.toml", "--set", f"data.path='{shards}'",
                                          "--storage", f"{out}/train_local"])

# Placement groups: ours (made by this driver and by one of its actors, as Train's controller makes a worker
# group's) are released; another job's (a detached group of a driver that has exited) stays.
other = subprocess.run([sys.executable, "-c", "import ray; from ray.util.placement_group import placement_group; "
                        f"ray.init(address='{cluster.address}'); pg = placement_group([{{'CPU': 0.01}}], "
                        "lifetime='detached'); ray.get(pg.ready()); print(pg.id.hex())"],
                       capture_output=True, text=True, check=True)
other_pg = other.stdout.strip().splitlines()[-1]

@ray.remote(num_cpus=0)
class Controller:
    def reserve(self):
        group = placement_group([{"CPU": 0.01}])
        ray.get(group.ready())
        return group.id.hex()

controller = Controller.remote()
ours = [ray.get(controller.reserve.remote())]
group = placement_group([{"CPU": 0.01}])
ray.get(group.ready())
ours.append(group.id.hex())
summary["released"] = release_leaked_placement_groups()
summary["reserved_after"] = reserved_placement_groups()
summary["ours"], summary["other"] = ours, other_pg

# A GPU trial on a torch without CUDA and train.device = "auto": the search ends at once with the refusal.
summary["tune_no_cuda"] = run(tune.main, [experiment, "--data", shards, "--storage", f"{out}/nocuda",
                                          "--shared-storage", "--no-wandb", "--verbose"])
summary["reserved_at_end"] = reserved_placement_groups()
print(json.dumps(summary))
ray.shutdown()
cluster.shutdown()
"""

EXPERIMENT = """
name = "checks"
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
"train.lr" = [1e-3]
"""


@pytest.fixture(scope="module")
def two_nodes(smoke_shards, tmp_path_factory):
    pytest.importorskip("ray")
    import torch

    if torch.cuda.is_available():
        pytest.skip("the no-CUDA refusal needs a torch without CUDA")
    tmp = tmp_path_factory.mktemp("two_nodes")
    experiment = tmp / "checks.toml"
    experiment.write_text(EXPERIMENT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(smoke_shards), str(tmp), str(experiment)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), tmp


@pytest.mark.ray
def test_two_node_cluster_refuses_local_storage(two_nodes):
    summary, tmp = two_nodes
    assert summary["nodes"] == 2
    for command in ("tune_local", "train_local"):
        assert summary[command]["rc"] == 2, summary[command]
        assert "--storage s3://" in summary[command]["stderr"] and "--shared-storage" in summary[command]["stderr"]
    assert not (tmp / "local" / "checks" / "stages").exists()  # refused before any stage ran


@pytest.mark.ray
def test_only_this_jobs_placement_groups_are_released(two_nodes):
    summary, _ = two_nodes
    assert summary["released"] == 2
    reserved = summary["reserved_after"]
    assert summary["other"] in reserved and not set(summary["ours"]) & set(reserved)


@pytest.mark.ray
def test_gpu_trial_without_cuda_ends_the_search(two_nodes):
    summary, tmp = two_nodes
    result = summary["tune_no_cuda"]
    assert result["rc"] == 2, result
    assert "sees no CUDA device" in result["stderr"] and "train.device = 'cpu'" in result["stderr"]
    assert not (tmp / "nocuda" / "checks" / "stages" / "search.json").exists()  # no stage record of nothing trained
    assert summary["reserved_at_end"] == [summary["other"]]  # the failed trials reserve nothing
    print(f"two-node cluster up in {summary['cluster_up_s']:.0f} s; refused: tune {summary['tune_local']['seconds']:.1f} s, "
          f"train {summary['train_local']['seconds']:.1f} s; no-CUDA search ended in {result['seconds']:.0f} s")


# -- joining a `ray start` head, with token authentication on and off ------------------------------------------------
# Each head is this test's own (its own port and --temp-dir, stopped by killing its processes: `ray stop` would stop
# every cluster on the machine), alive only for the test. The joining commands run in subprocesses.

from test_cluster_jobs import free_port, kill_cluster, run_cli  # noqa: E402

JOIN_SCRIPT = """
import sys
from protopo_ray.cluster.connect import ClusterAuthError, prepare_auth
try:
    prepare_auth(sys.argv[1], "RAY_ADDRESS")
    print("joinable")
except ClusterAuthError as error:
    print(error)
"""


def start_head(temp_dir: Path, *, token: bool) -> tuple[dict[str, str], str]:
    """A `ray start --head` on 127.0.0.1 with (or without) token authentication; the environment of a user of that
    machine (no RAY_AUTH_MODE, the token where the head's was, no RAY_ADDRESS) and the head's GCS address."""
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    base.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}",
                 "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                 "RAY_TMPDIR": str(temp_dir), "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0",
                 "WANDB_MODE": "offline"})
    head_env = {**base, "RAY_AUTH_MODE": "token" if token else "disabled"}
    port = free_port()
    for _ in range(2):  # Ray gives a raylet 30 s to register: a loaded machine can miss that once
        start = run_cli(["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host",
                         "127.0.0.1", "--dashboard-port", str(free_port()), "--num-cpus", "2", "--temp-dir",
                         str(temp_dir), "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port()),
                         "--ray-client-server-port", str(free_port())], head_env, timeout_s=180)
        if start.returncode == 0:
            break
        kill_cluster(temp_dir)
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
    return base, f"127.0.0.1:{port}"


def dry_run(smoke_shards, tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protopo_ray.tune", "experiments/smoke.toml", "--data",
                           str(smoke_shards), "--storage", str(tmp / "runs"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def join(address: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", JOIN_SCRIPT, address], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def head_dir():
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="rcn", dir="/tmp"))  # Ray's socket paths must stay short
    yield path
    kill_cluster(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.ray
def test_search_joins_a_ray_start_head_with_token_auth(smoke_shards, head_dir):
    env, address = start_head(head_dir, token=True)
    # RAY_ADDRESS named, RAY_AUTH_MODE unset: Ray itself would go in without the token and be refused
    done = dry_run(smoke_shards, head_dir, {**env, "RAY_ADDRESS": address})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in done.stderr and "search" in done.stdout
    # Without the head's token, or with another one: one line saying what to set, at once.
    started = time.time()
    missing = join(address, {**env, "RAY_AUTH_TOKEN_PATH": str(head_dir / "nothing"), "HOME": str(head_dir)})
    wrong_file = head_dir / "other_token"
    wrong_file.write_text(secrets.token_hex(32))
    wrong = join(address, {**env, "RAY_AUTH_TOKEN_PATH": str(wrong_file)})
    disabled = join(address, {**env, "RAY_AUTH_MODE": "disabled"})
    assert "requires token authentication" in missing and "set RAY_AUTH_TOKEN_PATH" in missing, missing
    assert "refuses the token" in wrong and "set RAY_AUTH_TOKEN_PATH" in wrong, wrong
    assert "RAY_AUTH_MODE=disabled" in disabled and "set RAY_AUTH_MODE=token" in disabled, disabled
    assert time.time() - started < 60  # the probes answer at once (ray.init retries ~20 s, then a bare ConnectionError)
    cli = subprocess.run([sys.executable, "-m", "protopo_ray.tune", "experiments/smoke.toml", "--data", str(smoke_shards),
                          "--storage", str(head_dir / "runs"), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         env={**env, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN_PATH": str(wrong_file)}, timeout=300)
    assert cli.returncode == 2 and cli.stderr.strip().splitlines()[-1].startswith("error: the Ray cluster at"), cli.stderr


@pytest.mark.ray
def test_search_joins_a_ray_start_head_without_auth_found_on_this_machine(smoke_shards, head_dir):
    env, address = start_head(head_dir, token=False)
    assert join(address, env) == "joinable"  # a token at hand is not sent where none is asked for
    done = dry_run(smoke_shards, head_dir, env)  # no RAY_ADDRESS: the live `ray start` of RAY_TMPDIR
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in done.stderr


PRIVATE_CLUSTER = """
import sys
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""
PROBE = """
from ray._private import services
from protopo_ray.cluster.connect import running_cluster
print(running_cluster(), " ".join(sorted(services.find_gcs_addresses())))
"""


@pytest.mark.ray
def test_another_process_private_cluster_is_not_joined(head_dir):
    """A second `tune` beside a first on one machine: the first's cluster (its own `ray.init`) ends when it exits,
    so the second must start its own instead of joining it (its trials died with "owner's node has crashed")."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(head_dir), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    holder = subprocess.Popen([sys.executable, "-c", PRIVATE_CLUSTER], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        gcs = holder.stdout.readline().strip()
        probe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=120)
        assert probe.returncode == 0, probe.stderr[-2000:]
        joined, live = probe.stdout.split(" ", 1)
        assert gcs and gcs in live.split()  # it is alive and visible ...
        assert joined == "None"  # ... but nobody's `ray start`
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
