"""What each sequence-feature group carries on its own: a linear per-residue classifier over the features only
(no embedding, no LSTM), decoded with argmax and with the topology grammar's Viterbi.

    .venv/bin/python -m tools.bench_features [--labels ../shared/data/deeptmhmm/DeepTMHMM.partitions.json]

Multinomial logistic regression (full-batch L-BFGS) on folds cv0+cv4, the grammar's entry penalty chosen on cv3
(by topo_mean), figures on cv1. The test fold cv2 is never read. Cheap (a minute of CPU), so it measures the
features where a training run per feature group does not fit the machine.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from protopo_ray.data.alphabet import LABELS, encode_labels, encode_sequence
from protopo_ray.data.records import read_records
from protopo_ray.model.crf import CRF
from protopo_ray.model.features import SequenceFeatures, feature_groups
from protopo_ray.model.grammar import Decoding, default_grammar
from protopo_ray.model.metrics import protein_metrics

PENALTIES = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
GROUPS = {"none (class prior)": (), "hydropathy": ("hydropathy",), "charge": ("charge",), "blosum": ("blosum",),
          "hydropathy + charge": ("hydropathy", "charge"), "all three": ("hydropathy", "charge", "blosum")}


def fold_tensors(records, groups):
    aa = torch.tensor([i for r in records for i in encode_sequence(r.sequence)])
    y = torch.tensor([i for r in records for i in encode_labels(r.labels)])
    lengths = torch.tensor([len(r.sequence) for r in records])
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    batch_vec = torch.repeat_interleave(torch.arange(len(records)), lengths)
    x = SequenceFeatures(groups)(aa, ptr, batch_vec)
    return torch.cat([x, torch.ones(x.size(0), 1)], dim=1), y, lengths


def fit(x, y, iterations: int = 60):
    w = torch.zeros(x.size(1), len(LABELS), requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def decode(log_p, lengths, penalty):
    crf = CRF.fixed(default_grammar(), Decoding(entry_penalty=penalty, duration_weight=0.0))
    out = []
    order = np.argsort(lengths.numpy())
    pieces = list(torch.split(log_p, lengths.tolist()))
    for chunk in np.array_split(order, max(1, len(order) // 32)):
        lens = lengths[chunk]
        padded = torch.zeros(len(chunk), int(lens.max()), len(LABELS))
        for row, i in enumerate(chunk):
            padded[row, : lengths[i]] = pieces[i]
        decoded = crf.decode(padded, lens)
        out += [(int(i), decoded[row, : lengths[i]]) for row, i in enumerate(chunk)]
    return ["".join(LABELS[j] for j in labels.tolist()) for _, labels in sorted(out)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_features", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", default="../shared/data/deeptmhmm/DeepTMHMM.partitions.json")
    parser.add_argument("--out", default="benchmarks/features.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    records = read_records(args.labels).records
    folds = {name: [r for r in records if r.fold in members]
             for name, members in (("train", ("cv0", "cv4")), ("tune", ("cv3",)), ("eval", ("cv1",)))}
    results = {}
    for name, groups in GROUPS.items():
        groups = feature_groups(*(g in groups for g in ("hydropathy", "charge", "blosum")))
        x, y, _ = fold_tensors(folds["train"], groups)
        w = fit(x, y)
        tune_x, _, tune_lengths = fold_tensors(folds["tune"], groups)
        tune_lp = (tune_x @ w).log_softmax(-1)
        tune_true = [r.labels for r in folds["tune"]]
        by_penalty = {p: protein_metrics(tune_true, decode(tune_lp, tune_lengths, p))["topo_mean"] for p in PENALTIES}
        penalty = max(PENALTIES, key=lambda p: (by_penalty[p], -p))
        eval_x, eval_y, eval_lengths = fold_tensors(folds["eval"], groups)
        log_p = (eval_x @ w).log_softmax(-1)
        true = [r.labels for r in folds["eval"]]
        argmax = ["".join(LABELS[j] for j in piece.argmax(-1).tolist())
                  for piece in torch.split(log_p, eval_lengths.tolist())]
        m_arg, m_vit = protein_metrics(true, argmax), protein_metrics(true, decode(log_p, eval_lengths, penalty))
        is_m = eval_y == LABELS.index("M")
        results[name] = {"columns": x.size(1) - 1, "entry_penalty": penalty,
                         "residue_acc": m_arg["residue_acc"],
                         "m_recall": float(((log_p.argmax(-1) == LABELS.index("M")) & is_m).sum() / is_m.sum()),
                         "argmax": {k: m_arg[k] for k in ("overlap_acc", "topo_mean", "topo_tm")},
                         "viterbi": {k: m_vit[k] for k in ("overlap_acc", "topo_mean", "topo_tm", "topo_sptm",
                                                           "topo_sp", "topo_glob", "topo_beta", "type_acc")}}
        v = results[name]["viterbi"]
        print(f"{name:<22} cols {results[name]['columns']:>2}  residue_acc {m_arg['residue_acc']:.3f}  "
              f"M recall {results[name]['m_recall']:.3f}  argmax topo_mean {m_arg['topo_mean']:.3f}  |  grammar "
              f"(penalty {penalty:g}) topo_mean {v['topo_mean']:.3f} overlap {v['overlap_acc']:.3f} "
              f"TM {v['topo_tm']:.3f} SP+TM {v['topo_sptm']:.3f} SP {v['topo_sp']:.3f} GLOB {v['topo_glob']:.3f} "
              f"BETA {v['topo_beta']:.3f}", flush=True)
    results["wall_s"] = time.time() - started
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
