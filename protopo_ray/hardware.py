"""What the cluster holds (nodes, CPUs, GPUs, accelerator types, GPU memory) and how each search stage uses it.

Planning is pure: `plan_search` / `plan_promotion` take an `Inventory` and per-trial memory footprints in bytes
and return a `StagePlan` whose `resources_overrides()` are applied to each trial's Config. The inventory comes
from a running Ray cluster (`read_inventory`, the only place Ray is imported) or from a cluster YAML scaled out
(`inventory_from_cluster_yaml`), so a search can be planned before the cluster exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
#: Each trial process on a GPU holds its own CUDA context (~0.3-0.5 GiB) besides tensors; packing counts it.
CUDA_CONTEXT_BYTES = GIB // 2
#: More trials than this on one GPU just time-slice the SMs; throughput per trial collapses.
MAX_TRIALS_PER_GPU = 8
#: A GC+LSTM worker's data path needs a few cores; the rest of a big node stays free for Ray Data tasks.
MAX_CPUS_PER_GPU_WORKER = 8


class PlanError(ValueError):
    """The requested stage cannot run on this inventory (e.g. a trial does not fit any GPU)."""


@dataclass(frozen=True)
class NodeInventory:
    node_id: str
    cpus: float
    gpus: float
    accelerator_type: str | None
    memory_bytes: int
    gpu_memory_bytes: int | None
    resources: dict = field(default_factory=dict)

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


def node_from_resources(node_id: str, resources: dict[str, Any]) -> NodeInventory:
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
    )


#: Where `ray up` puts the autoscaler's config on the head node.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def read_inventory(cluster_file: str | Path | None = None) -> Inventory:
    """The connected cluster's alive nodes plus the nodes its autoscaler may still start.

    A fresh `ray up` cluster is a CPU head and nothing else: planning from live nodes alone finds no GPU. The
    autoscaler's node types come from `cluster_file`, else the `ray up` head's bootstrap config; for each
    type, `max_workers` less the nodes of that type already up are added as nodes that may come.
    """
    import ray

    if not ray.is_initialized():
        ray.init()
    live = [node_from_resources(n["NodeID"], n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    path = Path(cluster_file) if cluster_file else BOOTSTRAP_CONFIG.expanduser()
    if not path.exists():
        return Inventory(tuple(live))
    return with_autoscaler_headroom(live, _node_types(path))


def inventory_from_cluster_yaml(path: str | Path) -> Inventory:
    """The fully scaled-out cluster a Ray autoscaler YAML describes: the head plus `max_workers` of each type.

    Only the declared `resources` count (the autoscaler's own instance-type detection is not reproduced), so
    the project's cluster YAMLs declare CPU, GPU, accelerator type and GPU memory for every node type.
    """
    spec = _read_yaml(Path(path))
    head = spec.get("available_node_types", {}).get(spec.get("head_node_type"), {})
    return with_autoscaler_headroom([node_from_resources("head", head.get("resources", {}))], _node_types(Path(path)))


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _node_types(path: Path) -> dict[str, dict[str, Any]]:
    """The worker node types of an autoscaler YAML (the head is up already, whatever its config says)."""
    spec = _read_yaml(path)
    head = spec.get("head_node_type")
    return {name: node_type for name, node_type in spec.get("available_node_types", {}).items() if name != head}


def _signature(resources: dict[str, Any]) -> tuple:
    """What tells a node's type apart: CPUs, GPUs and its declared custom resources (not Ray's per-node ones)."""
    return tuple(sorted((k, float(v)) for k, v in resources.items()
                        if k != "memory" and k != "object_store_memory" and not k.startswith("node:")))


def with_autoscaler_headroom(live: list[NodeInventory], node_types: dict[str, dict[str, Any]]) -> Inventory:
    """Live nodes plus, per autoscaler node type, the `max_workers` not up yet (as `<type>-<i>`)."""
    nodes = list(live)
    for name, node_type in node_types.items():
        declared = node_type.get("resources", {})
        up = sum(1 for node in live if _signature(node.resources) == _signature(declared))
        for index in range(max(0, int(node_type.get("max_workers", 0)) - up)):
            nodes.append(node_from_resources(f"{name}-{up + index}", declared))
    return Inventory(tuple(nodes))


def inventory_json(inventory: Inventory) -> list[dict[str, Any]]:
    return [{"node": n.node_id, "cpus": n.cpus, "gpus": n.gpus, "accelerator_type": n.accelerator_type,
             "gpu_memory_bytes": n.gpu_memory_bytes, "memory_bytes": n.memory_bytes, "driver_host": n.is_driver_host}
            for n in inventory.nodes]


def trial_footprints(configs: Sequence[Any], longest: int, world_size: int = 1) -> list[int]:
    """Peak training memory in bytes per `protopo_ray.config.Config` (one worker), from its real batch plan."""
    from protopo_ray.footprint import trial_footprint

    return [trial_footprint(cfg, longest, world_size).total_bytes for cfg in configs]


@dataclass(frozen=True)
class StagePlan:
    kind: str
    """search or promotion."""
    device: str
    """gpu or cpu."""
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    accelerator_type: str
    """Accelerator type the workers are pinned to ("" = any)."""
    trials_per_gpu: int
    max_concurrent_trials: int
    footprint_bytes: int
    """Largest per-trial (per-worker) memory need the plan was sized for."""
    notes: tuple[str, ...] = ()
    num_trials: int = 0
    gpu_memory_bytes: int = 0
    """Memory of one GPU of the pinned type (0 = unknown or CPU): what each trial's own share is cut from."""
    memory_headroom: float = 0.9

    def trials_per_gpu_for(self, footprint_bytes: int) -> int:
        """How many trials of this footprint share one GPU: the stage's cap, or fewer for a bigger model."""
        if self.device != "gpu" or self.num_workers > 1 or not self.gpu_memory_bytes:
            return self.trials_per_gpu
        fit = math.floor(self.memory_headroom * self.gpu_memory_bytes / (footprint_bytes + CUDA_CONTEXT_BYTES))
        return max(1, min(self.trials_per_gpu, fit))

    def resources_overrides(self, footprint_bytes: int | None = None) -> dict[str, Any]:
        """Dotted overrides for `Config.replace`: what a trial of this footprint asks Ray for.

        Small models take a small slice of a GPU, large ones a bigger slice or a whole GPU, all on the stage's
        one accelerator type; without a footprint, the share the plan was sized for.
        """
        gpus = self.gpus_per_worker
        if footprint_bytes is not None and self.device == "gpu" and self.num_workers == 1:
            gpus = gpu_fraction(self.trials_per_gpu_for(footprint_bytes))
        return {
            "resources.num_workers": self.num_workers,
            "resources.cpus_per_worker": float(self.cpus_per_worker),
            "resources.gpus_per_worker": float(gpus),
            "resources.accelerator_type": self.accelerator_type,
        }


