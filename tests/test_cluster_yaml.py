"""The cluster YAMLs are valid for the installed Ray's autoscaler and carry what the planner relies on."""

from __future__ import annotations

import json
import pathlib
import re

import jsonschema
import pytest
import ray
import yaml

from protopo_ray.search.inventory import DRIVER_RESOURCE, GIB, GPU_MEMORY_RESOURCE, inventory_from_cluster_yaml
from protopo_ray.search.plan import plan_promotion, plan_search

REPO = pathlib.Path(__file__).resolve().parents[1]
YAMLS = [REPO / "cluster.yaml", REPO / "cluster-gcp.yaml"]


def load(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_validates_against_ray_autoscaler_schema(path, schema):
    jsonschema.validate(load(path), schema)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_image_is_plain_ray_at_installed_version(path):
    image = load(path)["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-(gpu|cu\d+)", image)
    assert match, f"{path.name}: image {image!r} is not a pinned rayproject/ray GPU tag"
    assert match.group(1) == ray.__version__


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_node_types_declare_what_the_planner_needs(path):
    spec = load(path)
    types = spec["available_node_types"]
    head = types[spec["head_node_type"]]["resources"]
    assert head.get(DRIVER_RESOURCE, 0) > 0 and head.get("CPU") == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 2  # a search pool and a promotion pool
    for name, node_type in gpu_types.items():
        resources = node_type["resources"]
        assert [k for k in resources if k.startswith("accelerator_type:")], f"{name}: no accelerator_type"
        assert resources.get(GPU_MEMORY_RESOURCE, 0) > 0, f"{name}: no {GPU_MEMORY_RESOURCE}"
        assert resources.get("CPU", 0) >= resources["GPU"], f"{name}: fewer CPUs than GPUs"
        assert any("--shm-size" in opt for opt in node_type["docker"]["worker_run_options"])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_scaled_out_inventory_plans_both_stages(path):
    inventory = inventory_from_cluster_yaml(path)
    spec = load(path)
    workers = sum(t.get("max_workers", 0) for n, t in spec["available_node_types"].items()
                  if n != spec["head_node_type"])
    assert len(inventory.nodes) == 1 + workers <= 1 + spec["max_workers"]
    for node in inventory.nodes:
        if node.gpus:
            assert node.accelerator_type and node.gpu_memory_bytes
    search = plan_search(inventory, [int(0.3 * GIB)] * 36, num_trials=36)
    # 4 one-GPU search nodes with 8 vCPUs: 8 trials per GPU, 32 at once (one-worker trials need no driver
    # slot). Searches take the smaller GPU type; the 8-GPU node stays for promotion.
    assert search.accelerator_type in ("A10G", "L4")
    assert (search.trials_per_gpu, search.max_concurrent_trials) == (8, 32)
    promotion = plan_promotion(inventory, 2 * GIB, num_trials=2)
    assert (promotion.accelerator_type, promotion.num_workers, promotion.gpus_per_worker) == ("A100", 4, 1.0)
    # Priced by the default table: the search on the spot pool, the promotion on the on-demand node.
    assert (search.market, promotion.market) == ("spot", "on-demand")
    assert 0 < search.usd_per_device_hour < promotion.usd_per_device_hour
    assert {n.node_type for n in inventory.nodes} == set(spec["available_node_types"])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_head_keeps_dashboard_on_loopback_and_requires_a_token(path):
    spec = load(path)
    head = " ".join(spec["head_start_ray_commands"])
    worker = " ".join(spec["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard cluster.yaml` (SSH forward)
    assert "RAY_AUTH_MODE=token ray start --head" in head and "RAY_AUTH_MODE=token ray start --address" in worker
    assert spec["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
