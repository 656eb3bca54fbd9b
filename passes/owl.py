"""OWL (Yin et al., ICML 2024): outlier-weighted layerwise sparsity, fewer zeros where outliers are."""

from __future__ import annotations

import torch
from pydantic import Field

from lmmc.adapters import PrunableLinear, block_linears
from lmmc.allocation import Allocation, AllocationConfig, AllocationPass, group_name, whole_counts
from lmmc.artifact import Artifact
from lmmc.blockwise import input_square_sums, visit_blocks
from lmmc.errors import LmmcError
from lmmc.pipeline import register


def input_sq_norms(art: Artifact) -> dict[str, torch.Tensor]:
    """Σx² per input feature of every prunable linear over the calibration tokens, through the dense
    model (OWL measures outliers before anything is pruned)."""
    out: dict[str, torch.Tensor] = {}
    model = art.student.to(art.device)
    stream = visit_blocks(model, art.adapter, lambda t: art.calib.calib_batches(t.modality), art.device)
    for tower, i, block, inputs, batches in stream:
        mods = {role: lin for role, (_, lin) in block_linears(block, tower).items()}
        for role, total in input_square_sums(block, mods, inputs, batches).items():
            out[f"{tower.name}.{i}.{role}"] = total  # the name group_name gives at "layer" granularity
    return out


def outlier_ratios(groups: dict[str, list[PrunableLinear]], sq_norms: dict[str, torch.Tensor],
                   threshold: float) -> tuple[dict[str, float], dict[str, float]]:
    """Per group and per matrix: the fraction of Wanda scores |W_ij|·‖X_j‖ above `threshold` times the
    mean score of the group (OWL's layer outlier distribution, with the mean over the whole group)."""
    def scores(pl: PrunableLinear) -> torch.Tensor:
        w = pl.module.weight.detach().float()
        return w.abs() * sq_norms[group_name(pl, "layer")].to(w.device).sqrt().unsqueeze(0)

    per_group, per_matrix = {}, {}
    for g, members in groups.items():
        total = sum(float(scores(pl).sum()) for pl in members)
        size = sum(pl.module.weight.numel() for pl in members)
        cut = threshold * total / size
        outliers = 0
        for pl in members:
            n = int((scores(pl) > cut).sum())
            per_matrix[pl.param] = n / pl.module.weight.numel()
            outliers += n
        per_group[g] = outliers / size
    return per_group, per_matrix


def owl_ratios(outliers: dict[str, float], sizes: dict[str, int], sparsity: float, lam: float) -> dict[str, float]:
    """OWL's rule: outlier ratios min-max scaled to [0, 2λ] become keep ratios, shifted so the kept
    weights meet the global budget. The shift is size-weighted (ours; OWL's groups are equal-sized
    transformer layers, where it is the plain mean), so groups of different sizes still meet it."""
    lo, hi = min(outliers.values()), max(outliers.values())
    if hi - lo <= 0:
        return {g: sparsity for g in outliers}
    scaled = {g: (d - lo) / (hi - lo) * 2 * lam for g, d in outliers.items()}
    mean = sum(scaled[g] * sizes[g] for g in scaled) / sum(sizes.values())
    ratios = {g: 1.0 - (scaled[g] - mean + 1.0 - sparsity) for g in scaled}
    low, high = min(ratios.values()), max(ratios.values())
    if low < 0.0 or high >= 1.0:
        # a group's sparsity moves from the target by lam times its spread: the largest lam that fits
        spread = {g: (scaled[g] - mean) / lam for g in scaled}
        bound = min([sparsity / c for c in spread.values() if c > 0] +
                    [(1.0 - sparsity) / -c for c in spread.values() if c < 0])
        raise LmmcError(f"OWL's sparsities span [{low:.3f}, {high:.3f}] at sparsity {sparsity} with lam {lam}, "
                        f"outside [0, 1); give a lam below {bound:.4f}, which keeps them inside here, or move "
                        f"the target away from 0 and 1")
    return ratios


def whole_weights(ratios: dict[str, float], sizes: dict[str, int], sparsity: float) -> dict[str, float]:
    """Each group's sparsity as a whole number of its weights, together exactly round(sparsity · ΣN): each
    group rounding its own count missed the global budget by up to half a weight per group."""
    zeros = whole_counts([ratios[g] * sizes[g] for g in ratios], round(sparsity * sum(sizes.values())))
    return {g: z / sizes[g] for g, z in zip(ratios, zeros)}


class OwlConfig(AllocationConfig):
    threshold: float = Field(5.0, gt=0.0, description="M: a weight is an outlier when its Wanda score exceeds "
                             "M times the mean score of its group")
    lam: float = Field(0.08, gt=0.0, lt=0.5, description="λ: the group sparsities span 2λ around the target")


@register
class OwlPass(AllocationPass):
    """OWL allocation (Yin et al., ICML 2024, arXiv:2310.05175): more activation outliers, fewer zeros.

    The outlier ratio D_g of every group (share of Wanda scores above M × the group mean, on the dense
    model) sets its sparsity: D min-max scaled to [0, 2λ] is added to the keep ratio, shifted so the
    global budget holds. Follow with a local pruner.

    Recipe::

        passes:
          - owl: {sparsity: 0.6, threshold: 5, lam: 0.08, granularity: block}
          - wanda: {}
    """

    name = "owl"
    Config = OwlConfig
    needs = frozenset({"student", "calib"})

    def allocate(self, art: Artifact, groups: dict[str, list[PrunableLinear]]) -> Allocation:
        cfg = self.config
        if art.calib is None:
            raise LmmcError("the owl pass needs calibration data; give --calib or 'calibration.path'")
        per_group, per_matrix = outlier_ratios(groups, input_sq_norms(art), cfg.threshold)
        sizes = {g: sum(pl.module.weight.numel() for pl in members) for g, members in groups.items()}
        ratios = whole_weights(owl_ratios(per_group, sizes, cfg.sparsity, cfg.lam), sizes, cfg.sparsity)
        return Allocation(ratios, per_group, per_matrix, {"threshold": cfg.threshold, "lam": cfg.lam})
