"""What training a model needs in memory: an analytic count per config (`footprint`), and what one trial needs
in GPU memory from its config and the real batch plan of its data (`trial_footprint`).

The peak of a training step is the weights, gradients and AdamW moments plus the activations of the largest
padded batch one rank ever sees. Under length bucketing the batch holding the longest protein holds its
length neighbours, all padded to it, so without a residue budget a rank's peak batch is
ceil(batch_size / workers) x the longest protein; with `data.max_residues_per_batch` it is the budget (or one
protein longer than it). Activations are counted at 4 bytes: the LSTM, which holds most of them, runs in
fp32 even under bf16 autocast (`network.ChainLSTM`), and GC activations are a small share; their analytic
count is scaled by what a step was measured to hold (MEASURED_ACTIVATION_SCALE).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from protopo_ray.config import Config, ModelConfig
from protopo_ray.data import shards
from protopo_ray.data.alphabet import NUM_LABELS
from protopo_ray.data.graphs import DEFAULT_K
from protopo_ray.model.features import feature_groups, num_features
from protopo_ray.model.grammar import default_grammar
from protopo_ray.model.network import NUM_EDGE_FEATURES, NUM_NODE_FEATURES, count_parameters

#: Measured / analytic activation bytes of a steady-state training step (tools/bench_footprint.py, CPU, peak
#: resident memory, five configs over both operators, 1-4 LSTM layers, GC 64-512, LSTM 128-512): 0.36-0.52. The
#: analytic count (`footprint`) sums every tensor autograd saves as if all were alive at once; at the peak
#: part of them is already freed. Fitted here so the planner packs GPUs by what a step really holds; the
#: figures were not measured on a GPU (no device was lent), where `--cuda` of the same tool re-checks them.
MEASURED_ACTIVATION_SCALE = 0.45


@dataclass(kw_only=True, frozen=True, slots=True)
class Footprint:
    num_parameters: int
    """Trainable parameters."""
    weights_bytes: int
    """Parameters, fp32 (autocast keeps master weights in fp32)."""
    grads_bytes: int
    """One fp32 gradient per parameter."""
    optimizer_bytes: int
    """AdamW's two fp32 moment buffers."""
    activation_bytes_per_residue: int
    """Tensors kept for backward per padded residue position, including the safety factor."""
    batch_activation_bytes: int
    """activation_bytes_per_residue x batch_size x max_len."""
    total_bytes: int
    """Weights + grads + optimizer + batch activations: the training-step peak to plan for."""


#: Calibration (tools/bench_model.py, CPU, torch 2.13, train mode, batch 4 x 200, k=16): the bytes of tensors autograd
#: saves for backward (torch.autograd.graph.saved_tensors_hooks, storages de-duplicated, parameters excluded) over
#: `activation_elements_per_residue` x 4 bytes came to 0.80-0.93 on seven configs spanning every operator, uni/bi,
#: gc 64-512 x 1-4 layers, lstm 128-512 x 1-4 layers. So the analytic count is already a mild upper bound of what is
#: kept; the factor adds room for what the hooks cannot see: activation gradients live during backward (about one
#: layer's worth), backward temporaries and allocator rounding. Not yet checked against cuDNN's LSTM reserve space
#: on a GPU (torch.cuda.max_memory_allocated), which is the next calibration to do.
ACTIVATION_SAFETY = 1.25


