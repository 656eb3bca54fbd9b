"""SparseGPT (Frantar & Alistarh, 2023): pruning with second-order (OBS) error compensation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from lmmc.errors import LmmcError
from lmmc.pipeline import register
from lmmc.sparsity import NM, LocalPruneConfig, LocalPruner, one_cpu_thread


@dataclass
class Hessian:
    """Σ xxᵀ over the calibration tokens one linear saw, and how many tokens that was."""

    xtx: torch.Tensor
    tokens: int = 0


def inverse_hessian_factor(xtx: torch.Tensor, tokens: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of H⁻¹ for H = 2XXᵀ/n + λI, λ = damp · mean(diag H), and which input
    features never fired (diag H = 0).

    Computed in float64, our choice: the factor of an inverse loses precision quickly in float32 on
    ill-conditioned Hessians, and these matrices (d_in ≤ a few thousand) are cheap on any device."""
    h = 2.0 * xtx.double() / max(tokens, 1)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # a silent input carries no information; its weights are zeroed by the caller
    h.diagonal().add_(damp * h.diagonal().mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        fix = "raise 'damp' (at most 10) or give" if damp < 10 else "give"
        raise LmmcError(f"the calibration Hessian is not positive definite even after damping {damp}; "
                        f"{fix} more calibration samples")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True), dead


def sparsegpt_prune_(weight: torch.Tensor, xtx: torch.Tensor, tokens: int, sparsity: float,
                     nm: NM | None = None, blocksize: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Prune `weight` [out, in] in place with SparseGPT and return its keep-mask.

    Columns are swept in blocks; a pruned weight's error (w − 0)/U_jj is spread over the weights to its
    right in the same row along U's row j, and each block's errors are carried to the later blocks in
    one matrix product. Unstructured: each block prunes the lowest w²/U_jj² of the whole block, sized so
    the matrix ends with exactly round(sparsity · numel) zeros. N:M: the lowest N of every M columns,
    chosen when the sweep reaches the group, so the choice sees the corrections already made."""
    u, dead = inverse_hessian_factor(xtx, tokens, damp)
    u = u.to(device=weight.device, dtype=torch.float32)
    # Kept transposed, [in, out]: the sweep walks input columns, which become contiguous rows here,
    # and each step is one rank-1 update (addr_) instead of a strided column update.
    wt = weight.detach().float().t().contiguous()
    wt[dead.to(weight.device)] = 0
    cols, rows = wt.shape
    pruned = torch.zeros_like(wt, dtype=torch.bool)
    zeros_so_far = 0
    with one_cpu_thread():
        for c0 in range(0, cols, blocksize):
            c1 = min(c0 + blocksize, cols)
            block, ub = wt[c0:c1].clone(), u[c0:c1, c0:c1]
            diag = ub.diagonal()
            cut = torch.zeros_like(block, dtype=torch.bool)
            errors = torch.zeros_like(block)
            if nm is None:
                k = round(sparsity * rows * c1) - zeros_so_far
                if k > 0:
                    salience = (block.pow(2) / diag.pow(2).unsqueeze(1)).flatten()
                    cut.view(-1)[torch.topk(salience, k, largest=False).indices] = True
                zeros_so_far += max(k, 0)
            for j in range(c1 - c0):
                if nm is not None and j % nm.m == 0:
                    group = block[j:j + nm.m].pow(2) / diag[j:j + nm.m].pow(2).unsqueeze(1)
                    cut[j:j + nm.m].scatter_(0, torch.topk(group, nm.n, dim=0, largest=False).indices, True)
                err = block[j].masked_fill(~cut[j], 0.0) / diag[j]
                block[j:].addr_(ub[j, j:], err, alpha=-1.0)
                errors[j] = err
            wt[c0:c1] = block.masked_fill(cut, 0.0)  # exact zeros, not w − (w/d)·d rounding residue
            pruned[c0:c1] = cut
            wt[c1:].addmm_(u[c0:c1, c1:].t(), errors, alpha=-1.0)
    weight.copy_(wt.t().to(weight.dtype))
    return ~pruned.t()


class SparseGPTConfig(LocalPruneConfig):
    blocksize: int = Field(128, gt=0, description="columns swept per block before the error is carried on")
    damp: float = Field(0.01, gt=0, le=10, description="λ added to diag H, as a fraction of mean(diag H)")

    @model_validator(mode="after")
    def _blocks_hold_whole_groups(self) -> "SparseGPTConfig":
        if self.nm and self.blocksize % self.nm.m:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M = {self.nm.m} so no N:M "
                             f"group straddles two blocks; use e.g. {self.nm.m * max(1, self.blocksize // self.nm.m)}")
        return self


@register
class SparseGPTPass(LocalPruner):
    """SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774): pruning with OBS error compensation.

    H = 2XXᵀ/n + λI from each linear's calibration inputs; masks by w²/[H⁻¹]_jj² in column blocks;
    the surviving weights absorb the error (OBS). Block-sequential; per-matrix targets from an
    allocation pass when one ran.

    Recipe: ``- sparsegpt: {sparsity: 0.5}`` or ``- sparsegpt: {nm: "2:4", blocksize: 128, damp: 0.01}``."""

    name = "sparsegpt"
    Config = SparseGPTConfig

    def new_stats(self, linear: nn.Linear) -> Hessian:
        d = linear.in_features
        return Hessian(torch.zeros(d, d, device=linear.weight.device))

    def accumulate(self, stats: Hessian, rows: torch.Tensor) -> None:
        stats.xtx.addmm_(rows.T, rows)
        stats.tokens += rows.shape[0]

    def prune_(self, weight: torch.Tensor, stats: Any, target: float, spread: bool) -> torch.Tensor:
        # The block-wise selection already hits round(target · numel) zeros, so `spread` changes nothing.
        cfg = self.config
        return sparsegpt_prune_(weight, stats.xtx, stats.tokens, target, cfg.nm, cfg.blocksize, cfg.damp)
