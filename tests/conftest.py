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
