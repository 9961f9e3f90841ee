"""The ensemble rule: several trained models predicting as one (`Ensemble`), and choosing its entry penalty.

Ensemble rule: every member gives per-residue label posteriors (the softmax of a cross-entropy model, the
marginals of a CRF model), the ensemble averages them and decodes the average with the topology grammar's
Viterbi (fixed moves, `entry_penalty` on entering an M or B segment). Averaging posteriors rather than voting
on whole topologies lets members that are each unsure about one helix agree on it, always yields a grammatical
topology, and works for any mix of decoders; with one member it is that member's posteriors decoded by the
grammar.

`Ensemble` quacks like a `TopologyModel` (forward -> log-posteriors, `decode`, `loss`), so
`loop.predict_labels` / `loop.evaluate` and the predictor run it unchanged. The directory an ensemble is saved
in, and loading it, are `protopo_ray.training.predictor`'s.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from protopo_ray.data.alphabet import IGNORE_LABEL, LABELS
from protopo_ray.model.crf import CRF
from protopo_ray.model.grammar import Grammar, default_grammar
from protopo_ray.model.metrics import aggregate, protein_result
from protopo_ray.model.network import TopologyModel, pad_by_protein

#: Entry penalties tried when one is chosen on validation data (the rule's one free number).
PENALTIES = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
_LETTERS = np.array(list(LABELS))
#: Posteriors are clamped here before the log, so one member's certainty never makes a label impossible.
MIN_PROBABILITY = 1e-6


class Ensemble(nn.Module):
    """Members' averaged label posteriors, decoded with the grammar (see the module docstring)."""

    def __init__(self, members: list[TopologyModel], entry_penalty: float = 0.0) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member checkpoint")
        grammar = members[0].grammar
        if any(m.grammar.stats != grammar.stats for m in members[1:]):
            raise ValueError("ensemble members were built with different topology grammars; they cannot decode as one")
        self.members = nn.ModuleList(members)
        self.entry_penalty = entry_penalty
        self.grammar = grammar
        self.crf = CRF.fixed(grammar, entry_penalty)

    def forward(self, batch) -> Tensor:
        """log of the members' mean label posteriors [N, NUM_LABELS]."""
        return mean_log_posteriors([m.label_posteriors(batch, m(batch).float()) for m in self.members])

    @torch.no_grad()
    def decode(self, batch, logits: Tensor) -> Tensor:
        padded, lengths, index = pad_by_protein(logits.float(), batch)
        return self.crf.decode(padded, lengths)[index]

    def loss(self, batch, logits: Tensor, loss_fn: nn.Module | None = None, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the averaged posteriors (they are log-probabilities, so log_softmax leaves them)."""
        return nn.functional.cross_entropy(logits.float(), batch.y, ignore_index=IGNORE_LABEL, reduction=reduction)

    def label_posteriors(self, batch, logits: Tensor) -> Tensor:
        return logits.float().exp()


def mean_log_posteriors(posteriors: list[Tensor]) -> Tensor:
    """The ensemble rule's average: log of the members' mean per-residue label posteriors (clamped)."""
    return torch.stack(posteriors).mean(0).clamp_min(MIN_PROBABILITY).log()


def grammar_decode(batches: list, log_probs: list[Tensor], penalty: float,
                   grammar: Grammar | None = None) -> list[Tensor]:
    """Grammar Viterbi (fixed moves, `penalty` on entering M or B) of per-residue log-probabilities, batch by batch."""
    crf = CRF.fixed(grammar or default_grammar(), penalty)
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


def choose_entry_penalty(batches: list, log_probs: list[Tensor], penalties: tuple[float, ...] = PENALTIES,
                         grammar: Grammar | None = None) -> tuple[float, dict[float, float], dict[str, float]]:
    """The penalty whose decoding has the best topo_mean on these (validation) batches, ties to the smaller one.
    Returns (penalty, topo_mean by penalty, the chosen penalty's figures)."""
    figures = {p: score(batches, grammar_decode(batches, log_probs, p, grammar)) for p in penalties}
    chosen = max(penalties, key=lambda p: (figures[p]["topo_mean"], -p))
    return chosen, {p: f["topo_mean"] for p, f in figures.items()}, figures[chosen]
