"""Stage planning from hand-built inventories, plus one check that a real (logical-resource) Ray cluster reads back."""

from __future__ import annotations

import itertools
import os

import pytest

from protopo_ray.config import Config
from protopo_ray.search.inventory import GIB, Inventory, format_inventory, node_from_resources
from protopo_ray.search.plan import (
    CUDA_CONTEXT_BYTES,
    DRIVER_MEMORY_BYTES,
    PlanError,
    driver_resources,
    format_plan,
    plan_promotion,
    plan_search,
)

SMALL = [int(0.3 * GIB)] * 36  # 36 seed-grid configs, each well under a GiB


def gpu_node(name: str, accelerator: str, gpus: int, cpus: int, **extra: float):
    return node_from_resources(name, {"CPU": cpus, "GPU": gpus, f"accelerator_type:{accelerator}": 1,
                                      "memory": 64 * GIB, **extra})


def a10g_box() -> Inventory:
    return Inventory((gpu_node("a10g-0", "A10G", gpus=1, cpus=8),))


def h100_box() -> Inventory:
    return Inventory((gpu_node("p5-0", "H100", gpus=8, cpus=192),))


def mixed() -> Inventory:
    a10g = tuple(gpu_node(f"g5-{i}", "A10G", gpus=4, cpus=48) for i in range(4))
    return Inventory((*a10g, gpu_node("p5-0", "H100", gpus=2, cpus=48)))


def cpu_box() -> Inventory:
    return Inventory((node_from_resources("laptop", {"CPU": 2, "memory": 8 * GIB}),))


def test_node_reads_accelerator_and_memory():
    node = gpu_node("n", "A10G", gpus=1, cpus=4)
    assert (node.accelerator_type, node.gpu_memory_bytes) == ("A10G", 24 * GIB)
    declared = node_from_resources("n", {"GPU": 8, "accelerator_type:A100": 1, "accelerator_type:A100-80G": 1,
                                         "gpu_memory_gb": 80})
    assert (declared.accelerator_type, declared.gpu_memory_bytes) == ("A100-80G", 80 * GIB)
    assert node_from_resources("n", {"CPU": 4}).gpu_memory_bytes is None


def test_one_a10g_packs_small_trials():
    plan = plan_search(a10g_box(), SMALL, num_trials=36)
    assert (plan.device, plan.accelerator_type, plan.num_workers) == ("gpu", "A10G", 1)
    assert plan.trials_per_gpu == 8  # capped at MAX_TRIALS_PER_GPU: 0.8 GiB each would allow 27
    assert plan.gpus_per_worker == 0.125 < 1
    assert plan.max_concurrent_trials == plan.trials_per_gpu
    assert plan.resources_overrides() == {"resources.num_workers": 1, "resources.cpus_per_worker": 1.0,
                                          "resources.gpus_per_worker": 0.125, "resources.accelerator_type": "A10G"}
    # The overrides are valid for the run config (fraction with one worker).
    assert Config().replace(plan.resources_overrides()).resources.gpus_per_worker == 0.125


def test_trials_per_gpu_bound_by_memory_and_cpus():
    # 5 GiB each: floor(0.9 * 24 / 5.5) = 3 fit on an A10G.
    assert plan_search(a10g_box(), [5 * GIB], num_trials=36).trials_per_gpu == 3
    # 4 vCPUs per GPU (g5.xlarge): one CPU per trial keeps data loading up, so 4 per GPU.
    box = Inventory((gpu_node("g5", "A10G", gpus=1, cpus=4),))
    assert plan_search(box, SMALL, num_trials=36).trials_per_gpu == 4


def test_h100_node_search_spreads_trials():
    plan = plan_search(h100_box(), SMALL, num_trials=36)
    # 36 trials over 8 GPUs: 5 per GPU runs all of them at once without packing tighter than needed.
    assert (plan.trials_per_gpu, plan.max_concurrent_trials, plan.gpus_per_worker) == (5, 36, 0.2)


def test_h100_node_promotion_top2_and_top1():
    top2 = plan_promotion(h100_box(), 2 * GIB, num_trials=2)
    assert (top2.max_concurrent_trials, top2.num_workers, top2.gpus_per_worker) == (2, 4, 1.0)
    assert top2.accelerator_type == "H100" and top2.device == "gpu"
    assert top2.cpus_per_worker == 8  # capped: the other cores stay free for Ray Data
    top1 = plan_promotion(h100_box(), 2 * GIB, num_trials=1)
    assert (top1.max_concurrent_trials, top1.num_workers) == (1, 8)