def activation_elements_per_residue(cfg: ModelConfig, k: int = DEFAULT_K, embedding_dim: int = 0) -> int:
    """Elements kept for backward per padded residue, from the layer widths (coefficients fitted to the
    saved-tensor measurements described at ACTIVATION_SAFETY; an int64 index counts as 2 elements).
    `embedding_dim` embedding inputs per residue widen the node features and the concatenated input."""
    w, e, hdim = cfg.gc_size, cfg.aa_embed_dim, cfg.lstm_size
    directions = 2 if cfg.bidirectional else 1
    # embedding, concatenated input (with the embedding inputs, which x also holds), projection, LayerNorm in/out, padded
    n = e + (e + NUM_NODE_FEATURES + embedding_dim) + embedding_dim + 4 * w
    for _ in range(cfg.gc_layers):
        if cfg.gc_operator == "cfconv":
            # per edge: RBF + edge features, filter hidden / SiLU / filter, gathered source features, message
            # (measured 4.25 w + 19 per edge)
            n += k * (5 * w + 2 * (16 + NUM_EDGE_FEATURES)) + 4 * w
        else:
            # gcn / graphconv keep no per-edge features (the edge weights need no grad), only the gather /
            # scatter indices; conv output, GELU, dropout mask, residual (measured 3.2-4.3 w)
            n += 4 * k + 5 * w
    for layer in range(cfg.lstm_layers):
        in_size = w if layer == 0 else hdim * directions
        # per direction: input copies (time-major, reversed) and the CPU LSTM's workspace, which grows with the
        # input width too (measured ~16.4 H + 0.7-5 x in); between layers the dropout output and mask
        n += directions * (5 * in_size + 16 * hdim) + (2 * in_size if layer > 0 else 0)
    n += 3 * hdim * directions + 3 * NUM_LABELS  # gathered flat output, dropout, head input / logits / softmax
    if cfg.decoder == "crf":
        # the CRF's scaled forward pass, run twice (all paths, true-label paths): per step and state the gathered
        # predecessors and their weighted copies (K each), the step sum, emission product and normalised alpha
        grammar = default_grammar()
        indegree = max(sum(1 for _, b in grammar.edges if b == s) for s in range(grammar.num_states))
        n += 2 * grammar.num_states * (2 * indegree + 3)
    if cfg.feature_hydropathy or cfg.feature_charge or cfg.feature_blosum:
        n += num_features(feature_groups(cfg.feature_hydropathy, cfg.feature_charge, cfg.feature_blosum))
    return n


def footprint(cfg: ModelConfig, batch_size: int, max_len: int, dtype_bytes: int = 4,
              embedding_dim: int = 0) -> Footprint:
    """Memory to train `cfg` with AdamW on `batch_size` proteins padded to `max_len` residues.

    `dtype_bytes` is the activation dtype (2 under bf16 autocast); weights, grads and AdamW states stay fp32.
    `embedding_dim`: embedding values per residue the shards add (`shards.embedding_dim`; 1280 for ESM-2 650M).
    The estimate is monotone in every size knob (gc_size, gc_layers, lstm_size, lstm_layers, batch, length).
    """
    if batch_size < 1 or max_len < 1 or dtype_bytes < 1:
        raise ValueError(f"footprint needs batch_size, max_len, dtype_bytes >= 1, got {batch_size}, {max_len}, {dtype_bytes}")
    num_parameters = count_parameters(cfg, embedding_dim)
    weights = 4 * num_parameters
    per_residue = int(activation_elements_per_residue(cfg, embedding_dim=embedding_dim) * dtype_bytes * ACTIVATION_SAFETY)
    activations = per_residue * batch_size * max_len
    return Footprint(
        num_parameters=num_parameters,
        weights_bytes=weights,
        grads_bytes=weights,
        optimizer_bytes=2 * weights,
        activation_bytes_per_residue=per_residue,
        batch_activation_bytes=activations,
        total_bytes=4 * weights + activations,
    )


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


@functools.lru_cache(maxsize=64)
def _manifest_embedding_dim(path: str) -> int:
    try:
        return shards.embedding_dim(shards.read_manifest(path))
    except (OSError, ValueError):  # no shards there yet (a dry run before prepare): plan for none
        return 0


def trial_footprint(config: Config, longest: int, world_size: int = 1,
                    embedding_dim: int | None = None) -> TrialFootprint:
    """Peak training memory of one worker of a run of `config` over data whose longest protein is `longest`
    (and `embedding_dim` embedding inputs per residue; default: what the manifest at `config.data.path` records,
    so the search plans ESM-2 inputs without being told)."""
    if embedding_dim is None:
        embedding_dim = _manifest_embedding_dim(str(config.data.path))
    positions = peak_padded_positions(config, longest, world_size)
    estimate = footprint(config.model, batch_size=1, max_len=positions, dtype_bytes=4, embedding_dim=embedding_dim)
    # Steady state: weights and AdamW's two moments live all the time; the activations of a step are freed
    # during backward while its gradients appear, so the peak holds one or the other, not both.
    persistent = estimate.weights_bytes + estimate.optimizer_bytes
    activations = MEASURED_ACTIVATION_SCALE * estimate.batch_activation_bytes
    return TrialFootprint(padded_positions=positions,
                          total_bytes=int(persistent + max(activations, estimate.grads_bytes)))
