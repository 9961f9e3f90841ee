"""TopologyModel on hand-built PyG batches: shapes, padding invariance, every operator's gradients, causality,
parameter counts and the memory footprint's monotonicity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from protopo_ray.config import GC_OPERATORS, ModelConfig
from protopo_ray.data.alphabet import NUM_LABELS
from protopo_ray.data.collate import records_to_batch
from protopo_ray.data.graphs import build_graph
from protopo_ray.data.records import ProteinRecord
from protopo_ray.model.footprint import footprint
from protopo_ray.model.network import ChainLSTM, TopologyModel, count_parameters, reverse_within_length

SMALL = ModelConfig(gc_size=16, gc_layers=2, lstm_size=12, lstm_layers=2, aa_embed_dim=8, dropout=0.2)


def protein(length: int, seed: int, window: int = 2, with_edges: bool = True) -> Data:
    """A chain of `length` residues; edges to sequence neighbours within `window`, every third with a distance."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(i, j) for i in range(length) for j in range(length) if i != j and abs(i - j) <= window]
    if not with_edges:
        pairs = []
    edge_index = torch.tensor(pairs, dtype=torch.long).t().reshape(2, -1)
    num_edges = edge_index.size(1)
    has_distance = (torch.arange(num_edges) % 3 == 0).float()
    separation = (edge_index[1] - edge_index[0]).float()
    edge_attr = torch.stack([
        has_distance * (0.38 + 0.1 * torch.rand(num_edges, generator=g)),
        separation.sign() * torch.log1p(separation.abs()) / torch.log1p(torch.tensor(1000.0)),
        has_distance,
    ], dim=1)
    return Data(
        aa=torch.randint(0, 21, (length,), generator=g),
        x=torch.rand(length, 8, generator=g),
        edge_index=edge_index,
        edge_attr=edge_attr,
        y=torch.randint(0, NUM_LABELS, (length,), generator=g),
        num_nodes=length,
    )


def build(cfg: ModelConfig = SMALL, seed: int = 0) -> TopologyModel:
    torch.manual_seed(seed)
    return TopologyModel(cfg)


def test_logits_one_row_per_residue_for_three_graphs_of_different_lengths():
    batch = Batch.from_data_list([protein(5, 0), protein(9, 1), protein(3, 2)])
    logits = build()(batch)
    assert logits.shape == (17, NUM_LABELS)
    assert logits.shape[0] == batch.y.shape[0]
    assert torch.isfinite(logits).all()


def test_keyword_call_matches_batch_call():
    batch = Batch.from_data_list([protein(5, 0), protein(9, 1)])
    model = build().eval()
    by_keyword = model(aa=batch.aa, x=batch.x, edge_index=batch.edge_index, edge_attr=batch.edge_attr,
                       batch_vec=batch.batch, ptr=batch.ptr)
    torch.testing.assert_close(by_keyword, model(batch))


def test_reverse_within_length_reverses_real_positions_and_keeps_padding():
    rev = reverse_within_length(torch.tensor([3, 1, 4]), 4)
    assert rev.tolist() == [[2, 1, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]]


