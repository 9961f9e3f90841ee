"""The halving-rule replays behind the ASHA benchmark rows (pure functions; no Ray)."""

from __future__ import annotations

from protopo_ray.search.halving import rungs as _rungs
from protopo_ray.search.halving import survivors
from tools.bench_search import replay_asha, replay_curves, replay_sha

# Four trials, 9 epochs, lower is better; trial 3 is the best throughout, trial 0 the worst.
CURVES = [[4.0 - 0.1 * e for e in range(9)], [3.0 - 0.1 * e for e in range(9)],
          [2.0 - 0.1 * e for e in range(9)], [1.0 - 0.1 * e for e in range(9)]]


def test_rungs_match_rays_milestones():
    assert _rungs(1, 3, 9) == [1, 3] and _rungs(1, 2, 6) == [1, 2, 4] and _rungs(2, 2, 6) == [2, 4]


def test_async_rule_lets_every_improving_newcomer_through_and_stops_a_worse_one():
    # Best last: each newcomer beats everything recorded before it, so nobody stops (4 x 9 epochs).
    assert replay_asha(CURVES, [0, 1, 2, 3], grace=1, rf=3, max_t=9) == (36, 3)
    # Best first: the first trial always continues (no rivals yet); the rest stop at the first rung.
    assert replay_asha(CURVES, [3, 2, 1, 0], grace=1, rf=3, max_t=9) == (9 + 1 + 1 + 1, 3)


def test_synchronous_halving_keeps_the_best_third_rounded_up_at_each_rung():
    # As SynchronousHalving decides: 4 trials to epoch 1, the best 2 (4 / 3 rounded up) on to epoch 3, the best 1
    # of those to 9: 4 + 2 x 2 + 1 x 6 epochs.
    assert [survivors(n, 3) for n in (1, 2, 3, 4, 12, 36)] == [1, 1, 1, 2, 4, 12]
    assert replay_sha(CURVES, grace=1, rf=3, max_t=9) == (14, 3)


def test_replay_curves_reports_fractions_and_whether_sha_found_the_best():
    out = replay_curves(CURVES, grace=1, rf=3, max_t=9, run_order=[0, 1, 2, 3])
    assert out["sha_epoch_fraction"] == 14 / 36 and out["sha_exact_winner"] and out["sha_gap"] == 0
    assert out["asha_sequential_run_order_fraction"] == 1.0 and out["num_trials"] == 4
