"""Prices of nodes: node types first, then market rates per GPU, then CPUs; spot read off the node configs."""

from __future__ import annotations

import pytest

from protopo_ray.search.inventory import GIB, node_from_resources
from protopo_ray.search.prices import PriceConfig, is_spot, market_of


def gpu_node(accelerator: str, gpus: int = 1, node_type: str = "", spot: bool = False):
    return node_from_resources("n", {"CPU": 8, "GPU": gpus, f"accelerator_type:{accelerator}": 1, "memory": GIB},
                               node_type, spot)


def test_node_price_prefers_node_type_then_market_rate_then_cpus():
    prices = PriceConfig(node_types={"big": 30.0}, gpu_hour={"A10G": 1.0}, spot_gpu_hour={"A10G": 0.4}, cpu_hour=0.05)
    assert prices.node_price(gpu_node("A10G", gpus=8, node_type="big")) == 30.0
    assert prices.node_price(gpu_node("A10G", gpus=2)) == 2.0
    assert prices.node_price(gpu_node("A10G", gpus=2, spot=True)) == 0.8
    assert prices.node_price(node_from_resources("c", {"CPU": 4})) == pytest.approx(0.2)
    assert prices.node_price(gpu_node("B999")) is None  # no price known for the type
    assert prices.node_price(node_from_resources("head", {"CPU": 0, "driver": 8})) is None


def test_defaults_price_the_cluster_yamls_gpu_types_on_both_markets():
    for accelerator in ("A10G", "L4", "A100", "A100-80G"):
        on_demand = PriceConfig().gpu_hour_price(accelerator, spot=False)
        assert 0 < PriceConfig().gpu_hour_price(accelerator, spot=True) < on_demand


def test_pool_price_is_the_dearest_node_per_device():
    pool = [gpu_node("A10G", spot=True), gpu_node("A10G")]
    assert PriceConfig().device_hour_price(pool, "gpu") == PriceConfig().gpu_hour_price("A10G", spot=False)
    assert market_of(pool) == "mixed" and market_of(pool[:1]) == "spot"


def test_spot_read_from_aws_and_gcp_node_configs():
    assert is_spot({"InstanceMarketOptions": {"MarketType": "spot"}})
    assert is_spot({"scheduling": {"provisioningModel": "SPOT"}}) and is_spot({"scheduling": {"preemptible": True}})
    assert not is_spot({"InstanceType": "p4d.24xlarge"}) and not is_spot({"scheduling": {"onHostMaintenance": "TERMINATE"}})


@pytest.mark.parametrize("values, message", [
    ({"gpu_hour": {"A10G": -1}}, "gpu_hour.A10G must be a price"),
    ({"cpu_hour": "cheap"}, "cpu_hour must be a price"),
    ({"gpu_hours": {}}, "unknown key(s) ['gpu_hours']"),
    ({"node_types": 3.0}, "node_types must be a table"),
])
def test_bad_price_tables_say_what_is_wrong(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PriceConfig.from_dict(values)
