"""Importance of attention heads, FFN channels and whole blocks, from calibration data.

Two kinds: first-order Taylor (AntGMM's grad⊙W sums) and a gradient-free, Wanda-style activation score."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmmc.adapters import Adapter, TowerModule, block_linears, block_list, head_dim
from lmmc.blockwise import block_input, block_output, input_square_sums, run_block, token_mask, visit_blocks
from lmmc.data import CalibData
from lmmc.errors import LmmcError
from lmmc.objectives import info_nce, make_objective, objective_batches

Key = tuple[str, int]  # (tower name, block index)


@dataclass
class Importance:
    """Scores per unit; higher means keep. Comparable across the layers and towers of one model."""

    heads: dict[Key, torch.Tensor] = field(default_factory=dict)  # [heads of the block]
    channels: dict[Key, torch.Tensor] = field(default_factory=dict)  # [FFN width of the block]
    blocks: dict[Key, float] = field(default_factory=dict)


def contrastive_distill_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of each student embedding against the batch's teacher embeddings, its own as the target.

    Ours: a bare encoder has no task loss, and a distance to the teacher is minimal (zero gradient) while
    the student still equals the teacher; the in-batch negatives keep the gradient informative."""
    return info_nce(F.normalize(student_emb, dim=-1), F.normalize(teacher_emb, dim=-1), temperature, symmetric=False)


