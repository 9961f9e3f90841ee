"""A trial's planned memory from its config and its data's longest protein, by hand."""

from __future__ import annotations

from protopo_ray.config import Config
from protopo_ray.model.footprint import MEASURED_ACTIVATION_SCALE, footprint, peak_padded_positions, trial_footprint


def config(batch: int, budget: int = 0) -> Config:
    return Config().replace({"data.batch_size": batch, "data.max_residues_per_batch": budget})


def test_peak_batch_is_the_longest_protein_with_its_neighbours_or_the_budget():
    assert peak_padded_positions(config(32), longest=4538) == 32 * 4538  # bucketing pads the batch to the longest
    assert peak_padded_positions(config(32, budget=65536), longest=4538) == 65536
    assert peak_padded_positions(config(32, budget=1000), longest=4538) == 4538  # one protein alone, over budget
    assert peak_padded_positions(config(8, budget=10**6), longest=100) == 800  # budget not reached
    assert peak_padded_positions(config(32), longest=500, world_size=4) == 8 * 500  # each rank: 1/4 of the batch


def test_total_is_weights_adamw_and_the_larger_of_activations_and_grads():
    cfg = config(8)
    got = trial_footprint(cfg, longest=300)
    parts = footprint(cfg.model, batch_size=1, max_len=8 * 300)
    expected = parts.weights_bytes + parts.optimizer_bytes + max(MEASURED_ACTIVATION_SCALE * parts.batch_activation_bytes,
                                                                 parts.grads_bytes)
    assert got.total_bytes == int(expected) and got.padded_positions == 2400
    assert trial_footprint(config(64), longest=300).total_bytes > got.total_bytes
