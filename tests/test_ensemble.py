"""The ensemble rule (model.ensemble) and what loads it (training.predictor): a checkpoint dir or an ensemble dir;
the ensemble averages posteriors and decodes by grammar; members must agree on inputs and grammar."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch_geometric.data import Batch, Data

from protopo_ray.config import Config, ModelConfig
from protopo_ray.data.alphabet import LABELS
from protopo_ray.model.ensemble import Ensemble, choose_decoding, grammar_decode, vote
from protopo_ray.model.grammar import Decoding, build_grammar, default_grammar
from protopo_ray.model.network import TopologyModel
from protopo_ray.model.segments import DEFAULT_STATS, label_runs
from protopo_ray.training.checkpoint import CheckpointError
from protopo_ray.training.predictor import load_predictor, write_ensemble
from tests.test_grammar import barrel, barrel_posteriors

SMALL = ModelConfig(gc_size=8, gc_layers=1, lstm_size=8, lstm_layers=1, aa_embed_dim=4)


def protein(length: int, seed: int) -> Data:
    """A chain with edges to its sequence neighbours (the sequence-window graph's shape, window 1)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.cat([torch.arange(length - 1), torch.arange(1, length)])
    dst = torch.cat([torch.arange(1, length), torch.arange(length - 1)])
    return Data(aa=torch.randint(0, 21, (length,), generator=g), x=torch.rand(length, 8, generator=g),
                edge_index=torch.stack([src, dst]), edge_attr=torch.zeros(src.numel(), 3),
                y=torch.zeros(length, dtype=torch.long), num_nodes=length)


@pytest.fixture
def checkpoint(tmp_path, write_checkpoint):
    def make(name: str, model_cfg: ModelConfig, seed: int, **fields):
        torch.manual_seed(seed)
        model = TopologyModel(model_cfg, build_grammar(fields.get("grammar", DEFAULT_STATS)))
        path = write_checkpoint(tmp_path / name, dataclasses.replace(Config(), model=model_cfg), model=model, **fields)
        return path, model

    return make


def test_checkpoint_dir_gives_the_model_itself(checkpoint):
    path, model = checkpoint("a", SMALL, 0, graph_k=10)
    predictor = load_predictor(path)
    assert isinstance(predictor.module, TopologyModel) and predictor.config.model == SMALL
    assert predictor.inputs.graph_k == 10
    batch = Batch.from_data_list([protein(12, 0)])
    assert torch.equal(predictor.module(batch), model.eval()(batch))


def test_ensemble_averages_posteriors_and_decodes_grammatically(tmp_path, checkpoint):
    a, model_a = checkpoint("a", SMALL, 0)
    b, model_b = checkpoint("b", dataclasses.replace(SMALL, decoder="crf", feature_hydropathy=True), 1)
    write_ensemble(tmp_path / "ens", [a, b], Decoding(entry_penalty=1.5))
    predictor = load_predictor(tmp_path / "ens")
    ensemble = predictor.module
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2 and ensemble.decoding.entry_penalty == 1.5
    batch = Batch.from_data_list([protein(30, 0), protein(17, 1)])
    log_p = ensemble(batch)
    each = (model_a.eval()(batch).softmax(-1), model_b.eval().label_posteriors(batch, model_b(batch)))
    assert torch.allclose(ensemble.label_posteriors(batch, log_p), (each[0] + each[1]) / 2, atol=1e-5)
    assert torch.allclose(log_p[:, 1].exp(), each[0], atol=1e-5) and torch.allclose(log_p[:, 2].exp(), each[1], atol=1e-5)
    decoded = ensemble.decode(batch, log_p)
    for lo, hi in ((0, 30), (30, 47)):
        assert default_grammar().accepts("".join(LABELS[i] for i in decoded[lo:hi].tolist()))


def test_members_must_agree_on_inputs_and_decode_with_all_their_grammars_saw(tmp_path, checkpoint):
    a, _ = checkpoint("a", SMALL, 0, graph_k=16)
    b, _ = checkpoint("b", SMALL, 1, graph_k=8)
    write_ensemble(tmp_path / "inputs", [a, b])
    with pytest.raises(CheckpointError, match="trained on other inputs"):
        load_predictor(tmp_path / "inputs")
    # A member trained on folds with a 38-residue helix (the others' longest is 30): the ensemble's grammar takes
    # both members' statistics, so it decodes what either saw.
    counts = {**DEFAULT_STATS.chain_counts, ("alpha", "M"): {**DEFAULT_STATS.chain_counts[("alpha", "M")], 38: 1}}
    other = dataclasses.replace(DEFAULT_STATS, lengths={**DEFAULT_STATS.lengths, ("alpha", "M"): (10, 38)},
                                chain_counts=counts)
    c, _ = checkpoint("c", SMALL, 2, grammar=other)
    write_ensemble(tmp_path / "grammars", [a, c])
    ensemble = load_predictor(tmp_path / "grammars").module
    helix38 = "I" * 5 + "M" * 38 + "O" * 5
    assert ensemble.grammar.accepts(helix38) and not default_grammar().accepts(helix38)
    assert ensemble.grammar.stats == DEFAULT_STATS.merged(other)
    assert ensemble.grammar.stats.chain_counts[("alpha", "M")][21] == 2 * DEFAULT_STATS.chain_counts[("alpha", "M")][21]


def test_neither_checkpoint_nor_ensemble_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_predictor(tmp_path)


def test_a_vote_takes_the_topology_most_members_agree_on():
    """Three members' decodings of one protein: two agree (one helix, placed a little apart), one predicts two
    helices; the vote returns one of the agreeing pair, the likelier under the mean posteriors."""
    batch = Batch.from_data_list([protein(40, 0)])
    one_a = "I" * 10 + "M" * 20 + "O" * 10
    one_b = "I" * 12 + "M" * 20 + "O" * 8
    two = "I" * 5 + "M" * 12 + "O" * 3 + "M" * 12 + "I" * 8
    decoded = [torch.tensor([LABELS.index(c) for c in s]) for s in (two, one_a, one_b)]
    log_probs = torch.full((40, 6), -5.0)
    log_probs[torch.arange(40), decoded[2]] = -0.1  # the mean posteriors favour one_b
    winner = "".join(LABELS[i] for i in vote(batch, log_probs, decoded).tolist())
    assert winner == one_b
    log_probs[torch.arange(40), decoded[0]] = 0.0  # likelier still, but outvoted two to one
    assert "".join(LABELS[i] for i in vote(batch, log_probs, decoded).tolist()) == one_b


def test_choose_decoding_gives_barrels_their_own_strand_penalty():
    """A 22-strand barrel whose strands the helices' entry penalty (4, held fixed) loses whole: the old rule
    (strands pay the entry penalty) scores it 0; choosing the strand penalty gets all 22 strands and the
    topology, and a grid of None alone is the old rule."""
    labels = barrel(22)
    batch = Batch.from_data_list([Data(y=torch.tensor([LABELS.index(c) for c in labels]), num_nodes=len(labels))])
    log_probs = [barrel_posteriors(labels, strand=0.45, loop=0.6)]
    fixed = {"penalties": (4.0,), "min_loops": (1,), "beta_offsets": (0.0,)}
    old = choose_decoding([batch], log_probs, **fixed, strand_penalties=(None,))
    assert old.decoding.strand_penalty is None and old.figures["topo_beta"] == 0.0
    chosen = choose_decoding([batch], log_probs, **fixed)
    assert chosen.decoding.entry_penalty == 4.0 and chosen.decoding.strand_penalty is not None
    assert chosen.figures["topo_beta"] == 1.0 and "penalty=4 loop=1 beta=0 strand=4" in chosen.topo_mean
    decoded = grammar_decode([batch], log_probs, chosen.decoding)[0]
    assert sum(1 for c, _ in label_runs("".join(LABELS[i] for i in decoded.tolist())) if c == "B") == 22
