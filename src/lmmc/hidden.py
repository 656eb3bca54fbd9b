"""Hidden (residual-stream) channels: their importance over calibration data, and the least-squares fit
of the map that takes a narrowed tower's output back to the teacher's width."""

from __future__ import annotations

import torch
from torch import nn

from lmmc.adapters import Adapter, TowerModule, TowerSpec, block_linears, block_list, input_names
from lmmc.data import CalibData
from lmmc.errors import LmmcError
from lmmc.importance import contrastive_distill_loss
from lmmc.surgery import find_restore, hidden_width

# Roles whose weights read the residual stream (input columns = hidden channels).
READERS = ("q", "k", "v", "fc1")
# Ridge strength of the least-squares fit, relative to the mean diagonal of the Gram matrix, pulling
# toward the current map rather than toward zero. Chosen on a dev split of broad_en.txt (disjoint from the
# calibration and held-out sentences; MiniLM at 50 % FLOPs, one-shot): dev cosine 0.735, against 0.699 for
# a near-plain least-squares fit (1e-3) and 0.703 for the best ridge toward zero (BENCHMARKS.md).
RIDGE = 0.3


def _readers(model: nn.Module, tower: TowerSpec) -> list[nn.Linear]:
    out = [block_linears(b, tower)[r][1] for b in block_list(model, tower)[1] for r in READERS]
    restore = find_restore(model, tower)
    return out + ([restore.proj] if restore is not None else [])


def _inputs(tower: TowerSpec, batch: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [batch[name].to(device) for name in input_names(tower)]


def taylor_hidden(student: nn.Module, teacher: nn.Module, tower: TowerSpec, calib: CalibData,
                  device: torch.device, temperature: float) -> torch.Tensor:
    """AntGMM's hidden-dimension score: channel d gets |Σ over every reader of the stream of
    (grad⊙W)[:, d]|, the first-order loss change of zeroing channel d where it is read, under the same
    contrastive loss to the teacher as the other stages. Absolute values are added per batch (as for heads
    and FFN channels), so batches that pull opposite ways do not cancel."""
    readers = _readers(student, tower)
    wanted = {id(lin.weight) for lin in readers}
    saved = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in wanted)
    s_mod, t_mod = TowerModule(student, tower), TowerModule(teacher, tower)
    score = torch.zeros(hidden_width(student, tower))
    used = 0
    try:
        for batch in calib.calib_batches(tower.modality):
            if len(next(iter(batch.values()))) < 2:
                continue  # one sample has no in-batch negative: the loss is constant
            with torch.no_grad():
                t_emb = t_mod(*_inputs(tower, batch, device))[1]
            contrastive_distill_loss(s_mod(*_inputs(tower, batch, device))[1], t_emb, temperature).backward()
            used += 1
            with torch.no_grad():
                step = sum((lin.weight * lin.weight.grad).sum(0) for lin in readers)
                score += step.abs().cpu()
            for lin in readers:
                lin.weight.grad = None
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    if not used:
        raise LmmcError("Taylor importance needs calibration batches of at least 2 samples (the loss contrasts "
                        "samples within a batch); raise calibration.batch_size or use importance: activation")
    return score


@torch.no_grad()
def activation_hidden(student: nn.Module, tower: TowerSpec, calib: CalibData, device: torch.device) -> torch.Tensor:
    """Gradient-free: channel d gets Σ over every reader of ‖X_d‖₂·Σ_i |W[i, d]| (Wanda's score summed over
    the channel's column), each reader's scores relative to their mean so no layer's scale dominates, X
    being the reader's input over real tokens."""
    readers = _readers(student, tower)
    squares = [torch.zeros(lin.in_features, device=device) for lin in readers]
    mask: list[torch.Tensor | None] = [None]

    def hook(k: int):
        def accumulate(_mod, args):
            x = args[0]
            rows = x[mask[0]] if mask[0] is not None and mask[0].shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            squares[k] += rows.float().pow(2).sum(0)
        return accumulate

    handles = [lin.register_forward_pre_hook(hook(k)) for k, lin in enumerate(readers)]
    module = TowerModule(student, tower)
    try:
        for batch in calib.calib_batches(tower.modality):
            m = batch.get("attention_mask")
            mask[0] = m.to(device).bool() if m is not None else None
            module(*_inputs(tower, batch, device))
    finally:
        for h in handles:
            h.remove()
    score = torch.zeros(hidden_width(student, tower), device=device)
    for lin, sq in zip(readers, squares):
        s = lin.weight.abs().sum(0) * sq.sqrt()
        score += s / s.mean().clamp(min=1e-12)
    return score.cpu()