def gpu_fraction(trials_per_gpu: int) -> float:
    # Ray keeps resource amounts to 4 decimals; round down so trials_per_gpu fractions never exceed 1 GPU.
    return math.floor(10000 / trials_per_gpu) / 10000


#: Memory a trial driver reserves: it holds no CPU, and Tune refuses an all-zero resource request.
DRIVER_MEMORY_BYTES = 256 * 2**20


def driver_resources(inventory: Inventory) -> dict[str, float]:
    """What one trial driver asks for: no CPU (a 2-CPU box would deadlock), a `driver` slot where declared."""
    if inventory.driver_slots:
        return {"CPU": 0, DRIVER_RESOURCE: 1}
    return {"CPU": 0, "memory": DRIVER_MEMORY_BYTES}


def _cap_by_drivers(concurrent: int, inventory: Inventory, notes: list[str], num_workers: int) -> int:
    """Trials with several workers each need a driver slot; a one-worker trial runs in its own process (no driver)."""
    if num_workers > 1 and inventory.driver_slots and concurrent > inventory.driver_slots:
        notes.append(f"concurrency capped at {inventory.driver_slots} by the '{DRIVER_RESOURCE}' resource")
        return inventory.driver_slots
    return concurrent


def _require_trials(num_trials: int) -> None:
    if num_trials < 1:
        raise PlanError(f"num_trials must be >= 1, got {num_trials}")


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f}"


