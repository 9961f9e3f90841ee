"""Topology grammar: which per-residue label strings are proteins, as a finite state space for a CRF.

The grammar is read off labelled proteins (`segment_stats`), not guessed: every protein belongs to one *world*
(alpha: TM, SP+TM, SP; beta: BETA; globular: GLOBULAR) and worlds never mix. Inside a world, the labels S, M
and B (the segments the metrics score with a minimum overlap) are *chains*: a segment of such a label is a run
of chain states whose length lies in the range observed for that label in that world, with the label that comes
before and after it as observed (I before M leads to O after it, O before M to I, P before B to O, ...). The
other labels (I, O, P) are *flanks*: one self-looping state each per world, any length.

A chain of maximum length n has states c_1..c_n; a segment of length L enters at c_(n-L+1) and leaves from
c_n. Entering at different positions (rather than leaving from them) keeps every state's number of
predecessors at <= 3, which is what keeps the CRF's forward pass cheap (`crf.py` gathers predecessors).

    python -m protopo_ray.model.grammar --labels ../shared/data/deeptmhmm/DeepTMHMM.partitions.json --folds cv0 cv3 cv4

prints the statistics of those folds and checks every protein of the file against the grammar built from them.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby

from protopo_ray.data.alphabet import LABEL_INDEX
from protopo_ray.data.records import read_records

#: Labels whose segments have a bounded length (the ones metrics.MIN_OVERLAP scores): chains of states.
CHAIN_LABELS = "SMB"
#: The world a protein type lives in; worlds share no state.
WORLD_OF_TYPE = {"TM": "alpha", "SP+TM": "alpha", "SP": "alpha", "GLOBULAR": "globular", "BETA": "beta"}
START, END = "^", "$"


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
    """(world, ^ or *, flank label) that ended a protein: ^ when the flank was the whole protein, * after a chain."""

    def to_json(self) -> dict[str, list[list]]:
        """Plain lists, sorted (a checkpoint records the grammar its model was built with)."""
        return {"lengths": [[world, label, lo, hi] for (world, label), (lo, hi) in sorted(self.lengths.items())],
                "contexts": sorted(map(list, self.contexts)), "flanks": sorted(map(list, self.flanks)),
                "flank_ends": sorted(map(list, self.flank_ends))}

    @classmethod
    def from_json(cls, values: dict[str, list[list]]) -> SegmentStats:
        return cls(lengths={(world, label): (lo, hi) for world, label, lo, hi in values["lengths"]},
                   contexts=frozenset(map(tuple, values["contexts"])), flanks=frozenset(map(tuple, values["flanks"])),
                   flank_ends=frozenset(map(tuple, values["flank_ends"])))


def _runs(labels: str) -> list[tuple[str, int]]:
    return [(letter, sum(1 for _ in group)) for letter, group in groupby(labels)]


def segment_stats(proteins: Iterable[tuple[str, str]]) -> SegmentStats:
    """Statistics of (protein type, label string) pairs, e.g. from the training folds' records."""
    lengths: dict[tuple[str, str], tuple[int, int]] = {}
    contexts, flanks, flank_ends = set(), set(), set()
    for protein_type, labels in proteins:
        world = WORLD_OF_TYPE[protein_type]
        runs = _runs(labels)
        for i, (letter, length) in enumerate(runs):
            before = runs[i - 1][0] if i > 0 else START
            after = runs[i + 1][0] if i + 1 < len(runs) else END
            if letter in CHAIN_LABELS:
                lo, hi = lengths.get((world, letter), (length, length))
                lengths[(world, letter)] = (min(lo, length), max(hi, length))
                contexts.add((world, before, letter, after))
            else:
                flanks.add((world, before, letter))
                if after == END:
                    flank_ends.add((world, START if before == START else "*", letter))
    return SegmentStats(lengths=lengths, contexts=frozenset(contexts), flanks=frozenset(flanks),
                        flank_ends=frozenset(flank_ends))


@dataclass(frozen=True, slots=True)
class Grammar:
    """A state space: each state emits one label; moves, starts and ends that are allowed."""

    names: tuple[str, ...]
    """Readable state names, e.g. 'alpha:I', 'alpha:I>M>O:3' (chain I->M->O, position 3)."""
    labels: tuple[int, ...]
    """Label index (alphabet.LABELS) each state emits."""
    edges: tuple[tuple[int, int], ...]
    """Allowed moves (from state, to state)."""
    edge_enters: tuple[str, ...]
    """For each edge, the chain label it enters a segment of ('' for moves within a segment or flank)."""
    starts: tuple[int, ...]
    """States a protein may begin in."""
    start_enters: tuple[str, ...]
    """For each start, the chain label whose segment it begins ('' for a flank)."""
    ends: tuple[int, ...]
    """States a protein may end in."""
    stats: SegmentStats | None = field(default=None, compare=False)

    @property
    def num_states(self) -> int:
        return len(self.names)

    def accepts(self, labels: str) -> bool:
        """Whether some state path emits exactly `labels` (a set-of-states simulation, memoised per label)."""
        return _Acceptor.of(self).accepts(labels)


