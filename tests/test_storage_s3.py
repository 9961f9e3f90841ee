"""A search on object storage: a real S3 API server (moto) on 127.0.0.1, pyarrow's S3 client and Ray's storage
pointed at it through AWS_ENDPOINT_URL_S3. Stages, trial checkpoints, promotion from an s3:// checkpoint,
winner, report and --resume all go through the server; nothing of the experiment is written locally but the
working copy of its records. The whole search takes ~4 min on 2 cores (two Ray starts, a DDP promotion): it is
marked `long`; its storage pieces run in CI in the first test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

EXPERIMENT = """
name = "s3search"
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
schedule = "linear"
[[stages]]
name = "search"
search = "grid"
scheduler = "none"
metric = "val_loss"
mode = "min"
max_epochs = 2
[stages.grid]
"train.lr" = [3e-3, 1e-2]
[[stages]]
name = "promotion"
kind = "promotion"
top_k = 1
metric = "val_loss"
mode = "min"
max_epochs = 3
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    port = free_port()
    server = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        from pyarrow import fs as pafs

        s3 = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        s3.create_dir("protopo")
        yield env, s3
    finally:
        server.terminate()
        server.wait(timeout=10)


def tune_run(env, shards, experiment, cwd, *extra):
    # Its own local cluster (RAY_ADDRESS=local): the trial processes must inherit the endpoint variables.
    cmd = [sys.executable, "-m", "protopo_ray.tune", str(experiment), "--data", str(shards),
           "--storage", "s3://protopo/runs", "--no-wandb", *extra]
    return subprocess.run(cmd, cwd=cwd, env={**env, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)


def test_checkpoints_round_trip_through_s3(s3_server, tmp_path, monkeypatch, write_checkpoint):
    """The pieces a search uses on object storage, against the server: best/ copied up, a run continued from an
    s3:// checkpoint, a stage working copy mirrored and fetched back (the fast half of the search test below)."""
    from protopo_ray.config import Config
    from protopo_ray.data import storage
    from protopo_ray.training.checkpoint import copy_checkpoint
    from protopo_ray.training.fit import continuation

    env, s3 = s3_server
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED",
                "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(key, env[key])
    config = Config().replace({"model.gc_size": 4, "model.lstm_size": 4, "model.aa_embed_dim": 4})
    local = write_checkpoint(tmp_path / "epoch_0002", config, epoch=2, metrics={"val_loss": 0.4}, best_value=0.4)
    copy_checkpoint(local, "s3://protopo/runs/exp/train", "trial_a/best")
    assert storage.exists("s3://protopo/runs/exp/train/trial_a/best/meta.json")
    # What Ray reports for that checkpoint ("bucket/key") gets its scheme back, and a continuation opens it.
    uri = storage.with_scheme("protopo/runs/exp/train/trial_a/best", like="s3://protopo/runs/exp/train")
    start = continuation(config.replace({"train.init_checkpoint": uri}))
    assert (start.epoch, start.meta.best_value, start.meta.metrics["val_loss"], start.config) == (2, 0.4, 0.4, config)
    (tmp_path / "work" / "stages").mkdir(parents=True)
    (tmp_path / "work" / "stages" / "search.json").write_text("{}")
    storage.upload(tmp_path / "work", "s3://protopo/runs/exp")
    assert storage.download("s3://protopo/runs/exp/stages", tmp_path / "back" / "stages")
    assert (tmp_path / "back" / "stages" / "search.json").read_text() == "{}"


def test_shards_stream_from_s3(s3_server, smoke_shards, monkeypatch):
    """A split streamed row group by row group from shards on object storage: every train protein once, and
    validation equal to the same split read whole (the one-process stream path; Ray's read tasks use the same
    reader, `splits.parquet_file_rows`)."""
    import torch

    from protopo_ray.config import load_config
    from protopo_ray.data import shards, storage
    from protopo_ray.model.network import TopologyModel
    from protopo_ray.training import splits
    from protopo_ray.training.evaluation import evaluate_split

    env, s3 = s3_server
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED",
                "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(key, env[key])
    storage.upload(smoke_shards, "s3://protopo/shards")
    config = load_config("experiments/smoke.toml", {"data.path": "s3://protopo/shards", "data.loading": "stream"})
    steps, tables = splits.local_split(config, "train").train_epoch(0, 0, 1)
    ids = sorted(i for t in tables for i in t.column("id").to_pylist())
    assert ids == sorted(shards.read_table(smoke_shards, folds=["train"]).column("id").to_pylist())
    torch.manual_seed(0)
    model = TopologyModel(config.model)
    streamed = evaluate_split(model, splits.local_split(config, "val"), config, torch.device("cpu"))
    whole = evaluate_split(model, splits.local_split(config, "val", mode="memory"), config, torch.device("cpu"))
    assert streamed["n_proteins"] == whole["n_proteins"] > 0
    assert streamed["loss"] == pytest.approx(whole["loss"], rel=1e-5)


@pytest.mark.long
def test_search_promotion_winner_and_resume_on_s3(s3_server, smoke_shards, tmp_path, untrained_figures):
    from protopo_ray.config import Config

    env, s3 = s3_server
    experiment = tmp_path / "s3search.toml"
    experiment.write_text(EXPERIMENT)
    done = tune_run(env, smoke_shards, experiment, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root = "protopo/runs/s3search"
    names = {info.path[len(root) + 1:] for info in s3.get_file_info(pafs_selector(root))}
    assert {"stages/search.json", "stages/promotion.json", "report.md", "winner/winner.json"} <= names
    promotion = json.loads(read(s3, f"{root}/stages/promotion.json"))
    (trial,) = promotion["trials"]
    assert trial["status"] == "completed" and trial["start_epoch"] == 2
    assert trial["resumed_from"].startswith("s3://protopo/runs/s3search/")  # the scheme survived
    assert trial["checkpoint"].startswith("s3://")
    run = f"{root}/train/{trial['config']['name']}"
    rows = [json.loads(line) for line in read(s3, f"{run}/metrics.jsonl").splitlines()]
    assert [r["epoch"] for r in rows] == [3] and rows[0]["train_lr"] > 0
    assert s3.get_file_info(f"{run}/best/meta.json").size > 0
    winner = json.loads(read(s3, f"{root}/winner/winner.json"))
    assert winner["trial_id"] == trial["trial_id"] and winner["source"].startswith("s3://")
    untrained = untrained_figures(Config.from_dict(winner["config"]))
    assert winner["test"]["n_proteins"] == untrained["n_proteins"] and winner["test"]["loss"] < untrained["loss"]
    assert not (tmp_path / "runs").exists()  # nothing of the experiment itself went to the local disk

    # --resume on a machine without the working copy: the finished stages come back from S3.
    resumed = tune_run(env, smoke_shards, experiment, tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None
                       else tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("already finished") == 2


def pafs_selector(root: str):
    from pyarrow import fs as pafs

    return pafs.FileSelector(root, recursive=True)


def read(s3, path: str) -> str:
    with s3.open_input_stream(path) as handle:
        return handle.read().decode()
