"""Global sparsity allocation: matrix groups, ECoFLaP's keep-budget rule, the allocation pass base."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field

from lmmc.adapters import PrunableLinear, prunable_linears
from lmmc.artifact import Artifact
from lmmc.errors import LmmcError
from lmmc.pipeline import Pass, PassConfig

Granularity = Literal["layer", "block", "tower", "model"]


def group_name(pl: PrunableLinear, granularity: Granularity) -> str:
    """The allocation group of one matrix: itself ("layer"), its transformer block, its tower, or one
    group for the whole model."""
    if granularity == "layer":
        return f"{pl.tower}.{pl.block}.{pl.role}"
    if granularity == "block":
        return f"{pl.tower}.{pl.block}"
    if granularity == "tower":
        return pl.tower
    return "model"


def build_groups(linears: list[PrunableLinear], granularity: Granularity) -> dict[str, list[PrunableLinear]]:
    """Group name -> its matrices, in model order. Every tower's matrices join the same budget."""
    groups: dict[str, list[PrunableLinear]] = {}
    for pl in linears:
        groups.setdefault(group_name(pl, granularity), []).append(pl)
    return groups


def keep_floors(sizes: list[int], sparsity: float, p_max: float) -> list[int]:
    """Each group's minimum kept weights ⌈(1 − p_max)·N_g⌉, after checking that the caps let the
    target be met at all. Cheap, so passes call it before spending time on scores."""
    if not 0.0 <= sparsity < 1.0:
        raise LmmcError(f"target sparsity must be in [0, 1), got {sparsity}")
    if p_max < sparsity:
        raise LmmcError(f"p_max ({p_max}) is below the target sparsity ({sparsity}); no group may exceed "
                        f"p_max, so the target cannot be met. Set p_max above {sparsity} (ECoFLaP uses target + 0.1)")
    if p_max > 1.0:
        raise LmmcError(f"p_max must be at most 1 (a fully pruned group), got {p_max}")
    if not sizes or any(n <= 0 for n in sizes):
        raise LmmcError("allocation needs at least one group, each with a positive number of weights")
    floors = [min(n, math.ceil((1.0 - p_max) * n - 1e-9)) for n in sizes]
    if sum(floors) > round((1.0 - sparsity) * sum(sizes)):
        reachable = 1.0 - sum(floors) / sum(sizes)
        raise LmmcError(f"sparsity {sparsity} cannot be reached with p_max = {p_max}: even with every group "
                        f"at its cap the model is only {reachable:.4%} sparse (each group's kept weights round "
                        f"up). Raise p_max above {sparsity} (e.g. {min(1.0, round(sparsity + 0.1, 6))}) or "
                        f"lower the target")
    return floors


def keep_budget(scores: list[float], sizes: list[int], sparsity: float, p_max: float) -> list[int]:
    """ECoFLaP's allocation: how many weights each group keeps under one global budget.

    K = round((1 − p)·Σ N_g) weights survive in all. Every group first keeps its floor ⌈(1 − p_max)·N_g⌉;
    the remainder R is then handed out in proportion to the group scores, k_g += ⌈S_g/ΣS·R⌉, capped at
    N_g; groups that reach N_g leave ΣS and the rest is handed out again until Σk_g = K.

    Ours where the paper leaves it open: the rounding up of one hand-out may overshoot R by less than one
    weight per group; the overshoot is taken back one weight each from the groups rounded up the most
    (ties: first group first), so every hand-out sums to R exactly. With all scores zero the remainder
    goes in proportion to the room each group has left."""
    keep = keep_floors(sizes, sparsity, p_max)
    if len(scores) != len(sizes) or any(s < 0 or not math.isfinite(s) for s in scores):
        raise LmmcError("allocation needs one finite, non-negative score per group")
    budget = round((1.0 - sparsity) * sum(sizes))
    while (rest := budget - sum(keep)) > 0:
        active = [g for g, n in enumerate(sizes) if keep[g] < n]
        weights = [scores[g] for g in active]
        if sum(weights) <= 0:
            weights = [sizes[g] - keep[g] for g in active]
        total = sum(weights)
        share = [w / total * rest for w in weights]
        give = [min(math.ceil(s - 1e-9), sizes[g] - keep[g]) for s, g in zip(share, active)]
        overshoot = sum(give) - rest
        if overshoot > 0:
            by_rounding = sorted(range(len(active)), key=lambda i: give[i] - share[i], reverse=True)
            for i in by_rounding[:overshoot]:
                give[i] -= 1
        for g, k in zip(active, give):
            keep[g] += k
    return keep


def keep_budget_ratios(scores: dict[str, float], sizes: dict[str, int], sparsity: float,
                       p_max: float) -> dict[str, float]:
    """Group name -> sparsity 1 − k_g/N_g from `keep_budget`."""
    names = list(sizes)
    keep = keep_budget([scores[g] for g in names], [sizes[g] for g in names], sparsity, p_max)
    return {g: 1.0 - k / sizes[g] for g, k in zip(names, keep)}


