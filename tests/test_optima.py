"""OPTIMA's bandit: it favours the module with the higher reward, follows drifting rewards through its
sliding window, resumes exactly from its saved state; and the two ablation schedules."""

from __future__ import annotations

import json
import random

import pytest

from lmmc.optima import AllModules, RoundRobin, SlidingWindowThompson, make_schedule


def play(bandit: SlidingWindowThompson, mean_of, steps: int, noise: float = 0.05, seed: int = 1) -> list[int]:
    """Run the bandit against Gaussian rewards whose mean per arm may depend on the step."""
    env = random.Random(seed)
    picks = []
    for t in range(steps):
        arm, = bandit.pick()
        bandit.update(arm, env.gauss(mean_of(t, arm), noise))
        picks.append(arm)
    return picks


def test_constantly_better_arm_is_picked_most():
    bandit = SlidingWindowThompson(3, window=30, seed=0)
    picks = play(bandit, lambda t, arm: 0.3 if arm == 1 else 0.1, 300)
    counts = [picks.count(a) for a in range(3)]
    assert counts[1] == max(counts)
    assert counts[1] > 0.7 * len(picks)
    # Every arm was tried at least once (the opening round), so none was ruled out unseen.
    assert min(counts) >= 1


def test_sliding_window_follows_a_drift():
    # Arm 0 pays more for the first 300 steps, arm 1 afterwards.
    bandit = SlidingWindowThompson(2, window=40, seed=0)
    picks = play(bandit, lambda t, arm: (0.3 if arm == 0 else 0.1) if t < 300 else (0.1 if arm == 0 else 0.3), 600)
    before, after = picks[200:300], picks[450:600]
    assert before.count(0) > 0.7 * len(before)
    assert after.count(1) > 0.7 * len(after)


def test_without_a_window_the_bandit_lags_behind_the_drift():
    """The same drift with a window long enough to remember everything: the stale history keeps the
    old favourite ahead for longer, which is why the window is there."""
    drift = lambda t, arm: (0.3 if arm == 0 else 0.1) if t < 300 else (0.1 if arm == 0 else 0.3)  # noqa: E731
    short = play(SlidingWindowThompson(2, window=40, seed=0), drift, 400)
    long = play(SlidingWindowThompson(2, window=400, seed=0), drift, 400)
    assert short[300:400].count(1) > long[300:400].count(1)


def test_state_round_trips_through_json_and_continues_identically():
    a = SlidingWindowThompson(3, window=20, seed=5)
    play(a, lambda t, arm: 0.1 * arm, 37)
    b = SlidingWindowThompson(3, window=20, seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert play(a, lambda t, arm: 0.1 * arm, 50, seed=7) == play(b, lambda t, arm: 0.1 * arm, 50, seed=7)


def test_posterior_shrinks_towards_the_window_mean_with_the_prior_weight():
    bandit = SlidingWindowThompson(2, window=10, prior_weight=2.0, seed=0)
    for arm, r in [(0, 1.0), (1, 0.0), (0, 1.0), (0, 1.0)]:
        bandit.update(arm, r)
    (m0, v0), (m1, v1) = bandit.posterior()
    mu = 0.75  # mean of every reward in the window
    var = sum((r - mu) ** 2 for r in (1.0, 0.0, 1.0, 1.0)) / 4
    assert m0 == pytest.approx((2.0 * mu + 3.0) / 5.0)
    assert m1 == pytest.approx((2.0 * mu + 0.0) / 3.0)
    assert v0 == pytest.approx(var / 5.0) and v1 == pytest.approx(var / 3.0)


def test_ablation_schedules():
    rr = RoundRobin(3)
    seen = []
    for _ in range(7):
        seen += rr.pick()
        rr.update(seen[-1], 0.0)
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    assert AllModules(4).pick() == [0, 1, 2, 3]
    assert isinstance(make_schedule("optima", 2, 10, 1.0, 0), SlidingWindowThompson)


def test_window_must_hold_every_arm():
    with pytest.raises(ValueError, match="window"):
        SlidingWindowThompson(5, window=3)
