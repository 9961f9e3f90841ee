"""The training-loop core: optimiser, schedule, loss, one training epoch, evaluation.

Plain PyTorch. The in-process path (`python -m protopo_ray.train --local`) and every Ray Train worker call
these same functions; only where batches come from and how results are reported differ (see `fit`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from protopo_ray.config import TrainConfig
from protopo_ray.data.alphabet import IGNORE_LABEL, LABEL_INDEX, LABELS, NUM_LABELS
from protopo_ray.data.collate import table_to_batch
from protopo_ray.model.metrics import ProteinResult, protein_result
from protopo_ray.training.checkpoint import unwrap


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Decay matrices only: decaying LayerNorm gains and biases just fights the normalisation.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_loss(cfg: TrainConfig) -> nn.CrossEntropyLoss:
    weight = None
    if cfg.label_weights:
        weight = torch.ones(NUM_LABELS)
        for letter, value in cfg.label_weights.items():
            weight[LABEL_INDEX[letter]] = value
    # IGNORE_LABEL marks residues without a label (prediction inputs); they never contribute.
    return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_LABEL, label_smoothing=cfg.label_smoothing)


@dataclass
class EpochStats:
    loss: float = 0.0
    steps: int = 0
    num_residues: int = 0
    num_proteins: int = 0
    seconds: float = 0.0
    data_wait_s: float = 0.0
    grad_norm_mean: float = 0.0
    grad_norm_max: float = 0.0
    clipped_steps: int = 0
    lr: float = 0.0
    first_step_unix: float = 0.0
    """Wall-clock time when the epoch's first optimiser step finished (trial start-up overhead is measured to it)."""

    @property
    def residues_per_s(self) -> float:
        return self.num_residues / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_share(self) -> float:
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0

    def as_metrics(self, prefix: str = "train_") -> dict[str, float]:
        values = asdict(self)
        values.update(residues_per_s=self.residues_per_s, data_wait_share=self.data_wait_share)
        return {f"{prefix}{key}": float(value) for key, value in values.items()}


def prefetch(make_batch: Callable[[np.ndarray], object], plan: Sequence[np.ndarray], depth: int = 2) -> Iterator:
    """Collate upcoming batches in a background thread so the step never waits on collation.

    Collation (Arrow -> PyG Batch) is numpy work that releases the GIL for most of its time.
    """
    if depth <= 0:
        for indices in plan:
            yield make_batch(indices)
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for indices in plan:
                slots.put(make_batch(indices))
        except BaseException as error:  # surfaced in the consumer
            slots.put(error)
        slots.put(done)

    threading.Thread(target=produce, daemon=True, name="protopo-prefetch").start()
    while (item := slots.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def collated(tables: Iterable[pa.Table], depth: int = 2, pin: bool = False) -> Iterator:
    """PyG batches of a stream of Arrow batch tables, collated in a prefetch thread ahead of the step; `pin`
    (for a CUDA device) puts each in pinned memory there too, so its copy to the device can be asynchronous."""
    return prefetch(functools.partial(_collate, pin=pin), tables, depth)


def _collate(table: pa.Table, pin: bool):
    batch = table_to_batch(table)
    return batch.pin_memory() if pin else batch


def iter_batches(table: pa.Table, plan: list[np.ndarray], prefetch_depth: int = 2) -> Iterator:
    """Collated batches of a plan of row indices into `table` (tools that plan their own batches)."""
    return collated((table.take(pa.array(idx)) for idx in plan), prefetch_depth)


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch, device: torch.device):
    """`batch` on `device`, with what the forward pass would otherwise read back from the device taken on the
    host first: `max_length` (the longest protein) and `host_lengths` (the packed LSTM's lengths). On CUDA
    the copy is from pinned memory (pinned here unless `collated(pin=True)` did it) and asynchronous. The
    caller's batch is left as it was (a shallow copy moves), so a tool can hand the same batches in again."""
    batch = copy.copy(batch)
    ptr = getattr(batch, "ptr", None)
    if ptr is not None and ptr.device.type == "cpu":
        lengths = ptr[1:] - ptr[:-1]
        batch.max_length = int(lengths.max()) if lengths.numel() else 0
    if device.type == "cuda":
        if batch.x.device.type == "cpu" and not batch.x.is_pinned():
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    if ptr is not None and ptr.device.type == "cpu":
        batch.host_lengths = lengths  # set after the copy: it stays on the host
    return batch


class StepTotals:
    """An epoch's running sums, kept on the device so that no step reads anything back (`read` is the sync)."""

    def __init__(self, device: torch.device, clip: float) -> None:
        zero = functools.partial(torch.zeros, (), device=device)
        self.clip = clip
        self.loss_sum, self.norm_sum = zero(dtype=torch.float64), zero(dtype=torch.float64)
        self.norm_max = torch.full((), -math.inf, dtype=torch.float64, device=device)
        self.residues, self.finite_norms, self.clipped = (zero(dtype=torch.int64) for _ in range(3))

    def add(self, loss: Tensor, residues: Tensor, norm: Tensor) -> None:
        # float64 sums of the float32 values: what the loop summed in Python floats before (tests/test_loop.py)
        self.loss_sum += loss.double() * residues
        self.residues += residues
        norm = norm.double()
        finite = torch.isfinite(norm)
        self.norm_sum += torch.where(finite, norm, 0.0)
        self.norm_max = torch.maximum(self.norm_max, torch.where(finite, norm, -math.inf))
        self.finite_norms += finite
        if self.clip > 0:
            self.clipped += norm > self.clip

    def read(self) -> dict[str, float]:
        """Every sum in one copy to the host (one sync)."""
        values = torch.stack([self.loss_sum, self.residues.double(), self.norm_sum, self.norm_max,
                              self.finite_norms.double(), self.clipped.double()]).tolist()
        return dict(zip(("loss_sum", "residues", "norm_sum", "norm_max", "finite_norms", "clipped"), values))


