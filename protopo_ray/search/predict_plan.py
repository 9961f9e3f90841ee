"""The hardware plan of `predict --ray`: how many network actors, on what share of a GPU, how many embedding
actors, how much CPU the decoding gets, and what an hour of it costs; from the cluster's inventory and the
predictor's memory footprint, as the search plans its stages (`search.plan`).

Inference keeps no activations for a backward pass, so a network actor needs its weights (every ensemble member's)
and one batch's activations under the residue budget; the training activation count (`model.footprint`) is
used for them, an upper bound. A GPU takes as many actors as fit (at most `MAX_ACTORS_PER_GPU`: small models
leave a GPU idle between Python-side batches, a few actors keep it busy); with embeddings, half of each GPU goes
to an embedding actor. Without GPUs half the CPUs run network actors and the rest decode. Actors never take the
CPUs one Viterbi task and a read and a graph task need (`TASK_CPUS`): where too few are left, they share fractions
of a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protopo_ray.config import ModelConfig
from protopo_ray.model.footprint import MEASURED_ACTIVATION_SCALE, footprint
from protopo_ray.search.inventory import Inventory, gib_text
from protopo_ray.search.plan import CUDA_CONTEXT_BYTES, gpu_fraction
from protopo_ray.search.prices import PriceConfig

MAX_ACTORS_PER_GPU = 4
#: CPUs the plan leaves free of actors: one Viterbi task (1 CPU) and a read and a graph task
#: (`cluster.batch_predict`: READ_CPUS, GRAPH_CPUS).
TASK_CPUS = 1.5
#: Share of a GPU's memory the plan fills (the rest: allocator slack, the embedding model, other tenants).
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True, kw_only=True)
class PredictPlan:
    device: str
    """'gpu' or 'cpu': where the network actors run."""
    network_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    embed_actors: int
    """0 when the predictor takes no embeddings."""
    embed_gpus: float
    embed_cpus: float
    """CPUs of an embedding actor."""
    decode_cpus: float
    """CPUs the Viterbi tasks may use at once."""
    footprint_bytes: int
    """One network actor's memory: weights and one batch."""
    devices: float
    """GPUs (device gpu) or CPUs (device cpu) the plan holds: what device-hours count."""
    usd_per_device_hour: float | None
    notes: tuple[str, ...] = ()


def inference_bytes(cfg: ModelConfig, max_residues: int, members: int = 1, embedding_dim: int = 0) -> int:
    """Weights of `members` models of `cfg` and the activations of one batch of `max_residues` padded residues."""
    estimate = footprint(cfg, batch_size=1, max_len=max_residues, embedding_dim=embedding_dim)
    return int(members * estimate.weights_bytes + MEASURED_ACTIVATION_SCALE * estimate.batch_activation_bytes)


