"""What the cluster holds (nodes, CPUs, GPUs, accelerator types, GPU memory) and how each search stage uses it.

Planning is pure: `plan_search` / `plan_promotion` take an `Inventory` (protopo_ray.search.inventory: the live cluster
plus what its autoscaler may start, or a cluster YAML scaled out) and per-trial memory footprints in bytes, and
return a `StagePlan` whose `resources_overrides(footprint)` give each trial's Config its own share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protopo_ray.search.inventory import (
    DRIVER_RESOURCE,
    GIB,
    GPU_MEMORY_RESOURCE,
    Inventory,
    NodeInventory,
    gib_text,
    text_table,
)
from protopo_ray.search.prices import PriceConfig, market_of

#: Each trial process on a GPU holds its own CUDA context (~0.3-0.5 GiB) besides tensors; packing counts it.
CUDA_CONTEXT_BYTES = GIB // 2
#: More trials than this on one GPU just time-slice the SMs; throughput per trial collapses.
MAX_TRIALS_PER_GPU = 8
#: A GC+LSTM worker's data path needs a few cores; the rest of a big node stays free for Ray Data tasks.
MAX_CPUS_PER_GPU_WORKER = 8


class PlanError(ValueError):
    """The requested stage cannot run on this inventory (e.g. a trial does not fit any GPU)."""


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
    usd_per_device_hour: float | None = None
    """Price of one device the trials hold for an hour (a GPU; a vCPU on CPU plans); None = unknown."""
    market: str = ""
    """spot, on-demand or mixed: the capacity the stage's pool runs on."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> StagePlan:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in values.items() if k in names}, "notes": tuple(values.get("notes", ()))})

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


def _too_big(footprint: int, inventory: Inventory, memory_headroom: float) -> PlanError:
    known = [(n.gpu_memory_bytes, n.accelerator_type or "unknown") for n in inventory.nodes if n.gpu_memory_bytes]
    biggest_bytes, biggest_name = max(known)
    return PlanError(
        f"a trial needs {gib_text(footprint)} GiB of GPU memory (+{gib_text(CUDA_CONTEXT_BYTES)} GiB CUDA context), but "
        f"the biggest GPU here is {biggest_name} with {gib_text(biggest_bytes)} GiB "
        f"({gib_text(memory_headroom * biggest_bytes)} GiB usable at memory_headroom={memory_headroom}); "
        "lower data.batch_size or max_len, or add bigger GPUs")


def _cpu_price(inventory: Inventory, prices: PriceConfig) -> dict[str, Any]:
    nodes = [n for n in inventory.nodes if n.cpus]
    return {"usd_per_device_hour": prices.device_hour_price(nodes, "cpu"), "market": market_of(nodes)}


def _cpu_search(inventory: Inventory, footprint: int, num_trials: int, cpus_per_trial: float,
                prices: PriceConfig) -> StagePlan:
    cpus_per_worker = max(1.0, float(math.floor(cpus_per_trial)))
    # Per node: a worker cannot straddle nodes, so fractional leftovers on each node are lost.
    slots = sum(math.floor(node.cpus / cpus_per_worker) for node in inventory.nodes)
    notes = ["no GPUs: one CPU worker per trial; trial drivers hold 0 CPU"]
    concurrent = max(1, min(num_trials, slots))
    return StagePlan(kind="search", device="cpu", num_workers=1, cpus_per_worker=cpus_per_worker,
                     gpus_per_worker=0.0, accelerator_type="", trials_per_gpu=0, max_concurrent_trials=concurrent,
                     footprint_bytes=footprint, notes=tuple(notes), num_trials=num_trials,
                     **_cpu_price(inventory, prices))


def plan_search(inventory: Inventory, footprint_bytes: Sequence[int], *, num_trials: int,
                cpus_per_trial: float = 1.0, memory_headroom: float = 0.9,
                prices: PriceConfig | None = None) -> StagePlan:
    """Many small trials at once: each one worker on a slice of a GPU, all pinned to one accelerator type.

    The type is the cheapest per trial-hour (its GPU-hour price / trials per GPU) where every type has a price,
    so a spot search pool goes before an on-demand promotion node; else the smallest GPUs every config fits.
    Only one type is used so the scheduler compares trials that ran on the same hardware.
    """
    _require_trials(num_trials)
    prices = prices or PriceConfig()
    if not footprint_bytes:
        raise PlanError("plan_search needs at least one footprint (bytes per trial)")
    footprint = max(int(f) for f in footprint_bytes)
    smallest = min(int(f) for f in footprint_bytes)
    groups = inventory.gpu_groups()
    if not groups:
        if inventory.total_cpus < 1:
            raise PlanError("the inventory has no GPUs and less than one CPU: nothing can run a trial")
        return _cpu_search(inventory, footprint, num_trials, cpus_per_trial, prices)

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
        price = prices.device_hour_price(nodes, "gpu")
        candidates.append({"name": name, "concurrent": min(num_trials, slots), "trials_per_gpu": trials_per_gpu,
                           "cpus_per_worker": cpus_per_worker, "notes": notes, "memory": min(m or 0 for m in memories),
                           "price": price, "market": market_of(nodes),
                           "trial_hour": None if price is None else price / trials_per_gpu})
    if not candidates:
        raise _too_big(footprint, inventory, memory_headroom)

    # Cheapest per trial-hour where every pool has a price; else (and among equal prices) the smallest GPUs every
    # config fits, so the big-GPU nodes stay free for promoted runs (plan_promotion); then the most concurrent.
    priced = all(c["trial_hour"] is not None for c in candidates)
    chosen = min(candidates, key=lambda c: (c["trial_hour"] if priced else 0.0, c["memory"], -c["concurrent"],
                                            c["trials_per_gpu"]))
    name, notes = chosen["name"], chosen["notes"]
    others = sorted(c["name"] or "unknown" for c in candidates if c["name"] != name) + [
        f"{s or 'unknown'} (too small)" for s in skipped]
    if others:
        notes.append(f"search pinned to {name or 'any GPU'}; idle this stage: {', '.join(others)}")
    if priced and len(candidates) > 1:
        notes.append("USD per trial-hour: " + ", ".join(
            f"{c['name'] or 'unknown'} ({c['market']}) {c['trial_hour']:.3f}"
            for c in sorted(candidates, key=lambda c: c["trial_hour"])))
    return StagePlan(kind="search", device="gpu", num_workers=1, cpus_per_worker=chosen["cpus_per_worker"],
                     gpus_per_worker=gpu_fraction(chosen["trials_per_gpu"]), accelerator_type=name,
                     trials_per_gpu=chosen["trials_per_gpu"], max_concurrent_trials=chosen["concurrent"],
                     footprint_bytes=footprint, notes=tuple(notes), num_trials=num_trials,
                     gpu_memory_bytes=chosen["memory"], memory_headroom=memory_headroom,
                     usd_per_device_hour=chosen["price"], market=chosen["market"])


