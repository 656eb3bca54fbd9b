"""OPTIMA's module-wise adaptive schedule (Liang et al., NeurIPS 2023): a sliding-window Thompson-sampling
bandit over the student's modules, and the round-robin and every-module schedules it is ablated against.

The paper states the idea (modules are arms, the reward of distilling a module is the decrease of its
distillation loss, a modified Thompson sampling that trusts recent history because contributions drift)
but not the window, prior or posterior. Ours, all exposed as parameters:

- Window: the rewards of the last `window` steps, whichever arm earned them. An arm that has not been
  picked inside the window falls back to the prior, so a neglected arm gets re-tried by itself.
- Posterior of an arm's mean reward: Gaussian, N((w·μ̄ + Σr) / (w + n), σ² / (w + n)), with n the arm's
  rewards in the window, μ̄ and σ² the mean and variance of every reward in the window, w = `prior_weight`
  pseudo-observations. Centring the prior on the window's own mean makes it scale-free: rewards shrink
  by orders of magnitude as the student converges, and no fixed prior survives that.
- Every arm is pulled once before sampling starts, so the first window holds a reward from each.
- The reward (measured by lmmc.distiller): the drop of the *whole* distillation loss (every module's
  terms, the output and contrastive terms) on a fixed set of samples never trained on, from before the
  step to after it, over its value before (or per sample). A module's own loss on the batch it just fitted
  would reward the module easiest to fit, not the one whose step helps the student most.
- Arms: runs of blocks of one tower, or (dual encoders) the same stage of both towers at once.
"""

from __future__ import annotations

import random
import statistics
from collections import deque
from typing import Any, Literal

ScheduleName = Literal["optima", "round_robin", "all"]
ArmSpan = Literal["tower", "towers"]  # an arm's blocks lie in one tower, or the same stage of every tower

# Floors the posterior variance relative to the rewards' scale, so identical rewards do not collapse
# the sampler into a deterministic argmax that can never revisit another arm.
_MIN_REL_VAR = 1e-6


class Schedule:
    """Chooses which modules (arms) are distilled at each step and learns from their rewards."""

    def __init__(self, n_arms: int) -> None:
        if n_arms < 1:
            raise ValueError("a schedule needs at least one arm")
        self.n_arms = n_arms
        self.steps = 0

    def pick(self) -> list[int]:
        """The arms to distil this step."""
        raise NotImplementedError

    def update(self, arm: int, reward: float) -> None:
        """Record the reward of the arm picked this step (ignored by the fixed schedules)."""
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON data, so a checkpoint stores it without pickle."""
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


class AllModules(Schedule):
    """Plain layerwise distillation: every module on every step."""

    def pick(self) -> list[int]:
        return list(range(self.n_arms))


class RoundRobin(Schedule):
    """Modules in turn, one per step: the ablation with the bandit's cost and no adaptivity."""

    def pick(self) -> list[int]:
        return [self.steps % self.n_arms]


class SlidingWindowThompson(Schedule):
    """OPTIMA's modified Thompson sampling over a sliding window of recent rewards (see module docstring)."""

    def __init__(self, n_arms: int, window: int = 50, prior_weight: float = 1.0, seed: int = 0) -> None:
        super().__init__(n_arms)
        if window < n_arms:
            raise ValueError(f"the bandit window ({window}) must hold at least one reward per arm ({n_arms})")
        if prior_weight <= 0:
            raise ValueError("prior_weight must be positive")
        self.window = window
        self.prior_weight = prior_weight
        self.rng = random.Random(seed)
        self.history: deque[tuple[int, float]] = deque(maxlen=window)
        self.seen: set[int] = set()

    def posterior(self) -> list[tuple[float, float]]:
        """(mean, variance) of every arm's mean reward under the window's evidence."""
        rewards = [r for _, r in self.history]
        mu = statistics.fmean(rewards)
        var = statistics.pvariance(rewards, mu) if len(rewards) > 1 else mu * mu
        var = max(var, _MIN_REL_VAR * (mu * mu + 1e-30))
        out = []
        for arm in range(self.n_arms):
            own = [r for a, r in self.history if a == arm]
            weight = self.prior_weight + len(own)
            out.append(((self.prior_weight * mu + sum(own)) / weight, var / weight))
        return out

    def pick(self) -> list[int]:
        unseen = [a for a in range(self.n_arms) if a not in self.seen]
        if unseen:
            return [unseen[0]]
        draws = [self.rng.gauss(mean, var ** 0.5) for mean, var in self.posterior()]
        return [max(range(self.n_arms), key=draws.__getitem__)]

    def update(self, arm: int, reward: float) -> None:
        super().update(arm, reward)
        self.history.append((arm, float(reward)))
        self.seen.add(arm)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = self.rng.getstate()
        return {**super().state_dict(), "history": [list(h) for h in self.history], "seen": sorted(self.seen),
                "rng": [version, list(internal), gauss_next]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = deque(((int(a), float(r)) for a, r in state["history"]), maxlen=self.window)
        self.seen = set(state["seen"])
        version, internal, gauss_next = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss_next))


def make_schedule(name: ScheduleName, n_arms: int, window: int, prior_weight: float, seed: int) -> Schedule:
    if name == "optima":
        return SlidingWindowThompson(n_arms, window, prior_weight, seed)
    if name == "round_robin":
        return RoundRobin(n_arms)
    return AllModules(n_arms)
