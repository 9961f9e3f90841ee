"""`python -m protopo_ray.predict`: run a trained predictor on new proteins and write DeepTMHMM-style outputs.

    python -m protopo_ray.predict --checkpoint runs/default/winner/checkpoint --input proteins.fasta --out-dir pred
    python -m protopo_ray.predict --checkpoint runs/default/winner/checkpoint --input proteins.fasta --out-dir pred --plots
    python -m protopo_ray.predict --checkpoint runs/default/winner/checkpoint --input proteins.fasta --out predicted.3line
    python -m protopo_ray.predict --checkpoint CKPT --input s3://bucket/proteome.fasta.gz --out-dir s3://bucket/pred --ray

--checkpoint is a checkpoint directory or an ensemble directory (a search's winner/checkpoint is either); it
describes itself, so the graphs of new proteins are built as its training graphs were (the same k). --out-dir
writes predicted.3line, predicted.gff3 (topology regions), summary.tsv (id, length, type, membrane segments,
mean confidence), rejects.tsv (records not predicted, with the reason) and, with --plots, plots/<id>.png (see
protopo_ray.inference.outputs); --out writes the 3-line file alone. Input is FASTA (unlabelled) or 3-line
(labelled: the metrics are printed too), plain or .gz, a file or a directory of them (FASTA also on s3:// / gs://).
What the field's tools accept is accepted and counted in the closing line: lowercase residues are upper-cased, a
terminal '*' dropped; a bad record (illegal letters, empty sequence, duplicate id) is rejected and every other
protein predicted. Proteins longer than --max-length are predicted in overlapping windows.

Proteins with a structure file in --structures get a structure graph, the rest the sequence-window graph, exactly
as `prepare` does. A predictor that never saw a kind of graph the proteins get (sequence windows for a model
trained on structures only, or the reverse) is refused with what to do (--allow-input-shift goes on, with a
warning); a kind it saw rarely is a warning. A predictor trained on ESM-2 embeddings embeds the new proteins with
the same model and layer, reading the weights file its checkpoint records (--embed-weights overrides it).

--ray runs it on Ray Data (the cluster at RAY_ADDRESS / --address, else a local one): network actors on GPUs where
the cluster has them, the Viterbi as CPU tasks, result shards in --out-dir/shards written as they finish; the same
command again resumes, skipping finished shards (protopo_ray.cluster.batch_predict). --dry-run prints its plan.
Exit codes: 0 ok, 2 bad input (no checkpoint, no valid record, an input shift refused, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from protopo_ray.data.embeddings import EmbeddingError
from protopo_ray.data.records import FIXES, ProteinRecord, RecordError
from protopo_ray.inference.inputs import InputError, Reject, first_occurrences, list_inputs, read_units, unit_residues
from protopo_ray.inference.outputs import FILES, write_3line, write_outputs
from protopo_ray.inference.predictions import (
    MAX_LENGTH,
    MAX_RESIDUES,
    Batching,
    build_inputs,
    cpu_decoder,
    embed_records,
    predict_inputs,
    with_embeddings,
)
from protopo_ray.model.metrics import format_metrics, protein_metrics
from protopo_ray.training.checkpoint import CheckpointError
from protopo_ray.training.input_shift import expected_shifts, find_input_shifts, refusal
from protopo_ray.training.loop import resolve_device
from protopo_ray.training.predictor import Predictor, load_predictor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (holds meta.json and state.pt) or "
                        "ensemble directory (holds ensemble.json)")
    parser.add_argument("--input", required=True, help=".fasta/.fa/.faa or .3line file (.gz allowed), a directory of "
                        "them, or an s3:// / gs:// URI of FASTA")
    parser.add_argument("--structures", help="directory of AlphaFold/PDB structures (optional)")
    parser.add_argument("--out-dir", help="write predicted.3line, predicted.gff3, summary.tsv here (--ray: also "
                        "the result shards; a local path or s3:// / gs:// URI)")
    parser.add_argument("--plots", action="store_true",
                        help="also write --out-dir/plots/<id>.png per protein (not with --ray)")
    parser.add_argument("--out", type=Path, help="write the 3-line predictions to this file")
    parser.add_argument("--embed-weights", metavar="FILE", help="ESM-2 weights file (local path or s3:// / gs://) "
                        "for a predictor trained on embeddings; default: the path its checkpoint records")
    parser.add_argument("--batch-size", type=int, default=32, help="proteins per forward batch at most")
    parser.add_argument("--max-residues", type=int, default=MAX_RESIDUES,
                        help="padded residues per forward batch at most (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH,
                        help="longer proteins are predicted in overlapping windows (default %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--allow-input-shift", action="store_true", help="predict proteins whose graph kind the "
                        "predictor never saw in training (a warning instead of a refusal)")
    ray = parser.add_argument_group("cluster (--ray)")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data: streamed, sharded, resumable")
    ray.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, a running `ray start`, else a "
                     "local cluster)")
    ray.add_argument("--dry-run", action="store_true", help="print the hardware plan of --ray and exit")
    ray.add_argument("--cluster", metavar="YAML", help="plan from this cluster YAML's node types (with --dry-run)")
    ray.add_argument("--probabilities", action="store_true", help="keep per-residue label probabilities in the "
                     "result shards")
    ray.add_argument("--overwrite", action="store_true", help="discard the shards of an interrupted run made with "
                     "other inputs or arguments, and start over")
    return parser


def fixed_text(fixed: Counter) -> str:
    shown = [f"{count} {FIXES[name]}" for name, count in sorted(fixed.items()) if count]
    return "; repaired: " + ", ".join(shown) if shown else ""


def report_rejects(rejects: list[Reject], where: str | None) -> str:
    if not rejects:
        return ""
    print(f"rejected {len(rejects)} record(s){f' (listed in {where})' if where else ''}; the first: "
          f"{rejects[0].reason}", file=sys.stderr)
    return f"; {len(rejects)} rejected"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and args.out_dir is None and not args.dry_run:
        parser.error("say where the predictions go: --out-dir DIR (3-line, GFF3, TSV, plots) and/or --out FILE.3line")
    if args.plots and args.out_dir is None:
        parser.error("--plots writes into --out-dir/plots; give --out-dir")
    if args.plots and (args.ray or args.dry_run):
        # Refused before any cluster starts: the Ray path writes shards and the assembled text files, never PNGs
        # (a proteome's worth of plots is not what --ray is for), so the flag would silently do nothing.
        parser.error("--plots is not supported with --ray: plot the proteins you want to see with the in-process "
                     "path (the same command without --ray, on a FASTA of those proteins); --ray --probabilities "
                     "keeps every protein's per-residue probabilities in its result shard")
    if (args.ray or args.dry_run) and args.out_dir is None and not args.dry_run:
        parser.error("--ray writes result shards into --out-dir; give --out-dir")
    try:
        cut = Batching(batch_size=args.batch_size, max_residues=args.max_residues, max_length=args.max_length)
        files = list_inputs(args.input)
        device = resolve_device("cpu" if args.dry_run else args.device)
        predictor = load_predictor(args.checkpoint, device if not args.ray else "cpu")
        if args.embed_weights and not predictor.inputs.embedding:
            raise ValueError(f"--embed-weights: {args.checkpoint} was trained without embeddings")
    except (CheckpointError, InputError, RecordError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.ray or args.dry_run:
        return predict_on_ray(args, predictor, files, cut)
    return predict_in_process(args, predictor, files, cut, device)


def predict_on_ray(args: argparse.Namespace, predictor: Predictor, files: list[str], cut: Batching) -> int:
    """--ray / --dry-run: the hardware plan from the cluster (or --cluster YAML), then the Ray Data pipeline."""
    # Deferred: Ray, the planner and the pipeline are imported only for --ray (a bare GPU box predicts without Ray).
    from protopo_ray.cluster import batch_predict, prepare_tasks  # deferred: Ray (see above)
    from protopo_ray.search import inventory as cluster_inventory  # deferred: the planner (see above)
    from protopo_ray.search.predict_plan import format_predict_plan, inference_bytes, plan_prediction  # see above

    shifts = expected_shifts(predictor.inputs, bool(args.structures), where=str(args.checkpoint))
    if refusal(shifts) and not args.allow_input_shift:
        print(f"error: {refusal(shifts)}", file=sys.stderr)
        return 2
    for shift in shifts:
        print(f"warning: {shift.message}", file=sys.stderr)
    import ray  # deferred with the rest: only --ray needs it

    owned = not ray.is_initialized()  # a cluster this call starts is shut down when it ends; a joined one stays
    if args.cluster:
        inventory = cluster_inventory.inventory_from_cluster_yaml(args.cluster)
    else:
        prepare_tasks.connect(args.address)
        inventory = cluster_inventory.read_inventory()
    members = len(getattr(predictor.module, "members", [None]))
    footprint = inference_bytes(predictor.config.model, cut.max_residues, members, predictor.inputs.embedding_dim)
    plan = plan_prediction(inventory, footprint, embedding=bool(predictor.inputs.embedding))
    print(format_predict_plan(plan, inventory), flush=True)
    if args.dry_run:
        if owned:
            prepare_tasks.disconnect()
        return 0
    resources = batch_predict.Resources(
        network_actors=plan.network_actors, gpus_per_actor=plan.gpus_per_actor, cpus_per_actor=plan.cpus_per_actor,
        embed_actors=plan.embed_actors, embed_gpus=plan.embed_gpus, embed_cpus=plan.embed_cpus, devices=plan.devices,
        device=plan.device, usd_per_device_hour=plan.usd_per_device_hour)
    try:
        return batch_predict.run(args, predictor, files, cut, resources)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if owned:
            prepare_tasks.disconnect()


def predict_in_process(args: argparse.Namespace, predictor: Predictor, files: list[str], cut: Batching,
                       device) -> int:
    """The single-process path: the same units, batches and functions as --ray, held in memory."""
    start = time.perf_counter()
    residues = unit_residues(predictor.inputs.embedding_dim)
    try:
        units = [unit for index, path in enumerate(files) for unit in read_units(path, index, residues)]
        if not any(unit.records for unit in units):
            first = next((item for unit in units for item in unit.items), None)
            raise InputError(f"{args.input}: no records (the file is empty or holds only blank lines); expected FASTA "
                             f"records ('>ID' header, sequence lines) or 3-line records" if first is None else
                             f"{args.input}: none of its record(s) is valid, so there is nothing to predict; the "
                             f"first problem: {first.reason}")
        built = [build_inputs(unit.records, args.structures, predictor.inputs.graph_k, cut) for unit in units]
        # The new proteins are embedded with the checkpoint's own model and layer (embed_records), so only their
        # graph kinds can differ from what it trained on.
        shifts = find_input_shifts(predictor.inputs, [i.graph_source for group in built for i in group],
                                   predictor.inputs.embedding, where=str(args.checkpoint))
        if refusal(shifts) and not args.allow_input_shift:
            raise InputError(refusal(shifts))
        for shift in shifts:
            print(f"warning: {shift.message}", file=sys.stderr)
        module, decoder = predictor.module, cpu_decoder(predictor.module)
        predicted: dict[tuple[int, int], object] = {}
        for unit, inputs in zip(units, built):
            embedded = embed_records(unit.records, predictor.inputs.embedding, args.embed_weights)
            for n, prediction in enumerate(predict_inputs(module, with_embeddings(inputs, embedded), device, cut,
                                                          decoder)):
                predicted[(id(unit), n)] = prediction
    except (InputError, EmbeddingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ordered, records = [], {}
    for unit in units:
        for n, record in enumerate(unit.records):
            records[id(record)] = predicted[(id(unit), n)]
        ordered += unit.items
    items = first_occurrences(ordered)
    predictions = [records[id(item)] for item in items if isinstance(item, ProteinRecord)]
    rejects = [item for item in items if isinstance(item, Reject)]
    fixed = sum((Counter(unit.fixed) for unit in units), Counter())
    if args.out is not None:
        write_3line(args.out, predictions)
    if args.out_dir is not None:
        write_outputs(args.out_dir, predictions, plots=args.plots, rejects=rejects)
    wall = time.perf_counter() - start
    rejected = report_rejects(rejects, str(Path(args.out_dir) / FILES["rejects"]) if args.out_dir else None)
    print(f"wrote {len(predictions)} predictions to {', '.join(str(p) for p in (args.out, args.out_dir) if p)}: "
          f"{len(predictions) / wall:.1f} proteins/s in {wall:.1f} s on {device} (one process){rejected}"
          f"{fixed_text(fixed)}")
    labelled = [item for item in items if isinstance(item, ProteinRecord)]
    if labelled and all(r.labels for r in labelled):
        metrics = protein_metrics([r.labels for r in labelled], [p.labels for p in predictions],
                                  ids=[r.id for r in labelled])
        print(format_metrics(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
