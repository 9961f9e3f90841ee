"""Barrel strands (issue 27 item 4): how many strands the grammar Viterbi calls in each BETA protein, against the
labels, under one or more decodings, from a model's validation posteriors saved once to a file.

    # once: a checkpoint's (or several checkpoints' mean) posteriors of its validation split -> a file
    .venv/bin/python -m tools.quality_strands --checkpoint runs/x/best --save cv1_posteriors.pt
    # then seconds per decoding: strand-count error per BETA protein, BETA topology, topo_mean, overlap
    .venv/bin/python -m tools.quality_strands --posteriors cv1_posteriors.pt \
        --decoding entry_penalty=4,min_loop=4 --decoding entry_penalty=4,min_loop=4,strand_prior=uniform
    # the same for posteriors made from the true labels (every residue's label at probability P, the rest
    # sharing 1 - P, multiplied by log-normal noise): what the grammar does with clear evidence
    .venv/bin/python -m tools.quality_strands --posteriors cv1_posteriors.pt --oracle 0.45 --decoding ...
    # --choose: also the decodings ensemble.choose_decoding picks on these posteriors, with strands paying the
    # entry penalty (the rule before issue 27 item 4) and with their own strand penalty (its figures printed too)

The strand-count error of a protein is |predicted strands - true strands| (predicted: B segments of the decoded
labels, whatever type they make the protein). B posterior mass is reported too: the mean B posterior over
true-strand residues, and over the residues the decoding calls B, which says whether a missed strand had its
evidence in the posteriors (and the decoder dropped it) or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from protopo_ray.data.alphabet import LABEL_INDEX, LABELS
from protopo_ray.model.crf import CRF
from protopo_ray.model.grammar import Decoding, Grammar, build_grammar
from protopo_ray.model.metrics import aggregate, protein_result
from protopo_ray.model.segments import SegmentStats, label_runs

_LETTERS = np.array(list(LABELS))


@dataclass(frozen=True)
class Posteriors:
    """Per protein of a split: id, true labels and [T, NUM_LABELS] log-posteriors; the grammar statistics of the
    model(s) that made them."""

    ids: list[str]
    labels: list[str]
    log_probs: list[torch.Tensor]
    stats: SegmentStats | None

    def save(self, path: str) -> None:
        torch.save({"ids": self.ids, "labels": self.labels, "log_probs": [p.half() for p in self.log_probs],
                    "stats": self.stats.to_json() if self.stats else None}, path)

    @classmethod
    def load(cls, path: str) -> Posteriors:
        raw = torch.load(path, weights_only=False)
        return cls(ids=raw["ids"], labels=raw["labels"], log_probs=[p.float() for p in raw["log_probs"]],
                   stats=SegmentStats.from_json(raw["stats"]) if raw["stats"] else None)


def model_posteriors(checkpoints: list[str], split: str = "val") -> Posteriors:
    """The mean label posteriors of these checkpoints (decoder = viterbi or crf) on the first one's `split`."""
    from protopo_ray.model.ensemble import ensemble_grammar, mean_log_posteriors
    from protopo_ray.training import loop
    from protopo_ray.training.checkpoint import load_checkpoint
    from protopo_ray.training.splits import local_split

    loaded = [load_checkpoint(path) for path in checkpoints]
    models = [c.model().eval() for c in loaded]
    config = loaded[0].config.replace({"data.max_proteins": 0})
    ids, labels, log_probs = [], [], []
    with torch.no_grad():
        for batch in loop.collated(local_split(config, split, mode="memory").eval_batches(0, 1), depth=0):
            lp = mean_log_posteriors([m.label_posteriors(batch, m(batch).float()) for m in models])
            ptr, y = batch.ptr.tolist(), batch.y.numpy()
            for i, protein in enumerate(batch.protein_id):
                ids.append(protein)
                labels.append("".join(_LETTERS[y[ptr[i]:ptr[i + 1]]]))
                log_probs.append(lp[ptr[i]:ptr[i + 1]].clone())
    return Posteriors(ids=ids, labels=labels, log_probs=log_probs, stats=ensemble_grammar(models).stats)


