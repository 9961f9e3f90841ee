"""Topology grammar: derived from segment statistics, accepts the true label strings, rejects mixed worlds."""

from __future__ import annotations

import pytest
import torch

from protopo_ray.data.alphabet import LABEL_INDEX, LABELS
from protopo_ray.data.records import read_records
from protopo_ray.model.crf import CRF
from protopo_ray.model.grammar import Decoding, build_grammar, default_grammar
from protopo_ray.model.segments import DEFAULT_STATS, label_runs, segment_stats

TINY = [("TM", "IIMMMOOMMMI"), ("SP", "SSOOO"), ("GLOBULAR", "IIII"), ("BETA", "SPPBBBOBBBPP")]


def test_segment_stats_of_hand_built_proteins():
    stats = segment_stats(TINY + [("TM", "OMMMMII")])
    assert stats.lengths[("alpha", "M")] == (3, 4)
    assert stats.lengths[("beta", "B")] == (3, 3)
    assert ("alpha", "I", "M", "O") in stats.contexts and ("alpha", "O", "M", "I") in stats.contexts
    assert ("globular", "^", "I") in stats.flanks
    assert ("beta", "B", "P") in stats.flank_ends and ("globular", "^", "I") in stats.flank_ends


def test_grammar_accepts_its_own_data_and_lengths_in_range():
    grammar = build_grammar(segment_stats(TINY + [("TM", "OMMMMII")]))
    for _, labels in TINY:
        assert grammar.accepts(labels)
    assert grammar.accepts("OOMMMMII")  # M of 4 is in the observed 3-4 range
    assert not grammar.accepts("IIMMMMOO")  # no protein here ends outside after a helix: O ends only after S
    assert not grammar.accepts("IIMMOO")  # M of 2 is too short
    assert not grammar.accepts("IIMMMMMOO")  # M of 5 is too long
    assert not grammar.accepts("IIMMMII")  # an M segment has to cross to the other side
    assert not grammar.accepts("OOOO")  # alpha may start and end outside, but not be outside alone (INVALID)
    assert not grammar.accepts("PPPP")


def test_worlds_never_mix():
    grammar = build_grammar(segment_stats(TINY))
    assert not grammar.accepts("SPPMMMOO")  # beta periplasm with an alpha helix
    assert not grammar.accepts("IIBBBOO")  # a beta strand from the inside
    assert not grammar.accepts("SSOOBBBPP")  # an alpha signal peptide (-> O) then a beta strand


def test_chain_states_have_few_predecessors():
    grammar = default_grammar()
    indegree: dict[int, int] = {}
    for _, b in grammar.edges:
        indegree[b] = indegree.get(b, 0) + 1
    assert max(indegree.values()) <= 3


def test_default_stats_are_the_training_folds(partitions_json):
    records = read_records(partitions_json).records
    train = [(r.type, r.labels) for r in records if r.fold in ("cv0", "cv3", "cv4")]
    assert segment_stats(train) == DEFAULT_STATS


def test_every_true_label_string_is_accepted_but_one(partitions_json):
    records = read_records(partitions_json).records
    assert len(records) == 3576
    grammar = default_grammar()
    rejected = [r.id for r in records if not grammar.accepts(r.labels)]
    # P04003 (cv2, SP) has a 48-residue signal peptide; the training folds' longest alpha-world one is 47.
    assert rejected == ["P04003"]


def test_length_priors_are_distributions_over_each_segment_and_loop():
    """Every chain's entries (and a beta strand's too) and every inner loop's choices sum to probability 1."""
    import math

    grammar = default_grammar()
    entries: dict[tuple[int, str], list[float]] = {}
    for (a, b), enter, prior in zip(grammar.edges, grammar.edge_enters, grammar.edge_priors):
        if enter:  # flank -> chain entry: one distribution per (source state, chain)
            entries.setdefault((a, grammar.names[b].rsplit(":", 1)[0]), []).append(prior)
    assert entries and all(abs(sum(map(math.exp, p)) - 1) < 1e-9 for p in entries.values())
    loops: dict[tuple[int, str], list[float]] = {}
    for (a, b), prior in zip(grammar.edges, grammar.edge_priors):
        name = grammar.names[b]
        if "~" in name and grammar.names[a].endswith(f":{grammar.names[a].rsplit(':', 1)[-1]}") and ">" in grammar.names[a]:
            loops.setdefault((a, name.split("~")[0]), []).append(prior)
    assert loops and all(abs(sum(map(math.exp, p)) - 1) < 1e-9 for p in loops.values())
    # A one-residue loop between helices is rare in the training folds: far less likely than a six-residue one.
    assert DEFAULT_STATS.loop_counts[("alpha", "I")][1] == 1 and DEFAULT_STATS.loop_counts[("alpha", "I")][6] == 27


