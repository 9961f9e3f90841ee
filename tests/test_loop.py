"""Training-loop core: schedules, loss weights, gradient statistics, and learning on the synthetic set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protopo_ray.config import Config, TrainConfig
from protopo_ray.data import batching, collate, shards
from protopo_ray.model.network import TopologyModel
from protopo_ray.training import loop
from protopo_ray.training.schedule import EpochSchedule


def test_label_weights_and_smoothing_reach_the_loss():
    loss = loop.build_loss(TrainConfig(label_weights={"M": 3.0}, label_smoothing=0.1))
    assert loss.weight.tolist() == [1, 1, 1, 1, 3, 1] and loss.label_smoothing == 0.1
    assert loss.ignore_index == -100


def small_setup(smoke_shards, **train):
    config = Config().replace({"data.path": str(smoke_shards), "model.gc_size": 16, "model.lstm_size": 16,
                               "model.lstm_layers": 1, "data.batch_size": 8, "train.lr": 3e-3,
                               "train.schedule": "constant", **{f"train.{k}": v for k, v in train.items()}})
    table = shards.read_table(smoke_shards, folds=["train"]).sort_by("id")
    torch.manual_seed(0)
    model = TopologyModel(config.model)
    optimizer = loop.build_optimizer(model, config.train)
    scheduler = EpochSchedule(optimizer, config.train)
    return config, table, model, optimizer, scheduler


def test_loss_falls_within_a_few_epochs(smoke_shards):
    config, table, model, optimizer, scheduler = small_setup(smoke_shards)
    losses = []
    for epoch in range(5):
        plan = batching.plan_batches(table.column("length").to_numpy(), 8, epoch=epoch)
        batches = (collate.table_to_batch(table.take(idx)) for idx in plan)
        stats = loop.train_epoch(model, batches, optimizer, scheduler, loop.build_loss(config.train), config.train,
                                 torch.device("cpu"))
        losses.append(stats.loss)
        assert stats.steps == len(plan) and stats.num_proteins == table.num_rows
    assert losses[-1] < 0.8 * losses[0]


def test_gradient_statistics_count_clipped_steps(smoke_shards):
    config, table, model, optimizer, scheduler = small_setup(smoke_shards, clip_grad_norm=1e-3)
    plan = batching.plan_batches(table.column("length").to_numpy(), 8)
    batches = loop.prefetch(lambda idx: collate.table_to_batch(table.take(idx)), plan)
    stats = loop.train_epoch(model, batches, optimizer, scheduler, loop.build_loss(config.train), config.train,
                             torch.device("cpu"))
    assert stats.clipped_steps == stats.steps == len(plan)  # a tiny clip value clips every step
    assert 0 < stats.grad_norm_mean <= stats.grad_norm_max
    assert 0 <= stats.data_wait_share < 1


def test_evaluate_scores_every_protein_once(smoke_shards):
    config, table, model, *_ = small_setup(smoke_shards)
    plan = batching.eval_batches(table.column("length").to_numpy(), 8)
    loss_sum, residues, results = loop.evaluate(model, (collate.table_to_batch(table.take(i)) for i in plan),
                                                torch.device("cpu"))
    assert len(results) == table.num_rows and residues == sum(table.column("length").to_pylist())
    assert loss_sum > 0


def test_prefetch_surfaces_errors():
    def broken(_):
        raise RuntimeError("collate failed")

    with pytest.raises(RuntimeError, match="collate failed"):
        list(loop.prefetch(broken, [[0]]))


def test_crf_loss_falls_and_validation_decodes_with_viterbi(smoke_shards):
    config, table, _, _, _ = small_setup(smoke_shards)
    config = config.replace({"model.decoder": "crf", "model.feature_hydropathy": True, "train.lr": 1e-2})
    # the 8 shortest proteins: the CRF's forward pass is a Python loop over residues, keep the test quick
    table = table.take(np.argsort(table.column("length").to_numpy())[:8])
    torch.manual_seed(0)
    model = TopologyModel(config.model)
    optimizer = loop.build_optimizer(model, config.train)
    scheduler = EpochSchedule(optimizer, config.train)
    losses = []
    for epoch in range(3):
        plan = batching.plan_batches(table.column("length").to_numpy(), 4, epoch=epoch)
        batches = (collate.table_to_batch(table.take(idx)) for idx in plan)
        stats = loop.train_epoch(model, batches, optimizer, scheduler, loop.build_loss(config.train), config.train,
                                 torch.device("cpu"))
        losses.append(stats.loss)
    assert losses[-1] < losses[0]
    plan = batching.eval_batches(table.column("length").to_numpy(), 4)
    loss_sum, residues, results = loop.evaluate(model, (collate.table_to_batch(table.take(i)) for i in plan),
                                                torch.device("cpu"))
    assert len(results) == table.num_rows and residues > 0 and loss_sum > 0
    assert all(r.pred_type != "INVALID" for r in results)  # Viterbi over the grammar never yields an invalid type
