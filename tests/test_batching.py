"""Length-bucketed batch plans: coverage, padding, budgets, and the per-rank split."""

from __future__ import annotations

import numpy as np

from protopo_ray.batching import eval_batches, padding_efficiency, plan_batches, shard_batches


def lengths(n=500, seed=0):
    return np.random.default_rng(seed).lognormal(np.log(400), 0.7, n).astype(int).clip(50, 5000)


def test_every_protein_once_per_epoch_and_new_order_each_epoch():
    lens = lengths()
    first = plan_batches(lens, 32, seed=1, epoch=0)
    second = plan_batches(lens, 32, seed=1, epoch=1)
    assert sorted(np.concatenate(first).tolist()) == list(range(len(lens)))
    assert [b.tolist() for b in first] != [b.tolist() for b in second]
    assert [b.tolist() for b in first] == [b.tolist() for b in plan_batches(lens, 32, seed=1, epoch=0)]
    assert all(len(b) <= 32 for b in first)


def test_bucketing_beats_random_batches():
    lens = lengths()
    bucketed = padding_efficiency(lens, plan_batches(lens, 32, bucket_batches=16))
    random = padding_efficiency(lens, plan_batches(lens, 32, bucket_batches=1))
    assert bucketed > 0.8 and random < 0.35  # log-normal lengths: random batches are mostly padding


def test_padding_efficiency_by_hand():
    lens = np.array([10, 20, 30, 40])
    assert padding_efficiency(lens, [np.array([0, 1]), np.array([2, 3])]) == (10 + 20 + 30 + 40) / (2 * 20 + 2 * 40)


def test_residue_budget_counts_padded_positions():
    lens = np.array([100, 100, 100, 400, 50])
    batches = eval_batches(lens, batch_size=8, max_residues=300)
    for batch in batches:
        assert len(batch) == 1 or len(batch) * lens[batch].max() <= 300
    assert sorted(np.concatenate(batches).tolist()) == [0, 1, 2, 3, 4]
    assert [4, 0, 1] == eval_batches(lens, 8, 300)[0].tolist()  # 3 x 100 = 300 fits; a fourth would not
    assert any(b.tolist() == [3] for b in batches)  # longer than the budget: a batch of its own


def test_weights_resample_rare_types():
    weights = np.array([10.0] + [1.0] * 99)
    drawn = np.concatenate(plan_batches(np.full(100, 50), 10, weights=weights, seed=0))
    assert len(drawn) == 100 and (drawn == 0).sum() > 3


def test_shards_are_disjoint_and_equal_sized():
    plan = plan_batches(lengths(101), 8, seed=3)
    ranks = [shard_batches(plan, r, 3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    seen = [set(np.concatenate(r).tolist()) for r in ranks]
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert shard_batches(plan, 0, 1) is plan
