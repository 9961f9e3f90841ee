"""Checkpoints describe themselves: round trip, the model rebuilt from the checkpoint alone (its grammar too), a
missing field named, interrupted writes skipped."""

from __future__ import annotations

import json

import pytest
import torch

from protopo_ray.config import Config, Objective
from protopo_ray.data.graphs import EDGE_FEATURES, NODE_FEATURES
from protopo_ray.model.grammar import build_grammar
from protopo_ray.model.segments import DEFAULT_STATS, SegmentStats
from protopo_ray.training.checkpoint import (
    BestTracker,
    CheckpointError,
    ModelInputs,
    load_checkpoint,
    load_latest_valid,
    read_meta,
)

TINY = {"model.gc_size": 4, "model.lstm_size": 4, "model.aa_embed_dim": 4}


def tiny_config(**overrides) -> Config:
    return Config().replace({**TINY, **overrides})


def test_round_trip_keeps_schedule_start_best_config_and_inputs(tmp_path, write_checkpoint):
    config = tiny_config()
    write_checkpoint(tmp_path / "c", config, epoch=5, metrics={"val_loss": 0.7}, best_value=0.5,
                     schedule_start_epoch=3, graph_k=12, graph_sources={"sequence": 40})
    checkpoint = load_checkpoint(tmp_path / "c")
    assert (checkpoint.epoch, checkpoint.meta.schedule_start_epoch, checkpoint.meta.best_value) == (5, 3, 0.5)
    assert checkpoint.config == config and checkpoint.meta.grammar == DEFAULT_STATS
    assert checkpoint.meta.inputs == ModelInputs(graph_k=12, graph_sources={"sequence": 40},
                                                 node_features=NODE_FEATURES, edge_features=EDGE_FEATURES)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())  # readable without torch
    assert meta["best_value"] == 0.5 and meta["epoch"] == 5 and meta["inputs"]["graph_k"] == 12
    model = checkpoint.model()
    assert not model.training and model.cfg == config.model
    assert torch.equal(next(iter(model.state_dict().values())), next(iter(checkpoint.state.model.values())))


def test_the_model_is_rebuilt_with_the_grammar_the_checkpoint_recorded(tmp_path, write_checkpoint):
    # A CRF's transition scores exist per grammar edge: a model trained with another grammar than today's default
    # (longer helices here) only loads when it is rebuilt with its own.
    lengths = {**DEFAULT_STATS.lengths, ("alpha", "M"): (8, 40)}
    other = SegmentStats(lengths=lengths, contexts=DEFAULT_STATS.contexts, flanks=DEFAULT_STATS.flanks,
                         flank_ends=DEFAULT_STATS.flank_ends)
    write_checkpoint(tmp_path / "c", tiny_config(**{"model.decoder": "crf"}), grammar=other)
    model = load_checkpoint(tmp_path / "c").model()
    assert model.grammar.num_states == build_grammar(other).num_states != build_grammar(DEFAULT_STATS).num_states
    assert model.grammar.accepts("O" * 5 + "M" * 38 + "I" * 5)  # a 38-residue helix: only the recorded grammar


def test_decoding_can_be_overridden_but_not_the_shape(tmp_path, write_checkpoint):
    write_checkpoint(tmp_path / "c", tiny_config())
    model = load_checkpoint(tmp_path / "c").model(overrides={"model.decoder": "viterbi", "model.entry_penalty": 4.0})
    assert model.cfg.decoder == "viterbi" and model.crf is not None


def test_a_missing_field_is_named_and_an_older_format_says_so(tmp_path, write_checkpoint):
    write_checkpoint(tmp_path / "c", tiny_config())
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    del meta["inputs"]
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"no 'inputs'.*format 2"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "meta.json").write_text(json.dumps({"epoch": 2, "metrics": {}}))  # what format 1 wrote
    with pytest.raises(CheckpointError, match=r"'config', 'inputs', 'grammar' \(format 1, written by an older"):
        read_meta(tmp_path / "c")


def test_inputs_built_with_other_features_refuse_to_build_here():
    inputs = ModelInputs(graph_k=16, graph_sources={}, node_features=("rel_position",), edge_features=EDGE_FEATURES)
    with pytest.raises(CheckpointError, match="node features"):
        inputs.check_builds_here("ckpt")


def test_interrupted_write_is_skipped_for_the_previous_checkpoint(tmp_path, write_checkpoint):
    write_checkpoint(tmp_path / "e1", tiny_config(), epoch=1)
    write_checkpoint(tmp_path / "e2", tiny_config(), epoch=2)
    (tmp_path / "e2" / "meta.json").unlink()  # the write never finished
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "e2")
    found = load_latest_valid([tmp_path / "e1", tmp_path / "e2"])
    assert found.path.name == "e1" and found.epoch == 1


def test_best_tracker_continues_from_a_resumed_best():
    tracker = BestTracker(Objective("val_loss", "min"), best=0.4)
    assert not tracker.update({"val_loss": 0.9})  # worse than before the restart: best/ stays
    assert not tracker.update({"val_loss": float("nan")})
    assert tracker.update({"val_loss": 0.3}) and tracker.best == 0.3
