"""`python -m protopo_ray.predict`: run a trained checkpoint on new proteins, write 3-line predictions.

    python -m protopo_ray.predict --checkpoint runs/x/winner --input proteins.fasta --out predicted.3line

Input is FASTA (unlabelled) or 3-line (labelled: the metric dict is printed too). Proteins with a structure
file in --structures get a structure graph, the rest the sequence-window graph, exactly as `prepare` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from protopo_ray import batching, graphs, loop
from protopo_ray.checkpoint import CheckpointError
from protopo_ray.checkpoint import load_model as checkpoint_model
from protopo_ray.config import Config
from protopo_ray.metrics import format_metrics, protein_metrics, protein_type
from protopo_ray.model import TopologyModel
from protopo_ray.records import ProteinRecord, RecordError, read_records


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[TopologyModel, Config, int]:
    model, config, _ = checkpoint_model(checkpoint, device)
    return model, config, graph_k(config)


def graph_k(config: Config) -> int:
    """The k the model was trained with (from its shards' manifest), so new graphs match the training ones."""
    from protopo_ray.shards import read_manifest

    try:
        return int(read_manifest(config.data.path)["k"])
    except (FileNotFoundError, ValueError, KeyError, OSError):
        print(f"warning: no manifest at {config.data.path}; building graphs with k={graphs.DEFAULT_K}", file=sys.stderr)
        return graphs.DEFAULT_K


def build_graphs(records: list[ProteinRecord], structures: str | Path | None, k: int) -> list[graphs.ResidueGraph]:
    built = []
    for record in records:
        ca = None
        if structures:
            from protopo_ray.structures import load_aligned_ca

            ca, _ = load_aligned_ca(structures, record)
        built.append(graphs.build_graph(record.sequence, ca, k=k))
    return built


def predict_records(model: TopologyModel, records: list[ProteinRecord], graph_list: list[graphs.ResidueGraph],
                    device: torch.device, batch_size: int = 32) -> dict[str, str]:
    """Predicted label string per protein id, batched by length."""
    from protopo_ray.collate import records_to_batch

    lengths = [len(r.sequence) for r in records]
    plan = batching.eval_batches(lengths, batch_size)
    batches = (records_to_batch([records[i] for i in idx], [graph_list[i] for i in idx]) for idx in plan)
    predicted: dict[str, str] = {}
    for proteins, _, _ in loop.predict_labels(model, batches, device):
        predicted.update({pid: pred for pid, _, _, pred in proteins})
    return predicted


def write_3line(path: str | Path, records: list[ProteinRecord], predicted: dict[str, str]) -> None:
    with open(path, "w") as handle:
        for record in records:
            labels = predicted[record.id]
            handle.write(f">{record.id}|{protein_type(labels)}\n{record.sequence}\n{labels}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (holds state.pt)")
    parser.add_argument("--input", required=True, help=".fasta or .3line file")
    parser.add_argument("--structures", help="directory of AlphaFold/PDB structures (optional)")
    parser.add_argument("--out", required=True, help="3-line output file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    try:
        device = loop.resolve_device(args.device)
        model, _, k = load_model(args.checkpoint, device)
        records = read_records(args.input).records
    except (CheckpointError, RecordError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    predicted = predict_records(model, records, build_graphs(records, args.structures, k), device, args.batch_size)
    write_3line(args.out, records, predicted)
    print(f"wrote {len(records)} predictions to {args.out}")
    if records and all(r.labels for r in records):
        metrics = protein_metrics([r.labels for r in records], [predicted[r.id] for r in records],
                                  ids=[r.id for r in records])
        print(format_metrics(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
