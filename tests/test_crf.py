"""CRF kernels against brute-force enumeration of every grammar path on tiny lattices."""

from __future__ import annotations

import math
from itertools import groupby

import pytest
import torch

from protopo_ray.data.alphabet import LABELS, encode_labels
from protopo_ray.model.crf import CRF
from protopo_ray.model.grammar import Decoding, build_grammar, default_grammar
from protopo_ray.model.segments import segment_stats

TINY = build_grammar(segment_stats([("TM", "IMMOOMMMI"), ("SP", "SOO"), ("GLOBULAR", "II"), ("BETA", "SPBBOBBP")]))


def all_paths(grammar, length):
    successors = {}
    for a, b in grammar.edges:
        successors.setdefault(a, []).append(b)
    paths = [[s] for s in grammar.starts]
    for _ in range(length - 1):
        paths = [p + [b] for p in paths for b in successors.get(p[-1], [])]
    return [p for p in paths if p[-1] in grammar.ends]


def path_score(crf, emissions, path):
    g = crf.grammar
    score = crf.start_scores[g.starts.index(path[0])] + crf.end_scores[g.ends.index(path[-1])]
    score = score + sum(emissions[t, g.labels[s]] for t, s in enumerate(path))
    return score + sum(crf.edge_scores[g.edges.index((a, b))] for a, b in zip(path, path[1:]))


def random_crf(seed):
    torch.manual_seed(seed)
    crf = CRF(TINY)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    return crf


@pytest.mark.parametrize("length", [1, 3, 5, 6])
def test_log_partition_and_viterbi_match_brute_force(length):
    crf = random_crf(length)
    emissions = torch.randn(1, length, len(LABELS))
    paths = all_paths(TINY, length)
    assert paths, "the tiny grammar has paths of every tested length"
    scores = torch.stack([path_score(crf, emissions[0], p) for p in paths])
    assert crf.log_partition(emissions, torch.tensor([length]))[0].item() == pytest.approx(
        torch.logsumexp(scores, 0).item(), abs=1e-4)
    best = paths[int(scores.argmax())]
    decoded = crf.decode(emissions, torch.tensor([length]))[0].tolist()
    assert decoded == [TINY.labels[s] for s in best]


def test_nll_matches_brute_force_and_padding_is_exact():
    crf = random_crf(7)
    true = ["IMMOO", "SOO", "II", "SPBBO"]
    lengths = torch.tensor([len(t) for t in true])
    emissions = torch.randn(len(true), 6, len(LABELS))
    labels = torch.full((len(true), 6), -100)
    for i, t in enumerate(true):
        labels[i, : len(t)] = torch.tensor(encode_labels(t))
    nll, accepted = crf.nll(emissions, lengths, labels)
    for i, t in enumerate(true):
        paths = all_paths(TINY, len(t))
        scores = torch.stack([path_score(crf, emissions[i], p) for p in paths])
        gold = [s for p, s in zip(paths, scores) if "".join(LABELS[TINY.labels[x]] for x in p) == t]
        if not gold:  # "SPBBO" ends outside, which no beta protein of the tiny data does
            assert not accepted[i] and nll[i] == 0
            continue
        expected = torch.logsumexp(scores, 0) - torch.logsumexp(torch.stack(gold), 0)
        assert accepted[i] and nll[i].item() == pytest.approx(expected.item(), abs=1e-4)
        # the same protein alone, unpadded, gives the same NLL and the same Viterbi labels
        alone, _ = crf.nll(emissions[i : i + 1, : len(t)], lengths[i : i + 1], labels[i : i + 1, : len(t)])
        assert alone.item() == pytest.approx(nll[i].item(), abs=1e-4)
        assert torch.equal(crf.decode(emissions[i : i + 1, : len(t)], lengths[i : i + 1])[0],
                           crf.decode(emissions, lengths)[i, : len(t)])


