"""The ensemble rule both ways, on a validation fold every member is out of: posterior mean vs topology vote.

    .venv/bin/python -m tools.quality_rule --checkpoints runs/q/A/best runs/q/B/best [...] [--out FILE]

A fold-rotation ensemble cannot compare its rules out of fold (each protein of a member's validation fold was
another member's training data), so this takes members that all trained on the same folds and validated on the
same one (the first checkpoint's config says which): every member is out of that fold. The decoding (entry
penalty, helix-loop floor, beta offset) is chosen on that fold for the mean rule (`choose_decoding`, the merged
grammar the ensemble decodes with), then both rules decode with it; each member alone decodes with the same
numbers for reference. Nothing here reads a test fold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from protopo_ray.model.ensemble import Ensemble, choose_decoding, ensemble_grammar, score
from protopo_ray.training import loop
from protopo_ray.training.checkpoint import load_checkpoint
from protopo_ray.training.splits import local_split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--out", default="benchmarks/quality_rule.json")
    args = parser.parse_args()
    checkpoints = [load_checkpoint(c) for c in args.checkpoints]
    folds = {(c.config.data.train_folds, c.config.data.val_folds) for c in checkpoints}
    if len(folds) != 1:
        raise SystemExit(f"the members trained or validated on different folds ({sorted(folds)}): no fold is out "
                         f"of every member")
    config = checkpoints[0].config.replace({"data.max_proteins": 0})
    batches = list(loop.collated(local_split(config, "val", mode="memory").eval_batches(0, 1), depth=0))
    models = [c.model() for c in checkpoints]
    ensemble = Ensemble(models)
    with torch.no_grad():
        outputs = [ensemble(b) for b in batches]
    choice = choose_decoding(batches, [o[:, 0] for o in outputs], grammar=ensemble_grammar(models))
    rows = {"_": {"checkpoints": args.checkpoints, "val_folds": list(config.data.val_folds),
                  "decoding": choice.decoding.to_json()}}
    for rule in ("mean", "vote"):
        ens = Ensemble(models, dataclasses.replace(choice.decoding, rule=rule))
        rows[rule] = score(batches, [ens.decode(b, o) for b, o in zip(batches, outputs)])
    for k, path in enumerate(args.checkpoints):
        alone = Ensemble([models[k]], choice.decoding)
        rows[path] = score(batches, [alone.decode(b, o[:, [1 + k, 1 + k]]) for b, o in zip(batches, outputs)])
    for name, figures in rows.items():
        if name != "_":
            print(f"{name}: topo_mean {figures['topo_mean']:.3f} tm {figures['topo_tm']:.3f} sptm "
                  f"{figures['topo_sptm']:.3f} sp {figures['topo_sp']:.3f} glob {figures['topo_glob']:.3f} beta "
                  f"{figures['topo_beta']:.3f} overlap {figures['overlap_acc']:.3f} type {figures['type_acc']:.3f}")
    print(f"decoding (chosen on {config.data.val_folds} for the mean): {choice.decoding}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
