"""What one trial needs in GPU memory, from its config and the real batch plan of its data.

The peak of a training step is the weights, gradients and AdamW moments plus the activations of the largest
padded batch one rank ever sees. Under length bucketing the batch holding the longest protein holds its
length neighbours, all padded to it, so without a residue budget a rank's peak batch is
ceil(batch_size / workers) x the longest protein; with `data.max_residues_per_batch` it is the budget (or one
protein longer than it). Activations are counted at 4 bytes: the LSTM, which holds most of them, runs in
fp32 even under bf16 autocast (`model.ChainLSTM`), and GC activations are a small share; their analytic
count is scaled by what a step was measured to hold (MEASURED_ACTIVATION_SCALE).
"""

from __future__ import annotations

from dataclasses import dataclass

from protopo_ray.config import Config

#: Measured / analytic activation bytes of a steady-state training step (tools/bench_footprint.py, CPU, peak
#: resident memory, five configs over both operators, 1-4 LSTM layers, GC 64-512, LSTM 128-512): 0.36-0.52. The
#: analytic count (model.footprint) sums every tensor autograd saves as if all were alive at once; at the peak
#: part of them is already freed. Fitted here so the planner packs GPUs by what a step really holds; the
#: figures were not measured on a GPU (no device was lent), where `--cuda` of the same tool re-checks them.
MEASURED_ACTIVATION_SCALE = 0.45


@dataclass(frozen=True, kw_only=True, slots=True)
class TrialFootprint:
    padded_positions: int
    """LSTM positions (proteins x padded length) of one rank's largest batch."""
    total_bytes: int
    """Weights + grads + AdamW + that batch's activations: the training step's peak, per worker."""


def peak_padded_positions(config: Config, longest: int, world_size: int = 1) -> int:
    """Padded residues of one rank's largest batch under the run's batch plan (see `batching.plan_batches`)."""
    per_rank = -(-config.data.batch_size // max(1, world_size))
    unbudgeted = per_rank * max(1, longest)
    budget = config.data.max_residues_per_batch
    return min(unbudgeted, max(budget, longest)) if budget else unbudgeted


def trial_footprint(config: Config, longest: int, world_size: int = 1) -> TrialFootprint:
    """Peak training memory of one worker of a run of `config` over data whose longest protein is `longest`."""
    from protopo_ray.model.network import footprint

    positions = peak_padded_positions(config, longest, world_size)
    estimate = footprint(config.model, batch_size=1, max_len=positions, dtype_bytes=4)
    # Steady state: weights and AdamW's two moments live all the time; the activations of a step are freed
    # during backward while its gradients appear, so the peak holds one or the other, not both.
    persistent = estimate.weights_bytes + estimate.optimizer_bytes
    activations = MEASURED_ACTIVATION_SCALE * estimate.batch_activation_bytes
    return TrialFootprint(padded_positions=positions,
                          total_bytes=int(persistent + max(activations, estimate.grads_bytes)))