def test_marginals_are_label_posteriors():
    crf = random_crf(3)
    emissions = torch.randn(2, 5, len(LABELS))
    lengths = torch.tensor([5, 3])
    marginals = crf.marginals(emissions, lengths)
    assert torch.allclose(marginals[0].sum(-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(marginals[1, :3].sum(-1), torch.ones(3), atol=1e-5)
    assert marginals[1, 3:].abs().sum() == 0
    paths = all_paths(TINY, 5)
    scores = torch.stack([path_score(crf, emissions[0], p) for p in paths])
    probs = torch.softmax(scores, 0)
    p_m_at_2 = sum(float(pr.detach()) for p, pr in zip(paths, probs) if LABELS[TINY.labels[p[2]]] == "M")
    assert marginals[0, 2, LABELS.index("M")].item() == pytest.approx(p_m_at_2, abs=1e-5)


def test_fixed_penalty_removes_weak_helices():
    grammar = default_grammar()
    # inside, then a weak helix / outside loop / helix stretch: each residue there leans M (or O) over I
    probs = torch.full((1, 120, 6), 1e-3)
    probs[0, :, 0] = 0.9
    probs[0, 40:90, 0] = 0.2
    probs[0, 40:60, 4] = probs[0, 70:90, 4] = 0.5
    probs[0, 60:70, 1] = 0.5
    logp, lengths = probs.log(), torch.tensor([120])
    free = "".join(LABELS[i] for i in CRF.fixed(grammar, Decoding(duration_weight=0.0)).decode(logp, lengths)[0].tolist())
    assert free == "I" * 40 + "M" * 20 + "O" * 10 + "M" * 20 + "I" * 30
    penalised = "".join(LABELS[i] for i in CRF.fixed(grammar, Decoding(entry_penalty=50.0, duration_weight=0.0)).decode(logp, lengths)[0].tolist())
    assert penalised == "I" * 120


def test_learned_transitions_get_gradients():
    crf = CRF(TINY)
    emissions = torch.randn(1, 3, len(LABELS), requires_grad=True)
    nll, accepted = crf.nll(emissions, torch.tensor([3]), torch.tensor([encode_labels("SOO")]))
    nll.sum().backward()
    assert accepted.all() and crf.edge_scores.grad.abs().sum() > 0 and torch.isfinite(emissions.grad).all()


def test_length_priors_widen_a_one_residue_loop_the_posteriors_barely_support():
    """A 50-residue hydrophobic stretch (M favoured, I at 0.6 of M) is too long for one helix: with lengths free
    the decoder splits it by the cheapest loop, one residue; with the training folds' length priors (one-residue
    inner loops are 0.2 % of them) the loop it takes is longer."""
    grammar = default_grammar()
    logp = torch.full((1, 70, 6), -30.0)
    logp[0, :10, 0] = logp[0, 60:, 0] = 0.0  # inside before and after: two helices, an outside loop between
    logp[0, 10:60, 4], logp[0, 10:60, 1] = 0.0, -0.5
    lengths = torch.tensor([70])

    def loops(decoding: Decoding) -> list[int]:
        labels = "".join(LABELS[i] for i in CRF.fixed(grammar, decoding).decode(logp, lengths)[0].tolist())
        runs = [(k, len(list(g))) for k, g in groupby(labels)]
        return [n for i, (k, n) in enumerate(runs[1:-1], 1) if k == "O" and runs[i - 1][0] == runs[i + 1][0] == "M"]

    assert loops(Decoding(duration_weight=0.0)) == [1]
    (widened,) = loops(Decoding(duration_weight=1.0))
    assert widened > 1


def test_min_loop_floors_helix_loops_where_the_posteriors_are_weakest():
    """Two helices whose M posterior runs on through a 4-residue turn (M at 0.9 there): the length priors alone
    cut the stretch with a one-residue loop; a floor of 4 puts the whole turn back, at the least M-like residues."""
    grammar = default_grammar()
    logp = torch.full((1, 70, 6), -30.0)
    logp[0, :10, 0] = logp[0, 56:, 0] = 0.0
    logp[0, 10:56, 4] = 0.0
    logp[0, 10:56, 1] = -6.0
    logp[0, 31:35, 4], logp[0, 31:35, 1] = math.log(0.9), math.log(0.1)
    logp[0, 32, 4], logp[0, 32, 1] = math.log(0.8), math.log(0.2)
    lengths = torch.tensor([70])

    def labels(decoding: Decoding) -> str:
        return "".join(LABELS[i] for i in CRF.fixed(grammar, decoding).decode(logp, lengths)[0].tolist())

    def loops(decoding: Decoding) -> list[tuple[int, int]]:
        """(start, length) of the loops between two helices."""
        runs, at = [], 0
        for k, g in groupby(labels(decoding)):
            runs.append((k, at, len(list(g))))
            at += runs[-1][2]
        return [(s, n) for i, (k, s, n) in enumerate(runs[1:-1], 1) if runs[i - 1][0] == runs[i + 1][0] == "M"]

    assert loops(Decoding()) == [(32, 1)]
    assert loops(Decoding(min_loop=4)) == [(31, 4)]


def test_min_loop_leaves_beta_turns_and_signal_peptides_alone():
    grammar = default_grammar()
    loops = [n for n, e in zip(grammar.edge_helix_loops, grammar.edges) if n]
    assert set(loops) == set(range(1, grammar.stats.loop_states + 2))
    for n, (a, _) in zip(grammar.edge_helix_loops, grammar.edges):
        if n:
            assert grammar.names[a].startswith("alpha:") and LABELS[grammar.labels[a]] == "M"


def test_beta_offset_moves_a_protein_into_the_beta_world():
    grammar = default_grammar()
    # A signal peptide, then stretches where B and M are about as likely (a weak barrel or weak helices).
    logp = torch.full((1, 90, 6), -30.0)
    logp[0, :20, 3] = 0.0
    logp[0, 20:, 1] = logp[0, 20:, 2] = -1.0
    for start in (30, 50, 70):
        logp[0, start:start + 9, 5], logp[0, start:start + 9, 4] = -1.5, -0.3
    lengths = torch.tensor([90])
    plain = "".join(LABELS[i] for i in CRF.fixed(grammar, Decoding()).decode(logp, lengths)[0].tolist())
    offset = "".join(LABELS[i] for i in CRF.fixed(grammar, Decoding(beta_offset=20.0)).decode(logp, lengths)[0].tolist())
    assert "B" not in plain and "B" in offset
