"""Decoding levers on one trained checkpoint, on and off: segment-length priors, a floor on helix-helix loops,
the beta-world offset.

    .venv/bin/python -m tools.quality_decoding --checkpoint runs/q/RUN/best [--out benchmarks/quality_decoding.json]

The checkpoint's posteriors on its validation fold are decoded with the grammar Viterbi under each setting; every
free number (entry penalty, loop floor, beta offset) is chosen on that validation fold (`model.ensemble.choose_decoding`),
and the test fold is decoded once per setting with what the validation fold chose. Each row also counts the
inner loops of one residue between two membrane segments in the predictions (the issue's split helices).
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import groupby
from pathlib import Path

import numpy as np
import torch

from protopo_ray.data.alphabet import IGNORE_LABEL, LABELS
from protopo_ray.model.ensemble import choose_decoding, grammar_decode, score
from protopo_ray.model.grammar import Decoding, default_grammar
from protopo_ray.training import loop
from protopo_ray.training.checkpoint import load_checkpoint
from protopo_ray.training.splits import local_split

LETTERS = np.array(list(LABELS))
#: name -> (start, what choose_decoding may vary: {} = its defaults; (x,) = held at x)
SETTINGS = {
    "uniform lengths (today)": (Decoding(duration_weight=0.0), {"beta_offsets": (0.0,), "min_loops": (1,)}),
    "length priors": (Decoding(duration_weight=1.0), {"beta_offsets": (0.0,), "min_loops": (1,)}),
    "length priors + helix-loop floor": (Decoding(duration_weight=1.0), {"beta_offsets": (0.0,)}),
    "length priors + floor + beta offset": (Decoding(duration_weight=1.0), {}),
}


def posteriors(model, config, split: str) -> tuple[list, list[torch.Tensor]]:
    batches = list(loop.collated(local_split(config.replace({"data.max_proteins": 0}), split,
                                             mode="memory").eval_batches(0, 1), depth=0))
    with torch.no_grad():
        return batches, [model.label_posteriors(b, model(b).float()).clamp_min(1e-6).log() for b in batches]


def short_loops(batches: list, decoded: list[torch.Tensor]) -> tuple[int, int]:
    """(one-residue flanks between two membrane segments, all flanks between two membrane segments)."""
    short = total = 0
    for batch, pred in zip(batches, decoded):
        ptr = batch.ptr.numpy()
        for i in range(int(batch.num_graphs)):
            runs = [(k, len(list(g))) for k, g in groupby("".join(LETTERS[pred[ptr[i]:ptr[i + 1]].numpy()]))]
            for j in range(1, len(runs) - 1):
                if runs[j][0] not in "MB" and runs[j - 1][0] in "MB" and runs[j + 1][0] in "MB":
                    total += 1
                    short += runs[j][1] == 1
    return short, total


def true_short_loops(batches: list) -> tuple[int, int]:
    return short_loops(batches, [torch.where(b.y == IGNORE_LABEL, 0, b.y) for b in batches])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="benchmarks/quality_decoding.json")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    # Decode-only levers: the weights are the checkpoint's, the grammar today's (its length priors).
    grammar = default_grammar()
    model = checkpoint.model()
    config = checkpoint.config
    val, val_lp = posteriors(model, config, "val")
    test, test_lp = posteriors(model, config, "test")
    rows: dict[str, dict] = {"_": {"checkpoint": str(args.checkpoint), "epoch": checkpoint.epoch,
                                   "val_folds": list(config.data.val_folds), "test_folds": list(config.data.test_folds),
                                   "true_short_loops_val": true_short_loops(val),
                                   "true_short_loops_test": true_short_loops(test)}}
    for name, (start, held) in SETTINGS.items():
        began = time.process_time()
        choice = choose_decoding(val, val_lp, grammar, start=start, **held)
        decoded = grammar_decode(test, test_lp, choice.decoding, grammar)
        rows[name] = {"decoding": choice.decoding.to_json(), "val": choice.figures, "test": score(test, decoded),
                      "short_loops_val": short_loops(val, grammar_decode(val, val_lp, choice.decoding, grammar)),
                      "short_loops_test": short_loops(test, decoded), "cpu_s": time.process_time() - began}
        v, t = rows[name]["val"], rows[name]["test"]
        print(f"{name}: {choice.decoding}\n  val topo_mean {v['topo_mean']:.3f} tm {v['topo_tm']:.3f} beta "
              f"{v['topo_beta']:.3f} | test tm {t['topo_tm']:.3f} sptm {t['topo_sptm']:.3f} sp {t['topo_sp']:.3f} "
              f"glob {t['topo_glob']:.3f} beta {t['topo_beta']:.3f} overlap {t['overlap_acc']:.3f} type "
              f"{t['type_acc']:.3f}; one-residue loops test {rows[name]['short_loops_test']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
