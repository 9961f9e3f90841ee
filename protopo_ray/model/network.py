"""Topology model: residue-graph convolutions -> LayerNorm -> (bi)LSTM along the chain -> per-residue classifier.

Pure torch + torch_geometric (no Ray, no torch-scatter / torch-sparse / pyg-lib). The contract is
`TopologyModel(cfg)(batch) -> logits [N, NUM_LABELS]`, flat and aligned with `batch.y`; what is trained and how
labels are read off those logits follows `cfg.decoder`: `model.loss(batch, logits, loss_fn)` (cross-entropy, or
the grammar CRF's NLL) and `model.decode(batch, logits) -> label indices [N]` (argmax, Viterbi over the
softmax with fixed moves, or the CRF's Viterbi). The training loop and every consumer call only these.

The LSTM (`recurrence.ChainLSTM`) runs on right-padded tensors on CPU (packing was ~11x slower there) and, by
default, as cuDNN's bidirectional LSTM over packed sequences on CUDA; both are exact under padding, so a
protein's logits do not depend on what it is batched with.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch_geometric.nn import GCNConv, GraphConv, MessagePassing

from protopo_ray.config import ModelConfig
from protopo_ray.data.alphabet import IGNORE_LABEL, NUM_AA_TOKENS, NUM_LABELS
from protopo_ray.data.graphs import EDGE_FEATURES, NODE_FEATURES, SEPARATION_SCALE
from protopo_ray.model.crf import CRF
from protopo_ray.model.features import SequenceFeatures, feature_groups, num_features
from protopo_ray.model.grammar import Decoding, Grammar, default_grammar
from protopo_ray.model.recurrence import ChainLSTM, reverse_within_length

NUM_NODE_FEATURES = len(NODE_FEATURES)
NUM_EDGE_FEATURES = len(EDGE_FEATURES)

__all__ = ["ChainLSTM", "TopologyModel", "count_parameters", "pad_by_protein", "reverse_within_length"]


class CFConv(MessagePassing):
    """SchNet-style continuous-filter convolution: message = lin(x_src) * MLP(edge features), mean-aggregated.

    The C-alpha distance (edge_attr col 0, in units of 10 Å) is expanded on Gaussian radial basis functions so
    the filter can be sharp in distance; the expansion is zeroed on sequence-window edges (has_distance = 0),
    whose distance column is a placeholder 0, not a real contact. Mean rather than sum keeps the scale the same
    for k-NN (degree k) and sequence-window graphs (different degree).
    """

    def __init__(self, channels: int, num_rbf: int = 16, cutoff: float = 2.0) -> None:
        super().__init__(aggr="mean")
        self.register_buffer("rbf_centers", torch.linspace(0.0, cutoff, num_rbf), persistent=False)
        self.rbf_gamma = (num_rbf / cutoff) ** 2  # Gaussians about one centre spacing wide
        self.filter = nn.Sequential(
            nn.Linear(num_rbf + NUM_EDGE_FEATURES, channels), nn.SiLU(), nn.Linear(channels, channels)
        )
        self.lin_src = nn.Linear(channels, channels, bias=False)
        self.lin_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        distance, has_distance = edge_attr[:, :1], edge_attr[:, 2:3]
        rbf = torch.exp(-self.rbf_gamma * (distance - self.rbf_centers) ** 2) * has_distance
        weight = self.filter(torch.cat([rbf, edge_attr], dim=-1))
        return self.lin_out(self.propagate(edge_index, x=self.lin_src(x), weight=weight))

    def message(self, x_j: Tensor, weight: Tensor) -> Tensor:
        return x_j * weight

    def forward_window(self, x: Tensor, mask: Tensor, window: int) -> Tensor:
        """The same layer on right-padded [B, T, C] sequence-window graphs (`GraphBlock.forward_window`): every
        edge of a window has no distance, so its filter depends on its offset only, one weight vector each."""
        src = self.lin_src(x) * mask[..., None]
        total, count = torch.zeros_like(src), torch.zeros_like(mask, dtype=src.dtype)
        for offset in range(-window, window + 1):
            if offset == 0:
                continue
            # target t, source t + offset: the edge's separation (dst - src) is -offset
            separation = -math.copysign(math.log1p(abs(offset)) / SEPARATION_SCALE, offset)
            features = src.new_zeros(self.filter[0].in_features)
            features[-NUM_EDGE_FEATURES + 1] = separation
            weight = self.filter(features)
            total += _shift(src, offset) * weight
            count += _shift(mask.to(src.dtype), offset)
        return self.lin_out(total / count.clamp_min(1)[..., None])


def _shift(values: Tensor, offset: int) -> Tensor:
    """values[:, t + offset] at t (zero where t + offset falls outside the row)."""
    out = torch.zeros_like(values)
    length = values.size(1)
    if offset >= 0:
        out[:, : max(0, length - offset)] = values[:, offset:]
    else:
        out[:, -offset:] = values[:, : length + offset]
    return out


def window_sum(values: Tensor, window: int) -> Tensor:
    """Sum over positions t - window .. t + window of right-padded [B, T, C] values (zero beyond the row)."""
    if window == 0:
        return values
    size = 2 * window + 1
    pooled = nn.functional.avg_pool1d(values.transpose(1, 2), size, stride=1, padding=window, count_include_pad=True)
    return pooled.transpose(1, 2) * size


class GraphBlock(nn.Module):
    """One residual graph-convolution layer: h + dropout(act(conv(h)))."""

    def __init__(self, operator: str, channels: int, dropout: float) -> None:
        super().__init__()
        self.operator = operator
        if operator == "gcn":
            self.conv = GCNConv(channels, channels)
        elif operator == "graphconv":
            self.conv = GraphConv(channels, channels, aggr="mean")  # mean: same scale for any graph degree
        elif operator == "cfconv":
            self.conv = CFConv(channels)
        else:
            raise ValueError(f"unknown gc_operator {operator!r}; expected gcn, graphconv or cfconv")
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        out = self.conv(h, edge_index, edge_attr) if self.operator == "cfconv" else self.conv(h, edge_index)
        return h + self.dropout(self.act(out))

    def forward_window(self, h: Tensor, mask: Tensor, window: int) -> Tensor:
        """This layer on right-padded [B, T, C] inputs whose graphs are sequence windows of half-width `window`
        (every residue linked to those within `window` of it, in both directions, nothing else): the same
        function as `forward` on the flat graph, as dense window sums instead of gathers and scatters (the
        message passing was a third of a CPU step's time). `mask` [B, T] marks real positions; padded ones
        carry no message into them."""
        real = mask.to(h.dtype)[..., None]
        neighbours = window_sum(real, window) - real  # per position: residues of its own chain in its window
        if self.operator == "gcn":
            # GCNConv: self loops, symmetric normalisation 1/sqrt(deg_i deg_j), deg counting the self loop
            scale = (neighbours + 1).rsqrt() * real
            out = window_sum(self.conv.lin(h) * scale, window) * scale + self.conv.bias
        elif self.operator == "graphconv":
            # GraphConv(aggr="mean"): lin_rel(mean over neighbours) + lin_root(self); no neighbour -> 0
            masked = h * real
            mean = (window_sum(masked, window) - masked) / neighbours.clamp_min(1)
            out = self.conv.lin_rel(mean) + self.conv.lin_root(h)
        else:
            out = self.conv.forward_window(h, mask, window)
        return h + self.dropout(self.act(out))


class TopologyModel(nn.Module):
    """Per-residue topology classifier built from a `ModelConfig` and the topology grammar its decoder uses
    (default: the grammar of `segments.DEFAULT_STATS`; a checkpoint rebuilds the model with the one it recorded).
    `embedding_dim`: per-residue embedding values the shards add to the node features (the manifest's
    `embedding.dim`, `shards.embedding_dim`; 0 without), so `x` is [N, NUM_NODE_FEATURES + embedding_dim]."""

    def __init__(self, cfg: ModelConfig, grammar: Grammar | None = None, embedding_dim: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding_dim = embedding_dim
        self.grammar = grammar or default_grammar()
        self.aa_embedding = nn.Embedding(NUM_AA_TOKENS, cfg.aa_embed_dim)
        groups = feature_groups(cfg.feature_hydropathy, cfg.feature_charge, cfg.feature_blosum)
        self.features = SequenceFeatures(groups) if groups else None
        self.input_proj = nn.Linear(cfg.aa_embed_dim + NUM_NODE_FEATURES + embedding_dim + num_features(groups),
                                    cfg.gc_size)
        self.gc_blocks = nn.ModuleList(
            GraphBlock(cfg.gc_operator, cfg.gc_size, cfg.dropout) for _ in range(cfg.gc_layers)
        )
        self.norm = nn.LayerNorm(cfg.gc_size)
        self.lstm = ChainLSTM(cfg.gc_size, cfg.lstm_size, cfg.lstm_layers, cfg.bidirectional, cfg.dropout,
                              impl=cfg.lstm_impl, bf16=cfg.lstm_bf16)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.lstm.output_size, NUM_LABELS)
        # crf: learned transition scores (in the state dict); viterbi: fixed ones (not saved, so any checkpoint
        # trained with cross-entropy can be decoded with the grammar by changing model.decoder)
        self.crf = None
        if cfg.decoder == "crf":
            self.crf = CRF(self.grammar)
        elif cfg.decoder == "viterbi":
            self.crf = CRF.fixed(self.grammar, self.decoding)

    @property
    def decoding(self) -> Decoding:
        """How decoder = viterbi turns its softmax into a topology (`model.entry_penalty`, `duration_weight`,
        `beta_offset`, `min_loop`, `strand_penalty`)."""
        cfg = self.cfg
        return Decoding(entry_penalty=cfg.entry_penalty, duration_weight=cfg.duration_weight,
                        beta_offset=cfg.beta_offset, min_loop=cfg.min_loop, strand_penalty=cfg.strand_penalty)

    def forward(
        self,
        data=None,
        *,
        aa: Tensor | None = None,
        x: Tensor | None = None,
        edge_index: Tensor | None = None,
        edge_attr: Tensor | None = None,
        batch_vec: Tensor | None = None,
        ptr: Tensor | None = None,
        window: int = -1,
        max_length: int | None = None,
        host_lengths: Tensor | None = None,
    ) -> Tensor:
        """Logits [N, NUM_LABELS] for a PyG Batch (`data`), or for the same tensors passed by keyword.

        `window` >= 0 (a batch's `window`, set by `collate` when every graph in it is a sequence window of that
        half-width) runs the GC layers as dense window sums: the same function, faster (`GraphBlock.forward_window`).
        `max_length` (the longest protein) and `host_lengths` (lengths [B] on the host), which `loop.to_device`
        sets on a batch before its copy to the device, spare the forward pass reading them back from the device.
        """
        if data is not None:
            aa, x, edge_index, edge_attr = data.aa, data.x, data.edge_index, data.edge_attr
            batch_vec, ptr = data.batch, getattr(data, "ptr", None)
            window = int(getattr(data, "window", -1))
            max_length = getattr(data, "max_length", None)
            host_lengths = getattr(data, "host_lengths", None)
        if batch_vec is None:  # a single graph
            batch_vec = torch.zeros(aa.numel(), dtype=torch.long, device=aa.device)
        if ptr is None:
            counts = torch.bincount(batch_vec)
            ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

        inputs = [self.aa_embedding(aa), x]
        if self.features is not None:
            inputs.append(self.features(aa, ptr, batch_vec).to(x.dtype))
        h = self.input_proj(torch.cat(inputs, dim=-1))
        # flat -> right-padded without a Python loop over proteins; the same (row, position) indices bring
        # the LSTM output back to the flat order of batch.y
        lengths = ptr[1:] - ptr[:-1]
        position = torch.arange(h.size(0), device=h.device) - ptr[batch_vec]
        if max_length is None:  # read back from the device: a sync on CUDA
            max_length = int(lengths.max()) if lengths.numel() else 0
        if window >= 0:  # sequence-window graphs: the GC layers as window sums on the padded tensor
            padded = h.new_zeros(lengths.numel(), max_length, h.size(-1))
            padded[batch_vec, position] = h
            mask = torch.arange(padded.size(1), device=h.device)[None, :] < lengths[:, None]
            for block in self.gc_blocks:
                padded = block.forward_window(padded, mask, window)
            padded = self.norm(padded)  # padding positions never reach a real one in the LSTM (module docstring)
        else:
            for block in self.gc_blocks:
                h = block(h, edge_index, edge_attr)
            h = self.norm(h)
            padded = h.new_zeros(lengths.numel(), max_length, h.size(-1))
            padded[batch_vec, position] = h
        out = self.lstm(padded, lengths, host_lengths)[batch_vec, position]
        return self.head(self.dropout(out))

    def loss(self, batch, logits: Tensor, loss_fn: nn.Module | None = None, reduction: str = "mean") -> Tensor:
        """Training loss of `logits` (this model's output for `batch`) against `batch.y`.

        decoder = crf: the CRF's NLL per protein (proteins whose labels the grammar rejects are left out), summed,
        or divided by the labelled residues of the proteins kept (the same per-residue scale as cross-entropy).
        Otherwise `loss_fn` (the run's CrossEntropyLoss, label weights and smoothing included), or plain
        cross-entropy when none is given.
        """
        labelled = batch.y != IGNORE_LABEL
        if self.cfg.decoder != "crf":
            if loss_fn is None:
                loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL, reduction=reduction)
                return loss_fn(logits.float(), batch.y)
            loss = loss_fn(logits.float(), batch.y)
            return loss * labelled.sum() if reduction == "sum" else loss
        emissions, lengths, index = pad_by_protein(logits, batch)
        labels = batch.y.new_full(emissions.shape[:2], IGNORE_LABEL)
        labels[index] = batch.y
        nll, accepted = self.crf.nll(emissions, lengths, labels)
        if reduction == "sum":
            return nll.sum()
        residues = torch.bincount(index[0][labelled], minlength=lengths.numel())
        return nll.sum() / (residues * accepted).sum().clamp_min(1)

    @torch.no_grad()
    def decode(self, batch, logits: Tensor) -> Tensor:
        """Predicted label indices [N] (flat, like `batch.y`) from this model's `logits` for `batch`."""
        if self.crf is None:
            return logits.argmax(dim=-1)
        emissions = logits.float() if self.cfg.decoder == "crf" else logits.float().log_softmax(-1)
        padded, lengths, index = pad_by_protein(emissions, batch)
        return self.crf.decode(padded, lengths)[index]

    @torch.no_grad()
    def label_posteriors(self, batch, logits: Tensor) -> Tensor:
        """Per-residue label probabilities [N, NUM_LABELS]: the CRF's marginals, else the softmax (for ensembles)."""
        if self.cfg.decoder != "crf":
            return logits.float().softmax(-1)
        padded, lengths, index = pad_by_protein(logits.float(), batch)
        return self.crf.marginals(padded, lengths)[index]


def pad_by_protein(values: Tensor, batch) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Flat per-residue `values` [N, C] -> right-padded [B, T, C], lengths [B], and the (row, position) index
    that maps padded back to flat (`padded[index]` is `values`)."""
    ptr = getattr(batch, "ptr", None)
    batch_vec = getattr(batch, "batch", None)
    if batch_vec is None:
        batch_vec = torch.zeros(values.size(0), dtype=torch.long, device=values.device)
    if ptr is None:
        counts = torch.bincount(batch_vec)
        ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    lengths = ptr[1:] - ptr[:-1]
    position = torch.arange(values.size(0), device=values.device) - ptr[batch_vec]
    max_length = getattr(batch, "max_length", None)  # set on the host by loop.to_device: no read from the device
    if max_length is None:
        max_length = int(lengths.max()) if lengths.numel() else 0
    padded = values.new_zeros(lengths.numel(), max_length, values.size(-1))
    padded[batch_vec, position] = values
    return padded, lengths, (batch_vec, position)


@functools.lru_cache(maxsize=4096)
def _count_config(cfg: ModelConfig, embedding_dim: int = 0) -> int:
    # meta device: shapes only, no memory and no init cost, so the hardware planner can price many configs
    with torch.device("meta"):
        model = TopologyModel(cfg, embedding_dim=embedding_dim)
    return sum(p.numel() for p in model.parameters())


def count_parameters(model_or_config: nn.Module | ModelConfig, embedding_dim: int = 0) -> int:
    """Number of trainable parameters of a model, or of the model a `ModelConfig` would build (with
    `embedding_dim` embedding inputs per residue)."""
    if isinstance(model_or_config, ModelConfig):
        return _count_config(model_or_config, embedding_dim)
    return sum(p.numel() for p in model_or_config.parameters() if p.requires_grad)