def test_promotion_with_more_trials_than_gpus_runs_them_in_turn():
    plan = plan_promotion(Inventory((gpu_node("g", "A10G", gpus=2, cpus=16),)), GIB, num_trials=5)
    assert (plan.max_concurrent_trials, plan.num_workers) == (1, 2)


def test_promotion_keeps_ranks_within_a_node():
    two_nodes = Inventory(tuple(gpu_node(f"p5-{i}", "H100", gpus=8, cpus=192) for i in range(2)))
    plan = plan_promotion(two_nodes, GIB, num_trials=3)
    # 16 // 3 = 5 would straddle nodes; 4 (a divisor of 8) keeps each trial on one NVLink island.
    assert (plan.num_workers, plan.max_concurrent_trials) == (4, 3)


def test_mixed_cluster_search_most_slots_promotion_biggest():
    inventory = mixed()
    search = plan_search(inventory, SMALL, num_trials=36)
    assert search.accelerator_type == "A10G"  # 16 A10G GPUs give more slots than 2 H100s
    assert search.max_concurrent_trials == 36 and search.trials_per_gpu == 3
    promotion = plan_promotion(inventory, 2 * GIB, num_trials=2)
    assert (promotion.accelerator_type, promotion.num_workers, promotion.max_concurrent_trials) == ("H100", 1, 2)


def test_search_skips_a_type_the_trial_does_not_fit():
    plan = plan_search(mixed(), [30 * GIB], num_trials=36)
    assert plan.accelerator_type == "H100" and plan.trials_per_gpu == 2
    assert any("A10G (too small)" in note for note in plan.notes)


def test_cpu_only_two_cores():
    search = plan_search(cpu_box(), SMALL, num_trials=36)
    assert (search.device, search.num_workers, search.cpus_per_worker, search.gpus_per_worker) == ("cpu", 1, 1.0, 0.0)
    assert search.max_concurrent_trials == 2
    assert driver_resources(cpu_box()) == {"CPU": 0, "memory": DRIVER_MEMORY_BYTES}
    promotion = plan_promotion(cpu_box(), GIB, num_trials=1)
    assert (promotion.device, promotion.num_workers, promotion.cpus_per_worker) == ("cpu", 2, 1.0)
    assert promotion.max_concurrent_trials == 1


def test_driver_resource_caps_only_multi_worker_trials():
    head = node_from_resources("head", {"CPU": 0, "driver": 1})
    inventory = Inventory((head, *h100_box().nodes))
    assert head.is_driver_host and inventory.driver_slots == 1
    # One-worker search trials run in their own Tune process on the GPU node: no driver slot needed.
    assert plan_search(inventory, SMALL, num_trials=36).max_concurrent_trials == 36
    # DDP trials need a driver each: two 4-GPU promotions run one after the other.
    plan = plan_promotion(inventory, GIB, num_trials=2)
    assert (plan.num_workers, plan.max_concurrent_trials) == (4, 1)
    assert driver_resources(inventory) == {"CPU": 0, "driver": 1}


@pytest.mark.parametrize("plan_fn", [plan_search, plan_promotion])
def test_footprint_bigger_than_any_gpu(plan_fn):
    footprint = 100 * GIB
    with pytest.raises(PlanError, match=r"100\.00 GiB.*biggest GPU here is H100 with 80\.00 GiB"):
        plan_fn(mixed(), [footprint] if plan_fn is plan_search else footprint, num_trials=2)


