"""Joint selection under a latency budget: attention heads, FFN channels and whole blocks of every tower
compete in one ranking by loss change per predicted millisecond."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch
from torch import nn

from lmmc.adapters import Adapter, TowerModule, block_list
from lmmc.data import CalibData
from lmmc.importance import add_gate, contrastive_distill_loss


@dataclass(frozen=True)
class BlockUnits:
    """One block as the joint ranking sees it: what its units and the block itself cost in predicted ms,
    and what removing each would cost in loss (all on one scale: a change of the distillation loss)."""

    group: Hashable  # (tower, block index)
    tower: str
    overhead: float  # ms of the block with no heads and no channels: norms, residuals, biases
    head_ms: float  # ms per head unit (a key/value head with its query heads)
    channel_ms: float  # ms per FFN channel
    heads: list[float]  # loss change per head unit
    channels: list[float]  # loss change per FFN channel
    block: float  # loss change of removing the whole block
    min_heads: int = 1  # head units the block keeps while it stays
    min_channels: int = 1

    def ms(self, heads: int, channels: int) -> float:
        return self.overhead + self.head_ms * heads + self.channel_ms * channels


@dataclass
class JointSelection:
    blocks: list[Hashable] = field(default_factory=list)  # removed whole
    heads: dict[Hashable, list[int]] = field(default_factory=dict)  # removed head units, of blocks that stay
    channels: dict[Hashable, list[int]] = field(default_factory=dict)  # removed channels, of blocks that stay
    removed_ms: float = 0.0


def _ratio(loss: float, ms: float) -> float:
    return loss / ms if ms > 0 else float("inf")


def select_joint(blocks: list[BlockUnits], remove: float, min_layers: int) -> JointSelection:
    """Remove at least `remove` predicted ms (a ceiling: whole units may overshoot it) at the least loss
    change per ms, greedily.

    Each step takes the cheapest of: a block's least important remaining head or channel (beyond the
    block's floors), or a whole block (while its tower keeps more than `min_layers`). A whole block
    saves everything it still runs — its overhead plus its remaining heads and channels — so a layer
    thinned to a few units is priced with the overhead that removing it recovers and thinning it never
    does; FLOPs count no such overhead. The block's loss change is measured on the structure the
    scores came from and is not lowered as its units go (its remaining units' own scores would
    double-count what was already paid): removing a thinned block is judged conservatively."""
    heads_order = {b.group: sorted(range(len(b.heads)), key=lambda j: (b.heads[j], j)) for b in blocks}
    chan_order = {b.group: sorted(range(len(b.channels)), key=lambda j: (b.channels[j], j)) for b in blocks}
    taken_heads = {b.group: 0 for b in blocks}
    taken_chan = {b.group: 0 for b in blocks}
    alive = {b.group: b for b in blocks}
    per_tower: dict[str, int] = {}
    for b in blocks:
        per_tower[b.tower] = per_tower.get(b.tower, 0) + 1
    out = JointSelection()
    while out.removed_ms < remove:
        best: tuple[float, int, str, Hashable] | None = None
        for rank, (group, b) in enumerate(alive.items()):
            kept_h, kept_c = len(b.heads) - taken_heads[group], len(b.channels) - taken_chan[group]
            options = []
            if kept_h > max(b.min_heads, 0):
                options.append(("head", _ratio(b.heads[heads_order[group][taken_heads[group]]], b.head_ms)))
            if kept_c > max(b.min_channels, 0):
                options.append(("channel", _ratio(b.channels[chan_order[group][taken_chan[group]]], b.channel_ms)))
            if per_tower[b.tower] > min_layers:
                options.append(("block", _ratio(b.block, b.ms(kept_h, kept_c))))
            for kind, ratio in options:
                if ratio != float("inf") and (best is None or (ratio, rank) < best[:2]):
                    best = (ratio, rank, kind, group)
        if best is None:
            break  # the floors allow no more
        _, _, kind, group = best
        b = alive[group]
        if kind == "head":
            out.removed_ms += b.head_ms
            taken_heads[group] += 1
        elif kind == "channel":
            out.removed_ms += b.channel_ms
            taken_chan[group] += 1
        else:
            out.removed_ms += b.ms(len(b.heads) - taken_heads[group], len(b.channels) - taken_chan[group])
            out.blocks.append(group)
            per_tower[b.tower] -= 1
            del alive[group]
    # The last unit taken may overshoot by up to a whole block: give back removed heads and channels of
    # blocks that stay, the most loss per ms first, while the removed ms still reach `remove`.
    removed = [(b.heads[j], b.head_ms, "head", g, j) for g, b in alive.items()
               for j in heads_order[g][:taken_heads[g]]]
    removed += [(b.channels[j], b.channel_ms, "channel", g, j) for g, b in alive.items()
                for j in chan_order[g][:taken_chan[g]]]
    restored = set()
    for loss, ms, kind, group, j in sorted(removed, key=lambda u: -_ratio(u[0], u[1])):
        if out.removed_ms - ms >= remove:
            out.removed_ms -= ms
            restored.add((kind, group, j))
    for group in alive:
        heads = [j for j in heads_order[group][:taken_heads[group]] if ("head", group, j) not in restored]
        channels = [j for j in chan_order[group][:taken_chan[group]] if ("channel", group, j) not in restored]
        if heads:
            out.heads[group] = sorted(heads)
        if channels:
            out.channels[group] = sorted(channels)
    return out


@torch.no_grad()
def block_loss_change(student: nn.Module, teacher: nn.Module, adapter: Adapter, calib: CalibData,
                      device: torch.device, temperature: float) -> dict[tuple[str, int], float]:
    """Per block, the measured change of `contrastive_distill_loss` when its residual update is removed,
    |L(without) - L| per calibration batch summed over batches.

    On the scale of Taylor importance (per batch a first-order estimate of the same loss change, its
    absolute value summed over the same batches), so heads, channels and blocks rank together. Measured,
    not estimated: a whole block is too large a change for a first-order term."""
    student, teacher = student.to(device).eval(), teacher.to(device).eval()
    out: dict[tuple[str, int], float] = {}
    for tower in adapter.towers:
        blocks = block_list(student, tower)[1]
        gates = [torch.ones((), device=device) for _ in blocks]
        handles = [add_gate(b, g) for b, g in zip(blocks, gates)]
        s_mod, t_mod = TowerModule(student, tower), TowerModule(teacher, tower)
        totals = [0.0] * len(blocks)
        try:
            for batch in calib.calib_batches(tower.modality):
                if len(next(iter(batch.values()))) < 2:
                    continue  # as Taylor importance: one sample has no in-batch negative
                s_in = [batch[n].to(device) for n in s_mod.names]
                t_emb = t_mod(*[batch[n].to(device) for n in t_mod.names])[1]
                base = float(contrastive_distill_loss(s_mod(*s_in)[1], t_emb, temperature))
                for i, gate in enumerate(gates):
                    gate.fill_(0.0)
                    totals[i] += abs(float(contrastive_distill_loss(s_mod(*s_in)[1], t_emb, temperature)) - base)
                    gate.fill_(1.0)
        finally:
            for h in handles:
                h.remove()
        out.update({(tower.name, i): v for i, v in enumerate(totals)})
    return out
