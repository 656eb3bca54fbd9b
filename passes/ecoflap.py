"""ECoFLaP (Sung, Yoon, Bansal, ICLR 2024): global sparsity allocation from zeroth- or first-order scores."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from lmmc.adapters import PrunableLinear, block_list
from lmmc.allocation import Allocation, AllocationConfig, AllocationPass, Granularity, keep_budget_ratios, keep_floors
from lmmc.artifact import Artifact
from lmmc.data import Batch
from lmmc.errors import LmmcError
from lmmc.objectives import Objective, make_objective, objective_batches, step_samples
from lmmc.pipeline import register
from lmmc.sparsity import fastest_cpu_threads


@contextmanager
def _blocks_recorded(blocks: dict[str, nn.ModuleList]) -> Iterator[dict[str, list[Any]]]:
    """Each block's output as the body's forwards give it, by tower and block index (the last forward's)."""
    outputs: dict[str, list[Any]] = {name: [None] * len(mods) for name, mods in blocks.items()}

    def keep(name: str, index: int):
        return lambda module, args, output: outputs[name].__setitem__(index, output)
    handles = [b.register_forward_hook(keep(name, i)) for name, mods in blocks.items() for i, b in enumerate(mods)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _replayed(blocks: nn.ModuleList, outputs: list[Any], upto: int) -> Iterator[None]:
    """Blocks before `upto` hand back the outputs they gave on this batch instead of computing them again: a
    matrix perturbed in block `upto` changes nothing before it, and the forward costs only the blocks after."""
    for i in range(upto):
        blocks[i].forward = lambda *args, _out=outputs[i], **kwargs: _out
    try:
        yield
    finally:
        for i in range(upto):
            del blocks[i].forward


@torch.no_grad()
def zeroth_order_scores(objective: Objective, linears: list[PrunableLinear], steps: list[dict[str, Batch]],
                        epsilon: float, seed: int, device: torch.device) -> dict[str, float]:
    """s_l = Σ_b |L(W_l + εz) − L(W_l − εz)| / 2ε, one fresh z ~ N(0, I) per matrix and batch.

    Forward passes only. The perturbed weights live in one probe tensor the size of the matrix, which
    the layer reads in place of its own weights while the original tensor stays untouched; swapping it
    back restores the weights bit for bit (adding and subtracting εz would not) and costs no copy. The
    blocks before a perturbed matrix replay their unperturbed outputs, which nearly halves the forwards' cost."""
    gen = torch.Generator().manual_seed(seed)
    towers = {t.name: t for t in objective.adapter.towers}
    blocks = {name: block_list(objective.model, t)[1] for name, t in towers.items()}
    scores = {pl.param: 0.0 for pl in linears}
    bar = tqdm(total=len(steps) * len(linears), desc="ecoflap: zeroth-order scores", unit="matrix", leave=False)
    for step in steps:
        targets = objective.targets(step, device)
        inputs = {name: objective.inputs(t, step, device) for name, t in towers.items()}

        def loss(pl: PrunableLinear) -> float:
            tower = objective.scored_by(pl.tower)
            return float(objective.loss(tower.name, objective.embed(tower, inputs[tower.name]), targets))

        with _blocks_recorded(blocks) as outputs:
            for tower in {objective.scored_by(pl.tower).name for pl in linears}:
                objective.embed(towers[tower], inputs[tower])  # every block's unperturbed output on this batch
        for pl in linears:
            weight = pl.module.weight
            original = weight.data
            probe = torch.randn(original.shape, generator=gen).to(device=original.device, dtype=original.dtype)
            probe.mul_(epsilon).add_(original)  # W + εz
            weight.data = probe
            # a bridge's linears (a projector between towers) lie in no tower's blocks: nothing to replay
            replay = (_replayed(blocks[pl.tower], outputs[pl.tower], pl.block) if pl.tower in blocks
                      else nullcontext())
            try:
                with replay:
                    up = loss(pl)
                    probe.mul_(-1.0).add_(original, alpha=2.0)  # 2W − (W + εz) = W − εz
                    down = loss(pl)
            finally:
                weight.data = original
            scores[pl.param] += abs(up - down) / (2 * epsilon)
            bar.update()
    bar.close()
    return scores


def first_order_scores(objective: Objective, linears: list[PrunableLinear], steps: list[dict[str, Batch]],
                       device: torch.device) -> dict[str, float]:
    """s_l = Σ_i |W_i| · mean_b |∂L_b/∂W_i|. Needs backward, so activations and one gradient-sized
    buffer per prunable matrix are held; the zeroth-order scores exist to avoid exactly that."""
    model = objective.model
    weights = [pl.module.weight for pl in linears]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    try:
        for step in steps:
            grads = torch.autograd.grad(objective(step, device), weights, allow_unused=True)
            for acc, g in zip(sums, grads):
                if g is not None:
                    acc.add_(g.abs())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {pl.param: float((w.detach().abs() * acc).sum()) / len(steps)
            for pl, w, acc in zip(linears, weights, sums)}


class EcoflapConfig(AllocationConfig):
    granularity: Granularity = Field("layer", description="what gets one sparsity: 'layer' (each matrix; "
                                     "the default, see the pass), 'block', 'tower' or 'model'")
    p_max: float | None = Field(None, gt=0.0, le=1.0, description="cap on any group's sparsity; default "
                                "sparsity + 0.1, as in ECoFLaP's released scripts")
    order: Literal[0, 1] = Field(0, description="0: zeroth-order (forward-only) scores; 1: first-order "
                                 "|W|·|∂L/∂W| (needs backward and its memory)")
    epsilon: float = Field(1e-3, gt=0.0, description="finite-difference step ε of the zeroth-order estimate")
    samples: int = Field(64, gt=0, description="calibration samples the scores are computed on")
    batch_size: int = Field(8, gt=1, description="samples per loss evaluation (in-batch negatives need ≥ 2)")
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the random directions z")

    @model_validator(mode="after")
    def _cap_reaches_target(self) -> "EcoflapConfig":
        if self.p_max is not None and self.p_max < self.sparsity:
            raise ValueError(f"p_max ({self.p_max}) is below the target sparsity ({self.sparsity}); no group "
                             f"may exceed p_max, so the target cannot be met. Use a p_max above {self.sparsity}, "
                             f"e.g. {min(1.0, round(self.sparsity + 0.1, 6))}")
        unused = [k for k in ("epsilon", "seed") if self.given(k)]
        if self.order == 1 and unused:
            raise ValueError(f"{' and '.join(unused)} set{'s' if len(unused) == 1 else ''} the zeroth-order "
                             f"estimate's random directions, and order 1 computes gradients instead; remove "
                             f"{' and '.join(unused)}, or use order 0")
        return self

    @property
    def cap(self) -> float:
        return self.p_max if self.p_max is not None else min(1.0, self.sparsity + 0.1)


@register
class EcoflapPass(AllocationPass):
    """ECoFLaP allocation (Sung, Yoon, Bansal, ICLR 2024, arXiv:2310.02998), forward-only by default.

    The coarse step: score every prunable matrix of every tower, sum the scores per group, and hand
    out one global keep budget in proportion to them (floor ⌈(1 − p_max)·N_g⌉ per group). A local
    pruner (wanda, sparsegpt) follows as the fine step and reads the per-matrix targets.

    Zeroth-order (order 0): forward-only finite differences along a random direction. First-order
    (order 1): |W|·|∂L/∂W|. The loss comes from the adapter (see lmmc.objectives).

    Ours, measured on MiniLM (benchmarks/results/allocation.md): the default granularity is 'layer',
    one group per matrix, where the paper defaults to blocks. The six block sums come out nearly equal,
    so block groups stay within about 0.03 of the target and end within ±0.005 cosine of uniform,
    while the matrices of one block differ a lot (value and output projections matter most). The
    default of 64 samples (the paper uses 32) is there because with 32 the zeroth-order scores are noisy
    enough that the gain over uniform at 60 % varied from +0.010 to +0.024 between seeds.

    Recipe::

        passes:
          - ecoflap: {sparsity: 0.6, p_max: 0.7, order: 0, granularity: layer, samples: 64, batch_size: 8}
          - wanda: {}
    """

    name = "ecoflap"
    Config = EcoflapConfig
    needs = frozenset({"student", "calib"})

    def allocate(self, art: Artifact, groups: dict[str, list[PrunableLinear]]) -> Allocation:
        cfg = self.config
        if art.calib is None:
            raise LmmcError("the ecoflap pass needs calibration data; give --calib or 'calibration.path'")
        sizes = {g: sum(pl.module.weight.numel() for pl in members) for g, members in groups.items()}
        keep_floors(list(sizes.values()), cfg.sparsity, cfg.cap)  # fail before the scores cost time
        model = art.student.to(art.device).eval()
        objective = make_objective(model, art.adapter)
        steps = objective_batches(art.calib, art.adapter, cfg.samples, cfg.batch_size)
        linears = [pl for members in groups.values() for pl in members]
        threads = None
        if cfg.order == 0:
            with torch.no_grad(), fastest_cpu_threads(lambda: objective(steps[0], art.device), art.device) as threads:
                matrix = zeroth_order_scores(objective, linears, steps, cfg.epsilon, cfg.seed, art.device)
        else:
            matrix = first_order_scores(objective, linears, steps, art.device)
        bad = [name for name, score in matrix.items() if not math.isfinite(score)]
        if bad:
            hint = f"lower 'epsilon' (now {cfg.epsilon}): W ± εz must stay a model that computes" if cfg.order == 0 \
                else "the gradients overflowed"
            raise LmmcError(f"ecoflap's loss was NaN or infinite on {len(bad)} matrices (first {bad[0]}); {hint}")
        group_scores = {g: sum(matrix[pl.param] for pl in members) for g, members in groups.items()}
        ratios = keep_budget_ratios(group_scores, sizes, cfg.sparsity, cfg.cap)
        samples = sum(step_samples(step) for step in steps)
        details: dict[str, Any] = {"p_max": cfg.cap, "order": cfg.order, "samples": samples}
        if threads is not None and art.device.type == "cpu":
            details["threads"] = threads  # the faster of one and all, timed on this machine as it ran
        if samples < cfg.samples:
            held = min(sum(len(next(iter(b.values()))) for b in art.calib.calib_batches(m))
                       for m in dict.fromkeys(t.modality for t in art.adapter.towers))
            why = (f"the calibration set holds {held}; raise calibration.samples, or lower ecoflap's samples"
                   if held < cfg.samples else
                   f"a last batch of one sample, which has none to contrast with, is left out; make samples no "
                   f"multiple of batch_size = {cfg.batch_size} plus one")
            details["warnings"] = [f"ecoflap scored on {samples} calibration samples, fewer than its samples = "
                                   f"{cfg.samples}: {why}"]
        return Allocation(ratios, group_scores, matrix, details)
