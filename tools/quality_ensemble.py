"""Quality rows of a fold-rotation ensemble search (experiments/deeptmhmm_ensemble.toml) on its test fold.

    .venv/bin/python -m tools.quality_ensemble [--exp runs/deeptmhmm_ensemble] [--out benchmarks/quality_ensemble.json]
    .venv/bin/python -m tools.quality_ensemble --checkpoints runs/a/best runs/b/best --out FILE   # single models only

Rows, each member from its `best/` checkpoint (chosen by the member's own validation metric), nothing tuned on
the test fold:
- each member alone, argmax;
- each member alone, grammar Viterbi with the entry penalty that maximises topo_mean on its own validation fold
  (the single-model predictor; member cv1 is the reference split: train cv0+cv3+cv4, validate cv1);
- the ensemble (`winner/checkpoint`: mean posteriors, grammar Viterbi, out-of-fold entry penalty), decoded here
  again so its decoding time is measured on the same footing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from protopo_ray.data.alphabet import IGNORE_LABEL, LABELS, protein_type
from protopo_ray.model.ensemble import mean_log_posteriors, score
from protopo_ray.model.metrics import segments, topology_match
from protopo_ray.training.checkpoint import checkpoint_epoch
from protopo_ray.training.predictor import load_predictor, read_ensemble
from tools.quality_decode import TABLE_KEYS, grammar_decode, outputs, split_batches, tune_penalty

LETTERS = np.array(list(LABELS))


def membrane_error(true: str, pred: str) -> str:
    """Why an alpha-membrane protein's topology is wrong (the first reason in this order), or "right"."""
    if topology_match(true, pred) and protein_type(pred) == protein_type(true):
        return "right"
    helices = [s for s in segments(true) if s[0] == "M"]
    found = [s for s in segments(pred) if s[0] == "M"]
    if not found:
        return "no helix predicted"
    if len(found) != len(helices):
        return "too many helices" if len(found) > len(helices) else "too few helices"
    if any(min(te, pe) - max(ts, ps) < 5 for (_, ts, te), (_, ps, pe) in zip(helices, found)):
        return "same count, a helix misplaced"
    if ("S" in true) != ("S" in pred):
        return "signal peptide missed" if "S" in true else "signal peptide extra"
    return "helices right, orientation wrong"


def membrane_errors(batches: list, decoded: list[torch.Tensor]) -> dict[str, dict[str, int]]:
    """Counts of `membrane_error` over the TM and SP+TM proteins of the batches, by true type."""
    counts: dict[str, dict[str, int]] = {}
    for true, pred in labelled_strings(batches, decoded):
        kind = protein_type(true)
        if kind in ("TM", "SP+TM"):
            reason = membrane_error(true, pred)
            counts.setdefault(kind, {})[reason] = counts.get(kind, {}).get(reason, 0) + 1
    return counts


def labelled_strings(batches: list, decoded: list[torch.Tensor]):
    for batch, pred in zip(batches, decoded):
        y, pred, ptr = batch.y.numpy(), pred.numpy(), batch.ptr.numpy()
        for i in range(int(batch.num_graphs)):
            lo, hi = ptr[i], ptr[i + 1]
            if (y[lo:hi] != IGNORE_LABEL).all():
                yield "".join(LETTERS[y[lo:hi]]), "".join(LETTERS[pred[lo:hi]])


def member_rows(member: Path, test: list) -> dict[str, dict]:
    predictor = load_predictor(member)
    model, config = predictor.module, predictor.config
    val = split_batches(config, "val")
    with torch.no_grad():
        val_lp = [mean_log_posteriors([model.label_posteriors(b, o)]) for b, o in zip(val, outputs(model, val))]
        test_out = outputs(model, test)
        test_lp = [mean_log_posteriors([model.label_posteriors(b, o)]) for b, o in zip(test, test_out)]
    penalty, by_penalty = tune_penalty(val, val_lp)
    decoded, seconds = grammar_decode(test, test_lp, penalty)
    fold = ",".join(config.data.val_folds)
    return {
        f"member_{fold}_argmax": {**score(test, [o.argmax(-1) for o in test_out]), "val_fold": fold},
        f"member_{fold}_viterbi": {**score(test, decoded), "val_fold": fold, "entry_penalty": penalty,
                                   "membrane_errors": membrane_errors(test, decoded),
                                   "val_topo_mean_by_penalty": by_penalty, "decode_cpu_s": seconds,
                                   "best_epoch": checkpoint_epoch(member)},
    }


def ensemble_row(path: Path, test: list) -> dict:
    predictor = load_predictor(path).module
    with torch.no_grad():
        start = time.process_time()
        log_probs = [o[:, 0] for o in outputs(predictor, test)]  # the members' mean (protopo_ray.model.ensemble)
        forward_s = time.process_time() - start
    penalty = predictor.decoding.entry_penalty
    decoded, seconds = grammar_decode(test, log_probs, penalty)
    return {**score(test, decoded), "entry_penalty": penalty, "members": len(predictor.members),
            "forward_cpu_s": forward_s, "decode_cpu_s": seconds, "membrane_errors": membrane_errors(test, decoded)}


def markdown_rows(rows: dict, what: str) -> list[str]:
    out = []
    for key, m in rows.items():
        if not isinstance(m, dict) or "overlap_acc" not in m or key == "winner_test":
            continue
        if key == "ensemble":
            name = f"ensemble of {m['members']} fold rotations (mean posteriors, grammar Viterbi, entry penalty " \
                   f"{m['entry_penalty']:g} chosen out of fold)"
        else:
            run, _, key = key.rpartition(":")
            who = run or f"member validated on {m['val_fold']} alone"
            name = (f"{who}, argmax" if key.endswith("_argmax") else
                    f"{who} (best epoch {m['best_epoch']}), grammar Viterbi (entry penalty {m['entry_penalty']:g}, "
                    f"tuned on {m['val_fold']})")
        out.append(f"| {what}: {name} | {int(m['n_proteins'])} | " + " | ".join(f"{m[k]:.3f}" for k in TABLE_KEYS)
                   + " <!-- QUALITY:ensemble --> |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.quality_ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="runs/deeptmhmm_ensemble")
    parser.add_argument("--out", default="benchmarks/quality_ensemble.json")
    parser.add_argument("--checkpoints", nargs="+", metavar="DIR",
                        help="instead of --exp: the single-model rows of these checkpoints (e.g. a with/without-features pair)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="deeptmhmm_ensemble (GC 64, LSTM 64 x 2 bi, 15 CPU epochs, features, "
                        "seq-window graphs, test cv2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    path = Path(args.exp) / "winner" / "checkpoint"
    members = [Path(c) for c in args.checkpoints] if args.checkpoints else read_ensemble(path)[0]
    test = split_batches(load_predictor(members[0]).config, "test")
    rows: dict = {}
    for member in members:
        rows.update({f"{member.parent.name}:{key}": row for key, row in member_rows(member, test).items()}
                    if args.checkpoints else member_rows(member, test))
    if not args.checkpoints:
        rows["ensemble"] = ensemble_row(path, test)
        rows["winner_test"] = json.loads((Path(args.exp) / "winner" / "winner.json").read_text()).get("test")
    rows["test_proteins"] = sum(int(b.num_graphs) for b in test)
    result = {"rows": rows, "wall_s": time.time() - started}
    Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps(result, indent=1, default=float))
    print("\n".join(markdown_rows(rows, args.label)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
