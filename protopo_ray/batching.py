"""Length-bucketed batch plans: which proteins go together in each batch of an epoch.

The LSTM runs over padded batches, so a batch costs (proteins x longest protein) steps. DeepTMHMM lengths
range from 50 to 5,478 residues; random batches spend most of those steps on padding. Here proteins are
shuffled, then sorted by length inside windows of `bucket_batches` batches, cut into batches, and the batch
order is shuffled again: similar lengths share a batch while every epoch still sees a new order.

Pure numpy. The same plan drives the in-process loop and every Ray Train worker (each rank takes its own
slice of the one global plan, see `shard_batches`).
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
) -> list[np.ndarray]:
    """Index arrays, one per batch, covering an epoch.

    `max_residues` > 0 closes a batch before its padded size (proteins x longest) would exceed the budget;
    a single protein longer than the budget still gets a batch of its own. `weights` resamples the epoch
    with replacement (same number of draws as proteins), e.g. to show rare protein types more often.
    """
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
        batches.extend(_cut(chunk, lengths, batch_size, max_residues))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _cut(chunk: np.ndarray, lengths: np.ndarray, batch_size: int, max_residues: int) -> list[np.ndarray]:
    if max_residues <= 0:
        return [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches, start, longest = [], 0, 0
    for i, index in enumerate(chunk):
        count = i - start
        longest_if_added = max(longest, int(lengths[index]))
        if count and (count == batch_size or (count + 1) * longest_if_added > max_residues):
            batches.append(chunk[start:i])
            start, longest_if_added = i, int(lengths[index])
        longest = longest_if_added
    batches.append(chunk[start:])
    return batches


def eval_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, max_residues: int = 0) -> list[np.ndarray]:
    """Deterministic batches for evaluation: sorted by length over the whole split (least padding)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    return _cut(order, lengths, batch_size, max_residues) if len(order) else []


def shard_batches(batches: list[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's batches of a global plan: disjoint across ranks and the same count on every rank.

    DDP needs every rank to take the same number of steps or the all-reduce hangs, so the last
    `len(batches) % world_size` batches of the (shuffled) plan are left out of this epoch.
    """
    if world_size <= 1:
        return batches
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


def padding_efficiency(lengths: Sequence[int] | np.ndarray, batches: list[np.ndarray]) -> float:
    """Real residues / LSTM positions (proteins x longest protein, summed over batches)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return real / padded if padded else 1.0
