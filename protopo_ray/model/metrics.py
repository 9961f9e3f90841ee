"""Exact protein-level metrics on label strings (I O P S M B), shared by training, tuning, reporting and prediction.

The reference project's figures came from code that appended topology matches twice per protein (so they no
longer lined up with the proteins) and that counted a prediction of an INVALID type as correct. Here every
protein is scored once, by `protein_result`, into a small picklable `ProteinResult`; `aggregate` turns any
collection of those into the metrics, so distributed workers can score their shard and the driver can combine
the gathered results into exactly what a single pass over all proteins would give.

Rules (DeepTMHMM's):
- protein type: B -> BETA; else S and M -> SP+TM; else M -> TM; else S -> SP; else only I -> GLOBULAR;
  anything else (only O/P, I with O/P but no M, empty) -> INVALID, which is never counted correct.
- topology match: same number of segments, same letters in order (O and P interchangeable), and every S or M
  segment overlaps its counterpart by >= 5 residues, every B segment by >= 3.
- per-type topology accuracy: for TM, SP+TM, BETA the predicted type must equal the true type and the topology
  must match; for SP and GLOBULAR the right type suffices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import groupby
from typing import NamedTuple

from protopo_ray.data.alphabet import INVALID_TYPE, LABELS, PROTEIN_TYPES, protein_type  # the one type rule

#: Short key suffix for each protein type, as used in metric names (topo_tm, type_sptm, n_glob, ...).
TYPE_KEYS = {"TM": "tm", "SP+TM": "sptm", "SP": "sp", "GLOBULAR": "glob", "BETA": "beta"}

#: The 14 metric keys, in report order; `protein_metrics` also returns the n_* counts. topo_mean (per-type topology
#: accuracy averaged over the types present) weighs the rare membrane types like the common ones, which
#: overlap_acc (dominated by 400 globular proteins per fold) does not: a search metric for what users care about.
METRIC_KEYS = (
    *(f"topo_{k}" for k in TYPE_KEYS.values()),
    *(f"type_{k}" for k in TYPE_KEYS.values()),
    "type_acc",
    "overlap_acc",
    "residue_acc",
    "topo_mean",
)

#: Minimum overlap (residues) between a true and a predicted segment for the topology to match.
MIN_OVERLAP = {"S": 5, "M": 5, "B": 3}

#: Types whose topology accuracy also needs the segments to match (for SP and GLOBULAR the type suffices).
_TOPOLOGY_TYPES = frozenset({"TM", "SP+TM", "BETA"})
_VALID_LETTERS = frozenset(LABELS)


class ProteinResult(NamedTuple):
    """One protein's score: everything `aggregate` needs, and nothing more (a plain tuple when pickled)."""

    true_type: str
    pred_type: str
    match: bool
    """Topology match (see module docstring); implies pred_type == true_type."""
    num_correct_residues: int
    num_residues: int


def segments(labels: str) -> list[tuple[str, int, int]]:
    """Maximal runs of one letter as (letter, start, end), end exclusive; the last ends at len(labels)."""
    runs = []
    start = 0
    for letter, group in groupby(labels):
        end = start + sum(1 for _ in group)
        runs.append((letter, start, end))
        start = end
    return runs


def _same_letter(a: str, b: str) -> bool:
    # O (outside) and P (periplasm) are both "not inside" and may stand for each other.
    return a == b or {a, b} == {"O", "P"}


def topology_match(true: str, pred: str) -> bool:
    """Whether the predicted segments line up with the true ones (see module docstring for the rule)."""
    true_segments, pred_segments = segments(true), segments(pred)
    if len(true_segments) != len(pred_segments):
        return False
    for (t, t_start, t_end), (p, p_start, p_end) in zip(true_segments, pred_segments):
        if not _same_letter(t, p):
            return False
        min_overlap = MIN_OVERLAP.get(t)
        if min_overlap is not None and min(t_end, p_end) - max(t_start, p_start) < min_overlap:
            return False
    return True


def _where(index: int | None, protein_id: str | None) -> str:
    parts = []
    if index is not None:
        parts.append(f"protein {index}")
    if protein_id is not None:
        parts.append(f"id {protein_id!r}")
    return f"{', '.join(parts)}: " if parts else ""


def _check_letters(labels: str, what: str, where: str) -> None:
    if not isinstance(labels, str):
        raise ValueError(f"{where}{what} labels must be a string of {LABELS}, got {type(labels).__name__}")
    bad = set(labels) - _VALID_LETTERS
    if bad:
        position = min(labels.index(c) for c in bad)
        raise ValueError(
            f"{where}{what} labels contain unknown letter(s) {''.join(sorted(bad))!r} "
            f"(first at residue {position}); expected only {LABELS}"
        )