def test_no_fractional_gpus_with_several_workers():
    inventories = [a10g_box(), h100_box(), mixed(), cpu_box(),
                   Inventory((gpu_node("odd", "T4", gpus=4, cpus=2),))]
    footprints = [GIB // 10, 3 * GIB, 12 * GIB]
    for inventory, footprint, num_trials in itertools.product(inventories, footprints, [1, 2, 3, 8, 36]):
        for plan_fn in (plan_search, plan_promotion):
            try:
                plan = plan_fn(inventory, [footprint] if plan_fn is plan_search else footprint,
                               num_trials=num_trials)
            except PlanError:
                assert footprint + CUDA_CONTEXT_BYTES > 0.9 * 16 * GIB  # only the T4 box can refuse
                continue
            if plan.num_workers > 1:
                assert plan.gpus_per_worker in (0.0, 1.0), plan
            assert 1 <= plan.max_concurrent_trials <= num_trials
            assert plan.trials_per_gpu * plan.gpus_per_worker <= 1.0
            Config().replace(plan.resources_overrides())  # ResourcesConfig's own validation agrees


def test_format_plan_and_inventory():
    inventory = a10g_box()
    text = format_plan(plan_search(inventory, SMALL, num_trials=36), inventory)
    assert "search" in text and "A10G (24 GiB)" in text and "1 x (0.125 GPU + 1 CPU)" in text and "8 of 36" in text
    assert "a10g-0" in format_inventory(inventory) and "1 GPUs" in format_inventory(inventory)


@pytest.fixture(scope="module")
def logical_a10g_cluster():
    ray = pytest.importorskip("ray")
    # This test needs its own logical resources: leave the shared test cluster (it restarts on next use).
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    # address="local": a cluster of its own, even where another test's cluster (a `ray start` head) lingers.
    ray.init(address="local", num_cpus=2, num_gpus=4, resources={"accelerator_type:A10G": 4},
             include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_read_inventory_from_local_ray(logical_a10g_cluster):
    from protopo_ray.search.inventory import read_inventory

    inventory = read_inventory()
    (node,) = inventory.gpu_groups()["A10G"]
    assert (node.gpus, node.cpus, node.gpu_memory_bytes) == (4.0, 2.0, 24 * GIB)
    assert node.memory_bytes > 0 and not node.is_driver_host
    plan = plan_search(inventory, SMALL, num_trials=36)
    # 2 CPUs for 4 GPUs: every GPU gets one trial with half a CPU rather than leaving two GPUs idle.
    assert (plan.accelerator_type, plan.trials_per_gpu, plan.gpus_per_worker) == ("A10G", 1, 1.0)
    assert (plan.cpus_per_worker, plan.max_concurrent_trials) == (0.5, 4)


def test_fresh_autoscaling_head_plans_on_the_gpu_types_it_may_start(tmp_path):
    """`ray up` starts only a CPU-0 head: the plan must come from the node types the autoscaler can start."""
    from pathlib import Path

    from protopo_ray.search.inventory import autoscaler_node_types, with_autoscaler_headroom

    yaml_path = Path(__file__).resolve().parents[1] / "cluster.yaml"
    head = node_from_resources("head-live", {"CPU": 0, "driver": 32, "memory": 30 * GIB, "node:__internal_head__": 1})
    inventory = with_autoscaler_headroom([head], autoscaler_node_types(yaml_path))
    assert inventory.total_gpus == 4 * 1 + 8
    plan = plan_search(inventory, SMALL, num_trials=36)
    assert (plan.device, plan.accelerator_type, plan.trials_per_gpu) == ("gpu", "A10G", 8)
    # A search node already up counts once: the autoscaler may start only the rest.
    up = node_from_resources("live-g5", {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1, "gpu_memory_gb": 24,
                                         "memory": 30 * GIB, "node:10.0.0.5": 1})
    assert with_autoscaler_headroom([head, up], autoscaler_node_types(yaml_path)).total_gpus == 4 + 8


def test_search_takes_the_cheapest_pool_per_trial_hour_over_the_smallest_gpus():
    from protopo_ray.search.prices import PriceConfig

    spot_l40s = tuple(node_from_resources(f"l40s-{i}", {"CPU": 8, "GPU": 1, "accelerator_type:L40S": 1}, "pool_l40s",
                                          spot=True) for i in range(2))
    inventory = Inventory((*spot_l40s, gpu_node("g5-0", "A10G", gpus=1, cpus=8)))
    # Without an L40S price the smaller A10G (24 GiB) wins, as before prices existed.
    assert plan_search(inventory, SMALL, num_trials=36).accelerator_type == "A10G"
    plan = plan_search(inventory, SMALL, num_trials=36, prices=PriceConfig(spot_gpu_hour={"L40S": 0.6}))
    # L40S spot 0.6 / 8 trials per GPU = 0.075 per trial-hour beats A10G on demand 1.212 / 8.
    assert (plan.accelerator_type, plan.usd_per_device_hour, plan.market) == ("L40S", 0.6, "spot")
    assert any("USD per trial-hour: L40S (spot) 0.075, A10G (on-demand) 0.151" in note for note in plan.notes)


def test_promotion_keeps_the_biggest_gpus_and_takes_the_cheaper_of_equal_ones():
    from protopo_ray.search.prices import PriceConfig

    inventory = Inventory((gpu_node("a-0", "A100", gpus=8, cpus=96), gpu_node("b-0", "A100-40G", gpus=8, cpus=96),
                           gpu_node("s-0", "A10G", gpus=1, cpus=8)))
    prices = PriceConfig(gpu_hour={"A100": 4.0, "A100-40G": 3.0, "A10G": 0.1})
    plan = plan_promotion(inventory, 2 * GIB, num_trials=2, prices=prices)
    assert (plan.accelerator_type, plan.usd_per_device_hour) == ("A100-40G", 3.0)
    assert "3.000/GPU-h on-demand" in format_plan(plan, inventory)
