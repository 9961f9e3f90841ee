"""The recurrence along the chain: `ChainLSTM`, a stacked (bi)LSTM over right-padded [B, T, D] residue features,
run one of two ways on the same parameters.

padded: each direction its own unidirectional nn.LSTM on right-padded input, the backward one on each sequence
reversed *within its own length* (`reverse_within_length`; padding stays at the end), so a protein's outputs
do not depend on what it is batched with. On CPU this is ~11x faster than packing (DESIGN.md, tools/bench_model).
packed: the same weights through one multi-layer bidirectional LSTM call over a PackedSequence, cuDNN's fused
kernel; whether it is faster on a GPU is what tools/gpu_check.py measures (not yet run on one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from protopo_ray.config.run import LSTM_IMPLS


def reverse_within_length(lengths: Tensor, max_len: int) -> Tensor:
    """Index [B, T] that reverses positions 0..L_b-1 of each row and leaves the padding where it is.

    It is its own inverse, so the same gather turns the backward direction's output back into chain order.
    """
    t = torch.arange(max_len, device=lengths.device)
    rev = lengths[:, None] - 1 - t[None, :]
    return torch.where(rev >= 0, rev, t[None, :])


class ChainLSTM(nn.Module):
    """Stacked (bi)LSTM on right-padded [B, T, D] input, exact under padding (see the module docstring).

    Parameters: one single-direction nn.LSTM per layer and direction (`forward_layers`, `backward_layers`), the
    parameter count nn.LSTM's own. Two ways to run them, chosen per call by `impl` and the device:
    - padded (CPU): layer by layer, the backward direction on input reversed within lengths and re-reversed
      (each layer's backward input comes from the previous layer's concatenated output);
    - packed (CUDA under "auto"): the same weights in nn.LSTM's flat order (per layer: forward then reverse
      direction, each w_ih, w_hh, b_ih, b_hh) through one multi-layer bidirectional LSTM call over a
      PackedSequence, which cuDNN runs as one fused kernel. The weights are separate tensors, so cuDNN copies
      them into its flat buffer each call (device to device, ~4 bytes per parameter).
    Both give the same outputs at real positions up to float tolerance (tests/test_network.py); padding
    positions hold garbage (padded) or zeros (packed) and are never read. State-dict keys are the same for both,
    so any checkpoint runs either way.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool, dropout: float,
                 impl: str = "auto", bf16: bool = False):
        super().__init__()
        if impl not in LSTM_IMPLS:
            raise ValueError(f"unknown lstm_impl {impl!r}; expected one of {LSTM_IMPLS}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.impl = impl
        self.bf16 = bf16
        self.output_size = hidden_size * (2 if bidirectional else 1)
        sizes = [input_size] + [self.output_size] * (num_layers - 1)
        self.forward_layers = nn.ModuleList(nn.LSTM(size, hidden_size, batch_first=True) for size in sizes)
        self.backward_layers = (
            nn.ModuleList(nn.LSTM(size, hidden_size, batch_first=True) for size in sizes) if bidirectional else None
        )
        self.dropout = nn.Dropout(dropout)
        for lstm in self.modules():
            if isinstance(lstm, nn.LSTM):
                # forget-gate bias 1 (gate order i, f, g, o): remember by default, which helps ~1000-residue chains
                with torch.no_grad():
                    lstm.bias_ih_l0[hidden_size : 2 * hidden_size].fill_(1.0)
                    lstm.bias_hh_l0[hidden_size : 2 * hidden_size].fill_(0.0)

    def path(self, device: torch.device) -> str:
        """padded or packed: what `forward` runs on `device` (auto: packed on CUDA, an unmeasured choice)."""
        if self.impl != "auto":
            return self.impl
        return "packed" if device.type == "cuda" else "padded"

    def forward(self, padded: Tensor, lengths: Tensor, host_lengths: Tensor | None = None) -> Tensor:
        """[B, T, output_size] for right-padded `padded` [B, T, D] with `lengths` [B] on its device; the packed
        path needs the lengths on the host too (`host_lengths`, else they are copied there: a device sync)."""
        device_type = padded.device.type
        # fp32 (TF32 on Ampere+) even under bf16 autocast unless lstm_bf16: whether bf16 recurrences over ~1000
        # steps cost accuracy, and what they gain, is measured on a GPU first. The GC layers keep bf16 either way.
        dtype = torch.float32
        if self.bf16 and torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16:
            dtype = torch.bfloat16
        with torch.autocast(device_type=device_type, enabled=False):
            if self.path(padded.device) == "packed":
                if host_lengths is None:
                    host_lengths = lengths.cpu()
                return self._forward_packed(padded.to(dtype), lengths, host_lengths)
            return self._forward_padded(padded.to(dtype), lengths)

    def _layer(self, lstm: nn.LSTM, h: Tensor) -> Tensor:
        if h.dtype == torch.float32:
            return lstm(h)[0]
        # bf16: nn.LSTM insists on weights of the input's dtype; the same call nn.LSTM makes, on cast weights
        zeros = h.new_zeros(1, h.size(0), self.hidden_size)
        weights = [w.to(h.dtype) for w in _weights(lstm)]
        return torch.lstm(h, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)[0]

    def _forward_padded(self, padded: Tensor, lengths: Tensor) -> Tensor:
        rev = reverse_within_length(lengths, padded.size(1)) if self.bidirectional else None
        h = padded
        for i, forward_lstm in enumerate(self.forward_layers):
            if i > 0:
                h = self.dropout(h)
            out = self._layer(forward_lstm, h)
            if self.backward_layers is not None:
                back = self._layer(self.backward_layers[i], h.gather(1, rev[..., None].expand(-1, -1, h.size(-1))))
                back = back.gather(1, rev[..., None].expand(-1, -1, back.size(-1)))
                out = torch.cat([out, back], dim=-1)
            h = out
        return h

    def flat_weights(self) -> list[Tensor]:
        """The parameters in the order of a multi-layer (bi)directional nn.LSTM's `_flat_weights`."""
        weights: list[Tensor] = []
        for i, forward_lstm in enumerate(self.forward_layers):
            weights += _weights(forward_lstm)
            if self.backward_layers is not None:
                weights += _weights(self.backward_layers[i])
        return weights

    def _forward_packed(self, padded: Tensor, lengths: Tensor, host_lengths: Tensor) -> Tensor:
        # Sorted by length here rather than by pack_padded_sequence(enforce_sorted=False), which copies its order to
        # the device and pad_packed_sequence reads it back (a sync). The same stable sort on the device lengths and
        # on the host copy gives the same order: the rows on the device, batch sizes on the host.
        order = torch.sort(lengths, descending=True, stable=True).indices
        sorted_host = torch.sort(host_lengths.to(torch.int64), descending=True, stable=True).values
        packed = pack_padded_sequence(padded.index_select(0, order), sorted_host, batch_first=True)
        batch, directions = padded.size(0), 2 if self.bidirectional else 1
        zeros = padded.new_zeros(self.num_layers * directions, batch, self.hidden_size)
        weights = [w.to(padded.dtype) for w in self.flat_weights()]
        # dropout between layers as the padded path has it (nn.Dropout's p; another random mask, same law)
        out, _, _ = torch.lstm(packed.data, packed.batch_sizes, (zeros, zeros), weights, True, self.num_layers,
                               self.dropout.p, self.training, self.bidirectional)
        result = pad_packed_sequence(PackedSequence(out, packed.batch_sizes), batch_first=True,
                                     total_length=padded.size(1))[0]
        restore = torch.empty_like(order).scatter_(0, order, torch.arange(batch, device=order.device))
        return result.index_select(0, restore)


def _weights(lstm: nn.LSTM) -> list[Tensor]:
    """A one-layer nn.LSTM's parameters in the order its functional call takes them."""
    return [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]
