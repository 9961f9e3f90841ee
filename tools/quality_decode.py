"""Quality figures of the decoding modes on the test fold, from the runs of experiments/deeptmhmm_crf.toml.

    .venv/bin/python -m tools.quality_decode [--crf runs/deeptmhmm_crf] [--ce runs/deeptmhmm_crf_twin_ce]
        [--out benchmarks/quality_crf.json]
    .venv/bin/python -m tools.quality_decode --rank runs/deeptmhmm_crf runs/deeptmhmm_crf_twin_ce --out FILE

Rows (each from a run's `best/` checkpoint, chosen by its own validation metric; nothing is tuned on the test fold):
- CE twin, argmax;  CE twin, decode-only grammar Viterbi with the entry penalty that maximises val topo_mean (cv1);
- CRF run, CRF Viterbi;  CRF run, argmax over its emissions (what the CRF head adds to the encoder);
- ensemble of the two (mean label posteriors, grammar Viterbi, entry penalty tuned on cv1; `protopo_ray.model.ensemble`).
Decoding is timed on the test fold. With --rank every kept epoch checkpoint of the given runs is scored on the test
fold instead (with each run's own decoder), to measure whether val_topo_mean or val_loss picks the better checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from protopo_ray.model import ensemble
from protopo_ray.model.ensemble import mean_log_posteriors, score
from protopo_ray.model.grammar import Decoding
from protopo_ray.training import loop, splits
from protopo_ray.training.checkpoint import checkpoint_epoch, find_checkpoints
from protopo_ray.training.predictor import load_predictor


def split_batches(config, split: str) -> list:
    memory = splits.local_split(config, split, mode="memory")
    return list(loop.collated(memory.eval_batches(0, 1), depth=0))


@torch.no_grad()
def outputs(model, batches: list) -> list[torch.Tensor]:
    return [model(b).float() for b in batches]


def grammar_decode(batches: list, log_probs: list[torch.Tensor], penalty: float) -> tuple[list[torch.Tensor], float]:
    """`ensemble.grammar_decode` at an entry penalty (no length priors: the grammar these rows were measured with),
    timed in CPU seconds."""
    start = time.process_time()
    decoded = ensemble.grammar_decode(batches, log_probs, Decoding(entry_penalty=penalty, duration_weight=0.0))
    return decoded, time.process_time() - start


def tune_penalty(batches: list, log_probs: list[torch.Tensor]) -> tuple[float, dict[str, float]]:
    """The entry penalty with the best val topo_mean (ties: the smaller penalty)."""
    choice = ensemble.choose_decoding(batches, log_probs, start=Decoding(duration_weight=0.0), beta_offsets=(0.0,),
                                      min_loops=(1,))
    return choice.decoding.entry_penalty, choice.topo_mean


def run_rows(crf_dir: Path, ce_dir: Path) -> dict:
    crf, ce = load_predictor(crf_dir / "best"), load_predictor(ce_dir / "best")
    crf_model, crf_config, ce_model = crf.module, crf.config, ce.module
    val, test = split_batches(crf_config, "val"), split_batches(crf_config, "test")
    rows: dict[str, dict] = {}

    ce_val, ce_test = outputs(ce_model, val), outputs(ce_model, test)
    rows["ce_argmax"] = score(test, [o.argmax(-1) for o in ce_test])
    penalty, tuning = tune_penalty(val, [o.log_softmax(-1) for o in ce_val])
    decoded, seconds = grammar_decode(test, [o.log_softmax(-1) for o in ce_test], penalty)
    rows["ce_viterbi"] = {**score(test, decoded), "entry_penalty": penalty, "val_topo_mean_by_penalty": tuning,
                          "decode_cpu_s": seconds}

    crf_val, crf_test = outputs(crf_model, val), outputs(crf_model, test)
    start = time.process_time()
    decoded = [crf_model.decode(b, o) for b, o in zip(test, crf_test)]
    rows["crf_viterbi"] = {**score(test, decoded), "decode_cpu_s": time.process_time() - start}
    rows["crf_argmax"] = score(test, [o.argmax(-1) for o in crf_test])

    # the ensemble rule (protopo_ray.model.ensemble.Ensemble) on the members' outputs computed above
    def ensemble_outputs(batches, ce_out, crf_out):
        return [mean_log_posteriors([ce_model.label_posteriors(b, a), crf_model.label_posteriors(b, c)])
                for b, a, c in zip(batches, ce_out, crf_out)]

    penalty, tuning = tune_penalty(val, ensemble_outputs(val, ce_val, crf_val))
    decoded, seconds = grammar_decode(test, ensemble_outputs(test, ce_test, crf_test), penalty)
    rows["ensemble"] = {**score(test, decoded), "entry_penalty": penalty, "val_topo_mean_by_penalty": tuning,
                        "decode_cpu_s": seconds}
    for name, directory in (("crf", crf_dir), ("ce", ce_dir)):
        rows[f"{name}_best_epoch"] = checkpoint_epoch(directory / "best")
    rows["test_proteins"] = sum(int(b.num_graphs) for b in test)
    return rows


def rank_rows(run_dir: Path, checkpoints_dir: Path | None = None) -> list[dict]:
    """Every kept epoch: its validation metrics (metrics.jsonl) and its test figures with the run's decoder.
    `checkpoints_dir`: where the epoch checkpoints are when not in the run (a Tune trial's own directory)."""
    history = {int(m["epoch"]): m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    epochs = sorted((checkpoint_epoch(p), p) for p in find_checkpoints(checkpoints_dir or run_dir) if p.name != "best")
    test, out = None, []
    for epoch, path in epochs:
        predictor = load_predictor(path)
        model, test = predictor.module, test or split_batches(predictor.config, "test")
        logits = outputs(model, test)
        figures = score(test, [model.decode(b, o) for b, o in zip(test, logits)])
        h = history.get(epoch, {})
        out.append({"epoch": epoch, "val_loss": h.get("val_loss"), "val_topo_mean": h.get("val_topo_mean"),
                    "val_overlap_acc": h.get("val_overlap_acc"), "test_topo_mean": figures["topo_mean"],
                    "test_overlap_acc": figures["overlap_acc"]})
    return out


ROW_NAMES = {
    "ce_argmax": "cross-entropy twin, argmax",
    "ce_viterbi": "cross-entropy twin, decode-only grammar Viterbi (entry penalty {entry_penalty:g}, tuned on cv1)",
    "crf_argmax": "CRF run, argmax over its emissions (no grammar)",
    "crf_viterbi": "CRF run, CRF Viterbi (the predictor)",
    "ensemble": "ensemble of the two (mean posteriors, grammar Viterbi, entry penalty {entry_penalty:g} tuned on cv1)",
}
TABLE_KEYS = ("overlap_acc", "residue_acc", "type_acc", "topo_tm", "topo_sptm", "topo_sp", "topo_glob", "topo_beta")


def markdown_rows(rows: dict, what: str) -> list[str]:
    """Quality-table rows (docs/benchmarks.md) for the figures of `run_rows`."""
    out = []
    for key, name in ROW_NAMES.items():
        m = rows[key]
        label = f"{what}: {name.format(**m) if 'entry_penalty' in m else name}"
        out.append(f"| {label} | {int(m['n_proteins'])} | " + " | ".join(f"{m[k]:.3f}" for k in TABLE_KEYS)
                   + " <!-- QUALITY:crf --> |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.quality_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crf", default="runs/deeptmhmm_crf")
    parser.add_argument("--ce", default="runs/deeptmhmm_crf_twin_ce")
    parser.add_argument("--out", default="benchmarks/quality_crf.json")
    parser.add_argument("--rank", nargs="+", metavar="RUN_DIR[=CHECKPOINTS_DIR]",
                        help="instead: score every kept epoch of these runs on the test fold (the ranking check); "
                        "=DIR where the epoch checkpoints are elsewhere (a Tune trial's directory)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="deeptmhmm_crf (GC 64, LSTM 64 x 2 bi, 4 CPU epochs, seq-window graphs)",
                        help="what the markdown rows name the runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    result = {}
    if args.rank:
        runs = [d.split("=", 1) if "=" in d else (d, None) for d in args.rank]
        result["rank"] = {d: rank_rows(Path(d), Path(c) if c else None) for d, c in runs}
    else:
        result["rows"] = run_rows(Path(args.crf), Path(args.ce))
    result["wall_s"] = time.time() - started
    Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps(result, indent=1, default=float))
    if "rows" in result:
        print("\n".join(markdown_rows(result["rows"], args.label)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