def _too_big(footprint: int, inventory: Inventory, memory_headroom: float) -> PlanError:
    known = [(n.gpu_memory_bytes, n.accelerator_type or "unknown") for n in inventory.nodes if n.gpu_memory_bytes]
    biggest_bytes, biggest_name = max(known)
    return PlanError(
        f"a trial needs {_gib(footprint)} GiB of GPU memory (+{_gib(CUDA_CONTEXT_BYTES)} GiB CUDA context), but "
        f"the biggest GPU here is {biggest_name} with {_gib(biggest_bytes)} GiB "
        f"({_gib(memory_headroom * biggest_bytes)} GiB usable at memory_headroom={memory_headroom}); "
        "lower data.batch_size or max_len, or add bigger GPUs")


def _cpu_search(inventory: Inventory, footprint: int, num_trials: int, cpus_per_trial: float) -> StagePlan:
    cpus_per_worker = max(1.0, float(math.floor(cpus_per_trial)))
    # Per node: a worker cannot straddle nodes, so fractional leftovers on each node are lost.
    slots = sum(math.floor(node.cpus / cpus_per_worker) for node in inventory.nodes)
    notes = ["no GPUs: one CPU worker per trial; trial drivers hold 0 CPU"]
    concurrent = max(1, min(num_trials, slots))
    return StagePlan(kind="search", device="cpu", num_workers=1, cpus_per_worker=cpus_per_worker,
                     gpus_per_worker=0.0, accelerator_type="", trials_per_gpu=0, max_concurrent_trials=concurrent,
                     footprint_bytes=footprint, notes=tuple(notes), num_trials=num_trials)


def plan_search(inventory: Inventory, footprint_bytes: Sequence[int], *, num_trials: int,
                cpus_per_trial: float = 1.0, memory_headroom: float = 0.9) -> StagePlan:
    """Many small trials at once: each one worker on a slice of a GPU, all pinned to the type with most slots.

    Only one accelerator type is used so ASHA compares trials that ran on the same hardware.
    """
    _require_trials(num_trials)
    if not footprint_bytes:
        raise PlanError("plan_search needs at least one footprint (bytes per trial)")
    footprint = max(int(f) for f in footprint_bytes)
    smallest = min(int(f) for f in footprint_bytes)
    groups = inventory.gpu_groups()
    if not groups:
        if inventory.total_cpus < 1:
            raise PlanError("the inventory has no GPUs and less than one CPU: nothing can run a trial")
        return _cpu_search(inventory, footprint, num_trials, cpus_per_trial)

    need = footprint + CUDA_CONTEXT_BYTES
    candidates = []
    skipped = []
    for name, nodes in groups.items():
        memories = [n.gpu_memory_bytes for n in nodes]
        notes = []
        if None in memories:
            # Without a memory figure, packing could OOM: one trial per GPU is the only safe choice.
            fit = 1
            notes.append(f"GPU memory of type '{name or 'unknown'}' unknown (declare '{GPU_MEMORY_RESOURCE}'): "
                         "one trial per GPU")
        else:
            if math.floor(memory_headroom * min(memories) / need) < 1:  # the largest config must fit
                skipped.append(name)
                continue
            # Packing is sized for the smallest config; each trial then takes its own share (trials_per_gpu_for).
            fit = math.floor(memory_headroom * min(memories) / (smallest + CUDA_CONTEXT_BYTES))
        num_gpus = sum(math.floor(n.gpus) for n in nodes)
        cpus_per_gpu = min(n.cpus / n.gpus for n in nodes)
        cpu_fit = math.floor(cpus_per_gpu / cpus_per_trial)
        # Packing beyond what the trials need only slows each of them down: spread them over the GPUs first.
        spread = math.ceil(num_trials / num_gpus)
        if cpu_fit >= 1:
            trials_per_gpu = max(1, min(fit, MAX_TRIALS_PER_GPU, cpu_fit, spread))
            cpus_per_worker = float(cpus_per_trial)
        else:
            # Fewer CPUs than GPUs x cpus_per_trial: keep every GPU busy, each trial gets what CPU there is.
            trials_per_gpu = 1
            cpus_per_worker = math.floor(cpus_per_gpu * 100) / 100
            notes.append(f"only {cpus_per_gpu:g} CPU per GPU: workers get {cpus_per_worker:g} CPU, data loading "
                         "may bound speed")
        slots = num_gpus * trials_per_gpu
        concurrent = min(num_trials, slots)
        candidates.append((concurrent, -min(m or 0 for m in memories), -trials_per_gpu, name, trials_per_gpu,
                           cpus_per_worker, notes, min(m or 0 for m in memories)))
    if not candidates:
        raise _too_big(footprint, inventory, memory_headroom)

    # Search on the smallest GPUs every config of the stage fits, promotion on the biggest (plan_promotion): the
    # small pool is the cheap (spot) one, and the big-GPU nodes stay free for promoted runs. Among types of
    # the same memory, the most concurrent trials.
    concurrent, _, _, name, trials_per_gpu, cpus_per_worker, notes, gpu_memory = max(candidates, key=lambda c: (c[1], c[0], c[2]))
    others = sorted(c[3] or "unknown" for c in candidates if c[3] != name) + [f"{s or 'unknown'} (too small)"
                                                                             for s in skipped]
    if others:
        notes.append(f"search pinned to {name or 'any GPU'}; idle this stage: {', '.join(others)}")
    return StagePlan(kind="search", device="gpu", num_workers=1, cpus_per_worker=cpus_per_worker,
                     gpus_per_worker=gpu_fraction(trials_per_gpu), accelerator_type=name, trials_per_gpu=trials_per_gpu,
                     max_concurrent_trials=concurrent, footprint_bytes=footprint, notes=tuple(notes),
                     num_trials=num_trials, gpu_memory_bytes=gpu_memory, memory_headroom=memory_headroom)


