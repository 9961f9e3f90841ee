"""ESM-2 embeddings as node features: a tiny ESM-2 (2 layers, 16 wide, random weights) saved in fair-esm's own file
format, read by fair-esm's builder, through prepare (Ray Data actors on the shared cluster) -> training -> predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
esm = pytest.importorskip("esm")

from protopo_ray import predict, prepare, train  # noqa: E402
from protopo_ray.data import shards  # noqa: E402
from protopo_ray.data.embeddings import (  # noqa: E402
    Embedder,
    EmbeddingError,
    EmbeddingSpec,
    read_spec,
    windows,
    write_random_esm2,
)
from protopo_ray.training.checkpoint import find_checkpoints, load_checkpoint  # noqa: E402

DIM, LAYERS = 16, 2


@pytest.fixture(scope="module")
def tiny_esm2(tmp_path_factory) -> Path:
    # fair-esm's file layout (embeddings.write_random_esm2), read back through fair-esm's own builder below.
    return write_random_esm2(tmp_path_factory.mktemp("esm") / "esm2_t2_16_tiny.pt", num_layers=LAYERS, dim=DIM)


def test_windows_cover_long_proteins_with_overlap():
    assert windows(3, 4, 2) == [(0, 3)]
    assert windows(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert windows(9, 4, 1) == [(0, 4), (3, 7), (5, 9)]


def test_the_fair_esm_file_gives_its_spec_and_the_model_fair_esm_builds(tiny_esm2):
    spec = read_spec(tiny_esm2)
    assert (spec.model, spec.layer, spec.dim, spec.num_layers) == ("esm2_t2_16_tiny", LAYERS, DIM, LAYERS)
    assert read_spec(tiny_esm2, layer=1).layer == 1
    with pytest.raises(EmbeddingError, match="layers 0..2"):
        read_spec(tiny_esm2, layer=3)
    sequence = "MKTAYIAKQRQISFVKSHFSRQ"
    (vector,) = Embedder(spec, device="cpu").embed([sequence])
    assert vector.shape == (len(sequence), DIM) and vector.dtype == np.float16
    # The same numbers as fair-esm's own model on the BOS + sequence + EOS tokens (residues 1..L).
    model, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2_t2_16_tiny", torch.load(
        tiny_esm2, weights_only=False), None)
    _, _, tokens = alphabet.get_batch_converter()([("p", sequence)])
    with torch.inference_mode():
        direct = model.eval()(tokens, repr_layers=[LAYERS])["representations"][LAYERS][0, 1:-1].numpy()
    np.testing.assert_allclose(vector.astype(np.float32), direct, atol=2e-3, rtol=2e-3)
    # A protein over the window limit is embedded in overlapping windows, every residue covered.
    windowed = EmbeddingSpec.from_json({**spec.to_json(), "window": 8, "overlap": 3})
    (long,) = Embedder(windowed, device="cpu").embed([sequence])
    assert long.shape == (len(sequence), DIM) and np.isfinite(long).all()
    assert np.allclose(long[:5].astype(np.float32), Embedder(windowed, device="cpu").embed([sequence[:8]])[0][:5]
                       .astype(np.float32), atol=1e-3)


def test_missing_weights_are_a_clear_error_naming_the_file_and_what_to_fetch(tmp_path, capsys):
    missing = tmp_path / "esm2_t33_650M_UR50D.pt"
    with pytest.raises(EmbeddingError, match="weights file not found"):
        read_spec(missing)
    assert prepare.main(["--synthetic", "4", "--out", str(tmp_path / "out"), "--embed-weights", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "dl.fbaipublicfiles.com/fair-esm" in err
    assert prepare.main(["--synthetic", "4", "--out", str(tmp_path / "out"), "--embed-layer", "3"]) == 2
    assert "apply to --embed near or --embed-weights" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EmbeddingError, match="not a readable fair-esm weights file"):
        read_spec(tmp_path / "junk.pt")


def test_prepare_on_ray_then_train_then_predict_with_embeddings(tmp_path, tiny_esm2, ray_cluster, capsys):
    from protopo_ray.cluster.prepare_tasks import RayBuilder
    from protopo_ray.data.build import LocalBuilder, prepare_synthetic

    out = tmp_path / "shards"
    spec = read_spec(tiny_esm2)
    summary = prepare_synthetic(20, out, seed=0, builder=RayBuilder(2), embedding=spec)
    manifest = shards.read_manifest(out)
    assert summary.num_written == 20
    assert manifest["embedding"]["model"] == "esm2_t2_16_tiny" and manifest["embedding"]["dim"] == DIM
    assert manifest["embedding"]["layer"] == LAYERS and manifest["embedding"]["dtype"] == "float16"
    table = shards.read_table(out)
    assert table.schema.field("embedding").type.value_type == "halffloat"
    first = table.slice(0, 1).to_pylist()[0]
    assert len(first["embedding"]) == first["length"] * DIM
    # The process-pool path writes the same embeddings.
    local = tmp_path / "local"
    prepare_synthetic(20, local, seed=0, builder=LocalBuilder(1), embedding=spec)
    assert shards.read_table(local)["embedding"].equals(table["embedding"])

    runs = tmp_path / "runs"
    assert train.main(["--local", "--storage", str(runs), "--set", f"data.path='{out}'", "--set", "name=esm",
                       "--set", "train.epochs=1", "--set", "model.gc_size=16", "--set", "model.lstm_size=16",
                       "--set", "model.aa_embed_dim=8", "--set", "data.batch_size=4", "--set", "train.num_threads=1"]) == 0
    checkpoint = find_checkpoints(runs / "esm")[0]
    loaded = load_checkpoint(checkpoint)
    assert loaded.meta.inputs.embedding_dim == DIM
    assert loaded.model().input_proj.in_features == 8 + len(manifest["node_features"]) + DIM

    fasta = tmp_path / "new.fasta"
    fasta.write_text(">new1\nMKTLLVAGLLLAVSAQAAPLLIVAVLAGLFYLRKK\n>new2\nMSEEKKDEQ\n")
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(fasta), "--out", str(tmp_path / "p.3line"),
                         "--allow-input-shift"]) == 0  # synthetic structures in training, sequence graphs here
    lines = (tmp_path / "p.3line").read_text().splitlines()
    assert lines[0].startswith(">new1") and len(lines[2]) == 35
    # The recorded weights gone: a clear refusal, and --embed-weights points at them again.
    moved = tmp_path / "elsewhere.pt"
    tiny_esm2.rename(moved)
    try:
        from protopo_ray.data import embeddings

        embeddings._EMBEDDERS.clear()
        assert predict.main(["--checkpoint", str(checkpoint), "--input", str(fasta), "--out", str(tmp_path / "q"),
                             "--allow-input-shift"]) == 2
        assert "trained on esm2_t2_16_tiny embeddings" in capsys.readouterr().err
        assert predict.main(["--checkpoint", str(checkpoint), "--input", str(fasta), "--out", str(tmp_path / "q"),
                             "--embed-weights", str(moved), "--allow-input-shift"]) == 0
    finally:
        moved.rename(tiny_esm2)


def _interrupted(monkeypatch, out: Path, spec: EmbeddingSpec, fail_at: int, **kwargs) -> None:
    """An embedding run of 10 synthetic proteins (units of 4) that dies while building protein `fail_at`."""
    from protopo_ray.data import build, output

    real = build.synthetic_rows

    def dies(jobs, *args):
        if any(index == fail_at for index, _, _ in jobs):
            raise RuntimeError("interrupted")
        return real(jobs, *args)

    monkeypatch.setattr(build, "synthetic_rows", dies)
    with pytest.raises(RuntimeError, match="interrupted"):
        build.prepare_synthetic(10, out, embedding=spec, **kwargs)
    monkeypatch.setattr(build, "synthetic_rows", real)
    assert not out.exists() and (output.staging_dir(out) / "done-00000.json").is_file()


def _same_set(a: Path, b: Path) -> None:
    """Same rows and the same manifest (but for its date)."""
    ma, mb = (shards.read_manifest(path) for path in (a, b))
    ma.pop("created_at"), mb.pop("created_at")
    assert ma == mb
    assert shards.read_table(a).equals(shards.read_table(b))


def test_an_interrupted_embedding_run_resumes_per_shard(tmp_path, tiny_esm2, monkeypatch, capsys):
    from protopo_ray.data import build, output

    monkeypatch.setattr(output, "RESUME_UNIT", 4)  # 10 proteins: 3 shard units
    spec = read_spec(tiny_esm2)
    whole = tmp_path / "whole"
    build.prepare_synthetic(10, whole, embedding=spec)

    out = tmp_path / "out"
    _interrupted(monkeypatch, out, spec, fail_at=5)  # unit 0 finished, unit 1 died
    built = []
    real = build.synthetic_rows
    monkeypatch.setattr(build, "synthetic_rows", lambda jobs, *args: built.extend(jobs) or real(jobs, *args))
    # Rerunning the same command resumes: unit 0 reused, only the other 6 proteins built and embedded.
    assert prepare.main(["--synthetic", "10", "--out", str(out), "--embed-weights", str(tiny_esm2)]) == 0
    assert "resumed: 1 of 3 shards reused" in capsys.readouterr().out
    assert [index for index, _, _ in built] == list(range(4, 10))
    _same_set(out, whole)
    assert not output.staging_dir(out).exists() and not list(out.glob("done-*")) and not (out / "resume.json").exists()


def test_a_rerun_with_other_arguments_never_mixes_shards(tmp_path, tiny_esm2, monkeypatch, capsys):
    from protopo_ray.data import build, output

    monkeypatch.setattr(output, "RESUME_UNIT", 4)
    spec = read_spec(tiny_esm2)
    out = tmp_path / "out"
    _interrupted(monkeypatch, out, spec, fail_at=5)
    assert prepare.main(["--synthetic", "10", "--seed", "1", "--out", str(out),
                         "--embed-weights", str(tiny_esm2)]) == 2
    error = capsys.readouterr().err
    assert "interrupted run with other inputs or arguments (differing: arguments, sources)" in error
    assert "--overwrite" in error and not out.exists()
    # --overwrite starts over: nothing of the seed-0 run in the seed-1 set.
    summary = build.prepare_synthetic(10, out, seed=1, embedding=spec, overwrite=True)
    assert summary.shards_reused == 0 and "discarding them and starting over" in capsys.readouterr().out
    whole = tmp_path / "whole"
    build.prepare_synthetic(10, whole, seed=1, embedding=spec)
    _same_set(out, whole)


def test_an_interrupted_local_embedding_run_resumes_on_ray(tmp_path, tiny_esm2, monkeypatch, ray_cluster):
    from protopo_ray.cluster.prepare_tasks import RayBuilder
    from protopo_ray.data import build, output

    monkeypatch.setattr(output, "RESUME_UNIT", 4)  # read on the driver: the same units on both builders
    spec = read_spec(tiny_esm2)
    whole = tmp_path / "whole"
    build.prepare_synthetic(10, whole, embedding=spec)
    out = tmp_path / "out"
    _interrupted(monkeypatch, out, spec, fail_at=9)  # units 0 and 1 finished
    summary = build.prepare_synthetic(10, out, embedding=spec, builder=RayBuilder(2))
    assert (summary.shards_reused, summary.shard_units, summary.num_written) == (2, 3, 10)
    _same_set(out, whole)