@dataclass
class Allocation:
    """What an allocation pass decided: a sparsity per group, the scores behind it (None for methods
    without scores) and any method-specific facts for the report."""

    ratios: dict[str, float]
    group_scores: dict[str, float] | None = None
    matrix_scores: dict[str, float] | None = None
    details: dict[str, Any] = field(default_factory=dict)


class AllocationConfig(PassConfig):
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="overall sparsity of all prunable matrices "
                            "of all towers together (one global budget)")
    granularity: Granularity = Field("block", description="what gets one sparsity: 'layer' (each matrix), "
                                     "'block', 'tower' or 'model'")


class AllocationPass(Pass):
    """Base of allocation passes: score the groups, pick a sparsity per group under the global budget,
    and write the per-matrix targets to `art.allocation` for the local pruner that follows.

    Subclasses give `allocate`. The pass's metrics hold the allocation table (per group and per tower,
    with the scores behind it) and name the plot written to the work directory."""

    Config: ClassVar[type[PassConfig]] = AllocationConfig
    needs = frozenset({"student"})
    provides = frozenset({"allocation"})

    def allocate(self, art: Artifact, groups: dict[str, list[PrunableLinear]]) -> Allocation:
        raise NotImplementedError

    def run(self, art: Artifact) -> dict[str, Any]:
        cfg = self.config
        linears = prunable_linears(art.student, art.adapter)
        groups = build_groups(linears, cfg.granularity)
        result = self.allocate(art, groups)
        art.allocation = matrix_targets(groups, result.ratios)
        metrics = {**allocation_table(groups, result, cfg.sparsity), "granularity": cfg.granularity,
                   **result.details, "plot": None}
        # A pruner's zeros stay: a matrix given less sparsity than it already has keeps its own, and the
        # student ends sparser than the budget (wanda 2:4, then ecoflap 0.6: 66 %).
        zeros = {name: float(1.0 - art.masks[name].float().mean()) for name in art.allocation if name in art.masks}
        denser = {name: (art.allocation[name], z) for name, z in zeros.items() if art.allocation[name] < z - 1e-6}
        if denser:
            name, (target, held) = next(iter(denser.items()))
            metrics["warnings"] = [f"{self.name} gives {len(denser)} matrices less sparsity than the zeros an earlier "
                                   f"pruner left in them (e.g. {name}: {target:.3f} against {held:.3f}); they keep "
                                   f"their zeros, so the student ends sparser than the {cfg.sparsity:g} budget. Put "
                                   f"the allocation before the pruner"]
        if art.workdir is not None:
            from lmmc.plots import plot_allocation

            path = art.workdir / "allocation.png"
            plot_allocation(metrics["groups"], cfg.sparsity, path, f"{self.name}: {cfg.granularity} groups")
            metrics["plot"] = path.name
        return metrics


def matrix_targets(groups: dict[str, list[PrunableLinear]], ratios: dict[str, float]) -> dict[str, float]:
    """Matrix name -> its sparsity, so that each group loses exactly round(ratio·N_g) weights in all.

    Each matrix rounds its own count, so a group's ratio applied to every member would miss the group's
    (and the global) budget by up to half a weight per matrix; the remainder goes instead to the members
    whose exact share was rounded down the most (ties: first matrix first)."""
    targets: dict[str, float] = {}
    for g, members in groups.items():
        sizes = [pl.module.weight.numel() for pl in members]
        zeros = whole_counts([ratios[g] * n for n in sizes], round(ratios[g] * sum(sizes)))
        targets.update({pl.param: z / n for pl, z, n in zip(members, zeros, sizes)})
    return targets


def whole_counts(exact: list[float], total: int) -> list[int]:
    """Whole numbers summing to `total`: each exact count rounded down, the rest one each to those rounded
    down the most (ties: first first)."""
    counts = [math.floor(z + 1e-9) for z in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:max(total - sum(counts), 0)]:
        counts[i] += 1
    return counts


def allocation_table(groups: dict[str, list[PrunableLinear]], result: Allocation, target: float) -> dict[str, Any]:
    """The report of one allocation: target, planned overall sparsity, per tower, per group, scores."""
    ratios, group_scores = result.ratios, result.group_scores
    rows, towers = [], {}
    zeros = total = 0.0
    for g, members in groups.items():
        size = sum(pl.module.weight.numel() for pl in members)
        names = sorted({pl.tower for pl in members}, key=[pl.tower for pl in members].index)
        rows.append({"group": g, "tower": "+".join(names), "params": size,
                     "score": None if group_scores is None else group_scores[g], "sparsity": ratios[g]})
        for pl in members:
            n = pl.module.weight.numel()
            z, t = towers.get(pl.tower, (0.0, 0))
            towers[pl.tower] = (z + ratios[g] * n, t + n)
        zeros += ratios[g] * size
        total += size
    return {
        "target": target,
        "planned_sparsity": zeros / total,
        "per_tower": {t: {"params": n, "sparsity": z / n} for t, (z, n) in towers.items()},
        "groups": rows,
        "matrix_scores": result.matrix_scores,
    }
