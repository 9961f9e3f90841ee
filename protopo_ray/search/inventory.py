"""What the cluster holds and may still start: nodes with their CPUs, GPUs, accelerator types and memory.

From a running Ray cluster (`read_inventory`: the live nodes plus the node types its autoscaler may still start)
or from a cluster YAML scaled out (`inventory_from_cluster_yaml`), so a search can be planned before the cluster
exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protopo_ray.search.prices import PriceConfig, is_spot

GIB = 2**30

#: GPU memory in GiB per Ray accelerator type (the names Ray puts in `accelerator_type:<T>` resources).
#: Marketing "GB" read as GiB; `memory_headroom` absorbs the difference and the driver's reservation.
KNOWN_GPU_MEMORY_GB: dict[str, float] = {
    "K80": 12, "P4": 8, "P100": 16, "V100": 16, "T4": 16, "A10G": 24, "A10": 24, "L4": 24, "L40S": 48,
    "A100": 40, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141, "H20": 96, "B200": 180,
    "RTX-PRO-6000": 96,
}
#: Custom node resource declaring GPU memory in GiB *per GPU* (cluster.yaml sets it; Ray only counts it).
GPU_MEMORY_RESOURCE = "gpu_memory_gb"
#: Custom resource on the node that hosts trial drivers (the head in cluster.yaml); a driver takes one unit.
DRIVER_RESOURCE = "driver"
ACCELERATOR_PREFIX = "accelerator_type:"
@dataclass(frozen=True)
class NodeInventory:
    node_id: str
    cpus: float
    gpus: float
    accelerator_type: str | None
    memory_bytes: int
    gpu_memory_bytes: int | None
    resources: dict = field(default_factory=dict)
    node_type: str = ""
    """The autoscaler node type it is (or would be) an instance of ("" = not known): what its price is keyed by."""
    spot: bool = False
    """Spot / preemptible capacity (its node type's node_config asks for it): priced at spot rates."""

    @property
    def is_driver_host(self) -> bool:
        return self.resources.get(DRIVER_RESOURCE, 0) > 0


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[NodeInventory, ...]

    @property
    def total_cpus(self) -> float:
        return sum(node.cpus for node in self.nodes)

    @property
    def total_gpus(self) -> float:
        return sum(node.gpus for node in self.nodes)

    @property
    def driver_slots(self) -> int:
        """Trial drivers the `driver` resource admits at once (0 = no driver resource: drivers go anywhere)."""
        return int(sum(node.resources.get(DRIVER_RESOURCE, 0) for node in self.nodes))

    def gpu_groups(self) -> dict[str, tuple[NodeInventory, ...]]:
        """GPU nodes by accelerator type ("" where Ray reported none)."""
        groups: dict[str, list[NodeInventory]] = {}
        for node in self.nodes:
            if node.gpus >= 1:
                groups.setdefault(node.accelerator_type or "", []).append(node)
        return {name: tuple(nodes) for name, nodes in groups.items()}


def node_from_resources(node_id: str, resources: dict[str, Any], node_type: str = "", spot: bool = False) -> NodeInventory:
    """One node from its Ray resource dict (`ray.nodes()[i]["Resources"]` or a cluster.yaml node type)."""
    types = [key[len(ACCELERATOR_PREFIX):] for key in resources if key.startswith(ACCELERATOR_PREFIX)]
    # A node may carry both "A100" (auto-detected) and "A100-80G" (declared); the longer name is more specific.
    accelerator = max(types, key=len) if types else None
    gpus = float(resources.get("GPU", 0))
    gpu_memory: int | None = None
    if gpus > 0:
        if resources.get(GPU_MEMORY_RESOURCE):
            gpu_memory = int(float(resources[GPU_MEMORY_RESOURCE]) * GIB)
        elif accelerator in KNOWN_GPU_MEMORY_GB:
            gpu_memory = int(KNOWN_GPU_MEMORY_GB[accelerator] * GIB)
    return NodeInventory(
        node_id=node_id, cpus=float(resources.get("CPU", 0)), gpus=gpus, accelerator_type=accelerator,
        memory_bytes=int(resources.get("memory", 0)), gpu_memory_bytes=gpu_memory, resources=dict(resources),
        node_type=node_type, spot=spot,
    )


#: Where `ray up` puts the autoscaler's config on the head node.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def read_inventory(cluster_file: str | Path | None = None) -> Inventory:
    """The connected cluster's alive nodes plus the nodes its autoscaler may still start.

    A fresh `ray up` cluster is a CPU head and nothing else: planning from live nodes alone finds no GPU. The
    autoscaler's node types come from `cluster_file`, else the `ray up` head's bootstrap config; for each
    type, `max_workers` less the nodes of that type already up are added as nodes that may come.
    """
    # Deferred on purpose: planning from a cluster YAML and the records that hold plans stay importable without Ray.
    import ray

    if not ray.is_initialized():
        ray.init()
    live = [node_from_resources(n["NodeID"], n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    path = Path(cluster_file) if cluster_file else BOOTSTRAP_CONFIG.expanduser()
    if not path.exists():
        return Inventory(tuple(live))
    return with_autoscaler_headroom(live, autoscaler_node_types(path))


def cluster_node_types(cluster_file: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The autoscaler's worker node types `read_inventory` plans with ({} without a cluster YAML)."""
    path = Path(cluster_file) if cluster_file else BOOTSTRAP_CONFIG.expanduser()
    return autoscaler_node_types(path) if path.exists() else {}


def live_node_types(node_types: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many alive nodes of each autoscaler node type the connected cluster has now (by declared resources)."""
    import ray  # deferred: see read_inventory

    live = [_signature(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    return {name: live.count(_signature(t.get("resources", {}))) for name, t in node_types.items()}


def inventory_from_cluster_yaml(path: str | Path) -> Inventory:
    """The fully scaled-out cluster a Ray autoscaler YAML describes: the head plus `max_workers` of each type.

    Only the declared `resources` count (the autoscaler's own instance-type detection is not reproduced), so
    the project's cluster YAMLs declare CPU, GPU, accelerator type and GPU memory for every node type.
    """
    spec = _read_yaml(Path(path))
    name = spec.get("head_node_type") or ""
    head = spec.get("available_node_types", {}).get(name, {})
    node = node_from_resources("head", head.get("resources", {}), name, is_spot(head.get("node_config") or {}))
    return with_autoscaler_headroom([node], autoscaler_node_types(Path(path)))


def _read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def autoscaler_node_types(path: Path) -> dict[str, dict[str, Any]]:
    """The worker node types of an autoscaler YAML (the head is up already, whatever its config says)."""
    spec = _read_yaml(path)
    head = spec.get("head_node_type")
    return {name: node_type for name, node_type in spec.get("available_node_types", {}).items() if name != head}


def _signature(resources: dict[str, Any]) -> tuple:
    """What tells a node's type apart: CPUs, GPUs and its declared custom resources (not Ray's per-node ones)."""
    return tuple(sorted((k, float(v)) for k, v in resources.items()
                        if k != "memory" and k != "object_store_memory" and not k.startswith("node:")))


def with_autoscaler_headroom(live: list[NodeInventory], node_types: dict[str, dict[str, Any]]) -> Inventory:
    """Live nodes plus, per autoscaler node type, the `max_workers` not up yet (as `<type>-<i>`); a live node
    whose resources match a node type is tagged with its name and market (what prices it)."""
    nodes = list(live)
    for name, node_type in node_types.items():
        declared = node_type.get("resources", {})
        spot = is_spot(node_type.get("node_config") or {})
        matching = [i for i, node in enumerate(live) if _signature(node.resources) == _signature(declared)]
        for i in matching:
            if not nodes[i].node_type:
                nodes[i] = dataclasses.replace(nodes[i], node_type=name, spot=spot)
        up = len(matching)
        for index in range(max(0, int(node_type.get("max_workers", 0)) - up)):
            nodes.append(node_from_resources(f"{name}-{up + index}", declared, name, spot))
    return Inventory(tuple(nodes))


def inventory_json(inventory: Inventory) -> list[dict[str, Any]]:
    return [{"node": n.node_id, "node_type": n.node_type, "spot": n.spot, "cpus": n.cpus, "gpus": n.gpus,
             "accelerator_type": n.accelerator_type, "gpu_memory_bytes": n.gpu_memory_bytes,
             "memory_bytes": n.memory_bytes, "driver_host": n.is_driver_host} for n in inventory.nodes]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def gib_text(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f}"


def format_inventory(inventory: Inventory, prices: PriceConfig | None = None) -> str:
    """The node table with USD per hour at `prices` (default prices when None)."""
    prices = prices or PriceConfig()
    rows = []
    for node in inventory.nodes:
        gpu_memory = gib_text(node.gpu_memory_bytes) if node.gpu_memory_bytes else "-"
        price = prices.node_price(node)
        rows.append([node.node_id[:16], f"{node.cpus:g}", f"{node.gpus:g}", node.accelerator_type or "-",
                     gpu_memory, gib_text(node.memory_bytes) if node.memory_bytes else "-",
                     "spot" if node.spot else "on-demand", "-" if price is None else f"{price:.3f}",
                     "yes" if node.is_driver_host else ""])
    lines = text_table(["node", "CPUs", "GPUs", "accelerator", "GiB/GPU", "mem GiB", "market", "USD/h", "drivers"], rows)
    lines.append(f"total: {len(inventory.nodes)} nodes, {inventory.total_cpus:g} CPUs, {inventory.total_gpus:g} GPUs"
                 + (f", {inventory.driver_slots} driver slots" if inventory.driver_slots else ""))
    return "\n".join(lines)
