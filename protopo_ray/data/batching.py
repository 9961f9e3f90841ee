"""Length-bucketed batch plans: which proteins go together in each batch of an epoch.

The LSTM runs over padded batches, so a batch costs (proteins x longest protein) steps. DeepTMHMM lengths
range from 50 to 5,478 residues; random batches spend most of those steps on padding. Here proteins are
shuffled, then sorted by length inside windows of `bucket_batches` batches, cut into batches, and the batch
order is shuffled again: similar lengths share a batch while every epoch still sees a new order.

Pure numpy. The same plan drives the in-process loop and every Ray Train worker.

The global-batch rule for N DDP workers: `data.batch_size` is the *global* batch. Every rank cuts the same
seeded plan of global batches and takes its 1/N of each one (`shard_batches`), so a run takes the same
optimiser steps per epoch and sees the same batches whatever its worker count: a trial searched on one GPU
and promoted to eight continues the optimisation it was searched with, at the searched LR. The residue budget
`max_residues` stays a per-rank memory bound (a global batch may hold N times as many padded residues), and
with N ranks every global batch holds at least N proteins, so every rank takes every step (DDP never hangs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    max_residues: int = 0,
    bucket_batches: int = 16,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    weights: Sequence[float] | np.ndarray | None = None,
    world_size: int = 1,
) -> list[np.ndarray]:
    """Index arrays, one per (global) batch, covering an epoch.

    `max_residues` > 0 closes a batch before one rank's padded slice (ceil(proteins / world_size) x longest)
    would exceed the budget; a single protein longer than the budget still gets a slice of its own.
    `weights` resamples the epoch with replacement (same number of draws as proteins), e.g. to show rare
    protein types more often. With `world_size` > 1 every batch holds at least `world_size` proteins (a short
    last batch is merged into the one before it).
    """
    if world_size > 1 and len(lengths) < world_size:
        raise ValueError(f"{len(lengths)} proteins cannot give each of {world_size} DDP ranks a batch; "
                         "use fewer workers or more data")
    if world_size > batch_size:
        raise ValueError(f"data.batch_size={batch_size} is the global batch; it must be >= the {world_size} "
                         "DDP workers that split it")
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    if weights is not None:
        p = np.asarray(weights, dtype=np.float64)
        order = rng.choice(n, size=n, replace=True, p=p / p.sum())
    elif shuffle:
        order = rng.permutation(n)
    else:
        order = np.arange(n)
    window = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, n, window):
        chunk = order[start : start + window]
        if bucket_batches > 1:
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(_cut(chunk, lengths, batch_size, max_residues, world_size))
    batches = _merge_short_tail(batches, world_size)  # the last window may hold fewer than world_size
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def plan_balanced(
    lengths: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    batch_size: int,
    *,
    max_residues: int = 0,
    bucket_batches: int = 16,
    seed: int = 0,
    epoch: int = 0,
    world_size: int = 1,
) -> list[np.ndarray]:
    """An epoch of (global) batches in which every group (protein type) has an equal share of every batch
    (DeepTMHMM's sampler): as many batches as a plain epoch, each holding batch_size // G proteins of each of the
    G groups present (the remainder going to groups in turn). Each group is drawn from its own shuffled
    permutations, cycled, so a rare group repeats within an epoch and a common one is seen in part.

    Length bucketing still holds within a window of `bucket_batches` batches: each group's draws for the window
    are sorted by length and dealt out in order, so batch b takes every group's b-th slice (similar length
    quantiles, little padding). `max_residues` then cuts a batch whose widest rank slice is over budget (its
    groups stay mixed); every batch keeps >= `world_size` proteins.
    """
    if world_size > batch_size:
        raise ValueError(f"data.batch_size={batch_size} is the global batch; it must be >= the {world_size} "
                         "DDP workers that split it")
    lengths = np.asarray(lengths, dtype=np.int64)
    groups = np.asarray(groups)
    n = len(lengths)
    if n == 0:
        return []
    if world_size > 1 and n < world_size:
        raise ValueError(f"{n} proteins cannot give each of {world_size} DDP ranks a batch; use fewer workers or more data")
    rng = np.random.default_rng([seed, epoch, 11])
    names = sorted(set(groups.tolist()))
    members = {g: np.flatnonzero(groups == g) for g in names}
    num_batches = -(-n // batch_size)
    # Slots per batch and group: an equal share, the remainder rotating over the groups from batch to batch.
    slots = np.full((num_batches, len(names)), batch_size // len(names), dtype=np.int64)
    for b in range(num_batches):
        for k in range(batch_size % len(names)):
            slots[b, (b + k) % len(names)] += 1

    def draws(group: str, count: int) -> np.ndarray:
        rounds = -(-count // len(members[group]))
        return np.concatenate([rng.permutation(members[group]) for _ in range(rounds)])[:count]

    pools = {g: draws(g, int(slots[:, k].sum())) for k, g in enumerate(names)}
    taken = dict.fromkeys(names, 0)
    batches: list[np.ndarray] = []
    for start in range(0, num_batches, bucket_batches):
        window = slots[start:start + bucket_batches]
        parts: list[list[np.ndarray]] = [[] for _ in range(len(window))]
        for k, g in enumerate(names):
            count = int(window[:, k].sum())
            chunk = pools[g][taken[g]:taken[g] + count]
            taken[g] += count
            if bucket_batches > 1:
                chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            for b, piece in enumerate(np.split(chunk, np.cumsum(window[:-1, k]))):
                parts[b].append(piece)
        for pieces in parts:
            batch = np.concatenate(pieces)
            if max_residues > 0:
                batches.extend(_cut(batch[np.argsort(lengths[batch], kind="stable")], lengths, len(batch), max_residues,
                                    world_size))
            else:
                batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]


def _cut(chunk: np.ndarray, lengths: np.ndarray, batch_size: int, max_residues: int,
         world_size: int = 1) -> list[np.ndarray]:
    if max_residues <= 0:
        return _merge_short_tail([chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)], world_size)
    batches, start, longest = [], 0, 0
    for i, index in enumerate(chunk):
        count = i - start
        longest_if_added = max(longest, int(lengths[index]))
        per_rank = -(-(count + 1) // world_size)  # the largest rank slice if this protein joins
        if count >= world_size and (count == batch_size or per_rank * longest_if_added > max_residues):
            batches.append(chunk[start:i])
            start, longest_if_added = i, int(lengths[index])
        longest = longest_if_added
    batches.append(chunk[start:])
    return _merge_short_tail(batches, world_size)


def _merge_short_tail(batches: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """A last batch too small to give every rank a protein joins the batch before it."""
    if world_size > 1 and len(batches) > 1 and len(batches[-1]) < world_size:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


def eval_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, max_residues: int = 0) -> list[np.ndarray]:
    """Deterministic batches for evaluation: sorted by length over the whole split (least padding)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    return _cut(order, lengths, batch_size, max_residues) if len(order) else []


def shard_batches(batches: list[np.ndarray], lengths: Sequence[int] | np.ndarray, rank: int,
                  world_size: int) -> list[np.ndarray]:
    """This rank's slice of every global batch: disjoint across ranks, one slice per batch on every rank.

    Each batch is sorted by length and dealt out round-robin, so the ranks' slices have similar lengths (no
    rank waits for another's padding); `plan_batches(world_size=N)` makes every batch hold >= N proteins.
    """
    if world_size <= 1:
        return batches
    lengths = np.asarray(lengths)
    out = []
    for batch in batches:
        if len(batch) < world_size:
            raise ValueError(f"a batch of {len(batch)} proteins cannot be split over {world_size} ranks; "
                             "plan it with plan_batches(world_size=...)")
        out.append(batch[np.argsort(lengths[batch], kind="stable")][rank::world_size])
    return out


def padding_efficiency(lengths: Sequence[int] | np.ndarray, batches: list[np.ndarray]) -> float:
    """Real residues / LSTM positions (proteins x longest protein, summed over batches)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return real / padded if padded else 1.0