def oracle_posteriors(labels: list[str], p_true: float, noise: float = 0.5, seed: int = 0) -> list[torch.Tensor]:
    """Log-posteriors made from the true labels: the true label at `p_true`, the other five sharing the rest,
    each multiplied by exp(noise x a standard normal) and renormalised."""
    rng = np.random.default_rng(seed)
    out = []
    for string in labels:
        index = np.array([LABEL_INDEX[c] for c in string])
        p = np.full((len(string), len(LABELS)), (1.0 - p_true) / (len(LABELS) - 1))
        p[np.arange(len(string)), index] = p_true
        p *= np.exp(noise * rng.standard_normal(p.shape))
        out.append(torch.tensor(np.log(p / p.sum(1, keepdims=True)), dtype=torch.float32))
    return out


def decode_all(grammar: Grammar, decoding: Decoding, log_probs: list[torch.Tensor], chunk: int = 32) -> list[str]:
    """Grammar Viterbi of every protein's log-posteriors (length-sorted chunks, the least padding)."""
    crf = CRF.fixed(grammar, decoding)
    order = sorted(range(len(log_probs)), key=lambda i: len(log_probs[i]))
    out: list[str] = [""] * len(log_probs)
    for lo in range(0, len(order), chunk):
        part = order[lo:lo + chunk]
        lengths = torch.tensor([len(log_probs[i]) for i in part])
        padded = torch.zeros(len(part), int(lengths.max()), len(LABELS))
        for row, i in enumerate(part):
            padded[row, :len(log_probs[i])] = log_probs[i]
        decoded = crf.decode(padded, lengths).numpy()
        for row, i in enumerate(part):
            out[i] = "".join(_LETTERS[decoded[row, :lengths[row]]])
    return out


def as_batches(posteriors: Posteriors, size: int = 32) -> tuple[list[SimpleNamespace], list[torch.Tensor]]:
    """Length-sorted batches of the saved proteins with what ensemble.choose_decoding reads (y, ptr, batch,
    num_graphs) and their flat log-posteriors."""
    order = sorted(range(len(posteriors.ids)), key=lambda i: len(posteriors.labels[i]))
    batches, log_probs = [], []
    for lo in range(0, len(order), size):
        part = order[lo:lo + size]
        lengths = torch.tensor([len(posteriors.labels[i]) for i in part])
        batches.append(SimpleNamespace(
            y=torch.tensor([LABEL_INDEX[c] for i in part for c in posteriors.labels[i]]),
            ptr=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            batch=torch.repeat_interleave(torch.arange(len(part)), lengths), num_graphs=len(part)))
        log_probs.append(torch.cat([posteriors.log_probs[i] for i in part]))
    return batches, log_probs


def strands(labels: str) -> int:
    return sum(1 for letter, _ in label_runs(labels) if letter == "B")


@dataclass(frozen=True)
class StrandFigures:
    """One decoding's figures: metrics.aggregate's (topo_beta, topo_mean, overlap_acc, ...) and per BETA protein
    (id, true strands, predicted strands, mean B posterior on true strands)."""

    metrics: dict[str, float]
    rows: list[tuple[str, int, int, float]]

    @property
    def mean_error(self) -> float:
        return float(np.mean([abs(p - t) for _, t, p, _ in self.rows])) if self.rows else float("nan")

    @property
    def exact(self) -> int:
        return sum(p == t for _, t, p, _ in self.rows)


def strand_figures(posteriors: Posteriors, decoded: list[str]) -> StrandFigures:
    results = [protein_result(t, p, protein_id=i) for i, t, p in zip(posteriors.ids, posteriors.labels, decoded)]
    rows = []
    for i, true, pred, lp, result in zip(posteriors.ids, posteriors.labels, decoded, posteriors.log_probs, results):
        if result.true_type != "BETA":
            continue
        on_strand = torch.tensor([c == "B" for c in true])
        b_mass = float(lp[on_strand, LABEL_INDEX["B"]].exp().mean())
        rows.append((i, strands(true), strands(pred), b_mass))
    return StrandFigures(metrics=aggregate(results), rows=rows)


