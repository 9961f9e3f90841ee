"""Prices of nodes and what a finished stage cost and saved (hand-computed values)."""

from __future__ import annotations

import math

import pytest

from protopo_ray.search.cost import PriceConfig, is_spot, market_of, stage_cost, trial_cost
from protopo_ray.search.inventory import GIB, node_from_resources


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


STAGE = {"kind": "search", "max_epochs": 9, "plan": {"usd_per_device_hour": 2.0}, "trials": [
    {"status": "completed", "epochs": 9, "accelerator_hours": 0.9},
    {"status": "stopped", "epochs": 3, "accelerator_hours": 0.6},  # 0.2 h per epoch, 6 epochs not run
    {"status": "stopped", "epochs": 1, "accelerator_hours": 0.1},  # 0.1 h per epoch, 8 not run
    {"status": "error", "epochs": 1, "accelerator_hours": 0.1},    # an error saves nothing
]}


def test_saving_is_epochs_not_run_times_the_trials_own_cost_per_epoch():
    stopped = trial_cost(STAGE["trials"][1], STAGE)
    assert (stopped.accelerator_hours, stopped.usd) == (0.6, 1.2)
    assert stopped.saved_accelerator_hours == pytest.approx(1.2) and stopped.saved_usd == pytest.approx(2.4)
    total = stage_cost(STAGE)
    assert total.accelerator_hours == pytest.approx(1.7) and total.usd == pytest.approx(3.4)
    assert total.saved_accelerator_hours == pytest.approx(2.0) and total.saved_usd == pytest.approx(4.0)


def test_unknown_price_gives_hours_but_no_dollars():
    cost = stage_cost({**STAGE, "plan": {}})
    assert cost.accelerator_hours == pytest.approx(1.7) and math.isnan(cost.usd) and math.isnan(cost.saved_usd)
    # A promotion continues trials to a budget: nothing is "saved" by stopping.
    assert stage_cost({**STAGE, "kind": "promotion"}).saved_accelerator_hours == 0