def _workers_within_nodes(share: int, gpus_per_node: int) -> int:
    """Largest worker count <= share that never splits a trial's ranks across nodes needlessly.

    NCCL between nodes (without EFA / GPUDirect) is far slower than NVLink inside one, so a trial takes either a
    divisor of a node's GPUs or whole nodes.
    """
    if share >= gpus_per_node:
        return share // gpus_per_node * gpus_per_node
    return max(d for d in range(1, share + 1) if gpus_per_node % d == 0)


def _cpu_promotion(inventory: Inventory, footprint: int, num_trials: int, max_workers: int = 0) -> StagePlan:
    total = math.floor(inventory.total_cpus)
    notes = ["no GPUs: CPU DDP workers (gloo), one CPU each; trial drivers hold 0 CPU"]
    if total >= num_trials:
        concurrent, workers = num_trials, total // num_trials
    else:
        concurrent, workers = 1, total
        notes.append(f"{num_trials} trials on {total} cores: run one after another, each on all cores")
    if max_workers and workers > max_workers:
        workers = max_workers
        notes.append(f"workers capped at {workers}: a global batch of {max_workers} proteins is split across them")
    concurrent = _cap_by_drivers(concurrent, inventory, notes, workers)
    return StagePlan(kind="promotion", device="cpu", num_workers=workers, cpus_per_worker=1.0, gpus_per_worker=0.0,
                     accelerator_type="", trials_per_gpu=0, max_concurrent_trials=concurrent,
                     footprint_bytes=footprint, notes=tuple(notes), num_trials=num_trials)