def plan_prediction(inventory: Inventory, footprint_bytes: int, *, embedding: bool,
                    prices: PriceConfig | None = None) -> PredictPlan:
    prices = prices or PriceConfig()
    gpu_nodes = [n for n in inventory.nodes if n.gpus >= 1]
    cpus = max(1.0, inventory.total_cpus)
    if gpu_nodes:
        gpus = sum(n.gpus for n in gpu_nodes)
        memories = [n.gpu_memory_bytes for n in gpu_nodes if n.gpu_memory_bytes]
        share = 0.5 if embedding else 1.0
        fit = (math.floor(MEMORY_HEADROOM * share * min(memories) / (footprint_bytes + CUDA_CONTEXT_BYTES))
               if memories else 1)
        per_gpu = max(1, min(MAX_ACTORS_PER_GPU, fit))
        notes = [f"{per_gpu} network actor(s) per GPU ({gib_text(footprint_bytes)} GiB each)"]
        if not fit:
            notes.append("the model's batch may not fit a GPU share: batches that run out of memory are split")
        actors = int(gpus * per_gpu)
        # A network actor holds its CPUs for the whole run: where a GPU node has fewer CPUs than its actors (and its
        # embedding actor, 1 CPU) plus TASK_CPUS, the actors share them, or the tasks find no CPU there and the
        # pipeline stalls with every actor placed and none fed (cluster-fake.yaml: 2 CPUs, 2 GPUs).
        cpus_per_actor = cpu_share(min((n.cpus - TASK_CPUS - (n.gpus if embedding else 0)) / (n.gpus * per_gpu)
                                       for n in gpu_nodes))
        if cpus_per_actor < 1:
            notes.append(f"GPU nodes have few CPUs: {cpus_per_actor:g} CPU per network actor, so the decoding keeps "
                         f"one per node")
        embed_actors = int(gpus) if embedding else 0
        return PredictPlan(device="gpu", network_actors=actors, gpus_per_actor=gpu_fraction(int(per_gpu / share)),
                           cpus_per_actor=cpus_per_actor, embed_actors=embed_actors,
                           embed_gpus=0.5 if embedding else 0.0, embed_cpus=1.0 if embedding else 0.0,
                           decode_cpus=max(1.0, cpus - actors * cpus_per_actor - embed_actors),
                           footprint_bytes=footprint_bytes, devices=gpus,
                           usd_per_device_hour=prices.device_hour_price(gpu_nodes, "gpu"), notes=tuple(notes))
    actors = max(1, int(cpus // 2))
    embed = max(1, int(cpus // 4)) if embedding else 0
    # The same rule as on GPU nodes: actors that take every CPU leave the Viterbi tasks none (2 CPUs with
    # embeddings: a network and an embedding actor of 1 CPU each, and the pipeline waits forever).
    share = cpu_share((cpus - TASK_CPUS) / (actors + embed))
    cpu_nodes = [n for n in inventory.nodes if n.cpus]
    notes = [f"no GPUs: network actors on {share:g} CPU each, the rest of the CPUs decode"]
    return PredictPlan(device="cpu", network_actors=actors, gpus_per_actor=0.0, cpus_per_actor=share,
                       embed_actors=embed, embed_gpus=0.0, embed_cpus=share if embedding else 0.0,
                       decode_cpus=max(1.0, cpus - (actors + embed) * share),
                       footprint_bytes=footprint_bytes, devices=cpus,
                       usd_per_device_hour=prices.device_hour_price(cpu_nodes, "cpu"), notes=tuple(notes))


def cpu_share(spare: float) -> float:
    """CPUs per actor: 1 where there are `spare` CPUs per actor or more, else `spare` in steps of 0.05 (at least
    0.05: an actor of fewer logical CPUs still runs one thread)."""
    return 1.0 if spare >= 1 else max(0.05, math.floor(spare * 20) / 20)


def format_predict_plan(plan: PredictPlan, inventory: Inventory) -> str:
    price = "unknown" if plan.usd_per_device_hour is None else f"${plan.usd_per_device_hour:.3f}"
    lines = [f"cluster: {len(inventory.nodes)} node(s), {inventory.total_cpus:g} CPUs, {inventory.total_gpus:g} GPUs",
             f"network: {plan.network_actors} actor(s) on {plan.device}, {plan.gpus_per_actor:g} GPU and "
             f"{plan.cpus_per_actor:g} CPU each, {gib_text(plan.footprint_bytes)} GiB each",
             f"embeddings: {plan.embed_actors} actor(s), {plan.embed_gpus:g} GPU and {plan.embed_cpus:g} CPU each"
             if plan.embed_actors else
             "embeddings: none (the predictor takes none)",
             f"decoding (Viterbi): CPU tasks, up to {plan.decode_cpus:g} CPUs at once",
             f"price: {price} per {plan.device.upper()}-hour, {plan.devices:g} {plan.device.upper()}(s) held"]
    return "\n".join(lines + [f"note: {note}" for note in plan.notes])
