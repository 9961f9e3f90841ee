"""Topology grammar: derived from segment statistics, accepts the true label strings, rejects mixed worlds."""

from __future__ import annotations

from protopo_ray.data.records import read_records
from protopo_ray.model.grammar import DEFAULT_STATS, build_grammar, default_grammar, segment_stats

TINY = [("TM", "IIMMMOOMMMI"), ("SP", "SSOOO"), ("GLOBULAR", "IIII"), ("BETA", "SPPBBBOBBBPP")]


def test_segment_stats_of_hand_built_proteins():
    stats = segment_stats(TINY + [("TM", "OMMMMII")])
    assert stats.lengths[("alpha", "M")] == (3, 4)
    assert stats.lengths[("beta", "B")] == (3, 3)
    assert ("alpha", "I", "M", "O") in stats.contexts and ("alpha", "O", "M", "I") in stats.contexts
    assert ("globular", "^", "I") in stats.flanks
    assert ("beta", "*", "P") in stats.flank_ends and ("globular", "^", "I") in stats.flank_ends


def test_grammar_accepts_its_own_data_and_lengths_in_range():
    grammar = build_grammar(segment_stats(TINY + [("TM", "OMMMMII")]))
    for _, labels in TINY:
        assert grammar.accepts(labels)
    assert grammar.accepts("IIMMMMOO")  # M of 4 is in the observed 3-4 range
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
