"""`python -m protopo_ray.predict`: run a trained checkpoint on new proteins and write DeepTMHMM-style outputs.

    python -m protopo_ray.predict --checkpoint runs/default/winner/checkpoint --input proteins.fasta --out-dir pred
    python -m protopo_ray.predict --checkpoint runs/default/winner/checkpoint --input proteins.fasta --out-dir pred --plots
    python -m protopo_ray.predict --checkpoint runs/default/winner/checkpoint --input proteins.fasta --out predicted.3line

--out-dir writes predicted.3line, predicted.gff3 (topology regions), summary.tsv (id, length, type, membrane
segments, mean confidence) and, with --plots, plots/<id>.png (see protopo_ray.inference.outputs); --out writes the
3-line file alone. Input is FASTA (unlabelled) or 3-line (labelled: the metrics are printed too). Proteins
with a structure file in --structures get a structure graph, the rest the sequence-window graph, exactly as
`prepare` does. Exit codes: 0 ok, 2 bad input (no checkpoint, an input without valid records, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from protopo_ray.config import Config
from protopo_ray.data import batching, graphs
from protopo_ray.data.records import ProteinRecord, RecordError, read_records
from protopo_ray.inference.outputs import Prediction, write_3line, write_outputs
from protopo_ray.model.metrics import format_metrics, protein_metrics
from protopo_ray.model.network import TopologyModel
from protopo_ray.prepare import ensure_data, experiment_synthetic
from protopo_ray.training import loop
from protopo_ray.training.checkpoint import CheckpointError

#: How far above a checkpoint its search's experiment.json may sit (EXP/<stage>/<trial>/<checkpoint_n>).
_EXPERIMENT_DEPTH = 5


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[TopologyModel, Config, int]:
    """(predictor in eval mode, its config, the graph k its shards were built with). `checkpoint` is a checkpoint
    directory or an ensemble directory (`ensemble.json`, protopo_ray.model.ensemble)."""
    from protopo_ray.model.ensemble import load_predictor

    model, config = load_predictor(checkpoint, device)
    return model, config, graph_k(config, experiment_synthetic(search_experiment_file(checkpoint)))


def search_experiment_file(checkpoint: str | Path) -> Path | None:
    """The experiment TOML of the search a checkpoint came from (`source` in EXP/experiment.json), if still there."""
    for parent in Path(checkpoint).resolve().parents[:_EXPERIMENT_DEPTH]:
        record = parent / "experiment.json"
        if record.is_file():
            try:
                source = json.loads(record.read_text()).get("source")
            except (json.JSONDecodeError, AttributeError):
                return None
            return Path(source) if source and Path(source).is_file() else None
    return None


def graph_k(config: Config, synthetic: tuple[int, int] = (0, 0)) -> int:
    """The k the model was trained with (from its shards' manifest), so new graphs match the training ones.

    When the model's data is the embedded synthetic set (`synthetic` = (N, seed) from its experiment file) and
    absent, it is made first, like `tune` and `train` do; other missing data falls back to the default k.
    """
    try:
        return int(ensure_data(config.data.path, *synthetic)["k"])
    except (FileNotFoundError, ValueError, KeyError, OSError):
        print(f"warning: no manifest at {config.data.path}; building graphs with k={graphs.DEFAULT_K}", file=sys.stderr)
        return graphs.DEFAULT_K


def build_graphs(records: list[ProteinRecord], structures: str | Path | None, k: int) -> list[graphs.ResidueGraph]:
    built = []
    for record in records:
        ca = None
        if structures:
            from protopo_ray.data.structures import load_aligned_ca

            ca, _ = load_aligned_ca(structures, record)
        built.append(graphs.build_graph(record.sequence, ca, k=k))
    return built


@torch.no_grad()
def label_probabilities(model: TopologyModel, batch, device: torch.device) -> list[np.ndarray]:
    """float [L, NUM_LABELS] per protein of `batch`: the decoder's label posteriors (softmax, or CRF marginals).

    A forward pass of its own, so the labels stay exactly what `loop.predict_labels` decodes (argmax, or the
    model's own decoder) while the plots and confidences show the per-residue distribution behind them.
    """
    model.eval()
    batch = batch.to(device)
    logits = model(batch)
    # The decoder's own per-residue distribution: softmax for cross-entropy models, CRF marginals for CRF models
    # and ensembles (their emissions are not probabilities).
    probabilities = model.label_posteriors(batch, logits).float().cpu().numpy()
    ptr = batch.ptr.cpu().numpy()
    return [probabilities[ptr[i]:ptr[i + 1]] for i in range(int(batch.num_graphs))]


def predict_records(model: TopologyModel, records: list[ProteinRecord], graph_list: list[graphs.ResidueGraph],
                    device: torch.device, batch_size: int = 32) -> list[Prediction]:
    """Decoded labels and label probabilities per protein, batched by length, in the order of `records`."""
    from protopo_ray.data.collate import records_to_batch

    lengths = [len(r.sequence) for r in records]
    found: dict[str, Prediction] = {}
    for idx in batching.eval_batches(lengths, batch_size):
        batch = records_to_batch([records[i] for i in idx], [graph_list[i] for i in idx])
        ((proteins, _, _),) = loop.predict_labels(model, [batch], device)
        for (pid, sequence, _, labels), probabilities in zip(proteins, label_probabilities(model, batch, device)):
            found[pid] = Prediction(pid, sequence, labels, probabilities)
    return [found[r.id] for r in records]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (holds state.pt) or ensemble directory (holds ensemble.json)")
    parser.add_argument("--input", required=True, help=".fasta or .3line file (.gz allowed)")
    parser.add_argument("--structures", help="directory of AlphaFold/PDB structures (optional)")
    parser.add_argument("--out-dir", type=Path, help="write predicted.3line, predicted.gff3, summary.tsv here")
    parser.add_argument("--plots", action="store_true", help="also write --out-dir/plots/<id>.png per protein")
    parser.add_argument("--out", type=Path, help="write the 3-line predictions to this file")
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
        device = loop.resolve_device(args.device)
        model, _, k = load_model(args.checkpoint, device)
    except (CheckpointError, RecordError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    predictions = predict_records(model, records, build_graphs(records, args.structures, k), device, args.batch_size)
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
