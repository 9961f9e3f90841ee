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


def test_embedding_inputs_widen_the_model_and_its_footprint(tmp_path):
    from protopo_ray.data.graphs import NODE_FEATURES
    from protopo_ray.model.network import TopologyModel, count_parameters

    cfg = config(8).model
    plain, esm = footprint(cfg, 8, 400), footprint(cfg, 8, 400, embedding_dim=1280)
    # The input projection gains 1280 x gc_size weights; every residue carries 1280 more values (twice: x and the
    # concatenated input).
    assert esm.num_parameters - plain.num_parameters == 1280 * cfg.gc_size
    assert esm.activation_bytes_per_residue > plain.activation_bytes_per_residue + 2 * 1280 * 4
    assert count_parameters(TopologyModel(cfg, embedding_dim=1280)) == esm.num_parameters
    assert TopologyModel(cfg, embedding_dim=16).input_proj.in_features == cfg.aa_embed_dim + len(NODE_FEATURES) + 16
    # The search's planner reads the width off the data's manifest (none there: plans for none).
    base = config(8).replace({"data.path": str(tmp_path / "nothing")})
    assert trial_footprint(base, 400).total_bytes == trial_footprint(base, 400, embedding_dim=0).total_bytes
    assert trial_footprint(base, 400, embedding_dim=1280).total_bytes > trial_footprint(base, 400).total_bytes
