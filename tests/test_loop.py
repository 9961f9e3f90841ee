"""Training-loop core: schedules, loss weights, gradient statistics, and learning on the synthetic set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protopo_ray.config import Config, TrainConfig
from protopo_ray.data import batching, collate, shards
from protopo_ray.data.graphs import build_graph
from protopo_ray.data.synthetic import generate_proteins
from protopo_ray.model.network import TopologyModel
from protopo_ray.training import loop, syncs
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


def reference_epoch(model, batches, optimizer, scheduler, loss_fn, cfg, on_step=None) -> dict:
    """The loop as it was before issue 30, step for step: every statistic read back to the host each step."""
    model.train()
    norms, loss_sum, residues_sum, clipped, steps, proteins = [], 0.0, 0, 0, 0, 0
    for batch in batches:
        logits = model(batch)
        loss = model.loss(batch, logits, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        optimizer.step()
        scheduler.step()
        residues = int((batch.y != -100).sum())
        loss_sum += float(loss.detach()) * residues
        norms.append(norm)
        clipped += int(cfg.clip_grad_norm > 0 and norm > cfg.clip_grad_norm)
        residues_sum += residues
        proteins += int(batch.num_graphs)
        steps += 1
    finite = [n for n in norms if np.isfinite(n)]
    return {"loss": loss_sum / max(1, residues_sum), "steps": steps, "num_residues": residues_sum,
            "num_proteins": proteins, "grad_norm_mean": float(np.mean(finite)), "grad_norm_max": float(np.max(finite)),
            "clipped_steps": clipped, "lr": optimizer.param_groups[0]["lr"], "norms": norms}


def epoch_batches(table, epoch: int = 0) -> list:
    plan = batching.plan_batches(table.column("length").to_numpy(), 8, epoch=epoch)
    return [collate.table_to_batch(table.take(idx)) for idx in plan]


@pytest.mark.parametrize("clip", [0.0, "median", 4.0])
def test_device_side_statistics_equal_the_per_step_reads(smoke_shards, clip):
    """Two epochs each way from the same seed: every EpochStats figure and every weight as before issue 30."""
    if clip == "median":  # a clip value that clips about half the steps (from an unclipped reference run)
        config, table, model, optimizer, scheduler = small_setup(smoke_shards, clip_grad_norm=0.0)
        norms = reference_epoch(model, epoch_batches(table), optimizer, scheduler, loop.build_loss(config.train),
                                config.train)["norms"]
        clip = float(np.median(norms))
    config, table, ref_model, ref_opt, ref_sched = small_setup(smoke_shards, clip_grad_norm=clip)
    _, _, model, optimizer, scheduler = small_setup(smoke_shards, clip_grad_norm=clip)
    loss_fn = loop.build_loss(config.train)
    for epoch in range(2):
        batches = epoch_batches(table, epoch)
        ref_sched.start_epoch(epoch, len(batches))
        scheduler.start_epoch(epoch, len(batches))
        torch.manual_seed(epoch)  # the same dropout masks each way
        want = reference_epoch(ref_model, batches, ref_opt, ref_sched, loss_fn, config.train)
        torch.manual_seed(epoch)
        got = loop.train_epoch(model, batches, optimizer, scheduler, loss_fn, config.train, torch.device("cpu"))
        assert got.steps == want["steps"] and got.num_proteins == want["num_proteins"]
        assert got.num_residues == want["num_residues"] and got.clipped_steps == want["clipped_steps"]
        assert got.loss == pytest.approx(want["loss"], rel=1e-12)
        assert got.grad_norm_mean == pytest.approx(want["grad_norm_mean"], rel=1e-12)
        assert got.grad_norm_max == want["grad_norm_max"] and got.lr == want["lr"]
        if clip:
            assert got.clipped_steps == sum(n > clip for n in want["norms"])
    if clip not in (0.0, 4.0):
        assert 0 < got.clipped_steps < got.steps  # the median clip: some steps clipped, some not
    for (name, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_step_totals_skip_nonfinite_norms_like_the_per_step_loop():
    totals = loop.StepTotals(torch.device("cpu"), clip=2.0)
    norms = [1.0, float("inf"), float("nan"), 3.0, 0.5]
    for norm in norms:
        totals.add(torch.tensor(0.5), torch.tensor(10), torch.tensor(norm))
    stats = loop._fill(loop.EpochStats(), totals, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), 0.0)
    assert stats.grad_norm_mean == pytest.approx(1.5) and stats.grad_norm_max == 3.0
    assert stats.clipped_steps == 2  # inf > clip counts, nan does not (as `norm > clip` did)
    assert stats.num_residues == 50 and stats.loss == pytest.approx(0.5)
    none_finite = loop.StepTotals(torch.device("cpu"), clip=0.0)
    none_finite.add(torch.tensor(1.0), torch.tensor(3), torch.tensor(float("nan")))
    stats = loop._fill(loop.EpochStats(), none_finite, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), 0.0)
    assert np.isnan(stats.grad_norm_mean) and np.isnan(stats.grad_norm_max) and stats.clipped_steps == 0


def window_batches(n: int = 24, size: int = 8) -> list:
    """Batches of synthetic proteins with sequence-window graphs (no structure: what the real data runs on)."""
    records = [record for record, _ in generate_proteins(n, seed=1)]
    graphs = [build_graph(record.sequence) for record in records]
    return [collate.records_to_batch(records[i:i + size], graphs[i:i + size]) for i in range(0, n, size)]


@pytest.mark.parametrize(("graphs", "lstm_impl"), [("window", "padded"), ("window", "packed"), ("structure", "padded")])
def test_a_training_step_reads_nothing_back_from_the_device(smoke_shards, monkeypatch, graphs, lstm_impl):
    """0 host syncs per step on sequence-window graphs, either LSTM path (CPU count of the reads that would sync
    on CUDA); the same counter sees the reads of the loop as it was before issue 30, so it is not blind."""
    config, table, model, optimizer, scheduler = small_setup(smoke_shards)
    model.lstm.impl = lstm_impl
    counts = []
    real_step = loop.train_step

    def counted_step(*args, **kwargs):
        with syncs.count_syncs(torch.device("cpu"), syncs.optimizer_steps(optimizer)) as count:
            real_step(*args, **kwargs)
        counts.append(dict(count.by_call))

    monkeypatch.setattr(loop, "train_step", counted_step)
    batches = window_batches() if graphs == "window" else epoch_batches(table)
    assert all((b.window > 0) == (graphs == "window") for b in batches)
    loop.train_epoch(model, batches, optimizer, scheduler, loop.build_loss(config.train), config.train,
                     torch.device("cpu"))
    assert len(counts) == len(batches)
    # structure graphs: GCNConv's own self-loop handling (PyG's gcn_norm) indexes by a mask once per layer
    expected = {} if graphs == "window" else {"bool_index": config.model.gc_layers}
    assert all(c == expected for c in counts), counts
    with syncs.count_syncs(torch.device("cpu"), syncs.optimizer_steps(optimizer)) as before:
        reference_epoch(model, batches[:2], optimizer, scheduler, loop.build_loss(config.train), config.train)
    # per step: float(norm), int(residues), float(loss), the forward pass's int(lengths.max()), and on the
    # packed path the lengths copied to the host (a batch that did not come through loop.to_device)
    packed = {"cpu": 2} if lstm_impl == "packed" else {}
    assert before.by_call == {"__float__": 4, "__int__": 4, **packed, **{k: 2 * v for k, v in expected.items()}}


def test_progress_hook_sees_the_statistics_so_far(smoke_shards):
    config, table, model, optimizer, scheduler = small_setup(smoke_shards)
    seen: list[loop.EpochStats] = []
    batches = epoch_batches(table)
    stats = loop.train_epoch(model, batches, optimizer, scheduler, loop.build_loss(config.train), config.train,
                             torch.device("cpu"), on_progress=seen.append, progress_every=2)
    assert [s.steps for s in seen] == list(range(2, len(batches) + 1, 2))
    assert all(a.num_residues < b.num_residues for a, b in zip(seen, seen[1:]))
    assert seen[0].num_residues == sum(int(b.num_nodes) for b in batches[:2]) and seen[0].loss > 0
    assert stats.steps == len(batches) and stats.num_residues >= seen[-1].num_residues


def test_to_device_takes_lengths_on_the_host_and_leaves_the_batch_alone(smoke_shards):
    _, table, *_ = small_setup(smoke_shards)
    batch = epoch_batches(table)[0]
    moved = loop.to_device(batch, torch.device("cpu"))
    assert moved.max_length == int(batch.lengths.max()) and torch.equal(moved.host_lengths, batch.lengths)
    assert not hasattr(batch, "max_length") and not hasattr(batch, "host_lengths")
