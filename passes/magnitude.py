"""Magnitude pruning: zero the smallest |W| in every output row. The baseline other pruners must beat."""

import torch

from lmmc.pipeline import register
from lmmc.sparsity import LocalPruner


@register
class MagnitudePass(LocalPruner):
    """Score |W_ij|; no calibration data needed.

    Recipe: ``- magnitude: {sparsity: 0.5}`` or ``- magnitude: {nm: "2:4"}``."""

    name = "magnitude"
    needs = frozenset({"student"})
    uses_activations = False

    def score(self, weight: torch.Tensor, sq_norms: torch.Tensor | None) -> torch.Tensor:
        return weight.abs()
