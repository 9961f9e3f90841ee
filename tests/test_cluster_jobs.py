"""Cluster operation, on this machine: a search submitted as a Ray job to a head started with `ray start`,
and a Train run surviving the loss of the node that hosts its worker (a spot preemption, simulated).

Both run their own clusters, never the shared `ray_cluster` one this pytest process may be connected to:
other ports, another temp dir (RAY_TMPDIR too, so `ray.init(address="auto")` elsewhere still finds the
shared cluster), no `ray.init` in this process, and they are stopped by the PIDs of their own processes
(`ray stop` would stop every local cluster). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is what keeps Ray on
127.0.0.1: on Linux `ray start --node-ip-address 127.0.0.1` is rewritten to the machine's routable
address (`services.resolve_ip_for_localhost`) unless Ray is told it runs a single-machine cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

TINY_SEARCH = """\
name = "cloudjob"

[data]
batch_size = 8
bucket_batches = 4

[model]
gc_size = 16
gc_layers = 1
lstm_size = 8
lstm_layers = 1
aa_embed_dim = 8

[train]
epochs = 2
lr = 3e-3
schedule = "constant"
num_threads = 1

[resources]
num_workers = 1

[[stages]]
name = "architecture"
search = "grid"
metric = "val_loss"
mode = "min"
max_epochs = 2
grace_epochs = 2
[stages.grid]
"model.lstm_size" = [16, 8]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_env(temp_dir: Path) -> dict[str, str]:
    """The environment of a test-owned cluster: venv first on PATH, loopback only, token auth with a token of
    its own (a fresh machine has no ~/.ray/auth_token, and the user's must not be touched), no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    token = temp_dir / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(temp_dir),
                # Ray's default nice 15 starves the workers on a shared machine (as protopo_ray.cluster.ray_init).
                "RAY_worker_niceness": "0",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"})
    return env


def processes_of(temp_dir: Path) -> list[psutil.Process]:
    """Every process of the cluster living in `temp_dir`: those naming it, and all their descendants."""
    found: dict[int, psutil.Process] = {}
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or []) + " "
            if process.pid not in me and (f"{temp_dir}/" in cmdline or f"{temp_dir} " in cmdline):
                for p in (process, *process.children(recursive=True)):
                    found[p.pid] = p
        except psutil.Error:
            continue
    return list(found.values())


def kill_cluster(temp_dir: Path) -> None:
    for _ in range(3):  # a raylet may fork a worker while we kill: sweep until nothing is left
        procs = processes_of(temp_dir)
        if not procs:
            return
        for process in procs:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=15)
    assert not processes_of(temp_dir), "test cluster processes survived"


def stop_own_cluster(temp_dir: Path) -> None:
    """Kill the test's cluster by PID, then check that it took no other local cluster with it."""
    ours = {p.pid for p in processes_of(temp_dir)}
    others = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "gcs_server" and p.pid not in ours]
    kill_cluster(temp_dir)
    assert all(p.is_running() for p in others), [p.pid for p in others if not p.is_running()]
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # the shared `ray_cluster` this process is connected to
        assert any(node["Alive"] for node in ray.nodes())


@pytest.fixture
def short_tmp():
    # Ray's Unix socket paths live under the temp dir and must stay under ~107 characters.
    path = Path(tempfile.mkdtemp(prefix="rcj", dir="/tmp"))
    yield path
    kill_cluster(path)
    shutil.rmtree(path, ignore_errors=True)


def head_logs(temp_dir: Path) -> str:
    """The tails of the head's job-side logs, for a failure message."""
    tails = []
    for name in ("dashboard_JobHead.log", "dashboard_agent.log", "raylet.out"):
        for path in temp_dir.glob(f"session_*/logs/{name}"):
            tails.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(tails)


def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)


