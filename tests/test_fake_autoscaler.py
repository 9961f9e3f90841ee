"""The cloud path on a real autoscaling cluster from zero: Ray's fake multi-node provider with a head of CPU 0 and
driver slots (as cluster.yaml's) and a GPU node type at min_workers 0 (logical GPUs; compute forced to the CPU).
The smoke search is submitted with `ray job submit`, exactly as docs/cloud.md says; the planner must see the
GPU node type the autoscaler can start, trials must make it start, and the search must finish; after each stage no
placement group stays reserved, and the idle GPU node then scales down.

Several minutes on 2 cores, so marked `long` (run by hand: `pytest -m long tests/test_fake_autoscaler.py`); the
planning half runs in CI (tests/test_hardware.py::test_fresh_autoscaling_head_plans_on_the_gpu_types_it_may_start).
It needs port 6379 (the fake nodes join the GCS there) and stops only the Ray processes it started.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "PROTOPO_FAKE_AUTOSCALER_TEST"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_processes() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if any(part in " ".join(p.info["cmdline"] or []) for part in ("ray::", "raylet", "gcs_server", "ray/"))}


def started_here(pid: int, marker: str) -> bool:
    """Whether a process belongs to this test's cluster: every process of it inherits the marker in its environment
    (other Ray clusters on this machine, started meanwhile by other jobs, do not)."""
    try:
        return psutil.Process(pid).environ().get(MARKER) == marker
    except psutil.Error:
        return False


@pytest.mark.long
def test_smoke_search_as_a_job_on_a_cluster_that_scales_from_zero(smoke_shards, tmp_path):
    if not port_free(6379):
        pytest.skip("port 6379 is taken by another Ray cluster; the fake nodes need the default GCS port")
    # The dashboard (and its agent) on free ports: other test clusters on this machine may hold the defaults.
    dashboard = 8265 if port_free(8265) else free_port()
    marker = f"{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", MARKER: marker}
    env.pop("RAY_ADDRESS", None)
    before = ray_processes()
    started = time.time()
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--port=6379", "--num-cpus=0",
                        '--resources={"driver": 8}', f"--autoscaling-config={REPO / 'cluster-fake.yaml'}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                        f"--dashboard-agent-listen-port={free_port()}"],
                       env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}, check=True,
                       capture_output=True, timeout=120)
        status = subprocess.run([str(BIN / "ray"), "status", "--address=127.0.0.1:6379"], env=env, capture_output=True, text=True, timeout=60)
        assert "search_gpu" not in status.stdout.split("Pending:")[0]  # only the head is up
        # No --working-dir here: the fake nodes share this disk, and one node's runtime-env cache clean-up
        # deletes the job's unpacked working directory under the others (the package is installed in .venv).
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
             "python", "-m", "protopo_ray.tune", str(REPO / "experiments" / "smoke.toml"), "--data", str(smoke_shards),
             "--storage", str(tmp_path / "runs"), "--cluster", str(REPO / "cluster-fake.yaml"), "--no-wandb",
             # The fake nodes share this disk (a local path on a multi-node cluster must be declared shared), and
             # their GPUs are logical: compute on the CPU, said so (a GPU without CUDA is refused otherwise).
             "--shared-storage", "--set", "train.device='cpu'"],
            env=env, capture_output=True, text=True, timeout=900)
        wall = time.time() - started
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        # The autoscaler started the GPU node (it idles out only a minute after the job).
        status = subprocess.run([str(BIN / "ray"), "status", "--address=127.0.0.1:6379"], env=env, capture_output=True, text=True, timeout=60)
        assert "search_gpu" in status.stdout.split("Pending:")[0], status.stdout
        record = json.loads((tmp_path / "runs" / "smoke" / "stages" / "architecture.json").read_text())
        assert record["plan"]["device"] == "gpu" and record["plan"]["accelerator_type"] == "A10G"
        promotion = json.loads((tmp_path / "runs" / "smoke" / "stages" / "promotion.json").read_text())
        assert promotion["plan"]["num_workers"] == 2 and promotion["trials"][0]["status"] == "completed"
        workers = json.loads((tmp_path / "runs" / "smoke" / "train" / promotion["trials"][0]["config"]["name"]
                              / "workers.json").read_text())
        assert len(workers) == 2 and all(w["gpu_ids"] for w in workers)
        # After every stage nothing stays reserved: no placement group of a finished or failed trial holds GPUs.
        after = re.findall(r"placement groups after stage (\w+): (\d+) left by its trials released, (\d+) reserved",
                           job.stdout)
        assert [stage for stage, _, _ in after] == ["architecture", "regularization", "promotion"], job.stdout[-4000:]
        assert all(reserved == "0" for _, _, reserved in after), after
        # ... so the idle GPU node scales down after the idle timeout (1 minute in cluster-fake.yaml).
        idle_started = time.time()
        while "search_gpu" in status.stdout.split("Pending:")[0] and time.time() - idle_started < 240:
            time.sleep(5)
            status = subprocess.run([str(BIN / "ray"), "status", "--address=127.0.0.1:6379"], env=env, capture_output=True, text=True, timeout=60)
        assert "search_gpu" not in status.stdout.split("Pending:")[0], status.stdout
        print(f"fake autoscaling cluster: search job finished in {wall:.0f} s; placement groups released per stage "
              f"{[int(n) for _, n, _ in after]}, reserved after each 0; GPU node gone "
              f"{time.time() - idle_started:.0f} s after the job")
    finally:
        for pid in ray_processes() - before:
            try:
                process = psutil.Process(pid)
                if process.create_time() >= started - 1 and started_here(pid, marker):
                    process.kill()
            except psutil.Error:
                pass
