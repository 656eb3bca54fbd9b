"""Uniform allocation: every prunable matrix gets the target sparsity; the baseline to beat."""

from __future__ import annotations

from lmmc.adapters import PrunableLinear
from lmmc.allocation import Allocation, AllocationPass
from lmmc.artifact import Artifact
from lmmc.pipeline import register


@register
class UniformPass(AllocationPass):
    """Uniform allocation: the same sparsity for every group of every tower.

    What Wanda and SparseGPT do on their own, made explicit so it is reported (table and plot) like
    the other allocations.

    Recipe::

        passes:
          - uniform: {sparsity: 0.6}
          - wanda: {}
    """

    name = "uniform"

    def allocate(self, art: Artifact, groups: dict[str, list[PrunableLinear]]) -> Allocation:
        return Allocation({g: self.config.sparsity for g in groups})
