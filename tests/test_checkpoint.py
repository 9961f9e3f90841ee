"""Checkpoints as TrainState: round trip, the one model loader, old-format checkpoints, interrupted writes."""

from __future__ import annotations

import json

import pytest
import torch

from protopo_ray.config import Config
from protopo_ray.model.network import TopologyModel
from protopo_ray.training.checkpoint import (
    BestTracker,
    CheckpointError,
    TrainState,
    load_checkpoint,
    load_latest_valid,
    load_model,
    rng_state,
    save_checkpoint,
)


def tiny_state(epoch: int, best: float | None = 0.5) -> TrainState:
    config = Config().replace({"model.gc_size": 4, "model.lstm_size": 4, "model.aa_embed_dim": 4})
    model = TopologyModel(config.model)
    return TrainState(model=model.state_dict(), optimizer=None, epoch=epoch, config=config.to_dict(),
                      metrics={"val_loss": 0.7}, schedule_start_epoch=3, best_value=best, rng=rng_state())


def test_round_trip_keeps_schedule_start_and_best(tmp_path):
    save_checkpoint(tmp_path / "c", tiny_state(5))
    state = load_checkpoint(tmp_path / "c")
    assert (state.epoch, state.schedule_start_epoch, state.best_value) == (5, 3, 0.5)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["best_value"] == 0.5 and meta["epoch"] == 5
    model, config, _ = load_model(tmp_path / "c")
    assert not model.training and config.model.gc_size == 4
    assert torch.equal(next(iter(model.state_dict().values())), next(iter(state.model.values())))


def test_checkpoints_from_before_train_state_still_load(tmp_path):
    old = tiny_state(2)
    raw = {"model": old.model, "optimizer": None, "scheduler": {"last_epoch": 20}, "epoch": 2, "rng": old.rng,
           "config": old.config, "metrics": {}}
    (tmp_path / "old").mkdir()
    torch.save(raw, tmp_path / "old" / "state.pt")
    (tmp_path / "old" / "meta.json").write_text(json.dumps({"epoch": 2, "metrics": {}}))
    state = load_checkpoint(tmp_path / "old")
    assert (state.epoch, state.schedule_start_epoch, state.best_value) == (2, 0, None)


def test_interrupted_write_is_skipped_for_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "e1", tiny_state(1))
    save_checkpoint(tmp_path / "e2", tiny_state(2))
    (tmp_path / "e2" / "meta.json").unlink()  # the write never finished
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "e2")
    found, state = load_latest_valid([tmp_path / "e1", tmp_path / "e2"])
    assert found.name == "e1" and state.epoch == 1


def test_best_tracker_continues_from_a_resumed_best():
    tracker = BestTracker("val_loss", "min", best=0.4)
    assert not tracker.update({"val_loss": 0.9})  # worse than before the restart: best/ stays
    assert not tracker.update({"val_loss": float("nan")})
    assert tracker.update({"val_loss": 0.3}) and tracker.best == 0.3
