"""Segment statistics of labelled proteins: what the topology grammar (protopo_ray.model.grammar) is built from.

Per world (alpha: TM, SP+TM, SP; beta: BETA; globular: GLOBULAR), the segment lengths of the chain labels
(S, M, B), the labels around them, how flank labels (I, O, P) are entered and end a protein, and the length
counts of chains and inner loops. `segment_stats` reads them off (type, label string) pairs; `DEFAULT_STATS`
holds those of DeepTMHMM's training folds, so a model builds its grammar with no data at hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby

#: Labels whose segments have a bounded length (the ones metrics.MIN_OVERLAP scores): chains of states.
CHAIN_LABELS = "SMB"
#: The world a protein type lives in; worlds share no state.
WORLD_OF_TYPE = {"TM": "alpha", "SP+TM": "alpha", "SP": "alpha", "GLOBULAR": "globular", "BETA": "beta"}
START, END = "^", "$"
#: Inner loops of 1..LOOP_STATES residues get their own probability; longer ones share a geometric tail.
LOOP_STATES = 8


@dataclass(frozen=True, slots=True)
class SegmentStats:
    """What the grammar needs from labelled data, per world."""

    lengths: dict[tuple[str, str], tuple[int, int]]
    """(world, chain label) -> (min, max) segment length observed."""
    contexts: frozenset[tuple[str, str, str, str]]
    """(world, label before or ^, chain label, label after or $) observed around chain segments."""
    flanks: frozenset[tuple[str, str, str]]
    """(world, before or ^, flank label): how flank segments are entered (a flank after a flank never occurs)."""
    flank_ends: frozenset[tuple[str, str, str]]
    """(world, ^ or the chain label before it, flank label) that ended a protein: ^ when the flank was the whole
    protein (statistics recorded before chains were told apart have * for "after any chain")."""
    chain_counts: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    """(world, chain label) -> {length: segments of that length}."""
    loop_counts: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    """(world, flank label) -> {length: inner loops of that length} for lengths 1..loop_states (a flank between two
    chains: I between helices, P and O between strands, O between a signal peptide and a helix)."""
    loop_tails: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    """(world, flank label) -> (inner loops longer than loop_states, their residues beyond loop_states in all)."""
    loop_states: int = LOOP_STATES
    """Without counts (statistics recorded before lengths were evidence) the grammar has no length scores."""

    def merged(self, *others: SegmentStats) -> SegmentStats:
        """The statistics of all their proteins together (e.g. ensemble members trained on different folds)."""
        if any(o.loop_states != self.loop_states for o in others):
            raise ValueError("segment statistics with different loop_states cannot be merged")
        lengths = dict(self.lengths)
        for other in others:
            for key, (lo, hi) in other.lengths.items():
                old = lengths.get(key, (lo, hi))
                lengths[key] = (min(old[0], lo), max(old[1], hi))

        def summed(tables: list[dict[tuple[str, str], dict[int, int]]]) -> dict[tuple[str, str], dict[int, int]]:
            out: dict[tuple[str, str], dict[int, int]] = {}
            for table in tables:
                for key, counts in table.items():
                    into = out.setdefault(key, {})
                    for length, n in counts.items():
                        into[length] = into.get(length, 0) + n
            return out

        tails: dict[tuple[str, str], tuple[int, int]] = {}
        for stats in (self, *others):
            for key, (n, excess) in stats.loop_tails.items():
                old_n, old_excess = tails.get(key, (0, 0))
                tails[key] = (old_n + n, old_excess + excess)
        everything = (self, *others)
        return SegmentStats(lengths=lengths, contexts=frozenset().union(*(s.contexts for s in everything)),
                            flanks=frozenset().union(*(s.flanks for s in everything)),
                            flank_ends=frozenset().union(*(s.flank_ends for s in everything)),
                            chain_counts=summed([s.chain_counts for s in everything]),
                            loop_counts=summed([s.loop_counts for s in everything]), loop_tails=tails,
                            loop_states=self.loop_states)

    def to_json(self) -> dict[str, list[list]]:
        """Plain lists, sorted (a checkpoint records the grammar its model was built with)."""
        def counts(table: dict[tuple[str, str], dict[int, int]]) -> list[list]:
            return [[w, c, sorted(map(list, lengths.items()))] for (w, c), lengths in sorted(table.items())]

        return {"lengths": [[world, label, lo, hi] for (world, label), (lo, hi) in sorted(self.lengths.items())],
                "contexts": sorted(map(list, self.contexts)), "flanks": sorted(map(list, self.flanks)),
                "flank_ends": sorted(map(list, self.flank_ends)), "chain_counts": counts(self.chain_counts),
                "loop_counts": counts(self.loop_counts),
                "loop_tails": [[w, c, n, excess] for (w, c), (n, excess) in sorted(self.loop_tails.items())],
                "loop_states": self.loop_states}

    @classmethod
    def from_json(cls, values: dict[str, list[list]]) -> SegmentStats:
        def counts(rows: list[list]) -> dict[tuple[str, str], dict[int, int]]:
            return {(w, c): {int(length): int(n) for length, n in lengths} for w, c, lengths in rows}

        return cls(lengths={(world, label): (lo, hi) for world, label, lo, hi in values["lengths"]},
                   contexts=frozenset(map(tuple, values["contexts"])), flanks=frozenset(map(tuple, values["flanks"])),
                   flank_ends=frozenset(map(tuple, values["flank_ends"])),
                   chain_counts=counts(values.get("chain_counts", [])), loop_counts=counts(values.get("loop_counts", [])),
                   loop_tails={(w, c): (int(n), int(e)) for w, c, n, e in values.get("loop_tails", [])},
                   loop_states=int(values.get("loop_states", LOOP_STATES)))


def label_runs(labels: str) -> list[tuple[str, int]]:
    return [(letter, sum(1 for _ in group)) for letter, group in groupby(labels)]


def segment_stats(proteins: Iterable[tuple[str, str]], loop_states: int = LOOP_STATES) -> SegmentStats:
    """Statistics of (protein type, label string) pairs, e.g. from the training folds' records."""
    lengths: dict[tuple[str, str], tuple[int, int]] = {}
    contexts, flanks, flank_ends = set(), set(), set()
    chain_counts: dict[tuple[str, str], dict[int, int]] = {}
    loop_counts: dict[tuple[str, str], dict[int, int]] = {}
    loop_tails: dict[tuple[str, str], tuple[int, int]] = {}
    for protein_type, labels in proteins:
        world = WORLD_OF_TYPE[protein_type]
        runs = label_runs(labels)
        for i, (letter, length) in enumerate(runs):
            before = runs[i - 1][0] if i > 0 else START
            after = runs[i + 1][0] if i + 1 < len(runs) else END
            if letter in CHAIN_LABELS:
                lo, hi = lengths.get((world, letter), (length, length))
                lengths[(world, letter)] = (min(lo, length), max(hi, length))
                contexts.add((world, before, letter, after))
                counts = chain_counts.setdefault((world, letter), {})
                counts[length] = counts.get(length, 0) + 1
            else:
                flanks.add((world, before, letter))
                if after == END:
                    flank_ends.add((world, before, letter))
                elif before != START:  # an inner loop: between two chains
                    if length <= loop_states:
                        counts = loop_counts.setdefault((world, letter), {})
                        counts[length] = counts.get(length, 0) + 1
                    else:
                        n, excess = loop_tails.get((world, letter), (0, 0))
                        loop_tails[(world, letter)] = (n + 1, excess + length - loop_states)
    return SegmentStats(lengths=lengths, contexts=frozenset(contexts), flanks=frozenset(flanks),
                        flank_ends=frozenset(flank_ends), chain_counts=chain_counts, loop_counts=loop_counts,
                        loop_tails=loop_tails, loop_states=loop_states)


