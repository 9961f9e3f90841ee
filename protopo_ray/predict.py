"""`python -m protopo_ray.predict`: run a trained predictor on new proteins and write DeepTMHMM-style outputs.

    python -m protopo_ray.predict --checkpoint runs/default/winner/checkpoint --input proteins.fasta --out-dir pred
    python -m protopo_ray.predict --checkpoint runs/default/winner/checkpoint --input proteins.fasta --out-dir pred --plots
    python -m protopo_ray.predict --checkpoint runs/default/winner/checkpoint --input proteins.fasta --out predicted.3line

--checkpoint is a checkpoint directory or an ensemble directory (a search's winner/checkpoint is either); it
describes itself, so the graphs of new proteins are built as its training graphs were (the same k). --out-dir
writes predicted.3line, predicted.gff3 (topology regions), summary.tsv (id, length, type, membrane segments,
mean confidence) and, with --plots, plots/<id>.png (see protopo_ray.inference.outputs); --out writes the 3-line
file alone. Input is FASTA (unlabelled) or 3-line (labelled: the metrics are printed too). Proteins with a
structure file in --structures get a structure graph, the rest the sequence-window graph, exactly as `prepare`
does. A predictor trained on ESM-2 embeddings (prepare --embed-weights) embeds the new proteins with the same
model and layer, reading the weights file its checkpoint records (--embed-weights overrides it), and refuses
with a clear error when that file is not there. Exit codes: 0 ok, 2 bad input (no checkpoint, an input without valid records, ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protopo_ray.data.records import RecordError, read_records
from protopo_ray.inference.outputs import write_3line, write_outputs
from protopo_ray.inference.predictions import build_graphs, embed_records, predict_records
from protopo_ray.model.metrics import format_metrics, protein_metrics
from protopo_ray.training.checkpoint import CheckpointError
from protopo_ray.training.loop import resolve_device
from protopo_ray.training.predictor import load_predictor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (holds meta.json and state.pt) or "
                        "ensemble directory (holds ensemble.json)")
    parser.add_argument("--input", required=True, help=".fasta or .3line file (.gz allowed)")
    parser.add_argument("--structures", help="directory of AlphaFold/PDB structures (optional)")
    parser.add_argument("--out-dir", type=Path, help="write predicted.3line, predicted.gff3, summary.tsv here")
    parser.add_argument("--plots", action="store_true", help="also write --out-dir/plots/<id>.png per protein")
    parser.add_argument("--out", type=Path, help="write the 3-line predictions to this file")
    parser.add_argument("--embed-weights", metavar="FILE", help="ESM-2 weights file (local path or s3:// / gs://) "
                        "for a predictor trained on embeddings; default: the path its checkpoint records")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and args.out_dir is None:
        parser.error("say where the predictions go: --out-dir DIR (3-line, GFF3, TSV, plots) and/or --out FILE.3line")
    if args.plots and args.out_dir is None:
        parser.error("--plots writes into --out-dir/plots; give --out-dir")
    try:
        records = read_records(args.input, allow_empty=False).records
        device = resolve_device(args.device)
        predictor = load_predictor(args.checkpoint, device)
        if args.embed_weights and not predictor.inputs.embedding:
            raise ValueError(f"--embed-weights: {args.checkpoint} was trained without embeddings")
        embedded = embed_records(records, predictor.inputs.embedding, args.embed_weights)
    except (CheckpointError, RecordError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.structures and not predictor.inputs.graph_sources.get("structure"):
        print(f"warning: {args.checkpoint} was trained on sequence-window graphs only; proteins with a structure in "
              f"{args.structures} get structure graphs it has never seen", file=sys.stderr)
    graphs = build_graphs(records, args.structures, predictor.inputs.graph_k)
    predictions = predict_records(predictor.module, records, graphs, device, args.batch_size, embedded)
    if args.out is not None:
        write_3line(args.out, predictions)
        print(f"wrote {len(predictions)} predictions to {args.out}")
    if args.out_dir is not None:
        written = write_outputs(args.out_dir, predictions, plots=args.plots)
        print(f"wrote {len(predictions)} predictions to {args.out_dir}: {', '.join(p.name for p in written.values())}")
    if all(r.labels for r in records):
        metrics = protein_metrics([r.labels for r in records], [p.labels for p in predictions],
                                  ids=[r.id for r in records])
        print(format_metrics(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