def plan_promotion(inventory: Inventory, footprint_bytes: int, *, num_trials: int,
                   memory_headroom: float = 0.9, max_workers: int = 0) -> StagePlan:
    """The top trials continue on whole GPUs of the biggest type, split into DDP workers between them.

    `max_workers` (> 0) caps a trial's workers: the global batch is split across them, one protein each at least.
    """
    _require_trials(num_trials)
    footprint = int(footprint_bytes)
    groups = inventory.gpu_groups()
    if not groups:
        if inventory.total_cpus < 1:
            raise PlanError("the inventory has no GPUs and less than one CPU: nothing can run a trial")
        return _cpu_promotion(inventory, footprint, num_trials, max_workers)

    def rank(item: tuple[str, tuple[NodeInventory, ...]]) -> tuple[int, float]:
        memories = [n.gpu_memory_bytes or 0 for n in item[1]]
        return min(memories), sum(n.gpus for n in item[1])

    name, nodes = max(groups.items(), key=rank)
    memory = min(n.gpu_memory_bytes or 0 for n in nodes)
    notes = []
    if memory == 0:
        notes.append(f"GPU memory unknown (declare '{GPU_MEMORY_RESOURCE}'); fit not checked")
    elif memory_headroom * memory < footprint + CUDA_CONTEXT_BYTES:
        raise _too_big(footprint, inventory, memory_headroom)
    num_gpus = sum(math.floor(n.gpus) for n in nodes)
    gpus_per_node = min(math.floor(n.gpus) for n in nodes)
    if num_gpus >= num_trials:
        concurrent = num_trials
        workers = _workers_within_nodes(num_gpus // num_trials, gpus_per_node)
        if workers * concurrent < num_gpus:
            notes.append(f"{num_gpus - workers * concurrent} of {num_gpus} {name} GPUs idle: workers kept "
                         "within nodes / equal per trial")
    else:
        concurrent, workers = 1, num_gpus
        notes.append(f"{num_trials} trials on {num_gpus} GPUs: run one after another, each on all of them")
    if max_workers and workers > max_workers:
        workers = _workers_within_nodes(max_workers, gpus_per_node)
        notes.append(f"workers capped at {workers}: a global batch of {max_workers} proteins is split across them")
    cpus_per_gpu = min(n.cpus / n.gpus for n in nodes)
    if cpus_per_gpu >= 1:
        cpus_per_worker = float(min(math.floor(cpus_per_gpu), MAX_CPUS_PER_GPU_WORKER))
    else:
        cpus_per_worker = math.floor(cpus_per_gpu * 100) / 100
    others = sorted(other or "unknown" for other in groups if other != name)
    if others:
        notes.append(f"promotion pinned to {name or 'any GPU'} (most memory); idle this stage: {', '.join(others)}")
    concurrent = _cap_by_drivers(concurrent, inventory, notes, workers)
    return StagePlan(kind="promotion", device="gpu", num_workers=workers, cpus_per_worker=cpus_per_worker,
                     gpus_per_worker=1.0, accelerator_type=name, trials_per_gpu=1, max_concurrent_trials=concurrent,
                     footprint_bytes=footprint, notes=tuple(notes), num_trials=num_trials, gpu_memory_bytes=memory,
                     memory_headroom=memory_headroom)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def format_inventory(inventory: Inventory) -> str:
    rows = []
    for node in inventory.nodes:
        gpu_memory = _gib(node.gpu_memory_bytes) if node.gpu_memory_bytes else "-"
        rows.append([node.node_id[:16], f"{node.cpus:g}", f"{node.gpus:g}", node.accelerator_type or "-",
                     gpu_memory, _gib(node.memory_bytes) if node.memory_bytes else "-",
                     "yes" if node.is_driver_host else ""])
    lines = _table(["node", "CPUs", "GPUs", "accelerator", "GiB/GPU", "mem GiB", "drivers"], rows)
    lines.append(f"total: {len(inventory.nodes)} nodes, {inventory.total_cpus:g} CPUs, {inventory.total_gpus:g} GPUs"
                 + (f", {inventory.driver_slots} driver slots" if inventory.driver_slots else ""))
    return "\n".join(lines)


def format_plan(plan: StagePlan, inventory: Inventory) -> str:
    """The table printed before a stage starts: what each trial gets and how many run at once."""
    if plan.device == "gpu":
        memory = next((n.gpu_memory_bytes for n in inventory.nodes
                       if n.gpus and (n.accelerator_type or "") == plan.accelerator_type and n.gpu_memory_bytes), None)
        accelerator = (plan.accelerator_type or "any") + (f" ({memory / GIB:g} GiB)" if memory else "")
        per_worker = f"{plan.gpus_per_worker:g} GPU + {plan.cpus_per_worker:g} CPU"
        per_gpu = str(plan.trials_per_gpu)
    else:
        accelerator, per_worker, per_gpu = "-", f"{plan.cpus_per_worker:g} CPU", "-"
    of = f" of {plan.num_trials}" if plan.num_trials else ""
    row = [plan.kind, plan.device, accelerator, f"{plan.num_workers} x ({per_worker})", per_gpu,
           f"{plan.max_concurrent_trials}{of}", _gib(plan.footprint_bytes)]
    header = ["stage", "device", "accelerator", "workers x per worker", "trials/GPU", "concurrent", "footprint GiB"]
    lines = _table(header, [row])
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)