def test_a_beta_protein_needs_a_strand_and_statistics_without_lengths_build_the_old_grammar():
    assert not default_grammar().accepts("S" * 20 + "P" * 30)  # the periplasmic tail follows a strand, never S
    import dataclasses

    old = dataclasses.replace(DEFAULT_STATS, chain_counts={}, loop_counts={}, loop_tails={})
    grammar = build_grammar(old)
    assert grammar.num_states == 196 and not any(grammar.edge_priors)  # the grammar before lengths were evidence
    assert grammar.accepts("IIIII" + "M" * 21 + "O" * 3 + "M" * 21 + "III")


def barrel(strands: int) -> str:
    """A hand-built barrel: signal peptide, periplasm, then hairpins strand-outside-strand-turn, periplasmic tail."""
    return "S" * 22 + "P" * 10 + ("B" * 9 + "O" * 14 + "B" * 9 + "P" * 5) * (strands // 2)


def barrel_posteriors(labels: str, strand: float, loop: float) -> torch.Tensor:
    """Log-posteriors of a barrel as a weak network gives them: B at `strand` on strands (the rest O and P), a
    loop's side at `loop` with most of the rest on the other side; S certain."""
    p = torch.full((len(labels), len(LABELS)), 0.01)
    for t, c in enumerate(labels):
        if c == "B":
            p[t, LABEL_INDEX["B"]] = strand
            p[t, LABEL_INDEX["O"]] = p[t, LABEL_INDEX["P"]] = (1 - strand) / 2
        elif c in "OP":
            p[t, LABEL_INDEX[c]], p[t, LABEL_INDEX["OP".replace(c, "")]], p[t, LABEL_INDEX["B"]] = loop, 0.9 - loop, 0.1
        else:
            p[t, LABEL_INDEX[c]] = 0.9
    return (p / p.sum(1, keepdim=True)).log()


def decoded_strands(log_probs: torch.Tensor, decoding: Decoding) -> int:
    path = CRF.fixed(default_grammar(), decoding).decode(log_probs[None], torch.tensor([len(log_probs)]))[0]
    return sum(1 for letter, _ in label_runs("".join(LABELS[i] for i in path.tolist())) if letter == "B")


def test_a_22_strand_barrel_with_clear_evidence_decodes_with_22_strands():
    labels = barrel(22)
    assert default_grammar().accepts(labels)
    clear = barrel_posteriors(labels, strand=0.45, loop=0.6)
    assert decoded_strands(clear, Decoding()) == 22
    # The members' entry penalty (4, chosen for helices) paid by each of 22 strands: 88 nats against the one
    # signal peptide of an SP path, and the barrel is lost whole. Its own strand penalty gives it back.
    assert decoded_strands(clear, Decoding(entry_penalty=4.0)) == 0
    assert decoded_strands(clear, Decoding(entry_penalty=4.0, strand_penalty=0.0)) == 22


def test_a_bonus_per_strand_pays_the_length_priors_weak_evidence_cannot():
    """~2 nats of length prior per strand and per loop add up to ~100 over a 22-strand barrel: at no penalty
    weak posteriors lose it; a bonus per strand (a negative strand penalty) keeps all 22, and none spill into
    a protein without strands."""
    weak = barrel_posteriors(barrel(22), strand=0.4, loop=0.5)
    assert decoded_strands(weak, Decoding()) == 0
    assert decoded_strands(weak, Decoding(strand_penalty=-4.0)) == 22
    globular = torch.full((200, len(LABELS)), 0.02)
    globular[:, LABEL_INDEX["I"]] = 0.9
    assert decoded_strands(globular.log(), Decoding(strand_penalty=-4.0)) == 0


def test_decoding_files_from_before_the_strand_penalty_decode_as_they_did():
    old = Decoding.from_json({"entry_penalty": 4.0, "duration_weight": 1.0, "beta_offset": 2.0, "min_loop": 3,
                              "rule": "mean"})
    assert old.strand_penalty is None and old.entry_cost("B") == old.entry_cost("M") == 4.0
    assert old.entry_cost("P") == old.entry_cost("") == 0.0
    new = Decoding(entry_penalty=4.0, strand_penalty=-2.0)
    assert Decoding.from_json(new.to_json()) == new and new.entry_cost("B") == -2.0 and new.entry_cost("M") == 4.0
    assert Decoding.from_json(old.to_json()) == old
    with pytest.raises(ValueError, match="strand_penalty"):
        Decoding(strand_penalty=float("nan"))
