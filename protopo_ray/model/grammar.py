"""Topology grammar: which per-residue label strings are proteins, as a finite state space for a CRF.

The grammar is read off labelled proteins (`segment_stats`), not guessed: every protein belongs to one *world*
(alpha: TM, SP+TM, SP; beta: BETA; globular: GLOBULAR) and worlds never mix. Inside a world, the labels S, M
and B (the segments the metrics score with a minimum overlap) are *chains*: a segment of such a label is a run
of chain states whose length lies in the range observed for that label in that world, with the label that comes
before and after it as observed (I before M leads to O after it, O before M to I, P before B to O, ...). The
other labels (I, O, P) are *flanks*, any length.

A chain of maximum length n has states c_1..c_n; a segment of length L enters at c_(n-L+1) and leaves from
c_n. Entering at different positions (rather than leaving from them) keeps every state's number of
predecessors at <= 3, which is what keeps the CRF's forward pass cheap (`crf.py` gathers predecessors).

Segment lengths are evidence too: the grammar scores every path by the log-probability of its segments'
lengths as the training folds have them (`edge_priors`, `start_priors`; the decode-only CRF weighs them with
`model.duration_weight`). A chain's length is its entry point's (add-one smoothed over the observed range). A
flank between two chains (an inner loop) runs through duration states l_1..l_m entered the same way (lengths
1..m exactly, m = `SegmentStats.loop_states`) or through a state l_> that loops with the geometric tail of
longer loops; a flank that ends the protein is a free self-looping tail state, and one that begins it a free
self-looping state: only the loops between membrane and signal segments carry lengths, so a hydrophobic
stretch split by a one-residue "loop" (0.2 % of the training folds' inner loops) pays for it.

    python -m protopo_ray.model.grammar --labels ../shared/data/deeptmhmm/DeepTMHMM.partitions.json --folds cv0 cv3 cv4

prints the statistics of those folds and checks every protein of the file against the grammar built from them.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from protopo_ray.data.alphabet import LABEL_INDEX
from protopo_ray.data.records import read_records
from protopo_ray.model.segments import (
    CHAIN_LABELS,
    DEFAULT_STATS,
    END,
    START,
    SegmentStats,
    format_stats,
    label_runs,
    segment_stats,
)

#: Chain labels the decode-only entry penalty applies to: entering a membrane segment.
MEMBRANE_LABELS = "MB"


@dataclass(frozen=True, kw_only=True, slots=True)
class Decoding:
    """The decode-only grammar Viterbi's free numbers (`crf.CRF.fixed`), chosen on validation folds."""

    entry_penalty: float = 0.0
    """Log-score cost of entering an M or B segment."""
    duration_weight: float = 1.0
    """Weight of the segment-length log-priors (0: any length in range at no cost)."""
    beta_offset: float = 0.0
    """Log-score added once to every path through the beta world: protein-level evidence for a barrel that
    per-residue posteriors, dominated by the alpha and globular proteins they were trained on, underweigh."""
    min_loop: int = 1
    """Shortest loop allowed between two membrane helices (alpha world; beta turns stay free). A hard floor
    beside the soft length priors: an over-confident M posterior through a short helix-helix turn outweighs the
    prior against a one-residue loop, and a floor places the turn where the model least believes M instead."""
    rule: str = "mean"
    """Ensembles: mean (decode the members' mean posteriors) or vote (each member decodes; the topology most
    members agree on wins, ties to the likeliest under the mean posteriors)."""
    strand_penalty: float | None = None
    """Log-score cost of entering a B segment (None: `entry_penalty`, as before this field existed). Apart from
    the helices' because it is paid once per strand: a 22-strand barrel pays it 22 times against a path with a
    few strands fewer, on top of the ~2 nats each strand's and loop's length prior costs, so a penalty chosen for
    helices (alpha proteins outnumber barrels 40 to 1 in validation) under-calls barrels. May be negative: a bonus
    per strand where the network's B posteriors are too weak to pay the length priors (issue 27 item 4)."""

    def __post_init__(self) -> None:
        if self.rule not in ("mean", "vote"):
            raise ValueError(f"decoding rule must be mean or vote, got {self.rule!r}")
        if self.strand_penalty is not None and not math.isfinite(self.strand_penalty):
            raise ValueError(f"decoding strand_penalty must be a finite number or None, got {self.strand_penalty}")

    def entry_cost(self, label: str) -> float:
        """The log-score cost of entering a segment of `label` ('' for moves that enter none)."""
        if label == "B" and self.strand_penalty is not None:
            return self.strand_penalty
        return self.entry_penalty if label and label in MEMBRANE_LABELS else 0.0

    def to_json(self) -> dict[str, float | str | None]:
        return {"entry_penalty": self.entry_penalty, "duration_weight": self.duration_weight,
                "beta_offset": self.beta_offset, "min_loop": self.min_loop, "rule": self.rule,
                "strand_penalty": self.strand_penalty}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> Decoding:
        """The inverse of `to_json`; fields a file does not name (one written before they existed) take their
        defaults, which decode as that file's writer did."""
        names = ("entry_penalty", "duration_weight", "beta_offset")
        strand = values.get("strand_penalty")
        return cls(**{k: float(values[k]) for k in names if k in values}, min_loop=int(values.get("min_loop", 1)),
                   rule=str(values.get("rule", "mean")),
                   strand_penalty=None if strand in (None, "", "none", "None") else float(strand))


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
    edge_priors: tuple[float, ...] = ()
    """For each edge, the log-probability of the segment length it commits to (0 for the others)."""
    start_priors: tuple[float, ...] = ()
    """For each start, the same for a protein that begins with a chain."""
    start_worlds: tuple[str, ...] = ()
    """For each start, the world its paths belong to."""
    edge_helix_loops: tuple[int, ...] = ()
    """For each edge, the length of the loop between two membrane helices it commits to (loop_states + 1 for the
    longer ones; 0 for every other edge): what `Decoding.min_loop` forbids."""
    stats: SegmentStats | None = field(default=None, compare=False)

    @property
    def num_states(self) -> int:
        return len(self.names)

    def accepts(self, labels: str) -> bool:
        """Whether some state path emits exactly `labels` (a set-of-states simulation, memoised per label)."""
        return _Acceptor.of(self).accepts(labels)


