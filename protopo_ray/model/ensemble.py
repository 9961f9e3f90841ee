"""The ensemble rule: several trained models predicting as one (`Ensemble`), and choosing how it decodes.

Every member gives per-residue label posteriors (the softmax of a cross-entropy model, the marginals of a CRF
model). Two rules turn them into one topology, both through the topology grammar's Viterbi with fixed scores
(`grammar.Decoding`: entry penalty, segment-length priors, beta-world offset):
- mean: decode the members' mean posteriors. Members that are each unsure about one helix can agree on it, and
  any mix of decoders works; with one member it is that member's posteriors decoded by the grammar.
- vote (DeepTMHMM's): every member decodes its own posteriors; the topology most members agree on wins, ties to
  the likeliest under the mean posteriors. A member's confident mistake counts once, not in proportion to its
  confidence.

`Ensemble` quacks like a `TopologyModel` (forward -> log-posteriors, `decode`, `loss`), so
`loop.predict_labels` / `loop.evaluate` and the predictor run it unchanged. The directory an ensemble is saved
in, and loading it, are `protopo_ray.training.predictor`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from protopo_ray.data.alphabet import IGNORE_LABEL, LABELS
from protopo_ray.model.crf import CRF
from protopo_ray.model.grammar import Decoding, Grammar, build_grammar, default_grammar
from protopo_ray.model.metrics import aggregate, protein_result, topology_match
from protopo_ray.model.network import TopologyModel, pad_by_protein

#: Entry penalties tried when one is chosen on validation data.
PENALTIES = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
#: Beta-world offsets tried at the chosen penalty (0 first: a tie keeps the grammar as it is).
BETA_OFFSETS = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0)
#: Floors on helix-helix loops tried at the chosen penalty (1: no floor).
MIN_LOOPS = (1, 2, 3, 4, 5)
#: Strand entry costs tried at the chosen penalty and floor (None first: the entry penalty, as before; negative
#: values are a bonus per strand, see `grammar.Decoding.strand_penalty`).
STRAND_PENALTIES: tuple[float | None, ...] = (None, 4.0, 2.0, 0.0, -2.0, -4.0, -6.0, -8.0)
_LETTERS = np.array(list(LABELS))
#: Posteriors are clamped here before the log, so one member's certainty never makes a label impossible.
MIN_PROBABILITY = 1e-6


class Ensemble(nn.Module):
    """Members predicting as one: their mean label posteriors decoded with the grammar (`decoding.rule` = mean), or
    each member's own decoding put to a vote (rule = vote), see the module docstring.

    `forward` returns [N, 1 + members, NUM_LABELS]: the log of the members' mean posteriors, then each member's
    log posteriors; `decode`, `loss` and `label_posteriors` read it, so it quacks like a `TopologyModel`.
    """

    def __init__(self, members: list[TopologyModel], decoding: Decoding | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member checkpoint")
        # Members trained on other folds read other grammars off them: the ensemble decodes with all they saw.
        grammar = ensemble_grammar(members)
        self.members = nn.ModuleList(members)
        self.decoding = decoding or Decoding()
        self.grammar = grammar
        self.crf = CRF.fixed(grammar, self.decoding)

    def forward(self, batch) -> Tensor:
        posteriors = [m.label_posteriors(batch, m(batch).float()) for m in self.members]
        each = torch.stack(posteriors, dim=1).clamp_min(MIN_PROBABILITY).log()
        return torch.cat([mean_log_posteriors(posteriors)[:, None], each], dim=1)

    @torch.no_grad()
    def decode(self, batch, logits: Tensor) -> Tensor:
        if self.decoding.rule == "mean":
            padded, lengths, index = pad_by_protein(logits[:, 0].float(), batch)
            return self.crf.decode(padded, lengths)[index]
        return vote(batch, logits[:, 0], [self._decode_one(batch, logits[:, 1 + k]) for k in range(len(self.members))])

    def _decode_one(self, batch, log_probs: Tensor) -> Tensor:
        padded, lengths, index = pad_by_protein(log_probs.float(), batch)
        return self.crf.decode(padded, lengths)[index]

    def loss(self, batch, logits: Tensor, loss_fn: nn.Module | None = None, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the averaged posteriors (they are log-probabilities, so log_softmax leaves them)."""
        return nn.functional.cross_entropy(logits[:, 0].float(), batch.y, ignore_index=IGNORE_LABEL,
                                           reduction=reduction)

    def label_posteriors(self, batch, logits: Tensor) -> Tensor:
        return logits[:, 0].float().exp()


def ensemble_grammar(members: list[TopologyModel]) -> Grammar:
    """The grammar of the members' segment statistics together (the first member's when one has none)."""
    stats = [m.grammar.stats for m in members]
    if any(s is None for s in stats) or all(s == stats[0] for s in stats):
        return members[0].grammar
    return build_grammar(stats[0].merged(*stats[1:]))


def mean_log_posteriors(posteriors: list[Tensor]) -> Tensor:
    """The ensemble rule's average: log of the members' mean per-residue label posteriors (clamped)."""
    return torch.stack(posteriors).mean(0).clamp_min(MIN_PROBABILITY).log()