def _workers_within_nodes(share: int, gpus_per_node: int) -> int:
    """Largest worker count <= share that never splits a trial's ranks across nodes needlessly.

    NCCL between nodes (without EFA / GPUDirect) is far slower than NVLink inside one, so a trial takes either a
    divisor of a node's GPUs or whole nodes.
    """
    if share >= gpus_per_node:
        return share // gpus_per_node * gpus_per_node
    return max(d for d in range(1, share + 1) if gpus_per_node % d == 0)


def _cpu_promotion(inventory: Inventory, footprint: int, num_trials: int, max_workers: int,
                   prices: PriceConfig) -> StagePlan:
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
                     footprint_bytes=footprint, notes=tuple(notes), num_trials=num_trials,
                     **_cpu_price(inventory, prices))


def plan_promotion(inventory: Inventory, footprint_bytes: int, *, num_trials: int,
                   memory_headroom: float = 0.9, max_workers: int = 0, prices: PriceConfig | None = None) -> StagePlan:
    """The top trials continue on whole GPUs of the biggest type, split into DDP workers between them; between
    pools of GPUs with the same memory, the cheaper per GPU-hour (then the one with more GPUs).

    `max_workers` (> 0) caps a trial's workers: the global batch is split across them, one protein each at least.
    """
    _require_trials(num_trials)
    prices = prices or PriceConfig()
    footprint = int(footprint_bytes)
    groups = inventory.gpu_groups()
    if not groups:
        if inventory.total_cpus < 1:
            raise PlanError("the inventory has no GPUs and less than one CPU: nothing can run a trial")
        return _cpu_promotion(inventory, footprint, num_trials, max_workers, prices)

    def rank(item: tuple[str, tuple[NodeInventory, ...]]) -> tuple[int, float, float]:
        memories = [n.gpu_memory_bytes or 0 for n in item[1]]
        price = prices.device_hour_price(item[1], "gpu")
        return min(memories), -price if price is not None else -math.inf, sum(n.gpus for n in item[1])

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
                     memory_headroom=memory_headroom, usd_per_device_hour=prices.device_hour_price(nodes, "gpu"),
                     market=market_of(nodes))


def format_plan(plan: StagePlan, inventory: Inventory) -> str:
    """The table printed before a stage starts: what each trial gets and how many run at once."""
    if plan.device == "gpu":
        memory = next((n.gpu_memory_bytes for n in inventory.nodes
                       if n.gpus and (n.accelerator_type or "") == plan.accelerator_type and n.gpu_memory_bytes), None)
        accelerator = (plan.accelerator_type or "any") + (f" ({memory / GIB:g} GiB)" if memory else "")
        largest = gpu_fraction(plan.trials_per_gpu_for(plan.footprint_bytes)) if plan.num_workers == 1 else 1.0
        share = f"{plan.gpus_per_worker:g}" + (f"-{largest:g}" if largest > plan.gpus_per_worker else "")
        per_worker = f"{share} GPU + {plan.cpus_per_worker:g} CPU"
        per_gpu = str(plan.trials_per_gpu)
    else:
        accelerator, per_worker, per_gpu = "-", f"{plan.cpus_per_worker:g} CPU", "-"
    of = f" of {plan.num_trials}" if plan.num_trials else ""
    unit = "GPU" if plan.device == "gpu" else "CPU"
    price = "-" if plan.usd_per_device_hour is None else f"{plan.usd_per_device_hour:.3f}/{unit}-h {plan.market}"
    row = [plan.kind, plan.device, accelerator, f"{plan.num_workers} x ({per_worker})", per_gpu,
           f"{plan.max_concurrent_trials}{of}", gib_text(plan.footprint_bytes), price]
    header = ["stage", "device", "accelerator", "workers x per worker", "trials/GPU", "concurrent", "largest GiB", "USD"]
    lines = text_table(header, [row])
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)