@pytest.mark.parametrize("operator", GC_OPERATORS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_does_not_change_a_proteins_logits(operator, bidirectional):
    cfg = dataclasses.replace(SMALL, gc_operator=operator, bidirectional=bidirectional)
    model = build(cfg).eval()
    short = protein(6, 7)
    with torch.no_grad():
        alone = model(Batch.from_data_list([short]))
        batched = model(Batch.from_data_list([protein(15, 8), short, protein(11, 9)]))
    torch.testing.assert_close(batched[15:21], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("operator", GC_OPERATORS)
def test_every_operator_trains_with_finite_gradients_on_every_parameter(operator):
    model = build(dataclasses.replace(SMALL, gc_operator=operator)).train()
    batch = Batch.from_data_list([protein(7, 3), protein(12, 4), protein(4, 5)])
    torch.nn.functional.cross_entropy(model(batch), batch.y).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_cfconv_uses_the_distances():
    model = build(dataclasses.replace(SMALL, gc_operator="cfconv")).eval()
    data = protein(8, 6)
    moved = data.clone()
    moved.edge_attr = data.edge_attr.clone()
    moved.edge_attr[:, 0] = moved.edge_attr[:, 0] * 2.0
    with torch.no_grad():
        assert not torch.allclose(model(Batch.from_data_list([data])), model(Batch.from_data_list([moved])))


def test_unidirectional_lstm_is_causal_along_the_chain():
    model = build(dataclasses.replace(SMALL, bidirectional=False)).eval()
    data = protein(10, 11, with_edges=False)  # no graph edges: only the LSTM can carry information along the chain
    changed = data.clone()
    changed.aa = data.aa.clone()
    changed.aa[6] = (data.aa[6] + 1) % 21
    with torch.no_grad():
        before = model(Batch.from_data_list([data]))
        after = model(Batch.from_data_list([changed]))
    torch.testing.assert_close(after[:6], before[:6], atol=0, rtol=0)
    assert not torch.allclose(after[6:], before[6:])


def test_bidirectional_lstm_carries_later_residues_back_to_earlier_ones():
    model = build(SMALL).eval()
    data = protein(10, 11, with_edges=False)
    changed = data.clone()
    changed.aa = data.aa.clone()
    changed.aa[6] = (data.aa[6] + 1) % 21
    with torch.no_grad():
        before = model(Batch.from_data_list([data]))
        after = model(Batch.from_data_list([changed]))
    assert not torch.allclose(after[:6], before[:6])


@pytest.mark.parametrize("operator", GC_OPERATORS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_count_parameters_matches_the_built_model(operator, bidirectional):
    cfg = dataclasses.replace(SMALL, gc_operator=operator, bidirectional=bidirectional, lstm_layers=3)
    model = build(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_lstm_parameter_count_equals_torch_lstm():
    cfg = ModelConfig(gc_size=64, lstm_size=128, lstm_layers=4)
    ours = build(cfg).lstm
    reference = torch.nn.LSTM(64, 128, num_layers=4, bidirectional=True)
    assert count_parameters(ours) == count_parameters(reference)


def test_footprint_adds_up():
    cfg = ModelConfig()
    fp = footprint(cfg, batch_size=8, max_len=300)
    assert fp.num_parameters == count_parameters(cfg)
    assert fp.weights_bytes == fp.grads_bytes == 4 * fp.num_parameters
    assert fp.optimizer_bytes == 2 * fp.weights_bytes
    assert fp.batch_activation_bytes == fp.activation_bytes_per_residue * 8 * 300
    assert fp.total_bytes == fp.weights_bytes + fp.grads_bytes + fp.optimizer_bytes + fp.batch_activation_bytes
    assert footprint(cfg, 8, 300, dtype_bytes=2).batch_activation_bytes < fp.batch_activation_bytes


@pytest.mark.parametrize("operator", GC_OPERATORS)
@pytest.mark.parametrize("knob", ["gc_size", "gc_layers", "lstm_size", "lstm_layers", "aa_embed_dim"])
def test_footprint_is_monotone_in_model_knobs(operator, knob):
    base = ModelConfig(gc_operator=operator)
    small, large = base, dataclasses.replace(base, **{knob: getattr(base, knob) * 2})
    for field in ("num_parameters", "activation_bytes_per_residue", "total_bytes"):
        assert getattr(footprint(large, 32, 500), field) > getattr(footprint(small, 32, 500), field), field


def test_footprint_is_monotone_in_batch_and_length_and_direction():
    cfg = ModelConfig()
    assert footprint(cfg, 64, 500).total_bytes > footprint(cfg, 32, 500).total_bytes
    assert footprint(cfg, 32, 1000).total_bytes > footprint(cfg, 32, 500).total_bytes
    uni = dataclasses.replace(cfg, bidirectional=False)
    assert footprint(cfg, 32, 500).total_bytes > footprint(uni, 32, 500).total_bytes


def test_footprint_rejects_empty_batches():
    with pytest.raises(ValueError, match="batch_size"):
        footprint(ModelConfig(), 0, 100)


# --- decoders and sequence features -------------------------------------------------------------------------

FEATURED = dataclasses.replace(SMALL, feature_hydropathy=True, feature_charge=True, feature_blosum=True)


def test_features_widen_only_the_input_projection():
    plain, featured = build(SMALL), build(FEATURED)
    assert featured.input_proj.in_features == plain.input_proj.in_features + 25
    assert count_parameters(featured) - count_parameters(plain) == 25 * SMALL.gc_size


def test_crf_model_loss_and_decode_follow_the_grammar():
    from protopo_ray.data.alphabet import LABELS, encode_labels
    from protopo_ray.model.grammar import default_grammar

    cfg = dataclasses.replace(FEATURED, decoder="crf")
    model = build(cfg)
    proteins = [protein(40, 0), protein(25, 1)]
    proteins[0].y = torch.tensor(encode_labels("I" * 10 + "M" * 20 + "O" * 10))
    proteins[1].y = torch.tensor(encode_labels("I" * 25))
    batch = Batch.from_data_list(proteins)
    logits = model(batch)
    loss = model.loss(batch, logits)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.crf.edge_scores.grad.abs().sum() > 0
    assert model.loss(batch, logits, reduction="sum").item() == pytest.approx(loss.item() * 65, rel=1e-5)
    model.eval()
    decoded = model.decode(batch, model(batch))
    assert decoded.shape == (65,)
    grammar = default_grammar()
    for lo, hi in ((0, 40), (40, 65)):
        assert grammar.accepts("".join(LABELS[i] for i in decoded[lo:hi].tolist()))
    # a protein decodes to the same labels alone as in a padded batch
    alone = Batch.from_data_list([proteins[1]])
    assert torch.equal(model.decode(alone, model(alone)), decoded[40:])
    assert torch.allclose(model.label_posteriors(batch, model(batch)).sum(-1), torch.ones(65), atol=1e-4)


def test_an_argmax_checkpoint_decodes_with_the_grammar():
    trained = build(SMALL)
    viterbi = TopologyModel(dataclasses.replace(SMALL, decoder="viterbi", entry_penalty=2.0))
    viterbi.load_state_dict(trained.state_dict())  # fixed transitions are not part of the state
    batch = Batch.from_data_list([protein(30, 3)])
    logits = viterbi.eval()(batch)
    assert torch.equal(trained.eval().decode(batch, logits), logits.argmax(-1))
    assert viterbi.decode(batch, logits).shape == (30,)
    assert float(viterbi.loss(batch, logits)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, batch.y)), rel=1e-6)


def test_crf_footprint_is_a_small_addition():
    base = footprint(SMALL, 8, 500)
    crf = footprint(dataclasses.replace(SMALL, decoder="crf"), 8, 500)
    assert base.total_bytes < crf.total_bytes
    assert crf.num_parameters - base.num_parameters < 1000


@pytest.mark.parametrize("operator", GC_OPERATORS)
@pytest.mark.parametrize("k", [16, 4])
def test_sequence_window_graphs_run_densely_with_the_same_outputs(operator, k):
    """Batches of sequence-window graphs (collate sets their half-width) run the GC layers as window sums on the
    padded tensor: the same function as message passing over the edges, lengths from 1 to longer than the window."""
    rng = np.random.default_rng(0)
    records = [ProteinRecord(id=f"p{i}", sequence="".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)))
               for i, n in enumerate([1, 3, 9, 17, 40, 120])]
    batch = records_to_batch(records, [build_graph(r.sequence, k=k) for r in records])
    assert batch.window == k // 2
    torch.manual_seed(0)
    model = TopologyModel(ModelConfig(gc_size=16, gc_layers=2, gc_operator=operator, lstm_size=8, lstm_layers=1,
                                      aa_embed_dim=4)).eval()
    sparse = batch.clone()
    sparse.window = -1
    torch.testing.assert_close(model(batch), model(sparse), atol=1e-5, rtol=1e-5)


