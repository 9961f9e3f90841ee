"""Experiment storage through pyarrow filesystems, exercised with file:// URIs (the same code as s3:// / gs://)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protopo_ray.data import storage


def test_local_paths_are_their_own_working_dir(tmp_path):
    assert storage.working_dir(str(tmp_path / "exp")) == tmp_path / "exp"
    assert storage.resolve("runs") == str(Path("runs").resolve()) and storage.resolve("s3://b/x") == "s3://b/x"


def test_upload_download_round_trip_through_a_uri(tmp_path):
    local = tmp_path / "work"
    (local / "stages").mkdir(parents=True)
    (local / "stages" / "a.json").write_text('{"stage": "a"}')
    uri = f"file://{tmp_path}/bucket/exp"
    assert not storage.exists(uri)
    storage.upload(local, uri)
    assert storage.exists(storage.join(uri, "stages", "a.json"))
    back = tmp_path / "back"
    assert storage.download(storage.join(uri, "stages"), back)
    assert (back / "a.json").read_text() == '{"stage": "a"}'
    assert not storage.download(storage.join(uri, "missing"), tmp_path / "nothing")


def test_working_dir_of_a_uri_is_a_stable_local_cache():
    first = storage.working_dir("s3://bucket/runs/default")
    assert first == storage.working_dir("s3://bucket/runs/default") and first.name.startswith("default-")
    assert first != storage.working_dir("s3://other/runs/default")


def test_fetch_dir_copies_remote_checkpoints_and_names_missing_ones(tmp_path):
    remote = tmp_path / "remote" / "epoch_0001"
    remote.mkdir(parents=True)
    (remote / "meta.json").write_text("{}")
    fetched = storage.fetch_dir(f"file://{remote}", tmp_path / "local")
    assert (fetched / "meta.json").exists() and fetched == tmp_path / "local"
    assert storage.fetch_dir(str(remote), tmp_path / "unused") == remote
    with pytest.raises(FileNotFoundError, match="epoch_0009"):
        storage.fetch_dir(f"file://{tmp_path}/remote/epoch_0009", tmp_path / "x")