def parse_decoding(text: str) -> Decoding:
    """'entry_penalty=4,min_loop=4' -> Decoding (unnamed fields at their defaults)."""
    values: dict[str, str] = dict(part.split("=", 1) for part in text.split(",") if part)
    types = {f.name: f.type for f in dataclasses.fields(Decoding)}
    unknown = set(values) - set(types)
    if unknown:
        raise SystemExit(f"--decoding {text!r}: unknown field(s) {sorted(unknown)}; Decoding has {sorted(types)}")
    return Decoding.from_json(values)


def format_figures(name: str, figures: StrandFigures) -> str:
    m = figures.metrics
    rows = [f"{name}: strand error mean {figures.mean_error:.2f}, exact {figures.exact}/{len(figures.rows)}, "
            f"BETA topology {m['topo_beta']:.3f}, type_beta {m['type_beta']:.3f}, topo_mean {m['topo_mean']:.3f} "
            f"(TM {m['topo_tm']:.3f} SP+TM {m['topo_sptm']:.3f} SP {m['topo_sp']:.3f} GLOB {m['topo_glob']:.3f}), "
            f"overlap {m['overlap_acc']:.3f}"]
    rows.append("  true -> predicted strands (mean B posterior on true strands): " + ", ".join(
        f"{t}->{p} ({b:.2f})" for _, t, p, b in sorted(figures.rows, key=lambda r: (-r[1], r[0]))))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.quality_strands", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="*", default=[], help="checkpoint(s) whose mean posteriors to use")
    parser.add_argument("--split", default="val", help="split of the first checkpoint's config (default val)")
    parser.add_argument("--save", help="write the posteriors here (then --posteriors reads them)")
    parser.add_argument("--posteriors", help="posteriors saved with --save")
    parser.add_argument("--decoding", action="append", default=[], help="k=v,... Decoding fields (repeatable)")
    parser.add_argument("--oracle", type=float, help="decode true-label posteriors at this probability instead")
    parser.add_argument("--choose", action="store_true",
                        help="also ensemble.choose_decoding's picks, without and with a strand penalty")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.checkpoint:
        posteriors = model_posteriors(args.checkpoint, args.split)
        if args.save:
            posteriors.save(args.save)
            print(f"saved {len(posteriors.ids)} proteins' posteriors to {args.save}")
    elif args.posteriors:
        posteriors = Posteriors.load(args.posteriors)
    else:
        parser.error("give --checkpoint or --posteriors")
    if args.oracle is not None:
        posteriors = dataclasses.replace(posteriors, log_probs=oracle_posteriors(posteriors.labels, args.oracle))
    if posteriors.stats is None:
        raise SystemExit("these posteriors carry no segment statistics (a checkpoint from before lengths were "
                         "evidence); re-save them from a newer checkpoint")
    grammar = build_grammar(posteriors.stats)
    decodings = [parse_decoding(text) for text in args.decoding] or [Decoding()]
    for decoding in decodings:
        print(format_figures(str(decoding.to_json()), strand_figures(posteriors, decode_all(grammar, decoding,
                                                                                                posteriors.log_probs))))
    if args.choose:
        from protopo_ray.model.ensemble import STRAND_PENALTIES, choose_decoding
        batches, log_probs = as_batches(posteriors)
        for name, grid in (("chosen, strands paying the entry penalty (before)", (None,)),
                           ("chosen with a strand penalty", STRAND_PENALTIES)):
            chosen = choose_decoding(batches, log_probs, grammar, start=decodings[0], strand_penalties=grid).decoding
            print(format_figures(f"{name} {chosen.to_json()}", strand_figures(
                posteriors, decode_all(grammar, chosen, posteriors.log_probs))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
