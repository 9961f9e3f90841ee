"""Rescore the reference project's test predictions with our exact metrics and compare with its own figures.

    .venv/bin/python tools/rescore_reference.py [PREDICTIONS_JSON] [--out rescored.json]

PREDICTIONS_JSON is {id: {"prediction": [ints], "label": [ints], "Type prediction", "Type label", "Match"}}
with ints I0 O1 P2 S3 M4 B5. The reference's own (buggy) figures are read from test_proteinMetrics.json and
accuracies.json next to it when present.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from protopo_ray.data.alphabet import decode_labels
from protopo_ray.model.metrics import aggregate, format_metrics, protein_result, protein_type

DEFAULT_PREDICTIONS = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "deeptmhmm"
    / "nmtmnet_reference"
    / "test_predictions.json"
)

#: Our metric key for each figure the reference reports (test_proteinMetrics.json, then accuracies.json).
REFERENCE_KEYS = {
    "tm acc": "topo_tm",
    "sptm acc": "topo_sptm",
    "sp acc": "topo_sp",
    "glob acc": "topo_glob",
    "beta acc": "topo_beta",
    "tm type acc": "type_tm",
    "tmsp type acc": "type_sptm",
    "sp type acc": "type_sp",
    "glob type acc": "type_glob",
    "beta type acc": "type_beta",
    "type acc": "type_acc",
    "Test accuracy overlap": "overlap_acc",
    "Test accuracy": "residue_acc",
}


def rescore(predictions: dict) -> tuple[dict[str, float], dict[str, int]]:
    """Our metrics over the reference predictions, and how often our per-protein verdicts differ from theirs."""
    results = []
    disagree = {"Type label": 0, "Type prediction": 0, "Match": 0}
    for i, (protein_id, entry) in enumerate(predictions.items()):
        try:
            true, pred = decode_labels(entry["label"]), decode_labels(entry["prediction"])
        except (IndexError, ValueError, TypeError, KeyError) as err:
            raise ValueError(f"protein {i}, id {protein_id!r}: cannot decode label ints ({err!r})") from err
        r = protein_result(true, pred, index=i, protein_id=protein_id)
        results.append(r)
        disagree["Type label"] += r.true_type != entry.get("Type label")
        disagree["Type prediction"] += protein_type(pred) != entry.get("Type prediction")
        disagree["Match"] += r.match != entry.get("Match")
    return aggregate(results), disagree


def load_reference_figures(folder: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    for name in ("test_proteinMetrics.json", "accuracies.json"):
        path = folder / name
        if path.exists():
            figures.update(json.loads(path.read_text()))
    return figures


def format_comparison(ours: dict[str, float], reference: dict[str, float]) -> str:
    rows = [f"{'reference figure':<22} {'our key':<12} {'reference':>10} {'ours':>10} {'diff':>9}"]
    for ref_key, our_key in REFERENCE_KEYS.items():
        if ref_key not in reference:
            continue
        theirs, mine = float(reference[ref_key]), ours[our_key]
        diff = "" if math.isnan(mine) else f"{mine - theirs:+.4f}"
        rows.append(f"{ref_key:<22} {our_key:<12} {theirs:>10.4f} {mine:>10.4f} {diff:>9}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", nargs="?", type=Path, default=DEFAULT_PREDICTIONS, help="test_predictions.json")
    parser.add_argument("--out", type=Path, default=None, help="write the rescored metrics here as JSON")
    args = parser.parse_args(argv)

    if not args.predictions.exists():
        print(
            f"error: reference predictions not found at {args.predictions}; pass the path to test_predictions.json",
            file=sys.stderr,
        )
        return 2
    predictions = json.loads(args.predictions.read_text())
    metrics, disagree = rescore(predictions)

    print(f"Rescored {args.predictions} with protopo_ray.model.metrics:\n")
    print(format_metrics(metrics))
    print(f"\nPer-protein verdicts that differ from the reference's own fields (of {len(predictions)}): {disagree}")
    reference = load_reference_figures(args.predictions.parent)
    if reference:
        print(
            "\nReference's own figures vs ours (reference type acc, residue and overlap figures are as it defined them):"
        )
        print(format_comparison(metrics, reference))
    else:
        print(f"\n(no test_proteinMetrics.json / accuracies.json in {args.predictions.parent} to compare with)")

    if args.out is not None:
        payload = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