def build_grammar(stats: SegmentStats) -> Grammar:
    """The state space for `stats` (see the module docstring)."""
    names: list[str] = []
    labels: list[int] = []
    edges: list[tuple[int, int]] = []
    enters: list[str] = []
    starts: list[int] = []
    start_enters: list[str] = []
    ends: list[int] = []

    def add_state(name: str, label: str) -> int:
        names.append(name)
        labels.append(LABEL_INDEX[label])
        return len(names) - 1

    # A flank that begins a protein is its own state ('alpha:^I'), apart from the same flank after a chain
    # ('alpha:I'): it may end the protein only where a protein was that flank alone (globular), so no path
    # through the alpha world can be all I or all O (an INVALID type).
    flank_state: dict[tuple[str, str, bool], int] = {}
    for world, before, letter in sorted(stats.flanks):
        first = before == START
        if (world, letter, first) in flank_state:
            continue
        state = flank_state[(world, letter, first)] = add_state(f"{world}:{'^' if first else ''}{letter}", letter)
        edges.append((state, state))
        enters.append("")
        if first:
            starts.append(state)
            start_enters.append("")
        if (world, START if first else "*", letter) in stats.flank_ends:
            ends.append(state)

    # One chain per (world, before, chain label): its last state leads to every label observed after it.
    chains = sorted({(w, b, c) for w, b, c, _ in stats.contexts})
    for world, before, letter in chains:
        lo, hi = stats.lengths[(world, letter)]
        chain = [add_state(f"{world}:{before}>{letter}:{k + 1}", letter) for k in range(hi)]
        entries = chain[: hi - lo + 1]  # entering at position j gives a segment of hi - j + 1 residues
        for a, b in zip(chain, chain[1:]):
            edges.append((a, b))
            enters.append("")
        for entry in entries:
            if before == START:
                starts.append(entry)
                start_enters.append(letter)
            else:
                for first in (True, False):
                    if (world, before, first) in flank_state:
                        edges.append((flank_state[(world, before, first)], entry))
                        enters.append(letter)
        for w, b, c, after in sorted(stats.contexts):
            if (w, b, c) != (world, before, letter):
                continue
            if after == END:
                ends.append(chain[-1])
            elif after in CHAIN_LABELS:
                raise ValueError(f"{world}: a {letter} segment followed directly by a {after} segment; the grammar "
                                 f"only joins chains through a flank (I, O or P)")
            else:
                edges.append((chain[-1], flank_state[(world, after, False)]))
                enters.append("")
    return Grammar(names=tuple(names), labels=tuple(labels), edges=tuple(edges), edge_enters=tuple(enters),
                   starts=tuple(starts), start_enters=tuple(start_enters), ends=tuple(sorted(set(ends))), stats=stats)


class _Acceptor:
    """Set-of-states simulation of a grammar; one step per residue is a dict lookup once memoised."""

    _cache: dict[int, _Acceptor] = {}

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.successors: dict[int, list[int]] = {}
        for a, b in grammar.edges:
            self.successors.setdefault(a, []).append(b)
        self.memo: dict[tuple[frozenset[int], int], frozenset[int]] = {}

    @classmethod
    def of(cls, grammar: Grammar) -> _Acceptor:
        key = id(grammar)
        found = cls._cache.get(key)
        if found is None or found.grammar is not grammar:
            found = cls._cache[key] = cls(grammar)
        return found

    def step(self, current: frozenset[int], label: int) -> frozenset[int]:
        key = (current, label)
        nxt = self.memo.get(key)
        if nxt is None:
            labels = self.grammar.labels
            nxt = frozenset(b for a in current for b in self.successors.get(a, ()) if labels[b] == label)
            self.memo[key] = nxt
        return nxt

    def accepts(self, labels: str) -> bool:
        if not labels:
            return False
        first = LABEL_INDEX[labels[0]]
        current = frozenset(s for s in self.grammar.starts if self.grammar.labels[s] == first)
        for letter in labels[1:]:
            if not current:
                return False
            current = self.step(current, LABEL_INDEX[letter])
        return bool(current & set(self.grammar.ends))


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
    flank_ends=frozenset({("alpha", "*", "I"), ("alpha", "*", "O"), ("beta", "*", "P"), ("globular", START, "I")}),
)


@functools.lru_cache(maxsize=1)
def default_grammar() -> Grammar:
    """The grammar of DEFAULT_STATS (built once per process)."""
    return build_grammar(DEFAULT_STATS)


def format_stats(stats: SegmentStats) -> str:
    rows = [f"{w} {c}: length {lo}-{hi}" for (w, c), (lo, hi) in sorted(stats.lengths.items())]
    rows += [f"{w}: {b} -> [{c}] -> {a}" for w, b, c, a in sorted(stats.contexts)]
    rows += [f"{w}: {b} -> {f} (flank)" for w, b, f in sorted(stats.flanks)]
    rows += [f"{w}: may end in {f} ({'as the whole protein' if b == START else 'after a segment'})"
             for w, b, f in sorted(stats.flank_ends)]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.model.grammar", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", required=True, help="3-line file or partitions JSON")
    parser.add_argument("--folds", nargs="*", default=[], help="folds to derive the statistics from (default: all)")
    args = parser.parse_args(argv)
    records = read_records(args.labels).records
    chosen = [r for r in records if not args.folds or r.fold in args.folds]
    stats = segment_stats((r.type, r.labels) for r in chosen)
    print(f"statistics of {len(chosen)} proteins ({', '.join(args.folds) or 'all folds'}):")
    print(format_stats(stats))
    grammar = build_grammar(stats)
    print(f"grammar: {grammar.num_states} states, {len(grammar.edges)} edges, {len(grammar.starts)} starts, "
          f"{len(grammar.ends)} ends; same as DEFAULT_STATS: {stats == DEFAULT_STATS}")
    rejected = [r for r in records if not grammar.accepts(r.labels)]
    print(f"accepted {len(records) - len(rejected)} of {len(records)} label strings")
    for r in rejected:
        print(f"  rejected {r.id} ({r.fold}, {r.type}): segments {_runs(r.labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