def test_search_submitted_as_a_job_to_a_ray_start_head(smoke_shards, short_tmp, tmp_path):
    env = cluster_env(short_tmp)
    gcs_port, dashboard_port = free_port(), free_port()
    for _ in range(2):  # Ray gives a raylet 30 s to register (fixed): a loaded machine can miss that once
        start = run_cli(["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--num-cpus", "2",
                         "--resources", '{"driver": 4}', "--temp-dir", str(short_tmp), "--disable-usage-stats",
                         # Fixed defaults (52365, 10001) collide with other local clusters: an agent that cannot
                         # bind answers job submissions with "No available agent to submit job".
                         "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port",
                         str(free_port())],
                        env, timeout_s=180)
        if start.returncode == 0:
            break
        kill_cluster(short_tmp)
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
    assert (short_tmp / "ray_current_cluster").read_text().strip() == f"127.0.0.1:{gcs_port}"
    listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
                 and c.laddr.port in (gcs_port, dashboard_port)}
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening

    experiment = tmp_path / "tiny.toml"
    experiment.write_text(TINY_SEARCH)
    storage = tmp_path / "runs"
    address = f"http://127.0.0.1:{dashboard_port}"
    started = time.time()
    while True:
        submit = run_cli(["job", "submit", "--address", address, "--no-wait", "--working-dir", str(REPO),
                          "--runtime-env-json", json.dumps({"excludes": [".venv", "data", "runs", ".git", "wandb"]}),
                          "--", "python", "-m", "protopo_ray.tune", str(experiment), "--data", str(smoke_shards),
                          "--storage", str(storage), "--no-wandb"], env)
        # `ray start` returns before the head's job agent is up; on a loaded machine that takes a while.
        if submit.returncode == 0 or "try again later" not in submit.stderr or time.time() - started > 180:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stderr[-3000:] + head_logs(short_tmp)
    job_id = next(word.strip("'") for word in submit.stdout.split() if word.strip("'").startswith("raysubmit_"))

    status = ""
    deadline = time.time() + 420
    while time.time() < deadline:
        # "Status for job '...': RUNNING" while it runs, "Job '...' succeeded" (failed, was stopped) at the end.
        reply = run_cli(["job", "status", "--address", address, job_id], env)
        status = (reply.stdout + reply.stderr).lower()
        if any(state in status for state in (f"{job_id.lower()}' {end}" for end in ("succeeded", "failed", "was stopped"))):
            break
        time.sleep(3)
    wall_s = time.time() - started
    logs = run_cli(["job", "logs", "--address", address, job_id], env).stdout
    assert f"{job_id.lower()}' succeeded" in status, f"{status}\n--- job logs ---\n{logs[-6000:]}"
    print(f"\njob {job_id}: submit -> SUCCEEDED in {wall_s:.0f} s")

    # The job joined the cluster it runs on (not the shared one, not a new local one).
    assert f"Ray dashboard: http://127.0.0.1:{dashboard_port}" in logs, logs[:4000]

    exp_dir = storage / "cloudjob"
    record = json.loads((exp_dir / "stages" / "architecture.json").read_text())
    # One-worker trials ran in their own Tune processes holding one CPU each (no driver slot, no Train group).
    assert record["plan"]["num_workers"] == 1
    assert all(t["config"]["resources"]["cpus_per_worker"] == 1.0 for t in record["trials"])
    assert len(record["trials"]) == 2 and all(t["epochs"] == 2 for t in record["trials"])
    report = (exp_dir / "report.md").read_text()
    assert all(t["trial_id"] in report for t in record["trials"])
    assert (exp_dir / "winner" / "winner.json").exists() and (exp_dir / "winner" / "checkpoint" / "state.pt").exists()

    stop_own_cluster(short_tmp)


