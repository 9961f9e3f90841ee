"""Shared fixtures: paths to the real data in ../shared (tests skip when absent) and one local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "deeptmhmm"
PARTITIONS_JSON = SHARED_DATA / "DeepTMHMM.partitions.json"
THREE_LINE = SHARED_DATA / "DeepTMHMM.derived.3line"
BAMA_PDB = SHARED_DATA / "structures" / "AF-B7MBF8-F1-model_v2.pdb"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    return path


@pytest.fixture
def partitions_json() -> Path:
    return require(PARTITIONS_JSON)


@pytest.fixture
def three_line() -> Path:
    return require(THREE_LINE)


@pytest.fixture
def bama_pdb() -> Path:
    return require(BAMA_PDB)


@pytest.fixture
def ray_cluster():
    """The one small local Ray cluster the Ray tests share (started on first use, bound to 127.0.0.1).

    Started lazily and re-started if a test with its own logical resources shut it down; the CLI tests
    that run in subprocesses join it through RAY_ADDRESS.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from protopo_ray.cluster.connect import ray_init

        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        # The project's own start-up path, told to start a cluster of its own (never to join another one
        # running on this machine): a local one with the dashboard on 127.0.0.1.
        os.environ["RAY_ADDRESS"] = "local"
        context = ray_init(num_cpus=2, logging_level="WARNING", log_to_driver=False)
        os.environ["RAY_ADDRESS"] = context.address_info["address"]
        os.environ["PROTOPO_TEST_DASHBOARD"] = context.dashboard_url or ""
    yield os.environ["RAY_ADDRESS"]


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory) -> Path:
    """A tiny synthetic shard set (60 proteins, folds train/val/test), prepared once per test session."""
    from protopo_ray.prepare import prepare_synthetic

    out = tmp_path_factory.mktemp("smoke") / "shards"
    prepare_synthetic(60, out, seed=0)
    return out
