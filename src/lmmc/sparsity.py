"""Masks for local pruning (per-row unstructured and N:M), and the shared base of local pruners."""

from __future__ import annotations

import math
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from pydantic import Field, field_serializer, field_validator
from torch import nn
from tqdm.auto import tqdm

from lmmc.adapters import PrunableLinear, block_linears, block_list, prunable_linears
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
        match = re.fullmatch(r"([0-9]+):([0-9]+)", str(text))  # int() would also take '1_0', '+2' and other digits
        if not match:
            raise ValueError(f"'{text}' is not N:M (e.g. '2:4')")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run the enclosed CPU work on one intra-op thread, for loops of many small tensor ops (SparseGPT's
    column sweep, ECoFLaP's thousands of small forwards): with several threads each op pays a thread
    barrier that costs more than its arithmetic. Measured on the 2-core machine: SparseGPT on a
    1536 x 1536 matrix 1.2 s on one thread against 3.4 s on two; with the cores busy, ECoFLaP's
    scores on MiniLM 52 s against 280 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def fastest_cpu_threads(probe: Callable[[], object], device: torch.device, repeats: int = 3) -> Iterator[int]:
    """Run the enclosed work on one intra-op thread or on torch's current count, whichever ran `probe`
    faster (medians of `repeats` runs in turns, after one of each to warm up); yields the count chosen.
    One thread wins for many small ops and on busy cores, where every op waits at a thread barrier; the
    forwards of a base-size model on a many-core server run several times faster on all of them."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield before
        return
    times: dict[int, list[float]] = {1: [], before: []}
    try:
        for run in range(repeats + 1):
            for threads in times:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                probe()
                if run:
                    times[threads].append(time.perf_counter() - start)
        chosen = min(times, key=lambda n: statistics.median(times[n]))
        torch.set_num_threads(chosen)
        yield chosen
    finally:
        torch.set_num_threads(before)


def row_mask(score: torch.Tensor, sparsity: float, spread: bool = False) -> torch.Tensor:
    """Keep-mask zeroing the floor(sparsity * d_in) lowest scores of every output row.

    With `spread`, the matrix loses round(sparsity * numel) weights in all: the remainder beyond the
    per-row floor goes one each to the rows whose next-lowest score is smallest. A global allocation
    needs this, since per-row flooring alone misses a budget by up to one weight per row (3 % on d_in = 32)."""
    rows, cols = score.shape
    total = round(sparsity * rows * cols) if spread else rows * int(math.floor(sparsity * cols + 1e-9))
    per_row, extra = divmod(total, rows)
    mask = torch.ones_like(score, dtype=torch.bool)
    if per_row == 0 and extra == 0:
        return mask
    order = torch.topk(score, min(per_row + 1, cols), dim=1, largest=False).indices
    if per_row:
        mask.scatter_(1, order[:, :per_row], False)
    if extra:
        next_col = order[:, per_row]
        next_score = score.gather(1, next_col.unsqueeze(1)).squeeze(1)
        chosen = torch.topk(next_score, extra, largest=False).indices
        mask[chosen, next_col[chosen]] = False
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
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0.0 <= v < 1.0:
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

    Per-matrix targets come from `art.allocation` when an allocation pass ran, else from `sparsity`.
    Subclasses give `score(weight, stats)` (stats: per-input-feature Σx² over calibration tokens, or
    None when `uses_activations` is False); a pruner that also updates the surviving weights
    (SparseGPT) overrides `new_stats`, `accumulate` and `prune_` instead."""

    Config: ClassVar[type[PassConfig]] = LocalPruneConfig
    needs = frozenset({"student", "calib"})
    provides = frozenset({"masks"})
    uses_activations: ClassVar[bool] = True

    def check(self, available: set[str]) -> None:
        super().check(available)
        nm = self.config.nm
        if nm and "allocation" in available:
            raise LmmcError(
                f"pass '{self.name}' has nm={nm}, which fixes every matrix at {nm.n}/{nm.m} zeros, so the "
                f"per-matrix sparsities of the allocation pass before it cannot apply; drop the allocation "
                f"pass, or give '{self.name}' no nm and let the allocation set unstructured sparsities"
            )

    def score(self, weight: torch.Tensor, stats: Any) -> torch.Tensor:
        raise NotImplementedError

    def new_stats(self, linear: nn.Linear) -> Any:
        """Empty calibration statistics for one linear: Σx² per input feature."""
        return torch.zeros(linear.in_features, device=linear.weight.device)

    def accumulate(self, stats: Any, rows: torch.Tensor) -> None:
        """Add one batch of input rows [tokens, in_features] to `stats` in place."""
        stats.add_(rows.pow(2).sum(0))

    def make_mask(self, score: torch.Tensor, target: float, spread: bool = False) -> torch.Tensor:
        cfg = self.config
        return nm_mask(score, cfg.nm) if cfg.nm else row_mask(score, target, spread)

    def prune_(self, weight: torch.Tensor, stats: Any, target: float, spread: bool) -> torch.Tensor:
        """Zero the pruned weights of `weight` in place and return its keep-mask. `spread` asks for
        exactly round(target * numel) zeros, which an allocation's budget relies on."""
        mask = self.make_mask(self.score(weight.detach().float(), stats), target, spread)
        weight.mul_(mask.to(weight.dtype))
        return mask

    def run(self, art: Artifact) -> dict[str, Any]:
        cfg = self.config
        # The model stays on the CPU; block-sequential calibration moves one block at a time to art.device.
        model = art.student.cpu()
        linears = {p.param: p for p in prunable_linears(model, art.adapter)}
        dense_nm: list[str] = []
        kept_earlier: list[str] = []  # matrices an earlier pass's zeros leave sparser than this pass's pattern
        pruned: list[str] = []  # matrices this pass set a mask on
        no_new_zeros: list[str] = []  # of those, matrices it zeroed no weight of that was not zero already
        followed: list[str] = []  # matrices an earlier pass had masked

        def prune(pl: PrunableLinear, stats: Any) -> None:
            w = pl.module.weight
            if cfg.nm and w.shape[1] % cfg.nm.m:
                dense_nm.append(pl.param)
                return
            allocated = pl.param in art.allocation
            target = art.allocation[pl.param] if allocated else cfg.sparsity
            with torch.no_grad():
                mask = self.prune_(w, stats, target, spread=allocated).cpu()
                earlier = art.masks.get(pl.param)
                if earlier is not None and earlier.shape == mask.shape:
                    # A later pruner at a lower sparsity keeps what an earlier one removed, and a distillation
                    # after it would grow that back: a pass removes weights, never restores them.
                    if cfg.nm and bool((mask & ~earlier).any()):
                        kept_earlier.append(pl.param)
                    followed.append(pl.param)
                    if not bool((earlier & ~mask).any()):
                        no_new_zeros.append(pl.param)
                    mask &= earlier
                    w.mul_(mask.to(w.device, w.dtype))  # SparseGPT's update writes into the earlier zeros
                elif bool(mask.all()):  # sparsity 0, or a row too short to lose a weight at this sparsity
                    no_new_zeros.append(pl.param)
            art.masks[pl.param] = mask
            pruned.append(pl.param)

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
                stats = {role: self.new_stats(m) for role, m in mods.items()}
                collect_linear_inputs(block, mods, inputs, batches,
                                      lambda role, rows: self.accumulate(stats[role], rows))
                for role, pl in roles.items():
                    prune(pl, stats.pop(role))
                bar.update()
                if i + 1 == len(block_list(model, tower)[1]):
                    # A bridge reads this tower's output: prune it now, before the next tower's block
                    # inputs are captured through it. Its inputs come from the whole tower, run on the CPU
                    # with the tower's last block back there.
                    for bridge in (b for b in art.adapter.bridges if b.after == tower.name):
                        block.cpu()
                        for pl in by_block[(bridge.name, 0)]:
                            stats = self.new_stats(pl.module)
                            bridge_linear_inputs(model, art.adapter, pl.module, art.calib.calib_batches("image"),
                                                 torch.device("cpu"), lambda rows: self.accumulate(stats, rows))
                            prune(pl, stats)
                        bar.update()
        bar.close()
        return {**sparsity_summary(model, art.adapter), "dense_nm": dense_nm, "nm_kept_earlier": kept_earlier,
                "targets": "allocation" if art.allocation else "uniform",
                "removed_nothing": bool(pruned) and len(no_new_zeros) == len(pruned), "after_earlier": bool(followed)}


def bridge_linear_inputs(model: nn.Module, adapter, linear: nn.Linear, batches: list[dict[str, torch.Tensor]],
                         device: torch.device, fn) -> None:
    """Compute the image features of every batch and hand the input rows [tokens, in_features] of one
    bridge linear to `fn`. Its linears are visited in order, so a later one sees the earlier ones pruned."""
    def hook(_mod, args):
        x = args[0].detach()
        fn(x.reshape(-1, x.shape[-1]).float())

    handle = linear.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                adapter.image_features(model, batch["pixel_values"].to(device))
    finally:
        handle.remove()


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
