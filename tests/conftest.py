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


@pytest.fixture
def write_checkpoint():
    """`write_checkpoint(directory, config, ...)`: a checkpoint of a freshly initialised model of `config`, written
    through the real classes (meta with inputs and grammar, state), as training writes one."""
    from protopo_ray.data.graphs import DEFAULT_K, EDGE_FEATURES, NODE_FEATURES
    from protopo_ray.model.grammar import build_grammar
    from protopo_ray.model.network import TopologyModel
    from protopo_ray.model.segments import DEFAULT_STATS
    from protopo_ray.training.checkpoint import CheckpointMeta, ModelInputs, TrainState, rng_state, save_checkpoint

    def write(directory: Path, config, *, epoch: int = 1, metrics: dict | None = None, best_value=None,
              schedule_start_epoch: int = 0, grammar=DEFAULT_STATS, graph_k: int = DEFAULT_K,
              graph_sources: dict | None = None, model=None) -> Path:
        model = model or TopologyModel(config.model, build_grammar(grammar))
        inputs = ModelInputs(graph_k=graph_k, graph_sources=graph_sources or {"structure": 1},
                             node_features=NODE_FEATURES, edge_features=EDGE_FEATURES)
        meta = CheckpointMeta(epoch=epoch, metrics=metrics or {}, best_value=best_value,
                              schedule_start_epoch=schedule_start_epoch, config=config, inputs=inputs, grammar=grammar)
        return save_checkpoint(directory, meta, TrainState(model=model.state_dict(), rng=rng_state()))

    return write


@pytest.fixture
def untrained_figures():
    """`untrained_figures(config, split)`: the metrics of `config`'s model as initialised by its seed, untrained, on
    a split of its data: what a search's winner must beat on the same split."""
    import torch

    from protopo_ray.model.network import TopologyModel
    from protopo_ray.training.evaluation import evaluate_split
    from protopo_ray.training.loop import set_seed
    from protopo_ray.training.splits import local_split

    def figures(config, split: str = "test") -> dict:
        set_seed(config.train.seed)
        config = config.replace({"data.max_proteins": 0})
        return evaluate_split(TopologyModel(config.model).eval(), local_split(config, split), config,
                              torch.device("cpu"))

    return figures
