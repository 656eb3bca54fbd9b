"""Least-squares reconstruction after structured pruning: a block's output projection is refitted so that
its kept heads or FFN channels stand in for the removed ones on the calibration tokens."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from lmmc.adapters import TowerModule, TowerSpec, block_linears, block_list, input_names
from lmmc.blockwise import StopForward
from lmmc.data import CalibData


def input_gram(model: nn.Module, tower: TowerSpec, block: int, role: str, calib: CalibData,
               device: torch.device) -> torch.Tensor:
    """E[x̃ x̃ᵀ] over the calibration tokens of x̃ = [x, 1], x the input of block `block`'s `role` linear
    ('o': the heads' concatenated outputs; 'fc2': the FFN's activations); each forward stops there.
    Padding tokens are left out: no pooled embedding reads them."""
    lin = block_linears(block_list(model, tower)[1][block], tower)[role][1]
    width = lin.in_features
    gram = torch.zeros(width + 1, width + 1, dtype=torch.float64)
    seen = [0]

    def add(x: torch.Tensor) -> None:
        x = x.double().cpu()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        gram.add_(x.T @ x)
        seen[0] += len(x)

    at_tokens(model, tower, lin, calib, device, add)
    return gram / max(seen[0], 1)


def at_tokens(model: nn.Module, tower: TowerSpec, module: nn.Module, calib: CalibData, device: torch.device,
              take: Callable[[torch.Tensor], None], output: bool = False) -> None:
    """Run the calibration batches through `tower` and pass `take` the input of `module` (its output with
    `output`) as [tokens, width] rows, padding tokens left out; each forward stops there."""
    keep: list[torch.Tensor | None] = [None]

    def rows(x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if keep[0] is not None and len(keep[0]) == len(x):
            x = x[keep[0]]
        take(x)
        raise StopForward  # nothing after this point is needed

    if output:
        handle = module.register_forward_hook(lambda _mod, _args, out: rows(out))
    else:
        handle = module.register_forward_pre_hook(lambda _mod, args: rows(args[0]))
    names = input_names(tower)
    tower_module = TowerModule(model, tower)
    try:
        with torch.no_grad():
            for batch in calib.calib_batches(tower.modality):
                mask = batch.get("attention_mask")
                keep[0] = mask.reshape(-1).bool() if mask is not None and tower.modality == "text" else None
                try:
                    tower_module(*[batch[n].to(device) for n in names])
                except StopForward:
                    pass
    finally:
        handle.remove()


def compensate_(lin: nn.Linear, gram: torch.Tensor, kept: Sequence[int], ridge: float) -> float:
    """Before `lin`'s input columns are cut to `kept`: fold what the other columns add into the kept ones.

    With z = [x_kept, 1] (x_kept alone when `lin` has no bias) and x_removed ≈ A z by ridge regression on
    `gram` (strength `ridge` times the mean diagonal of E[z zᵀ]), W_kept += W_removed A and the constant's
    part goes to the bias. Returns the share of the removed columns' contribution left unexplained,
    E‖W_r (x_r − A z)‖² / E‖W_r x_r‖² (0: replaced exactly; 1: no help)."""
    width = lin.in_features
    kept_set = set(int(k) for k in kept)
    kept_idx = torch.tensor(sorted(kept_set), dtype=torch.long)
    removed = torch.tensor([c for c in range(width) if c not in kept_set], dtype=torch.long)
    if not len(removed):
        return 0.0
    z = torch.cat([kept_idx, torch.tensor([width])]) if lin.bias is not None else kept_idx
    c_zz, c_rz, c_rr = gram[z][:, z], gram[removed][:, z], gram[removed][:, removed]
    reg = ridge * c_zz.diagonal().mean() * torch.eye(len(z), dtype=gram.dtype)
    # gelsd: a kept unit that never fires on the calibration data leaves the system singular without a ridge
    a = torch.linalg.lstsq(c_zz + reg, c_rz.T, driver="gelsd").solution.T  # |removed| x |z|
    with torch.no_grad():
        w_r = lin.weight[:, removed].double().cpu()
        delta = w_r @ a
        before = torch.trace(w_r @ c_rr @ w_r.T)
        rest = c_rr - a @ c_rz.T - c_rz @ a.T + a @ c_zz @ a.T
        left = float(torch.trace(w_r @ rest @ w_r.T) / before) if before > 0 else 0.0
        w = lin.weight
        w[:, kept_idx.to(w.device)] += delta[:, :len(kept_idx)].to(w.dtype).to(w.device)
        if lin.bias is not None:
            lin.bias += delta[:, -1].to(lin.bias.dtype).to(lin.bias.device)
    return left
