"""The search CLI end to end on the shared local cluster: ASHA, HyperOpt, promotion, report, W&B,
the dashboard, and --resume after the driver process is killed mid-stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from protopo_ray import tune

REPO = Path(__file__).resolve().parents[1]


def tune_cmd(smoke_shards, storage, *extra):
    return [sys.executable, "-m", "protopo_ray.tune", "experiments/smoke.toml", "--data", str(smoke_shards),
            "--storage", str(storage), *extra]


def train_histories(exp_dir: Path) -> dict[str, list[dict]]:
    runs = {}
    for path in (exp_dir / "train").glob("*/metrics.jsonl"):
        runs[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return runs


def test_bad_experiment_fails_before_any_trial(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[stages]]\nname = "a"\nmetric = "val_f1"\n[stages.grid]\n"model.gc_size" = [8]\n')
    assert tune.main([str(bad), "--storage", str(tmp_path)]) == 2
    assert "never reported by the trainer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_dry_run_prints_the_plan(ray_cluster, smoke_shards, tmp_path, capsys):
    assert tune.main(["experiments/smoke.toml", "--data", str(smoke_shards), "--storage", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "search" in out and "concurrent" in out and "1 x (1 CPU)" in out
    assert not (tmp_path / "smoke" / "stages").exists()


@pytest.mark.ray
def test_dashboard_answers_on_loopback_only(ray_cluster):
    url = os.environ["PROTOPO_TEST_DASHBOARD"]
    host, port = url.rsplit(":", 1)
    assert host == "127.0.0.1"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/version")
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        request.add_header("Authorization", f"Bearer {token.read_text().strip()}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and "ray_version" in response.read().decode()
    # Not on other interfaces: the listening socket is bound to loopback, not 0.0.0.0 (checked without
    # sending traffic anywhere but 127.0.0.1).
    listeners = [c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)]
    assert listeners and set(listeners) == {"127.0.0.1"}, listeners


@pytest.mark.ray
@pytest.mark.long  # ~275 s on 2 cores: run by hand (`-m long`); CI's suite stays well under 15 minutes
def test_smoke_search_killed_then_resumed_end_to_end(ray_cluster, smoke_shards, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "WANDB_MODE": "offline", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    exp_dir = tmp_path / "smoke"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(tune_cmd(smoke_shards, tmp_path), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    # Kill the driver process once a trial has finished an epoch, mid-way through the first stage.
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        progress = {name: len(rows) for name, rows in train_histories(exp_dir).items()}
        if any(progress.values()):
            break
        time.sleep(0.2)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before_kill = {name: len(rows) for name, rows in train_histories(exp_dir).items()}
    assert not (exp_dir / "stages" / "architecture.json").exists()

    resumed = subprocess.run(tune_cmd(smoke_shards, tmp_path, "--resume"), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    architecture = json.loads((exp_dir / "stages" / "architecture.json").read_text())
    trials = architecture["trials"]
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4  # every trial present once
    assert any(t["status"] == "stopped" for t in trials), [(t["params"], t["epochs"]) for t in trials]
    assert architecture["epochs_run"] < architecture["epochs_full"]
    histories = train_histories(exp_dir)
    for name, done in before_kill.items():
        rows = histories[name]
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
        # Trials that had trained before the kill continued from their checkpoints, not from epoch 0.
        assert all(r["resumed_from_epoch"] >= 1 for r in rows[done:]), (name, done, rows)

    regularization = json.loads((exp_dir / "stages" / "regularization.json").read_text())
    assert regularization["search"] == "hyperopt" and len(regularization["trials"]) == 1
    for trial in regularization["trials"]:
        assert 1e-3 <= trial["params"]["train.lr"] <= 1e-2 and 0.0 <= trial["params"]["model.dropout"] <= 0.3

    promotion = json.loads((exp_dir / "stages" / "promotion.json").read_text())
    (promoted,) = promotion["trials"]
    source = next(t for s in (architecture, regularization) for t in s["trials"]
                  if t["trial_id"] == promoted["promoted_from"])
    assert promoted["start_epoch"] == source["epochs"] >= 1
    assert [h["epoch"] for h in promoted["history"]] == list(range(source["epochs"] + 1, 6))
    assert promoted["history"][0]["resumed_from_epoch"] == source["epochs"]

    report = (exp_dir / "report.md").read_text()
    for stage in (architecture, regularization, promotion):
        for trial in stage["trials"]:
            assert trial["trial_id"] in report
    for png in ("val_curves_architecture.png", "grad_norms_promotion.png", "per_type_top5.png"):
        assert (exp_dir / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    winner = json.loads((exp_dir / "winner" / "winner.json").read_text())
    assert winner["test"]["n_proteins"] > 0 and (exp_dir / "winner" / "checkpoint" / "state.pt").exists()

    runs = list((exp_dir / "wandb").rglob("offline-run-*"))
    assert len(runs) >= 6  # one W&B run per trial: 4 + 1 + 1
    logged = b"".join(p.read_bytes() for run in runs for p in run.glob("*.wandb"))
    assert b"val_loss" in logged and b"train_grad_norm_max" in logged


def test_dry_run_json_on_the_cluster_yaml_prices_each_stage(smoke_shards, tmp_path, capsys):
    """No cluster: the YAML scaled out, priced by the default table (spot search pool, on-demand promotion)."""
    assert tune.main(["experiments/smoke.toml", "--data", str(smoke_shards), "--storage", str(tmp_path), "--dry-run",
                      "--json", "--cluster", str(REPO / "cluster.yaml")]) == 0
    plan = json.loads(capsys.readouterr().out)
    stages = {s["kind"]: s for s in plan["stages"]}
    assert (stages["search"]["accelerator_type"], stages["search"]["market"]) == ("A10G", "spot")
    assert (stages["promotion"]["accelerator_type"], stages["promotion"]["market"]) == ("A100", "on-demand")
    assert 0 < stages["search"]["usd_per_device_hour"] < stages["promotion"]["usd_per_device_hour"]
    assert {n["node_type"] for n in plan["inventory"]} == {"head", "search_a10g", "promotion_a100"}


# -- watching a search on the shared cluster (protopo_ray.monitoring; docs/monitoring.md) ----------------------------
# One small search (smoke's base config, a 2-trial grid of 2 epochs, ~30 s), watched while it runs through the state
# API and the node's metrics endpoint, as the dashboard and Prometheus see it.

LIVE_SEARCH = """
[[stages]]
name = "architecture"
search = "grid"
scheduler = "none"
metric = "val_loss"
mode = "min"
max_epochs = 2
[stages.grid]
"model.lstm_size" = [16, 8]
"""


@pytest.fixture(scope="module")
def watched_search(smoke_shards, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray.util.state import list_actors, list_jobs

    if not ray.is_initialized():  # the shared cluster as conftest's ray_cluster starts it (that one is per test)
        from protopo_ray.cluster.connect import ray_init

        os.environ["RAY_ADDRESS"] = "local"
        context = ray_init(num_cpus=2, logging_level="WARNING", log_to_driver=False)
        os.environ["RAY_ADDRESS"] = context.address_info["address"]
        os.environ["PROTOPO_TEST_DASHBOARD"] = context.dashboard_url or ""
    tmp = tmp_path_factory.mktemp("watched")
    toml = tmp / "watched.toml"
    toml.write_text((REPO / "experiments" / "smoke.toml").read_text().split("[[stages]]")[0]
                    .replace('name = "smoke"', 'name = "watched"') + LIVE_SEARCH)
    node = next(n for n in ray.nodes() if n["Alive"])
    endpoint = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    search = subprocess.Popen([sys.executable, "-m", "protopo_ray.tune", str(toml), "--data", str(smoke_shards),
                               "--storage", str(tmp), "--no-wandb"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    actors, samples = {}, {}
    while search.poll() is None:
        try:
            for actor in list_actors(filters=[("class_name", "=", "Trial_architecture")], detail=True):
                actors[actor.actor_id] = actor.repr_name
            with urllib.request.urlopen(endpoint, timeout=5) as reply:
                for line in reply.read().decode().splitlines():
                    if line.startswith("ray_protopo_") and 'experiment="watched"' in line:
                        series, value = line.rsplit(" ", 1)
                        samples[series] = float(value)
        except Exception:  # the state API or the exporter can time out on a loaded machine: ask again
            pass
        time.sleep(0.5)
    output = search.stdout.read()
    assert search.returncode == 0, output[-3000:]
    jobs = [job for job in list_jobs(detail=True) if (job.metadata or {}).get("job_name") == "watched"]
    record = json.loads((tmp / "watched" / "stages" / "architecture.json").read_text())
    return {"actors": actors, "samples": samples, "jobs": jobs, "record": record}


@pytest.mark.ray
def test_watched_search_trials_are_actors_named_by_stage_trial_and_values(ray_cluster, watched_search):
    trial_ids = {t["trial_id"]: t for t in watched_search["record"]["trials"]}
    reprs = list(watched_search["actors"].values())
    assert reprs, "no Trial_architecture actor seen while the search ran"
    for text in reprs:  # e.g. "architecture 5e1f2_00001 model.lstm_size=8"
        stage, trial_id, *values = text.split()
        assert stage == "architecture" and trial_id in trial_ids, text
        assert values == [f"model.lstm_size={trial_ids[trial_id]['params']['model.lstm_size']}"], text
    assert len(watched_search["jobs"]) == 1  # the driver job carries the experiment's name


@pytest.mark.ray
def test_watched_search_metrics_are_on_the_nodes_endpoint_with_their_tags(ray_cluster, watched_search):
    from protopo_ray.monitoring import metrics

    samples = watched_search["samples"]
    trial_ids = {t["trial_id"] for t in watched_search["record"]["trials"]}
    for spec in (metrics.EPOCH, metrics.VAL_LOSS, metrics.TRAIN_LOSS, metrics.STAGE_METRIC, metrics.RESIDUES_PER_S,
                 metrics.DATA_WAIT_SHARE, metrics.PEAK_MEMORY, metrics.TOPOLOGY_ACCURACY, metrics.DEVICE_HOURS,
                 metrics.TRIAL_USD):
        tagged = {s for s in samples if s.startswith(spec.exported + "{")}
        seen = {trial for trial in trial_ids if any(f'trial="{trial}"' in s for s in tagged)}
        assert seen == trial_ids, (spec.exported, sorted(samples)[:20])
        assert all('stage="architecture"' in s and 'member="-"' in s for s in tagged)
    val_loss = {t["trial_id"]: t["last"]["val_loss"] for t in watched_search["record"]["trials"]}
    for trial, value in val_loss.items():  # the last value exported is the trial's last reported one
        series = [v for s, v in samples.items() if s.startswith(metrics.VAL_LOSS.exported) and f'trial="{trial}"' in s]
        assert series and series[-1] == pytest.approx(value)
    finished = [v for s, v in samples.items() if s.startswith(metrics.STAGE_TRIALS.exported) and 'state="finished"' in s]
    assert finished == [2.0]