def vote(batch, mean_log_probs: Tensor, decoded: list[Tensor]) -> Tensor:
    """Per protein, the members' decoded topologies put to a vote: a topology's votes are the members whose
    prediction matches it (`metrics.topology_match`: same segments in order, each overlapping); the most votes
    win, ties the likeliest under the mean posteriors. Returns the winning member's labels, flat like `batch.y`."""
    ptr = batch.ptr.tolist()
    out = decoded[0].clone()
    for i in range(int(batch.num_graphs)):
        lo, hi = ptr[i], ptr[i + 1]
        candidates = [d[lo:hi] for d in decoded]
        strings = ["".join(_LETTERS[c.numpy()]) for c in candidates]
        votes = [sum(topology_match(a, b) for b in strings) for a in strings]
        likelihood = [float(mean_log_probs[lo:hi].gather(1, c[:, None]).sum()) for c in candidates]
        best = max(range(len(candidates)), key=lambda k: (votes[k], likelihood[k]))
        out[lo:hi] = candidates[best]
    return out


def grammar_decode(batches: list, log_probs: list[Tensor], decoding: Decoding,
                   grammar: Grammar | None = None) -> list[Tensor]:
    """Grammar Viterbi with fixed scores (`decoding`) of per-residue log-probabilities, batch by batch."""
    crf = CRF.fixed(grammar or default_grammar(), decoding)
    decoded = []
    for batch, lp in zip(batches, log_probs):
        padded, lengths, index = pad_by_protein(lp, batch)
        decoded.append(crf.decode(padded, lengths)[index])
    return decoded


def score(batches: list, decoded: list[Tensor]) -> dict[str, float]:
    """The project's metrics (`metrics.aggregate`) of decoded labels against the batches' labelled proteins."""
    results = []
    for batch, pred in zip(batches, decoded):
        y, pred, ptr = batch.y.numpy(), pred.numpy(), batch.ptr.numpy()
        for i in range(int(batch.num_graphs)):
            lo, hi = ptr[i], ptr[i + 1]
            if (y[lo:hi] != IGNORE_LABEL).all():
                results.append(protein_result("".join(_LETTERS[y[lo:hi]]), "".join(_LETTERS[pred[lo:hi]])))
    return aggregate(results)


@dataclass(kw_only=True)
class DecodingChoice:
    """What `choose_decoding` chose, and the validation topo_mean of every setting it tried."""

    decoding: Decoding
    figures: dict[str, float]
    """The chosen setting's metrics."""
    topo_mean: dict[str, float] = field(default_factory=dict)
    """"penalty=8 loop=3 beta=0" -> topo_mean, for every setting tried."""


def choose_decoding(batches: list, log_probs: list[Tensor], grammar: Grammar | None = None,
                    start: Decoding | None = None, penalties: tuple[float, ...] = PENALTIES,
                    beta_offsets: tuple[float, ...] = BETA_OFFSETS,
                    min_loops: tuple[int, ...] = MIN_LOOPS,
                    strand_penalties: tuple[float | None, ...] = STRAND_PENALTIES) -> DecodingChoice:
    """The decoding with the best topo_mean on these (validation) batches, one number at a time: the entry
    penalty (at no beta offset, strands paying it too), the helix-loop floor at that penalty, the penalty again
    at that floor, the strand penalty, then the beta offset; ties go to the smaller number (the strand penalty's
    to None: strands pay the entry penalty). `start` gives the other settings (duration weight, rule); pass a
    one-value tuple to hold a number fixed."""
    start = start or Decoding()
    tried: dict[Decoding, dict[str, float]] = {}

    def best(options: list[Decoding]) -> Decoding:
        for option in options:
            if option not in tried:
                tried[option] = score(batches, grammar_decode(batches, log_probs, option, grammar))
        return max(options, key=lambda d: (tried[d]["topo_mean"], -d.entry_penalty, -d.min_loop, -d.beta_offset,
                                           d.strand_penalty is None))

    start = dataclasses.replace(start, beta_offset=0.0, min_loop=min_loops[0], strand_penalty=strand_penalties[0])
    chosen = best([dataclasses.replace(start, entry_penalty=p) for p in penalties])
    if len(min_loops) > 1:
        chosen = best([dataclasses.replace(chosen, min_loop=n) for n in min_loops])
        chosen = best([dataclasses.replace(chosen, entry_penalty=p) for p in penalties])
    chosen = best([dataclasses.replace(chosen, strand_penalty=s) for s in strand_penalties])
    chosen = best([dataclasses.replace(chosen, beta_offset=b) for b in beta_offsets])
    return DecodingChoice(decoding=chosen, figures=tried[chosen],
                          topo_mean={_setting(d): f["topo_mean"] for d, f in tried.items()})


def _setting(d: Decoding) -> str:
    """A decoding's chosen numbers as one key, e.g. "penalty=8 loop=3 beta=0" (+ " strand=-4" when set)."""
    strand = "" if d.strand_penalty is None else f" strand={d.strand_penalty:g}"
    return f"penalty={d.entry_penalty:g} loop={d.min_loop} beta={d.beta_offset:g}{strand}"
