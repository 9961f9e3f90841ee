"""Decoding speed of the grammar CRF: batched Viterbi (and the CRF NLL's forward+backward) on one core.

    .venv/bin/python -m tools.bench_decode [--labels ../shared/data/deeptmhmm/DeepTMHMM.partitions.json] [--fold cv2]

Uses the real proteins' lengths of one fold (length-sorted batches, as evaluation batches them) and random
emissions (decoding time does not depend on their values). Prints proteins/s and residues/s of CPU time (process time: one thread, so per core, and robust to a
shared machine's load).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from protopo_ray.data.alphabet import NUM_LABELS
from protopo_ray.data.batching import eval_batches
from protopo_ray.data.records import read_records
from protopo_ray.model.crf import CRF
from protopo_ray.model.grammar import Decoding, default_grammar


def run(lengths: np.ndarray, batch_size: int, crf: CRF, train: bool) -> float:
    seconds = 0.0
    g = torch.Generator().manual_seed(0)
    for idx in eval_batches(lengths, batch_size):
        lens = torch.from_numpy(lengths[idx])
        emissions = torch.randn(len(idx), int(lens.max()), NUM_LABELS, generator=g).log_softmax(-1)
        start = time.process_time()
        if train:
            emissions.requires_grad_(True)
            labels = torch.zeros(len(idx), int(lens.max()), dtype=torch.long)  # all I: a globular protein
            nll, _ = crf.nll(emissions, lens, labels)
            nll.sum().backward()
        else:
            crf.decode(emissions, lens)
        seconds += time.process_time() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", default="../shared/data/deeptmhmm/DeepTMHMM.partitions.json")
    parser.add_argument("--fold", default="cv2")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    records = [r for r in read_records(args.labels).records if r.fold == args.fold]
    lengths = np.array([len(r.sequence) for r in records])
    grammar = default_grammar()
    crf = CRF.fixed(grammar, Decoding(entry_penalty=2.0))
    print(f"{len(records)} proteins of {args.fold} ({lengths.sum()} residues, mean {lengths.mean():.0f}), "
          f"grammar {grammar.num_states} states, batches of {args.batch_size}, 1 thread")
    for train in (False, True):
        run(lengths[:64], args.batch_size, crf, train)  # warm-up
        seconds = run(lengths, args.batch_size, CRF(grammar) if train else crf, train)
        what = "CRF NLL forward+backward" if train else "Viterbi decode"
        print(f"{what}: {len(lengths) / seconds:.0f} proteins/s, {lengths.sum() / seconds:.0f} residues/s "
              f"({seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
