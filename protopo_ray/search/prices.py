"""What compute costs: hourly prices of the cluster's nodes (what a finished stage spent is its record's:
`protopo_ray.search.results.StageRecord.cost`).

Prices live in the experiment, not the cluster YAML: Ray's autoscaler schema (ray/autoscaler/ray-schema.json)
rejects unknown keys in a node type, its `resources` are non-negative integers that Ray schedules on (a price
there would be a count of "dollars" trials could reserve), and its string `labels` are scheduling labels. An
experiment TOML may carry a `[prices]` table (USD per hour; every key optional, the defaults below apply):

    [prices]
    node_types = { search_a10g = 0.40, promotion_a100 = 32.77 }  # per node-hour, by the cluster YAML's node type
    gpu_hour = { A10G = 1.212 }         # per GPU-hour on demand, by Ray accelerator type
    spot_gpu_hour = { A10G = 0.45 }     # per GPU-hour on spot / preemptible capacity
    cpu_hour = 0.048                    # per vCPU-hour of a node without GPUs (and of CPU-only trials)

A node's price: its node type's entry, else GPUs x the GPU-hour price of its accelerator type in its market
(spot when the YAML's node_config asks for it: AWS `InstanceMarketOptions.MarketType: spot`, GCP
`scheduling.provisioningModel: SPOT` or `preemptible`), else, without GPUs, CPUs x cpu_hour; else unknown.
Pure module: no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protopo_ray.config.run import reject_unknown_keys

if TYPE_CHECKING:  # annotations only: inventory prices its nodes with this module
    from protopo_ray.search.inventory import NodeInventory

#: USD per GPU-hour on demand: the whole instance of the cluster YAMLs' node types divided by its GPUs (list
#: prices, AWS us-west-2 / GCP us-central1, 2025): g5.2xlarge $1.212 (A10G), g2-standard-8 $0.854 (L4),
#: p4d.24xlarge $32.77 / 8 (A100 40 GB), a2-ultragpu-8g $40.22 / 8 (A100 80 GB). Prices move: set your own.
DEFAULT_GPU_HOUR: dict[str, float] = {"A10G": 1.212, "L4": 0.854, "A100": 4.096, "A100-80G": 5.028}
#: USD per GPU-hour on spot / preemptible capacity, same instances (typical recent spot prices; they vary by
#: zone and hour): about 30-40 % of on demand.
DEFAULT_SPOT_GPU_HOUR: dict[str, float] = {"A10G": 0.45, "L4": 0.30, "A100": 1.50, "A100-80G": 1.90}
#: USD per vCPU-hour of a general-purpose node (m5.2xlarge $0.384 / 8, n2-standard-8 $0.389 / 8).
DEFAULT_CPU_HOUR = 0.048


@dataclass(kw_only=True, frozen=True, slots=True)
class PriceConfig:
    node_types: dict[str, float] = field(default_factory=dict)
    """USD per node-hour by the cluster YAML's node type name; wins over the per-GPU prices."""
    gpu_hour: dict[str, float] = field(default_factory=dict)
    """USD per GPU-hour on demand by accelerator type, over DEFAULT_GPU_HOUR."""
    spot_gpu_hour: dict[str, float] = field(default_factory=dict)
    """USD per GPU-hour on spot / preemptible nodes by accelerator type, over DEFAULT_SPOT_GPU_HOUR."""
    cpu_hour: float = DEFAULT_CPU_HOUR
    """USD per vCPU-hour of a node without GPUs."""

    def __post_init__(self) -> None:
        for name in ("node_types", "gpu_hour", "spot_gpu_hour"):
            for key, value in getattr(self, name).items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                    raise ValueError(f"[prices] {name}.{key} must be a price >= 0 in USD per hour, got {value!r}")
        if isinstance(self.cpu_hour, bool) or not isinstance(self.cpu_hour, (int, float)) or not self.cpu_hour >= 0:
            raise ValueError(f"[prices] cpu_hour must be a price >= 0 in USD per vCPU-hour, got {self.cpu_hour!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "[prices]") -> PriceConfig:
        reject_unknown_keys(cls, values, where)
        for name in ("node_types", "gpu_hour", "spot_gpu_hour"):
            if name in values and not isinstance(values[name], Mapping):
                raise ValueError(f"{where}: {name} must be a table of name = USD per hour, got {values[name]!r}")
        try:
            return cls(**{k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()})
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def gpu_hour_price(self, accelerator_type: str | None, spot: bool) -> float | None:
        table = {**DEFAULT_SPOT_GPU_HOUR, **self.spot_gpu_hour} if spot else {**DEFAULT_GPU_HOUR, **self.gpu_hour}
        return table.get(accelerator_type or "")

    def node_price(self, node: NodeInventory) -> float | None:
        """USD per hour of a node; None where no price applies."""
        if node.node_type and node.node_type in self.node_types:
            return float(self.node_types[node.node_type])
        if node.gpus:
            per_gpu = self.gpu_hour_price(node.accelerator_type, node.spot)
            return None if per_gpu is None else per_gpu * node.gpus
        # A node that declares no CPU and no GPU (a head kept free of trials) has no size to price: node_types.
        return self.cpu_hour * node.cpus if node.cpus else None

    def device_hour_price(self, nodes: Sequence[NodeInventory], device: str) -> float | None:
        """USD per GPU-hour (device "gpu") or vCPU-hour ("cpu") of a pool of nodes: the dearest node's, an upper
        bound when trials may land on either (Ray pins an accelerator type, not a market)."""
        prices = []
        for node in nodes:
            price, count = self.node_price(node), node.gpus if device == "gpu" else node.cpus
            if price is None or not count:
                return None
            prices.append(price / count)
        return max(prices) if prices else None


def market_of(nodes: Sequence[NodeInventory]) -> str:
    """spot, on-demand or mixed for a pool of nodes."""
    kinds = {"spot" if node.spot else "on-demand" for node in nodes}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "")


def is_spot(node_config: Mapping[str, Any]) -> bool:
    """Whether an autoscaler node_config asks for spot / preemptible capacity (AWS, GCP, Azure)."""
    market = (node_config.get("InstanceMarketOptions") or {}).get("MarketType", "")
    scheduling = node_config.get("scheduling") or {}
    return (str(market).lower() == "spot" or str(scheduling.get("provisioningModel", "")).upper() == "SPOT"
            or bool(scheduling.get("preemptible")) or str(node_config.get("priority", "")).lower() == "spot")