# ---- the two LSTM paths (issue 30): padded (CPU) and cuDNN-style packed, on the same parameters ----


def lstm_inputs(lengths: list[int], width: int = 7, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(lengths), max(lengths), width, generator=g), torch.tensor(lengths)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_packed_lstm_gives_the_padded_outputs_and_gradients(bidirectional, num_layers):
    torch.manual_seed(0)
    lstm = ChainLSTM(7, 6, num_layers, bidirectional, dropout=0.3, impl="padded").eval()  # eval: dropout off
    padded, lengths = lstm_inputs([9, 1, 5, 9, 3])
    real = torch.arange(padded.size(1))[None, :] < lengths[:, None]
    outputs, grads = {}, {}
    for impl in ("padded", "packed"):
        lstm.impl = impl
        lstm.zero_grad()
        x = padded.clone().requires_grad_()
        out = lstm(x, lengths)
        assert out.shape == (5, 9, lstm.output_size)
        (out[real] ** 2).sum().backward()  # a loss over real positions only, as the model's head reads them
        outputs[impl], grads[impl] = out[real], [x.grad[real]] + [p.grad for p in lstm.parameters()]
    torch.testing.assert_close(outputs["packed"], outputs["padded"], atol=1e-6, rtol=1e-5)
    for packed_grad, padded_grad in zip(grads["packed"], grads["padded"], strict=True):
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_lstm_paths_share_parameters_and_state_dict_keys():
    """A checkpoint of either path loads into the other: the keys are today's (one nn.LSTM per layer and direction)."""
    cfg = dataclasses.replace(SMALL, dropout=0.0)
    padded = build(dataclasses.replace(cfg, lstm_impl="padded")).eval()
    packed = TopologyModel(dataclasses.replace(cfg, lstm_impl="packed")).eval()
    assert [k for k in padded.state_dict() if k.startswith("lstm.")] == [
        f"lstm.{side}_layers.{i}.{name}_l0" for side in ("forward", "backward") for i in range(2)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    packed.load_state_dict(padded.state_dict())
    batch = Batch.from_data_list([protein(5, 0), protein(11, 1), protein(2, 2)])
    torch.testing.assert_close(packed(batch), padded(batch), atol=1e-5, rtol=1e-5)
    window = records_to_batch(*sequence_proteins([30, 7, 18]))  # the dense GC path, host lengths from the batch
    torch.testing.assert_close(packed(window), padded(window), atol=1e-5, rtol=1e-5)


def sequence_proteins(lengths: list[int]) -> tuple[list[ProteinRecord], list]:
    rng = np.random.default_rng(0)
    records = [ProteinRecord(id=f"p{i}", type="GLOBULAR", fold="train",
                             sequence="".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)), labels="O" * n)
               for i, n in enumerate(lengths)]
    return records, [build_graph(r.sequence) for r in records]