NODE_LOSS_SCRIPT = """\
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from protopo_ray.config import load_config
from protopo_ray.cluster.train_run import build_trainer

shards, storage, out, dashboard_port, gcs_port = sys.argv[1:6]
epochs = 8
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "gcs_server_port": int(gcs_port), "include_dashboard": True, "dashboard_host": "127.0.0.1",
    "dashboard_port": int(dashboard_port), "dashboard_agent_listen_port": None})  # None: any free port, not 52365
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.connect()
config = load_config("experiments/smoke.toml", {
    "name": "preempted", "data.path": shards, "resources.storage": storage, "train.epochs": epochs,
    "resources.max_failures": 3, "train.num_threads": 1})
metrics = f"{storage}/preempted/metrics.jsonl"
event = {}

def epochs_done():
    try:
        with open(metrics) as handle:
            return len(handle.read().splitlines())
    except FileNotFoundError:
        return 0

def preempt():
    node = None
    deadline = time.time() + 300
    while time.time() < deadline:
        if node is None:
            try:
                actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            except Exception:  # the state API times out now and then on a loaded machine: ask again
                actors = []
            nodes = {n.node_id: n for n in cluster.worker_nodes}
            node = next((nodes[a.node_id] for a in actors if a.node_id in nodes), None)
        done = epochs_done()
        if node is not None and done >= 2:
            event.update(after_epoch=done, removed_unix=time.time(), node_id=node.node_id)
            cluster.remove_node(node, allow_graceful=False)  # spot preemption: no warning, no clean shutdown
            event["removal_s"] = time.time() - event["removed_unix"]
            cluster.add_node(num_cpus=1)  # the autoscaler's replacement node
            event["replaced_s"] = time.time() - event["removed_unix"]
            return
        time.sleep(0.05 if node is not None else 0.5)

outcome = {}

def fit():
    try:
        outcome["result"] = build_trainer(config).fit()
    except BaseException as error:  # reported by the test
        outcome["exception"] = repr(error)

# fit() in a thread: adding a node (the replacement) registers signal handlers, which only the main thread may.
trainer = threading.Thread(target=fit, daemon=True)
started = time.time()
print("cluster up", flush=True)
trainer.start()
preempt()
trainer.join(timeout=400)
result = outcome.get("result")
if result is None:
    error = outcome.get("exception", "fit() did not return in time")
else:
    error = repr(result.error) if result.error else None
event.update(wall_s=time.time() - started, error=error)
with open(metrics) as handle:
    event["rows"] = [json.loads(line) for line in handle.read().splitlines()]
with open(out, "w") as handle:
    json.dump(event, handle)
ray.shutdown()
cluster.shutdown()  # the test also kills whatever is left of the cluster by PID
"""


def test_train_run_survives_losing_its_workers_node(smoke_shards, short_tmp, tmp_path):
    script = tmp_path / "node_loss.py"
    script.write_text(NODE_LOSS_SCRIPT)
    out = tmp_path / "node_loss.json"
    env = cluster_env(short_tmp)
    env["PYTHONPATH"] = str(REPO)
    try:
        for _ in range(2):  # a node that missed Ray's fixed 30 s registration window on a loaded machine: once more
            proc = subprocess.run([sys.executable, str(script), str(smoke_shards), str(tmp_path / "runs"), str(out),
                                   str(free_port()), str(free_port())], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=420)
            if proc.returncode == 0 or "cluster up" in proc.stdout:
                break
            kill_cluster(short_tmp)
    finally:
        stop_own_cluster(short_tmp)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    event = json.loads(out.read_text())
    assert "node_id" in event, f"the worker's node was never removed: {event}\n{proc.stderr[-4000:]}"
    assert event["error"] is None, event["error"]

    rows = event["rows"]
    assert [r["epoch"] for r in rows] == list(range(1, 9))  # every epoch once: the run finished
    # An epoch may have finished between reading metrics.jsonl and the removal: it still says 0.
    after = [r for r in rows[event["after_epoch"]:] if r["resumed_from_epoch"] > 0]
    resumed = {r["resumed_from_epoch"] for r in after}
    # Restarted once, from the newest checkpoint before the loss: at most the interrupted epoch was lost.
    assert len(resumed) == 1 and resumed.pop() >= event["after_epoch"] - 1, (event["after_epoch"], rows)
    lost = event["after_epoch"] - after[0]["resumed_from_epoch"]
    restart_s = after[0]["train_first_step_unix"] - event["removed_unix"]
    print(f"\nnode loss: worker node removed after epoch {event['after_epoch']} "
          f"(removal {event['removal_s']:.1f} s, replacement node up {event['replaced_s']:.1f} s after), "
          f"resumed from epoch {after[0]['resumed_from_epoch']:.0f}: {lost:.0f} epoch(s) lost; "
          f"first step after the restart {restart_s:.1f} s after the loss; run wall time {event['wall_s']:.0f} s")
