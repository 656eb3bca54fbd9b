"""Masks for local pruning (per-row unstructured and N:M), and the shared base of local pruners."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field, field_serializer, field_validator
from tqdm.auto import tqdm

from lmmc.adapters import PrunableLinear, block_linears, prunable_linears
from lmmc.artifact import Artifact
from lmmc.blockwise import collect_linear_inputs, visit_blocks
from lmmc.errors import LmmcError
from lmmc.pipeline import Pass, PassConfig


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: N zeros in every M consecutive weights along the input dimension."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> "NM":
        try:
            n, m = (int(x) for x in str(text).split(":"))
        except ValueError:
            raise ValueError(f"'{text}' is not N:M (e.g. '2:4')") from None
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask zeroing the floor(sparsity * d_in) lowest scores of every output row."""
    n_zero = int(math.floor(sparsity * score.shape[1] + 1e-9))
    mask = torch.ones_like(score, dtype=torch.bool)
    if n_zero:
        idx = torch.topk(score, n_zero, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(score: torch.Tensor, nm: NM) -> torch.Tensor:
    """Keep-mask with exactly N zeros (the N lowest scores) in every group of M input columns."""
    rows, cols = score.shape
    if cols % nm.m:
        raise ValueError(f"input dimension {cols} is not a multiple of {nm.m}")
    groups = score.reshape(rows, cols // nm.m, nm.m)
    idx = torch.topk(groups, nm.n, dim=2, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, False)
    return mask.reshape(rows, cols)


class LocalPruneConfig(PassConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of each row zeroed (unless an "
                            "allocation pass set per-matrix targets, or nm is given)")
    nm: NM | None = Field(None, description="N:M semi-structured pattern, e.g. '2:4'; overrides sparsity")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity_range(cls, v):
        if isinstance(v, (int, float)) and not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {v}; 0.5 zeroes half the weights")
        return v

    @field_validator("nm", mode="before")
    @classmethod
    def _parse_nm(cls, v):
        return NM.parse(v) if isinstance(v, str) else v

    @field_serializer("nm")
    def _dump_nm(self, v: NM | None) -> str | None:  # "2:4" stays text in recipes and reports
        return str(v) if v else None


class LocalPruner(Pass):
    """Prunes every prunable linear of every tower, one block at a time (block-sequential).

    Subclasses give `score(weight, sq_norms)` (sq_norms: per-input-feature Σx² over calibration
    tokens, or None when `uses_activations` is False), or override `prune_linear`."""

    Config: ClassVar[type[PassConfig]] = LocalPruneConfig
    needs = frozenset({"student", "calib"})
    provides = frozenset({"masks"})
    uses_activations: ClassVar[bool] = True

    def score(self, weight: torch.Tensor, sq_norms: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def make_mask(self, score: torch.Tensor, target: float) -> torch.Tensor:
        cfg = self.config
        return nm_mask(score, cfg.nm) if cfg.nm else row_mask(score, target)

    def run(self, art: Artifact) -> dict[str, Any]:
        cfg = self.config
        model = art.student.to(art.device)
        linears = {p.param: p for p in prunable_linears(model, art.adapter)}
        dense_nm: list[str] = []

        def prune(pl: PrunableLinear, sq_norms: torch.Tensor | None) -> None:
            w = pl.module.weight
            if cfg.nm and w.shape[1] % cfg.nm.m:
                dense_nm.append(pl.param)
                return
            target = art.allocation.get(pl.param, cfg.sparsity)
            with torch.no_grad():
                mask = self.make_mask(self.score(w.detach().float(), sq_norms), target)
                w.mul_(mask.to(w.dtype))
            art.masks[pl.param] = mask.cpu()

        by_block: dict[tuple[str, int], list[PrunableLinear]] = {}
        for pl in linears.values():
            by_block.setdefault((pl.tower, pl.block), []).append(pl)

        bar = tqdm(total=len(by_block), desc=f"{self.name}: pruning blocks", unit="block")
        if not self.uses_activations:
            for group in by_block.values():
                for pl in group:
                    prune(pl, None)
                bar.update()
        else:
            if art.calib is None:
                raise LmmcError(f"pass '{self.name}' needs calibration data; give --calib or 'calibration.path'")
            stream = visit_blocks(model, art.adapter, lambda t: art.calib.calib_batches(t.modality), art.device)
            for tower, i, block, inputs, batches in stream:
                group = by_block[(tower.name, i)]
                roles = {pl.role: pl for pl in group}
                mods = {role: lin for role, (_, lin) in block_linears(block, tower).items() if role in roles}
                sq = {role: torch.zeros(m.in_features, device=art.device) for role, m in mods.items()}

                def accumulate(role: str, rows: torch.Tensor) -> None:
                    sq[role] += rows.pow(2).sum(0)

                collect_linear_inputs(block, mods, inputs, batches, accumulate)
                for role, pl in roles.items():
                    prune(pl, sq[role])
                bar.update()
        bar.close()
        return {**sparsity_summary(model, art.adapter), "dense_nm": dense_nm}


def sparsity_summary(model: torch.nn.Module, adapter) -> dict[str, Any]:
    """Achieved sparsity of the prunable weights: overall, per tower and per matrix."""
    per_layer, per_tower = {}, {}
    zeros_all = total_all = 0
    for pl in prunable_linears(model, adapter):
        w = pl.module.weight
        zeros, total = int((w == 0).sum()), w.numel()
        per_layer[pl.param] = zeros / total
        z, t = per_tower.get(pl.tower, (0, 0))
        per_tower[pl.tower] = (z + zeros, t + total)
        zeros_all += zeros
        total_all += total
    return {
        "sparsity": zeros_all / max(total_all, 1),
        "sparsity_per_tower": {k: z / t for k, (z, t) in per_tower.items()},
        "sparsity_per_layer": per_layer,
    }