def _batch_inputs(module: TowerModule, batch: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [batch[name].to(device) for name in module.names]


def gate_hook(gate: torch.Tensor):
    """Forward hook scaling a block's residual update by `gate`: out = x + gate·(block(x) − x).

    At gate = 1 the block is unchanged; ∂L/∂gate is the first-order loss change of removing it."""

    def hook(_mod, args, kwargs, output):
        x = block_input(args, kwargs)
        y = block_output(output)
        gated = x + gate * (y - x)
        if isinstance(output, tuple):
            return (gated, *output[1:])
        if isinstance(output, list):
            return [gated, *output[1:]]
        return gated

    return hook


def add_gate(block: nn.Module, gate: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Hook `gate_hook(gate)` onto `block`, ahead of its other forward hooks: transformers records hidden
    states (LLaVA's image features are the second-to-last block's) with hooks it installs at a model's first
    call, and those must record the gated output, or the gate drops out of the loss."""
    return block.register_forward_hook(gate_hook(gate), with_kwargs=True, prepend=True)


def taylor_importance(student: nn.Module, teacher: nn.Module, adapter: Adapter, calib: CalibData,
                      device: torch.device, temperature: float = 0.1) -> Importance:
    """First-order Taylor importance (AntGMM's grad⊙W sums) under `contrastive_distill_loss`; for a
    generative model, under its own next-token loss.

    FFN channel j: |Σ_i grad⊙W_fc2[i, j]|, AntGMM's score. Head h: |Σ grad⊙W over the head's columns
    of the output projection| (ours: AntGMM sums over the head's q/k rows and over its v rows; the
    output-projection sum is exactly the derivative of a gate on the head's output, as in Michel et al.
    2019, and kept more of the teacher on MiniLM: held-out cosine 0.70 against 0.64 at 50 % FLOPs).
    Block: |∂L/∂gate| of `gate_hook`. The sums are taken per calibration batch and their absolute
    values added over batches (ours, as in Michel et al.): signed gradients summed over batches first
    let batches that pull opposite ways cancel."""
    student = student.to(device).eval()
    teacher = teacher.to(device).eval()
    towers = {t.name: t for t in adapter.towers}
    linears: dict[Key, dict[str, nn.Linear]] = {}
    gates: dict[Key, torch.Tensor] = {}
    for tower in adapter.towers:
        for i, block in enumerate(block_list(student, tower)[1]):
            linears[(tower.name, i)] = {r: m for r, (_, m) in block_linears(block, tower).items()}
            gates[(tower.name, i)] = torch.ones((), device=device, requires_grad=True)
    wanted = {id(lin[r].weight) for lin in linears.values() for r in ("o", "fc2")}
    saved = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        # Only these weights need gradients; skipping the rest (embeddings above all) saves most of the memory.
        p.requires_grad_(id(p) in wanted)
    handles = []
    for tower in adapter.towers:
        for i, block in enumerate(block_list(student, tower)[1]):
            handles.append(add_gate(block, gates[(tower.name, i)]))
    out = Importance()
    for key, lin in linears.items():
        hd = head_dim(student, towers[key[0]])
        out.heads[key] = torch.zeros(lin["q"].out_features // hd)
        out.channels[key] = torch.zeros(lin["fc1"].out_features)
        out.blocks[key] = 0.0
    used = 0

    @torch.no_grad()
    def collect(names: set[str]) -> None:
        """Add this backward pass's sums for the blocks of the towers in `names`, then clear the gradients."""
        for key, lin in linears.items():
            o = lin["o"].weight
            if key[0] not in names or o.grad is None:  # a block the loss does not read scores nothing
                continue
            hd = head_dim(student, towers[key[0]])
            out.heads[key] += (o * o.grad).reshape(o.shape[0], -1, hd).sum((0, 2)).abs().cpu()
            out.channels[key] += (lin["fc2"].weight * lin["fc2"].weight.grad).sum(0).abs().cpu()
            out.blocks[key] += float(gates[key].grad.abs())
            for r in ("o", "fc2"):
                lin[r].weight.grad = None
            gates[key].grad = None

    bar = tqdm(desc="antgmm: Taylor importance", unit="batch", leave=False)  # a batch takes seconds at full size
    try:
        if adapter.kind == "generative":
            # Ours: a generative model's output is logits, with no embedding to contrast. Its own teacher-forced
            # next-token loss on the calibration answers (ECoFLaP's objective) reaches every tower through the
            # decoder; a vision block the decoder never reads (LLaVA-1.5 takes the second-to-last) scores 0.
            objective = make_objective(student, adapter)
            text = next(t for t in adapter.towers if t.modality == "text")
            sizes = [len(next(iter(b.values()))) for b in calib.calib_batches(text.modality)]
            for step in objective_batches(calib, adapter, sum(sizes), max(sizes)):
                objective(step, device).backward()
                used += 1
                collect(set(towers))
                bar.update()
        else:
            for tower in adapter.towers:
                s_mod, t_mod = TowerModule(student, tower), TowerModule(teacher, tower)
                for batch in calib.calib_batches(tower.modality):
                    if len(next(iter(batch.values()))) < 2:
                        continue  # one sample has no in-batch negative: the loss is constant
                    with torch.no_grad():
                        t_emb = t_mod(*_batch_inputs(t_mod, batch, device))[1]
                    s_emb = s_mod(*_batch_inputs(s_mod, batch, device))[1]
                    contrastive_distill_loss(s_emb, t_emb, temperature).backward()
                    used += 1
                    collect({tower.name})
                    bar.update()
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    if not used:
        raise LmmcError("Taylor importance needs calibration batches of at least 2 samples (the loss contrasts "
                        "samples within a batch); raise calibration.batch_size or use importance: activation")
    return out


def _relative(scores: torch.Tensor) -> torch.Tensor:
    # Ours: activation scores carry each layer's activation scale, which differs from layer to layer
    # and tower to tower; dividing by the layer's mean makes a global ranking compare units by how
    # much they matter within their layer.
    return scores / scores.mean().clamp(min=1e-12)


def activation_importance(student: nn.Module, adapter: Adapter, calib: CalibData, device: torch.device) -> Importance:
    """Gradient-free importance from one block-sequential pass over the calibration data.

    Head h: Σ over its output-projection columns j of ‖X_j‖₂·Σ_i |W_o[i, j]| (Wanda's score, summed
    over the unit); FFN channel j: ‖X_j‖₂·Σ_i |W_fc2[i, j]|, X being the linear's input over real
    tokens. Both relative to their layer's mean. Block: mean over real tokens of 1 − cos(input, output)
    (the block's influence on the residual stream)."""
    student = student.to(device).eval()
    out = Importance()
    stream = visit_blocks(student, adapter, lambda t: calib.calib_batches(t.modality), device)
    for tower, i, block, inputs, batches in stream:
        lin = {r: m for r, (_, m) in block_linears(block, tower).items()}
        sq = input_square_sums(block, {r: lin[r] for r in ("o", "fc2")}, inputs, batches)
        hd = head_dim(student, tower)
        with torch.no_grad():
            o_score = lin["o"].weight.abs().sum(0) * sq["o"].sqrt()
            fc2_score = lin["fc2"].weight.abs().sum(0) * sq["fc2"].sqrt()
            out.heads[(tower.name, i)] = _relative(o_score.reshape(-1, hd).sum(1)).cpu()
            out.channels[(tower.name, i)] = _relative(fc2_score).cpu()
            out.blocks[(tower.name, i)] = _block_influence(block, inputs, batches)
    return out


@torch.no_grad()
def _block_influence(block: nn.Module, inputs: list, batches: list) -> float:
    total, count = 0.0, 0
    for (args, kwargs), batch in zip(inputs, batches):
        x = block_input(args, kwargs)
        y = run_block(block, (args, kwargs))
        change = 1 - F.cosine_similarity(x.float(), y.float(), dim=-1)
        mask = token_mask(batch)
        if mask is not None and change.shape == mask.shape:
            change = change[mask.to(change.device)]
        total += float(change.sum())
        count += change.numel()
    return total / max(count, 1)


def importance(method: str, student: nn.Module, teacher: nn.Module, adapter: Adapter, calib: CalibData,
               device: torch.device, temperature: float) -> Importance:
    """Scores by `method`: "taylor" or "activation"."""
    if method == "taylor":
        return taylor_importance(student, teacher, adapter, calib, device, temperature)
    return activation_importance(student, adapter, calib, device)