def train_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, scheduler, loss_fn: nn.Module,
               cfg: TrainConfig, totals: StepTotals) -> None:
    """One optimiser step on a batch already on the device (`to_device`); adds its loss, labelled residues and
    gradient norm to `totals` on the device and reads nothing back (tests/test_loop.py counts it: 0 syncs)."""
    with _autocast(batch.x.device, cfg.bf16):
        logits = model(batch)
    # through the (DDP) wrapper for the forward, the bare model for the loss its decoder calls for (CE or CRF NLL)
    loss = unwrap(model).loss(batch, logits, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # clip_grad_norm_ returns the norm before clipping: exactly the spike statistic the seed watched.
    max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    scheduler.step()
    totals.add(loss.detach(), (batch.y != IGNORE_LABEL).sum(), norm)


def _fill(stats: EpochStats, totals: StepTotals, optimizer: torch.optim.Optimizer, start: float) -> EpochStats:
    sums = totals.read()  # before the clock stops: the device work of the last steps is then inside `seconds`
    stats.seconds = time.perf_counter() - start
    stats.num_residues = int(sums["residues"])
    stats.loss = sums["loss_sum"] / max(1, stats.num_residues)
    finite = int(sums["finite_norms"])
    stats.grad_norm_mean = sums["norm_sum"] / finite if finite else float("nan")
    stats.grad_norm_max = sums["norm_max"] if finite else float("nan")
    stats.clipped_steps = int(sums["clipped"])
    stats.lr = float(optimizer.param_groups[0]["lr"])
    return stats


def train_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    *,
    on_progress: Callable[[EpochStats], None] | None = None,
    progress_every: int = 0,
) -> EpochStats:
    """One pass over `batches` (an iterable of PyG Batches). Returns loss and gradient-norm statistics.

    The statistics add up on the device and are read back once at the end of the epoch, so no step waits for
    the device (on CUDA: one more sync after the first step, for `first_step_unix`). With `on_progress`, every
    `progress_every` steps the statistics so far are read (one sync each) and handed to it: live metrics.
    """
    model.train()
    loss_fn = loss_fn.to(device)
    stats = EpochStats()
    totals = StepTotals(device, cfg.clip_grad_norm)
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        wait_start = time.perf_counter()
        batch = next(iterator, None)
        stats.data_wait_s += time.perf_counter() - wait_start
        if batch is None:
            break
        batch = to_device(batch, device)
        train_step(model, batch, optimizer, scheduler, loss_fn, cfg, totals)
        stats.num_proteins += int(batch.num_graphs)
        stats.steps += 1
        if stats.steps == 1:
            if device.type == "cuda":  # "when the first step finished", as the field says, not when it was queued
                torch.cuda.synchronize(device)
            stats.first_step_unix = time.time()
        if on_progress is not None and progress_every > 0 and stats.steps % progress_every == 0:
            on_progress(_fill(replace(stats), totals, optimizer, start))
    return _fill(stats, totals, optimizer, start)


@torch.no_grad()
def predict_labels(model: nn.Module, batches: Iterable, device: torch.device, bf16: bool = False) -> Iterator:
    """Yield (protein_id, sequence, true_labels or "", predicted_labels, loss_sum, residues) per batch.

    Labels are decoded by the model (`TopologyModel.decode`); the loss is its unweighted training loss summed
    (cross-entropy, or the CRF's NLL), so val_loss of a CRF model is its NLL per residue.
    """
    model.eval()
    letters = np.array(list(LABELS))
    for batch in batches:
        batch = batch.to(device)
        with _autocast(device, bf16):
            logits = model(batch).float()
        core = unwrap(model)
        pred = core.decode(batch, logits).cpu().numpy()  # argmax or grammar Viterbi, as model.decoder says
        y = batch.y.cpu().numpy()
        labelled = y != IGNORE_LABEL
        loss_sum = float(core.loss(batch, logits, reduction="sum")) if labelled.any() else 0.0
        ptr = batch.ptr.cpu().numpy()
        out = []
        for i in range(int(batch.num_graphs)):
            lo, hi = ptr[i], ptr[i + 1]
            true = "".join(letters[y[lo:hi]]) if labelled[lo:hi].all() else ""
            out.append((batch.protein_id[i], batch.sequence[i], true, "".join(letters[pred[lo:hi]])))
        yield out, loss_sum, int(labelled.sum())


def evaluate(model: nn.Module, batches: Iterable, device: torch.device, bf16: bool = False) -> tuple[float, float, list[ProteinResult]]:
    """(loss sum, labelled residues, per-protein results) over `batches`.

    Returns sums and per-protein results rather than a finished metric dict so that DDP ranks can gather
    them and compute the metrics over the whole split (`metrics.aggregate`).
    """
    loss_sum, residues, results = 0.0, 0, []
    for proteins, batch_loss, batch_residues in predict_labels(model, batches, device, bf16):
        loss_sum += batch_loss
        residues += batch_residues
        results.extend(protein_result(true, pred) for _, _, true, pred in proteins)
    return loss_sum, residues, results