def hidden_importance(method: str, student: nn.Module, teacher: nn.Module, adapter: Adapter, calib: CalibData,
                      device: torch.device, temperature: float) -> dict[str, torch.Tensor]:
    """Per tower, one score per hidden channel (higher means keep), by `method`: "taylor" or "activation"."""
    student.eval()
    teacher.eval()
    if method == "taylor":
        return {t.name: taylor_hidden(student, teacher, t, calib, device, temperature) for t in adapter.towers}
    return {t.name: activation_hidden(student, t, calib, device) for t in adapter.towers}


@torch.no_grad()
def fit_restore_(student: nn.Module, teacher: nn.Module, tower: TowerSpec, calib: CalibData,
                 device: torch.device, ridge: float = RIDGE) -> dict[str, float]:
    """Fit the tower's `WidthRestore` by ridge least squares: the student's last LayerNorm output over the
    kept channels, over the real tokens of the calibration data, onto the teacher's last hidden state.

    The ridge (relative to the mean diagonal of the Gram matrix) pulls the map toward its current value
    (after a first cut: each kept channel put back in its own place), not toward zero: a few thousand
    calibration tokens cannot pin down a full d'×d map, and the kept channels are already the teacher's.
    The pooled embedding is a (masked) mean of these token states, so fitting tokens fits it too. Returns
    the fit's relative residual (unexplained share of the teacher's centred sum of squares)."""
    restore = find_restore(student, tower)
    if restore is None:
        raise LmmcError(f"the {tower.name} tower has no map back to the teacher's width to fit")
    width = restore.proj.in_features
    gram = torch.zeros(width + 1, width + 1, dtype=torch.float64)
    cross = torch.zeros(width + 1, restore.proj.out_features, dtype=torch.float64)
    total_sq = torch.zeros((), dtype=torch.float64)
    target_sum = torch.zeros(restore.proj.out_features, dtype=torch.float64)
    count = 0
    captured: list[torch.Tensor] = []
    handle = restore.norm.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        for batch in calib.calib_batches(tower.modality):
            inputs = dict(zip(input_names(tower), _inputs(tower, batch, device)))
            captured.clear()
            tower.embed(student, inputs)
            target = tower.embed(teacher, inputs)[0]
            feats = captured[0]
            m = inputs.get("attention_mask")
            keep = m.bool() if m is not None else torch.ones(feats.shape[:-1], dtype=torch.bool, device=feats.device)
            x = feats[keep].double().cpu()
            y = target[keep].double().cpu()
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            gram += x.T @ x
            cross += x.T @ y
            total_sq += y.pow(2).sum()
            target_sum += y.sum(0)
            count += len(y)
    finally:
        handle.remove()
    pull = torch.zeros_like(gram)  # the bias row is not pulled
    pull[:-1, :-1] = ridge * gram.diagonal()[:-1].mean().clamp(min=1e-12) * torch.eye(width, dtype=gram.dtype)
    current = torch.cat([restore.proj.weight.T, restore.proj.bias[None]]).double().cpu()
    solution = torch.linalg.solve(gram + pull, cross + pull @ current)  # [width + 1, teacher width]
    restore.proj.weight.copy_(solution[:-1].T.to(restore.proj.weight.dtype))
    restore.proj.bias.copy_(solution[-1].to(restore.proj.bias.dtype))
    residual = total_sq - 2 * (solution * cross).sum() + (solution * (gram @ solution)).sum()
    centred = total_sq - target_sum.pow(2).sum() / max(count, 1)
    return {"tokens": count, "relative_residual": float(residual / centred.clamp(min=1e-12))}


@torch.no_grad()
def pooled_cosine(student: nn.Module, teacher: nn.Module, tower: TowerSpec, calib: CalibData,
                  device: torch.device) -> float:
    """Mean cosine between the student's and the teacher's pooled embeddings on the calibration batches."""
    s_mod, t_mod = TowerModule(student, tower), TowerModule(teacher, tower)
    values = []
    for batch in calib.calib_batches(tower.modality):
        inputs = _inputs(tower, batch, device)
        values.append((s_mod(*inputs)[1] * t_mod(*inputs)[1]).sum(-1).cpu())
    return float(torch.cat(values).mean())