#: Statistics of the training folds cv0 + cv3 + cv4 of DeepTMHMM.partitions.json (2145 proteins), as printed by
#: `python -m protopo_ray.model.grammar --labels .../DeepTMHMM.partitions.json --folds cv0 cv3 cv4`; tests/test_grammar.py
#: re-derives them from the file when it is present. The model builds its CRF from these, so a checkpoint needs no
#: data to be rebuilt.
DEFAULT_STATS = SegmentStats(
    lengths={("alpha", "M"): (10, 30), ("alpha", "S"): (12, 47), ("beta", "B"): (5, 15), ("beta", "S"): (13, 52)},
    contexts=frozenset({
        ("alpha", "I", "M", "O"), ("alpha", "O", "M", "I"), ("alpha", "I", "M", END), ("alpha", START, "S", "O"),
        ("beta", "O", "B", "P"), ("beta", "P", "B", "O"), ("beta", START, "S", "P"),
    }),
    flanks=frozenset({
        ("alpha", START, "I"), ("alpha", START, "O"), ("alpha", "M", "I"), ("alpha", "M", "O"), ("alpha", "S", "O"),
        ("beta", "S", "P"), ("beta", "B", "P"), ("beta", "B", "O"), ("globular", START, "I"),
    }),
    flank_ends=frozenset({("alpha", "M", "I"), ("alpha", "M", "O"), ("alpha", "S", "O"), ("beta", "B", "P"),
                          ("globular", START, "I")}),
    chain_counts={
        ("alpha", "M"): {10: 1, 12: 7, 13: 8, 14: 18, 15: 24, 16: 72, 17: 52, 18: 80, 19: 91, 20: 101, 21: 691, 22: 180,
                         23: 118, 24: 60, 25: 56, 26: 53, 27: 24, 28: 15, 29: 9, 30: 7},
        ("alpha", "S"): {12: 2, 14: 6, 15: 13, 16: 22, 17: 25, 18: 38, 19: 59, 20: 54, 21: 51, 22: 48, 23: 46, 24: 50,
                         25: 40, 26: 27, 27: 29, 28: 23, 29: 14, 30: 21, 31: 8, 32: 17, 33: 10, 34: 12, 35: 10, 36: 5,
                         37: 3, 38: 5, 39: 6, 40: 4, 41: 2, 42: 3, 43: 4, 45: 1, 46: 2, 47: 4},
        ("beta", "B"): {5: 7, 6: 34, 7: 111, 8: 148, 9: 165, 10: 109, 11: 68, 12: 48, 13: 34, 14: 10, 15: 8},
        ("beta", "S"): {13: 1, 19: 4, 20: 7, 21: 4, 22: 3, 23: 4, 24: 4, 25: 4, 26: 2, 27: 3, 28: 1, 29: 4, 32: 2, 33: 1,
                        34: 1, 35: 1, 37: 1, 48: 1, 52: 1},
    },
    loop_counts={
        ("alpha", "I"): {1: 1, 2: 6, 3: 15, 4: 16, 5: 17, 6: 27, 7: 18, 8: 16},
        ("alpha", "O"): {1: 10, 2: 6, 3: 27, 4: 29, 5: 32, 6: 31, 7: 22, 8: 29},
        ("beta", "O"): {1: 2, 2: 2, 3: 7, 4: 6, 5: 8, 6: 5, 7: 14, 8: 10},
        ("beta", "P"): {1: 4, 2: 5, 3: 37, 4: 22, 5: 47, 6: 55, 7: 46, 8: 38},
    },
    loop_tails={("alpha", "I"): (522, 14589), ("alpha", "O"): (611, 42359), ("beta", "O"): (317, 5630),
                ("beta", "P"): (117, 6832)},
)


def format_stats(stats: SegmentStats) -> str:
    rows = [f"{w} {c}: length {lo}-{hi}" for (w, c), (lo, hi) in sorted(stats.lengths.items())]
    rows += [f"{w}: {b} -> [{c}] -> {a}" for w, b, c, a in sorted(stats.contexts)]
    rows += [f"{w}: {b} -> {f} (flank)" for w, b, f in sorted(stats.flanks)]
    rows += [f"{w}: may end in {f} ({'as the whole protein' if b == START else f'after {b}'})"
             for w, b, f in sorted(stats.flank_ends)]
    return "\n".join(rows)