def test_auto_runs_padded_on_cpu_and_packed_on_cuda():
    lstm = ChainLSTM(4, 3, 1, True, 0.0)
    assert lstm.impl == "auto"
    assert lstm.path(torch.device("cpu")) == "padded" and lstm.path(torch.device("cuda")) == "packed"
    assert ChainLSTM(4, 3, 1, True, 0.0, impl="packed").path(torch.device("cpu")) == "packed"
    with pytest.raises(ValueError, match="lstm_impl"):
        ModelConfig(lstm_impl="cudnn")


@pytest.mark.parametrize("impl", ["padded", "packed"])
def test_lstm_runs_in_bf16_under_autocast_only_when_asked(impl):
    torch.manual_seed(0)
    lstm = ChainLSTM(7, 6, 2, True, 0.0, impl=impl).eval()
    padded, lengths = lstm_inputs([8, 3, 6])
    real = torch.arange(padded.size(1))[None, :] < lengths[:, None]
    exact = lstm(padded, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = lstm(padded.bfloat16(), lengths)  # lstm_bf16 off: fp32 inside autocast, as before issue 30
        lstm.bf16 = True
        low = lstm(padded, lengths)
    assert kept.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(kept[real], exact[real], atol=1e-2, rtol=0)  # only the bf16 input rounding
    torch.testing.assert_close(low.float()[real], exact[real], atol=3e-2, rtol=0)
    assert not torch.equal(low.float()[real], exact[real])
