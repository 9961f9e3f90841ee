"""TMHMM 2.0 on a fold of the DeepTMHMM set, scored by this project's metrics: the classic single-sequence row
beside ours in docs/benchmarks.md (issue 27 item 6).

    .venv/bin/pip install pytmhmm-binaries     # TMHMM 2.0's model and a Cython Viterbi; not a project dependency
    .venv/bin/python -m tools.baseline_tmhmm [--partitions ../shared/data/deeptmhmm/DeepTMHMM.partitions.json]
        [--fold cv2] [--out benchmarks/baseline_tmhmm_cv2.json]

TMHMM labels residues inside (i), membrane helix (M) and outside (o); it has no signal peptide, no barrel strand
and no periplasm. Its path is read as I / M / O and scored against the true labels with `metrics.protein_result`
exactly as our predictions are: a protein whose truth has an S or B segment cannot be right, which is what the
classic gives a user on those proteins. A path without a helix is TMHMM's "no membrane protein" call; TMHMM writes
it as all outside, DeepTMHMM's labels write a globular protein as all inside, so it is read as GLOBULAR (all I). Sequences with letters outside TMHMM's alphabet (X, U, ...) are named
and left out of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from protopo_ray.data.records import read_partitions_json
from protopo_ray.model.metrics import aggregate, format_metrics, protein_result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARTITIONS = ROOT.parent / "shared" / "data" / "deeptmhmm" / "DeepTMHMM.partitions.json"
TMHMM_ALPHABET = set("ACDEFGHIKLMNPQRSTVWY")
PATH_TO_LABEL = str.maketrans({"i": "I", "o": "O", "M": "M"})


def tmhmm_labels(sequence: str) -> str:
    """TMHMM 2.0's Viterbi path for one sequence, as this project's labels (I, M, O)."""
    from pyTMHMM import api

    labels = api.predict(sequence, compute_posterior=False).translate(PATH_TO_LABEL)
    return labels if "M" in labels else "I" * len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=Path, default=DEFAULT_PARTITIONS)
    parser.add_argument("--fold", default="cv2")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the figures (default: print only)")
    args = parser.parse_args(argv)
    try:
        import pyTMHMM  # noqa: F401
    except ImportError:
        print("error: TMHMM is not installed: .venv/bin/pip install pytmhmm-binaries", file=sys.stderr)
        return 2
    if not args.partitions.exists():
        print(f"error: {args.partitions} not found (the DeepTMHMM set: ../shared/data/deeptmhmm)", file=sys.stderr)
        return 2
    records = [r for r in read_partitions_json(args.partitions).records if r.fold == args.fold]
    kept = [r for r in records if set(r.sequence) <= TMHMM_ALPHABET]
    for r in records:
        if r not in kept:
            print(f"left out {r.id}: letters outside TMHMM's alphabet ({''.join(sorted(set(r.sequence) - TMHMM_ALPHABET))})")
    start = time.perf_counter()
    results = [protein_result(r.labels, tmhmm_labels(r.sequence), protein_id=r.id) for r in kept]
    seconds = time.perf_counter() - start
    figures = aggregate(results)
    print(format_metrics(figures))
    print(f"TMHMM 2.0 on {len(kept)} of {len(records)} {args.fold} proteins in {seconds:.1f} s "
          f"({len(kept) / seconds:.0f} proteins/s, one core)")
    if args.out:
        args.out.write_text(json.dumps({"fold": args.fold, "proteins": len(kept), "left_out": len(records) - len(kept),
                                        "seconds": round(seconds, 2), "figures": figures}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