def protein_result(true: str, pred: str, *, index: int | None = None, protein_id: str | None = None) -> ProteinResult:
    """Score one protein. `index` and `protein_id` only serve to say where an error is.

    Raises ValueError on unknown letters, on a length mismatch, and on a truth without a valid type.
    """
    where = _where(index, protein_id)
    _check_letters(true, "true", where)
    _check_letters(pred, "predicted", where)
    if len(true) != len(pred):
        raise ValueError(f"{where}true labels have {len(true)} residues but the prediction has {len(pred)}")
    true_type = protein_type(true)
    if true_type == INVALID_TYPE:
        shown = true if len(true) <= 40 else true[:40] + "..."
        raise ValueError(f"{where}true labels {shown!r} have no valid protein type (one of {PROTEIN_TYPES})")
    pred_type = protein_type(pred)
    return ProteinResult(
        true_type=true_type,
        pred_type=pred_type,
        match=pred_type != INVALID_TYPE and topology_match(true, pred),
        num_correct_residues=sum(t == p for t, p in zip(true, pred)),
        num_residues=len(true),
    )


def _share(hits: int, total: int) -> float:
    return hits / total if total else math.nan


def aggregate(results: Iterable[ProteinResult]) -> dict[str, float]:
    """Metrics over any collection of per-protein results (order and splitting do not matter)."""
    count = dict.fromkeys(PROTEIN_TYPES, 0)
    type_hits = dict.fromkeys(PROTEIN_TYPES, 0)
    topo_hits = dict.fromkeys(PROTEIN_TYPES, 0)
    num_proteins = num_matches = num_residues = num_correct = 0
    for r in results:
        t = r.true_type
        if t not in count:
            raise ValueError(f"result for a protein of true type {t!r}; expected one of {PROTEIN_TYPES}")
        count[t] += 1
        type_ok = r.pred_type == t  # an INVALID prediction never equals a (valid) true type
        type_hits[t] += type_ok
        topo_hits[t] += type_ok and (r.match or t not in _TOPOLOGY_TYPES)
        num_proteins += 1
        num_matches += r.match
        num_residues += r.num_residues
        num_correct += r.num_correct_residues

    metrics: dict[str, float] = {}
    for t, k in TYPE_KEYS.items():
        metrics[f"topo_{k}"] = _share(topo_hits[t], count[t])
    for t, k in TYPE_KEYS.items():
        metrics[f"type_{k}"] = _share(type_hits[t], count[t])
    present = [metrics[f"type_{k}"] for t, k in TYPE_KEYS.items() if count[t]]
    metrics["type_acc"] = sum(present) / len(present) if present else math.nan
    metrics["overlap_acc"] = _share(num_matches, num_proteins)
    metrics["residue_acc"] = _share(num_correct, num_residues)
    present_topo = [metrics[f"topo_{k}"] for t, k in TYPE_KEYS.items() if count[t]]
    metrics["topo_mean"] = sum(present_topo) / len(present_topo) if present_topo else math.nan
    for t, k in TYPE_KEYS.items():
        metrics[f"n_{k}"] = count[t]
    metrics["n_proteins"] = num_proteins
    metrics["n_residues"] = num_residues
    return metrics


def protein_metrics(
    true_labels: Sequence[str], pred_labels: Sequence[str], *, ids: Sequence[str] | None = None
) -> dict[str, float]:
    """All metrics for paired truth/prediction label strings; NaN for a type absent from the truth."""
    if len(true_labels) != len(pred_labels):
        raise ValueError(f"{len(true_labels)} true label strings but {len(pred_labels)} predictions")
    if ids is not None and len(ids) != len(true_labels):
        raise ValueError(f"{len(ids)} ids for {len(true_labels)} proteins")
    return aggregate(
        protein_result(t, p, index=i, protein_id=None if ids is None else ids[i])
        for i, (t, p) in enumerate(zip(true_labels, pred_labels))
    )


def _fmt(value: float) -> str:
    return "n/a (absent)" if math.isnan(value) else f"{value:.4f}"


def format_metrics(metrics: dict[str, float]) -> str:
    """A small table: one row per protein type (topology accuracy, type accuracy, count), then the totals."""
    rows = [f"{'type':<10} {'topology':>13} {'type acc':>13} {'count':>7}"]
    for t, k in TYPE_KEYS.items():
        count = metrics.get(f"n_{k}")
        rows.append(
            f"{t:<10} {_fmt(metrics[f'topo_{k}']):>13} {_fmt(metrics[f'type_{k}']):>13} "
            f"{'' if count is None else int(count):>7}"
        )
    rows.append(f"type_acc (mean over present types) {_fmt(metrics['type_acc'])}")
    rows.append(f"overlap_acc (topology, all proteins) {_fmt(metrics['overlap_acc'])}")
    rows.append(f"residue_acc {_fmt(metrics['residue_acc'])}")
    if "n_proteins" in metrics:
        rows.append(f"{int(metrics['n_proteins'])} proteins, {int(metrics['n_residues'])} residues")
    return "\n".join(rows)