def _log_probs(counts: dict[int, int], outcomes: Iterable[int]) -> dict[int, float]:
    """Add-one smoothed log-probabilities of `outcomes` from their counts."""
    outcomes = list(outcomes)
    total = sum(counts.get(o, 0) for o in outcomes) + len(outcomes)
    return {o: math.log((counts.get(o, 0) + 1) / total) for o in outcomes}


def build_grammar(stats: SegmentStats) -> Grammar:
    """The state space for `stats` (see the module docstring)."""
    names: list[str] = []
    labels: list[int] = []
    edges: list[tuple[int, int]] = []
    enters: list[str] = []
    priors: list[float] = []
    helix_loops: list[int] = []
    starts: list[int] = []
    start_enters: list[str] = []
    start_priors: list[float] = []
    start_worlds: list[str] = []
    ends: list[int] = []

    def add_state(name: str, label: str) -> int:
        names.append(name)
        labels.append(LABEL_INDEX[label])
        return len(names) - 1

    def add_edge(a: int, b: int, enter: str = "", prior: float = 0.0, helix_loop: int = 0) -> None:
        edges.append((a, b))
        enters.append(enter)
        priors.append(prior)
        helix_loops.append(helix_loop)

    # A flank that begins a protein is its own state ('alpha:^I'), apart from the same flank after a chain: it
    # may end the protein only where a protein was that flank alone (globular), so no path through the alpha world
    # can be all I or all O (an INVALID type). After a chain a flank is an inner loop (duration states, leading to
    # the next chain) or the protein's tail (free, ending it); without loop counts, one state that is both.
    first_state: dict[tuple[str, str], int] = {}
    loop_exit: dict[tuple[str, str], int] = {}  # the state an inner loop leaves from towards the next chain
    loop_entries: dict[tuple[str, str], list[tuple[int, float, int]]] = {}  # (state, log-prior, length) to enter
    tail_state: dict[tuple[str, str], tuple[int, set[str]]] = {}  # (tail state, chains it may follow)
    m = stats.loop_states
    for world, before, letter in sorted(stats.flanks):
        key = (world, letter)
        if before == START:
            if key in first_state:
                continue
            state = first_state[key] = add_state(f"{world}:^{letter}", letter)
            add_edge(state, state)
            starts.append(state)
            start_enters.append("")
            start_priors.append(0.0)
            start_worlds.append(world)
            if (world, START, letter) in stats.flank_ends:
                ends.append(state)
            continue
        if key in loop_entries:
            continue
        # The chains this flank ended a protein after (a beta protein's periplasmic tail follows a strand, never
        # its signal peptide): a free tail state entered from those only.
        ends_after = {b for w, b, f in stats.flank_ends if (w, f) == key and b != START}
        if not stats.chain_counts:  # statistics recorded without lengths: one free state, loop and tail
            state = add_state(f"{world}:{letter}", letter)
            add_edge(state, state)
            if ends_after:
                ends.append(state)
            loop_exit[key], loop_entries[key] = state, [(state, 0.0, 0)]
            continue
        loop_entries[key] = []
        if ends_after:
            tail = add_state(f"{world}:{letter}$", letter)
            add_edge(tail, tail)
            ends.append(tail)
            tail_state[key] = (tail, ends_after)
        if key not in stats.loop_counts and key not in stats.loop_tails:  # never between two chains: a tail only
            continue
        # Inner loop: l_1..l_m entered at l_(m-L+1) for a loop of L <= m residues, or l_> (a geometric number of
        # residues, the tail's mean) then l_1..l_m for longer ones; it leaves from l_m.
        counts, (longer, excess) = stats.loop_counts.get(key, {}), stats.loop_tails.get(key, (0, 0))
        logp = _log_probs({**counts, m + 1: longer}, range(1, m + 2))
        stay = 1.0 - 1.0 / max(excess / longer, 1.0) if longer else 0.5
        chain = [add_state(f"{world}:{letter}~{k + 1}", letter) for k in range(m)]
        over = add_state(f"{world}:{letter}~>", letter)
        for a, b in zip(chain, chain[1:]):
            add_edge(a, b)
        add_edge(over, over, prior=math.log(max(stay, 1e-6)))
        add_edge(over, chain[0], prior=math.log(max(1.0 - stay, 1e-6)))
        loop_exit[key] = chain[-1]
        loop_entries[key] = [(chain[k], logp[m - k], m - k) for k in range(m)] + [(over, logp[m + 1], m + 1)]

    # One chain per (world, before, chain label): its last state leads to every label observed after it.
    chains = sorted({(w, b, c) for w, b, c, _ in stats.contexts})
    for world, before, letter in chains:
        lo, hi = stats.lengths[(world, letter)]
        counts = stats.chain_counts.get((world, letter))
        logp = _log_probs(counts, range(lo, hi + 1)) if counts else dict.fromkeys(range(lo, hi + 1), 0.0)
        chain = [add_state(f"{world}:{before}>{letter}:{k + 1}", letter) for k in range(hi)]
        for a, b in zip(chain, chain[1:]):
            add_edge(a, b)
        for j, entry in enumerate(chain[: hi - lo + 1]):  # entering at position j gives a segment of hi - j residues
            if before == START:
                starts.append(entry)
                start_enters.append(letter)
                start_priors.append(logp[hi - j])
                start_worlds.append(world)
                continue
            for source in (first_state.get((world, before)), loop_exit.get((world, before))):
                if source is not None:
                    add_edge(source, entry, letter, logp[hi - j])
        for w, b, c, after in sorted(stats.contexts):
            if (w, b, c) != (world, before, letter):
                continue
            if after == END:
                ends.append(chain[-1])
            elif after in CHAIN_LABELS:
                raise ValueError(f"{world}: a {letter} segment followed directly by a {after} segment; the grammar "
                                 f"only joins chains through a flank (I, O or P)")
            else:
                for state, prior, length in loop_entries[(world, after)]:
                    add_edge(chain[-1], state, prior=prior, helix_loop=length if letter == "M" else 0)
                tail, ends_after = tail_state.get((world, after), (None, set()))
                if tail is not None and (letter in ends_after or "*" in ends_after):
                    add_edge(chain[-1], tail)
    return Grammar(names=tuple(names), labels=tuple(labels), edges=tuple(edges), edge_enters=tuple(enters),
                   starts=tuple(starts), start_enters=tuple(start_enters), ends=tuple(sorted(set(ends))),
                   edge_priors=tuple(priors), start_priors=tuple(start_priors), start_worlds=tuple(start_worlds),
                   edge_helix_loops=tuple(helix_loops), stats=stats)


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


@functools.lru_cache(maxsize=1)
def default_grammar() -> Grammar:
    """The grammar of DEFAULT_STATS (built once per process)."""
    return build_grammar(DEFAULT_STATS)


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
        print(f"  rejected {r.id} ({r.fold}, {r.type}): segments {label_runs(r.labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
