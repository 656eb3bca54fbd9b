"""Structured surgery: physically remove attention heads, FFN channels and whole blocks from a model."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lmmc.adapters import TowerSpec, _get, block_linears, block_list, tower_config
from lmmc.errors import LmmcError

# Attention modules of some families cache their head count; transformers 5.x reshapes with
# `view(..., -1, head_dim)`, so these are only kept true for any code that still reads them.
_HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
_HEAD_WIDTH_ATTRS = ("all_head_size",)


def _index(keep: Sequence[int], size: int, what: str) -> torch.Tensor:
    idx = sorted(set(int(i) for i in keep))
    if not idx:
        raise LmmcError(f"cannot remove every {what} of a layer; keep at least one (the floors min_heads/min_ffn "
                        f"exist for this)")
    if idx[0] < 0 or idx[-1] >= size:
        raise LmmcError(f"{what} index out of range: kept {idx}, but the layer has {size}")
    return torch.tensor(idx, dtype=torch.long)


def keep_rows_(lin: nn.Linear, rows: torch.Tensor) -> None:
    """Keep only the given output features (weight rows and bias entries) of `lin`, in place."""
    with torch.no_grad():
        rows = rows.to(lin.weight.device)
        lin.weight = nn.Parameter(lin.weight.index_select(0, rows).clone(), lin.weight.requires_grad)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, rows).clone(), lin.bias.requires_grad)
    lin.out_features = len(rows)


def keep_cols_(lin: nn.Linear, cols: torch.Tensor) -> None:
    """Keep only the given input features (weight columns) of `lin`, in place; the bias is untouched."""
    with torch.no_grad():
        cols = cols.to(lin.weight.device)
        lin.weight = nn.Parameter(lin.weight.index_select(1, cols).clone(), lin.weight.requires_grad)
    lin.in_features = len(cols)


def head_count(block: nn.Module, tower: TowerSpec, head_dim: int) -> int:
    return block_linears(block, tower)["q"][1].out_features // head_dim


def keep_heads_(block: nn.Module, tower: TowerSpec, head_dim: int, keep: Sequence[int]) -> None:
    """Keep the listed heads of one block: their q/k/v rows and the matching output-projection columns."""
    linears = block_linears(block, tower)
    heads = _index(keep, head_count(block, tower, head_dim), "attention head")
    rows = (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    for role in ("q", "k", "v"):
        keep_rows_(linears[role][1], rows)
    keep_cols_(linears["o"][1], rows)
    q_name = linears["q"][0]
    attention = _get(block, q_name.rsplit(".", 1)[0]) if "." in q_name else block
    for attr in _HEAD_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, len(heads))
    for attr in _HEAD_WIDTH_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, len(heads) * head_dim)


def keep_channels_(block: nn.Module, tower: TowerSpec, keep: Sequence[int]) -> None:
    """Keep the listed FFN channels of one block: fc1 rows (and bias) and fc2 columns."""
    linears = block_linears(block, tower)
    channels = _index(keep, linears["fc1"][1].out_features, "FFN channel")
    keep_rows_(linears["fc1"][1], channels)
    keep_cols_(linears["fc2"][1], channels)


def keep_blocks_(model: nn.Module, tower: TowerSpec, keep: Sequence[int]) -> None:
    """Keep the listed blocks of a tower (in order) and update the tower config's layer count.

    The config also records which teacher block each remaining block came from
    (`lmmc_teacher_layers`), so that layer-wise distillation and the student format can map them back."""
    path, blocks = block_list(model, tower)
    idx = _index(keep, len(blocks), "transformer block").tolist()
    cfg = tower_config(model, tower)
    origin = list(getattr(cfg, "lmmc_teacher_layers", None) or range(len(blocks)))
    parent_path, _, attr = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in idx]))
    for new_i, i in enumerate(idx):
        # A cache (decoder use) addresses blocks by position; keep those positions consecutive.
        for mod in blocks[i].modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_i
    cfg.num_hidden_layers = len(idx)
    cfg.lmmc_teacher_layers = [origin[i] for i in idx]
