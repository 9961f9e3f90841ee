"""Quality rows of a fold-rotation ensemble search (experiments/deeptmhmm_ensemble.toml) on its test fold.

    .venv/bin/python -m tools.quality_ensemble [--exp runs/deeptmhmm_ensemble] [--out benchmarks/quality_ensemble.json]
    .venv/bin/python -m tools.quality_ensemble --checkpoints runs/a/best runs/b/best --out FILE   # single models only

Rows, each member from its `best/` checkpoint (chosen by the member's own validation metric), nothing tuned on
the test fold:
- each member alone, argmax;
- each member alone, grammar Viterbi (its training folds' length priors) with the entry penalty, helix-loop floor
  and beta offset that maximise topo_mean on its own validation fold (`model.ensemble.choose_decoding`; the
  single-model predictor; member cv1 is the reference split: train cv0+cv3+cv4, validate cv1);
- the ensemble (`winner/checkpoint`: its rule, merged grammar and out-of-fold decoding), decoded here again so its
  decoding time is measured on the same footing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from protopo_ray.data.alphabet import IGNORE_LABEL, LABELS, protein_type
from protopo_ray.model import ensemble
from protopo_ray.model.ensemble import mean_log_posteriors, score
from protopo_ray.model.grammar import Decoding, Grammar
from protopo_ray.model.metrics import segments, topology_match
from protopo_ray.training.checkpoint import checkpoint_epoch
from protopo_ray.training.predictor import load_predictor, read_ensemble
from tools.quality_decode import TABLE_KEYS, outputs, split_batches

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


def decode_timed(batches: list, log_probs: list[torch.Tensor], decoding: Decoding,
                 grammar: Grammar) -> tuple[list[torch.Tensor], float]:
    start = time.process_time()
    decoded = ensemble.grammar_decode(batches, log_probs, decoding, grammar)
    return decoded, time.process_time() - start


def member_rows(member: Path, test: list) -> dict[str, dict]:
    predictor = load_predictor(member)
    model, config = predictor.module, predictor.config
    val = split_batches(config, "val")
    with torch.no_grad():
        val_lp = [mean_log_posteriors([model.label_posteriors(b, o)]) for b, o in zip(val, outputs(model, val))]
        test_out = outputs(model, test)
        test_lp = [mean_log_posteriors([model.label_posteriors(b, o)]) for b, o in zip(test, test_out)]
    choice = ensemble.choose_decoding(val, val_lp, model.grammar)
    decoded, seconds = decode_timed(test, test_lp, choice.decoding, model.grammar)
    fold = ",".join(config.data.val_folds)
    return {
        f"member_{fold}_argmax": {**score(test, [o.argmax(-1) for o in test_out]), "val_fold": fold},
        f"member_{fold}_viterbi": {**score(test, decoded), "val_fold": fold, "decoding": choice.decoding.to_json(),
                                   "membrane_errors": membrane_errors(test, decoded),
                                   "val_topo_mean_by_setting": choice.topo_mean, "decode_cpu_s": seconds,
                                   "best_epoch": checkpoint_epoch(member)},
    }


def ensemble_row(path: Path, test: list) -> dict:
    predictor = load_predictor(path).module
    with torch.no_grad():
        start = time.process_time()
        outs = outputs(predictor, test)
        forward_s = time.process_time() - start
    start = time.process_time()
    decoded = [predictor.decode(b, o) for b, o in zip(test, outs)]  # its own rule, grammar and decoding
    seconds = time.process_time() - start
    return {**score(test, decoded), "decoding": predictor.decoding.to_json(), "members": len(predictor.members),
            "forward_cpu_s": forward_s, "decode_cpu_s": seconds, "membrane_errors": membrane_errors(test, decoded)}


def describe(decoding: dict) -> str:
    return (f"entry penalty {decoding['entry_penalty']:g}, helix loops >= {decoding.get('min_loop', 1)}, beta offset "
            f"{decoding['beta_offset']:g}")


def markdown_rows(rows: dict, what: str, tag: str = "ensemble") -> list[str]:
    out = []
    for key, m in rows.items():
        if not isinstance(m, dict) or "overlap_acc" not in m or key == "winner_test":
            continue
        if key == "ensemble":
            name = (f"ensemble of {m['members']} fold rotations ({m['decoding']['rule']} rule, grammar Viterbi with "
                    f"length priors, {describe(m['decoding'])} chosen out of fold)")
        else:
            run, _, key = key.rpartition(":")
            who = run or f"member validated on {m['val_fold']} alone"
            name = (f"{who}, argmax" if key.endswith("_argmax") else
                    f"{who} (best epoch {m['best_epoch']}), grammar Viterbi with length priors ({describe(m['decoding'])}, "
                    f"chosen on {m['val_fold']})")
        out.append(f"| {what}: {name} | {int(m['n_proteins'])} | " + " | ".join(f"{m[k]:.3f}" for k in TABLE_KEYS)
                   + f" <!-- QUALITY:{tag} --> |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.quality_ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="runs/deeptmhmm_ensemble")
    parser.add_argument("--out", default="benchmarks/quality_ensemble.json")
    parser.add_argument("--checkpoints", nargs="+", metavar="DIR",
                        help="instead of --exp: the single-model rows of these checkpoints (e.g. a with/without-features pair)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="ensemble", help="the rows' QUALITY tag in docs/benchmarks.md")
    parser.add_argument("--label", default="deeptmhmm_ensemble (GC 64, LSTM 64 x 2 bi, 24 CPU epochs, features, "
                        "type-balanced batches, seq-window graphs, test cv2)")
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
    print("\n".join(markdown_rows(rows, args.label, args.tag)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
