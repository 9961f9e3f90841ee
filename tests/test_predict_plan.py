"""search/predict_plan: the hardware plan of `predict --ray` from an inventory and a network's footprint."""

from __future__ import annotations

from pathlib import Path

from protopo_ray.search.inventory import Inventory, inventory_from_cluster_yaml, node_from_resources
from protopo_ray.search.predict_plan import TASK_CPUS, plan_prediction

REPO = Path(__file__).resolve().parents[1]
SMALL = 150 * 2**20  # a small network's footprint: 4 actors fit a 24 GiB GPU


def gpu_node(name: str, cpus: float, gpus: float) -> Inventory:
    return node_from_resources(name, {"CPU": cpus, "GPU": gpus, "accelerator_type:A10G": 1, "gpu_memory_gb": 24})


def test_gpu_nodes_with_cpus_to_spare_give_each_network_actor_a_cpu():
    plan = plan_prediction(inventory_from_cluster_yaml(REPO / "cluster.yaml"), SMALL, embedding=False)
    assert plan.device == "gpu" and plan.network_actors == 48 and plan.gpus_per_actor == 0.25
    assert plan.cpus_per_actor == 1.0 and plan.decode_cpus == 128 - 48


def test_actors_share_the_cpus_of_a_gpu_node_that_has_few_so_the_decoding_keeps_one():
    """cluster-fake.yaml's worker: 2 CPUs, 2 GPUs. Eight actors of 1 CPU each cannot all be placed there, and the
    ones that are leave the Viterbi tasks no CPU: the pipeline would wait forever."""
    plan = plan_prediction(inventory_from_cluster_yaml(REPO / "cluster-fake.yaml"), SMALL, embedding=False)
    assert plan.network_actors == 8
    assert plan.network_actors * plan.cpus_per_actor <= 2 - TASK_CPUS
    assert any("few CPUs" in note for note in plan.notes)
    # With embeddings each GPU also holds an embedding actor of 1 CPU: on a node of 4 CPUs and 1 GPU the 4 network
    # actors share 1.5, and the GPU is half theirs, half the embedding actor's.
    plan = plan_prediction(Inventory((gpu_node("a", 4, 1),)), SMALL, embedding=True)
    assert (plan.embed_actors, plan.embed_cpus, plan.network_actors, plan.cpus_per_actor) == (1, 1.0, 4, 0.35)
    assert plan.network_actors * plan.gpus_per_actor + plan.embed_gpus <= 1
    assert plan.network_actors * plan.cpus_per_actor + plan.embed_actors <= 4 - 1


def test_without_gpus_half_the_cpus_run_network_actors_and_the_tasks_keep_theirs():
    four = Inventory((node_from_resources("a", {"CPU": 2}), node_from_resources("b", {"CPU": 2})))
    plan = plan_prediction(four, SMALL, embedding=False)
    assert (plan.device, plan.network_actors, plan.cpus_per_actor, plan.decode_cpus) == ("cpu", 2, 1.0, 2.0)
    # 2 CPUs with embeddings: a network and an embedding actor of 1 CPU each would leave the Viterbi tasks none.
    two = Inventory((node_from_resources("a", {"CPU": 2}),))
    plan = plan_prediction(two, SMALL, embedding=True)
    assert (plan.network_actors, plan.embed_actors) == (1, 1)
    assert plan.network_actors * plan.cpus_per_actor + plan.embed_actors * plan.embed_cpus <= 2 - TASK_CPUS
    # A head of 0 CPUs (an autoscaling cluster before its first worker) plans 1 CPU: one actor of a share of it.
    plan = plan_prediction(Inventory((node_from_resources("head", {"CPU": 0}),)), SMALL, embedding=False)
    assert plan.network_actors == 1 and plan.cpus_per_actor == 0.05
