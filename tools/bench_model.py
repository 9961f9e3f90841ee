"""Model benchmark: parameter counts and footprints of the seed's grid corners, the activation-estimate calibration,
and CPU forward+backward throughput of the padded exact-bidirectional LSTM vs a PackedSequence variant.

    .venv/bin/python -m tools.bench_model            # everything (~2-3 min on 2 cores)
    .venv/bin/python -m tools.bench_model --quick    # smaller throughput batch
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch_geometric.data import Batch, Data

from protopo_ray.config import ModelConfig
from protopo_ray.data.alphabet import NUM_AA_TOKENS, NUM_LABELS
from protopo_ray.data.graphs import DEFAULT_K
from protopo_ray.model.footprint import activation_elements_per_residue, footprint
from protopo_ray.model.network import NUM_EDGE_FEATURES, NUM_NODE_FEATURES, TopologyModel, count_parameters

GRID_CORNERS = [(64, 128, 1), (512, 512, 4), (64, 128, 4)]  # (gc_size, lstm_size, lstm_layers); last = final choice


def synthetic_batch(lengths: list[int], k: int = DEFAULT_K, seed: int = 0) -> Batch:
    """Random proteins with k random in-graph neighbours per residue (the shape of a real k-NN graph)."""
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for n in lengths:
        dst = torch.arange(n).repeat_interleave(k)
        src = torch.randint(0, n, (n * k,), generator=g)
        edge_attr = torch.stack(
            [torch.rand(n * k, generator=g) * 2, torch.randn(n * k, generator=g) * 0.3, torch.ones(n * k)], dim=1
        )
        graphs.append(Data(
            aa=torch.randint(0, NUM_AA_TOKENS, (n,), generator=g),
            x=torch.rand(n, NUM_NODE_FEATURES, generator=g),
            edge_index=torch.stack([src, dst]),
            edge_attr=edge_attr[:, :NUM_EDGE_FEATURES],
            y=torch.randint(0, NUM_LABELS, (n,), generator=g),
            num_nodes=n,
        ))
    return Batch.from_data_list(graphs)


class PackedLSTM(nn.Module):
    """Benchmark-only stand-in for ChainLSTM: one nn.LSTM on a PackedSequence (same parameter count)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(cfg.gc_size, cfg.lstm_size, cfg.lstm_layers, batch_first=True,
                            bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0)

    def forward(self, padded: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(padded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=padded.size(1))[0]


def packed_model(cfg: ModelConfig) -> TopologyModel:
    model = TopologyModel(cfg)
    model.lstm = PackedLSTM(cfg)
    return model


def saved_activation_bytes(model: nn.Module, batch: Batch) -> int:
    """Bytes of the tensors autograd keeps for backward (storages de-duplicated, parameters excluded)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(batch), batch.y)
    loss.backward()
    return sum(seen.values())


def calibrate() -> None:
    print("\n## activation estimate vs saved-tensor bytes (train mode, batch 4 x 200, equal lengths)")
    batch = synthetic_batch([200] * 4)
    configs = [
        ModelConfig(gc_size=64, lstm_size=128, lstm_layers=1, gc_operator="gcn"),
        ModelConfig(gc_size=64, lstm_size=128, lstm_layers=4, gc_operator="gcn"),
        ModelConfig(gc_size=64, lstm_size=128, lstm_layers=2, gc_operator="graphconv"),
        ModelConfig(gc_size=64, lstm_size=128, lstm_layers=2, gc_operator="cfconv"),
        ModelConfig(gc_size=512, lstm_size=512, lstm_layers=2, gc_operator="cfconv"),
        ModelConfig(gc_size=128, lstm_size=512, lstm_layers=3, gc_operator="graphconv", bidirectional=False),
        ModelConfig(gc_size=512, lstm_size=128, lstm_layers=1, gc_operator="gcn", gc_layers=4),
    ]
    for cfg in configs:
        torch.manual_seed(0)
        measured = saved_activation_bytes(TopologyModel(cfg), batch)
        estimate = activation_elements_per_residue(cfg) * 4 * batch.num_nodes
        print(f"{cfg.gc_operator:9s} gc {cfg.gc_size:3d}x{cfg.gc_layers} lstm {cfg.lstm_size:3d}x{cfg.lstm_layers} "
              f"bi={int(cfg.bidirectional)}: measured {measured / 2**20:7.1f} MiB, estimate {estimate / 2**20:7.1f} MiB, "
              f"ratio {measured / estimate:.2f}")


def sizes() -> None:
    print("## parameter counts and footprint (bidirectional, gcn, batch 64 x max_len 1000, fp32 / bf16 activations)")
    for gc, lstm, layers in GRID_CORNERS:
        cfg = ModelConfig(gc_size=gc, lstm_size=lstm, lstm_layers=layers)
        fp32, bf16 = footprint(cfg, 64, 1000), footprint(cfg, 64, 1000, dtype_bytes=2)
        print(f"gc {gc:3d} x lstm {lstm:3d} x {layers} layers: {count_parameters(cfg):>10,d} params, "
              f"weights {fp32.weights_bytes / 2**20:6.1f} MiB, act/residue {fp32.activation_bytes_per_residue / 1024:6.1f} KiB, "
              f"total {fp32.total_bytes / 2**30:6.1f} GiB fp32 / {bf16.total_bytes / 2**30:6.1f} GiB bf16")


def throughput(model: nn.Module, batch: Batch, steps: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(batch), batch.y).backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch.num_nodes * steps / (time.perf_counter() - start)


def speed(quick: bool) -> None:
    torch.set_num_threads(2)
    num, mean_len = (8, 200) if quick else (32, 500)
    g = torch.Generator().manual_seed(1)
    lengths = (mean_len + torch.randint(-mean_len // 10, mean_len // 10 + 1, (num,), generator=g)).tolist()
    batch = synthetic_batch(lengths)
    print(f"\n## CPU forward+backward+AdamW, 2 threads, batch {num} x ~{mean_len} ({batch.num_nodes} residues), gcn")
    for layers in (2, 4):
        cfg = ModelConfig(gc_size=64, lstm_size=128, lstm_layers=layers)
        torch.manual_seed(0)
        padded = throughput(TopologyModel(cfg), batch, steps=3)
        torch.manual_seed(0)
        packed = throughput(packed_model(cfg), batch, steps=1)
        print(f"gc 64 x lstm 128 x {layers}: padded exact-bi {padded:8.0f} residues/s, "
              f"PackedSequence {packed:8.0f} residues/s ({padded / packed:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small throughput batch (8 x ~200)")
    parser.add_argument("--skip-speed", action="store_true", help="only sizes and calibration")
    args = parser.parse_args()
    sizes()
    calibrate()
    if not args.skip_speed:
        speed(args.quick)


if __name__ == "__main__":
    main()
