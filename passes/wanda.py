"""Wanda pruning (Sun et al., 2023, arXiv:2306.11695): weights scored by |W| times input activation norm."""

import torch

from lmmc.pipeline import register
from lmmc.sparsity import LocalPruner


@register
class WandaPass(LocalPruner):
    """S_ij = |W_ij| · ‖X_j‖₂ over all calibration tokens; the lowest scores of each output row are
    zeroed (or of each group of M inputs for N:M). No weight update. Block-sequential.

    Recipe: ``- wanda: {sparsity: 0.5}`` or ``- wanda: {nm: "2:4"}``."""

    name = "wanda"

    def score(self, weight: torch.Tensor, sq_norms: torch.Tensor | None) -> torch.Tensor:
        return weight.abs() * sq_norms.sqrt().unsqueeze(0)
