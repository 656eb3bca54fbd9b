"""Structured surgery: physically remove attention heads (in GQA groups), FFN channels, blocks, hidden channels."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lmmc.adapters import TowerSpec, _get, block_linears, block_list, tower_config
from lmmc.errors import LmmcError

# Attention modules of some families cache their head count; transformers 5.x reshapes with
# `view(..., -1, head_dim)`, so these are only kept true for any code that still reads them.
_HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
_KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")
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
    """Query heads of one block's attention."""
    return block_linears(block, tower)["q"][1].out_features // head_dim


def group_size(block: nn.Module, tower: TowerSpec, head_dim: int) -> int:
    """Query heads sharing one key/value head: 1 under multi-head attention, more under grouped-query
    attention. Removing heads keeps it: a k/v head goes with all of its query heads."""
    linears = block_linears(block, tower)
    heads, kv = linears["q"][1].out_features // head_dim, linears["k"][1].out_features // head_dim
    if kv == 0 or heads % kv:
        raise LmmcError(f"the {tower.name} tower's block has {heads} query heads and {kv} key/value heads of "
                        f"width {head_dim}; the query heads must split evenly over the key/value heads")
    return heads // kv


def _rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """The weight rows of the given units, each `width` consecutive rows."""
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def keep_heads_(block: nn.Module, tower: TowerSpec, head_dim: int, keep: Sequence[int]) -> None:
    """Keep the listed query heads of one block: their q rows and output-projection columns, and the
    k/v rows of the key/value heads they use.

    Under grouped-query attention query head h reads key/value head h // g (g = `group_size`, the order
    transformers' `repeat_kv` uses), so `keep` must be whole groups; a cut that splits one is refused."""
    linears = block_linears(block, tower)
    g = group_size(block, tower, head_dim)
    heads = _index(keep, head_count(block, tower, head_dim), "attention head")
    groups = torch.unique(heads // g)
    if len(heads) != len(groups) * g:
        split = sorted(int(k) for k in groups if int(((heads // g) == k).sum()) != g)
        raise LmmcError(f"the kept heads {heads.tolist()} split the {tower.name} tower's grouped-query attention "
                        f"groups {split}: each group of {g} query heads shares one key/value head, so heads go "
                        f"in whole groups (heads {g}k .. {g}k+{g - 1}); keep or remove all {g} heads of a group")
    if tower.keep_heads is not None:
        tower.keep_heads(block, heads)
    rows = _rows(heads, head_dim)
    kv_rows = _rows(groups, head_dim)
    q_name = linears["q"][0]
    attention = _get(block, q_name.rsplit(".", 1)[0]) if "." in q_name else block
    # OLMo2 normalises q and k across all their heads, so those norms' weights run along the rows cut here
    # (Qwen3's are one head wide, shared by every head, and stay as they are).
    for name, role, kept in (("q_norm", "q", rows), ("k_norm", "k", kv_rows)):
        norm = getattr(attention, name, None)
        weight = getattr(norm, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 1 and \
                weight.numel() == linears[role][1].out_features != head_dim:
            norm.weight = nn.Parameter(weight.data[kept].clone(), requires_grad=weight.requires_grad)
    keep_rows_(linears["q"][1], rows)
    for role in ("k", "v"):
        keep_rows_(linears[role][1], kv_rows)
    keep_cols_(linears["o"][1], rows)
    for attr in _HEAD_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, len(heads))
    for attr in _KV_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, len(groups))
    for attr in _HEAD_WIDTH_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, len(heads) * head_dim)


def keep_channels_(block: nn.Module, tower: TowerSpec, keep: Sequence[int]) -> None:
    """Keep the listed FFN channels of one block: fc1 rows (and bias), the gate's rows of a gated MLP
    (SwiGLU: channel j is act(gate_j) * up_j) and fc2 columns."""
    linears = block_linears(block, tower)
    channels = _index(keep, linears["fc1"][1].out_features, "FFN channel")
    for role in ("fc1", "gate"):
        if role in linears:
            keep_rows_(linears[role][1], channels)
    keep_cols_(linears["fc2"][1], channels)
    fc1_name = linears["fc1"][0]
    mlp = _get(block, fc1_name.rsplit(".", 1)[0]) if "." in fc1_name else block
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(channels)


def keep_blocks_(model: nn.Module, tower: TowerSpec, keep: Sequence[int]) -> None:
    """Keep the listed blocks of a tower (in order) and update the tower config's layer count.

    A decoder's KV cache addresses blocks by `layer_idx` and sizes itself from the config's
    `num_hidden_layers` and per-layer `layer_types`; both are renumbered so cached generation works. The
    config also records which teacher block each remaining block came from
    (`lmmc_teacher_layers`), so that layer-wise distillation and the student format can map them back."""
    path, blocks = block_list(model, tower)
    idx = _index(keep, len(blocks), "transformer block").tolist()
    if idx[-1] != len(blocks) - 1 and find_restore(model, tower) is not None:
        raise LmmcError(f"the {tower.name} tower's last block holds the map back to the teacher's width that "
                        f"removing hidden channels added, and it would be removed; remove blocks before hidden "
                        f"channels (antgmm's stage order does)")
    cfg = tower_config(model, tower)
    origin = list(getattr(cfg, "lmmc_teacher_layers", None) or range(len(blocks)))
    if tower.config_key == "vision_config" and getattr(model.config, "vision_feature_layer", None) is not None:
        # Checked before anything changes, since it may refuse the cut.
        model.config.vision_feature_layer = _feature_layer(model.config.vision_feature_layer, idx, len(blocks),
                                                           tower.name)
    parent_path, _, attr = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in idx]))
    for new_i, i in enumerate(idx):
        # A cache (decoder use) addresses blocks by position; keep those positions consecutive.
        for mod in blocks[i].modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_i
    cfg.num_hidden_layers = len(idx)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        cfg.layer_types = [layer_types[i] for i in idx]
    cfg.lmmc_teacher_layers = [origin[i] for i in idx]


def feature_blocks(model: nn.Module, tower: TowerSpec) -> set[int] | None:
    """The blocks of a LLaVA-style vision tower whose output the projector reads (`vision_feature_layer`,
    the patch embeddings' state excluded); None for a tower read only at its end."""
    layer = getattr(model.config, "vision_feature_layer", None)
    if tower.config_key != "vision_config" or layer is None:
        return None
    blocks = len(block_list(model, tower)[1])
    states = {i % (blocks + 1) for i in ([layer] if isinstance(layer, int) else layer)}
    return {state - 1 for state in states if state}


def _feature_layer(layer: int | list[int], keep: list[int], blocks: int, tower: str) -> int | list[int]:
    """LLaVA's `vision_feature_layer` once only the blocks `keep` of `blocks` remain, so that the projector
    reads the same hidden state as before.

    The index counts hidden states (0: the patch embeddings, i: the output of block i - 1) and is usually
    negative (-2: the second to last), so it would point elsewhere once blocks are removed. A read block
    that is kept is read at its new position. The deepest read block may go, as a tower's last block may:
    the projector then reads the last block kept before it, the tower's output now. Any other read block
    is refused, since its hidden state is then no longer in the student."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    deepest = max(i % (blocks + 1) for i in layers)
    out = []
    for i in layers:
        state = i % (blocks + 1)  # 0 .. blocks
        before = sum(k < state for k in keep)  # kept blocks whose output this state has passed through
        if state and state - 1 not in keep and (state != deepest or before == 0):
            raise LmmcError(f"removing {tower} block {state - 1}, whose output the projector reads "
                            f"(vision_feature_layer {layer}), leaves no block to read in its place; remove fewer "
                            f"{tower} blocks (a lower depth share or a higher keep)")
        out.append(before if i >= 0 else before - (len(keep) + 1))
    if len(set(out)) < len(out):  # two read states became one: the projector would read a state twice
        raise LmmcError(f"removing {tower} blocks {sorted(set(range(blocks)) - set(keep))} leaves the projector "
                        f"reading one hidden state in place of two (vision_feature_layer {layer}); remove fewer "
                        f"{tower} blocks (a lower depth share or a higher keep)")
    return out[0] if isinstance(layer, int) else out


class WidthRestore(nn.Module):
    """The last LayerNorm of a tower whose hidden channels were removed, then a linear map from the kept
    channels back to the teacher's width, so the tower's outputs stay comparable with the teacher's."""

    def __init__(self, norm: nn.LayerNorm, proj: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def _final_norm(block: nn.Module, tower: TowerSpec) -> tuple[str, nn.Module]:
    for name in tower.hidden.final_norm:
        mod = _get(block, name)
        if mod is not None:
            return name, mod
    raise LmmcError(f"the {tower.name} tower's block has no output LayerNorm at {tower.hidden.final_norm}")


def find_restore(model: nn.Module, tower: TowerSpec) -> WidthRestore | None:
    """The tower's map back to the teacher's width, if hidden channels were removed."""
    if tower.hidden is None:
        return None
    mod = _final_norm(block_list(model, tower)[1][-1], tower)[1]
    return mod if isinstance(mod, WidthRestore) else None


def hidden_width(model: nn.Module, tower: TowerSpec) -> int:
    """Channels of the tower's residual stream (the teacher's hidden size until hidden channels go)."""
    return block_linears(block_list(model, tower)[1][0], tower)["q"][1].in_features


def keep_norm_(norm: nn.LayerNorm, channels: torch.Tensor) -> None:
    """Keep the given channels of a LayerNorm: its weight and bias entries, and its normalised shape."""
    with torch.no_grad():
        channels = channels.to(norm.weight.device)
        for attr in ("weight", "bias"):
            p = getattr(norm, attr)
            if p is not None:
                setattr(norm, attr, nn.Parameter(p.index_select(0, channels).clone(), p.requires_grad))
    norm.normalized_shape = (len(channels),)


def keep_hidden_(model: nn.Module, tower: TowerSpec, keep: Sequence[int]) -> None:
    """Keep the listed channels of a tower's residual stream, in every module that reads or writes it.

    Embedding columns and the embedding LayerNorm; in every block the q/k/v and fc1 input columns, the
    output-projection and fc2 rows (and biases), and every LayerNorm over the stream. The first call puts
    a `WidthRestore` (identity over the full width) on the last block's output LayerNorm, whose input
    columns then shrink like any other reader's; `lmmc.hidden.fit_restore_` fits it afterwards."""
    _, blocks = block_list(model, tower)
    width = hidden_width(model, tower)
    channels = _index(keep, width, "hidden channel")
    if len(channels) == width:
        return
    if tower.hidden is None:
        raise LmmcError(f"removing hidden channels is not supported for the {tower.name} tower of this model "
                        f"family (BERT-family text encoders only); drop 'hidden' from the antgmm shares")
    embeddings = _get(model, tower.hidden.embeddings)
    for name, mod in embeddings.named_modules():
        if isinstance(mod, nn.Embedding):
            if mod.embedding_dim != width:
                raise LmmcError(f"the {tower.name} tower's embedding '{name}' is {mod.embedding_dim} wide, not the "
                                f"hidden size {width} (a factorised embedding); its hidden channels cannot be removed")
            with torch.no_grad():
                idx = channels.to(mod.weight.device)
                mod.weight = nn.Parameter(mod.weight.index_select(1, idx).clone(), mod.weight.requires_grad)
            mod.embedding_dim = len(channels)
        elif isinstance(mod, nn.LayerNorm):
            keep_norm_(mod, channels)
    last = blocks[-1]
    name, norm = _final_norm(last, tower)
    if not isinstance(norm, WidthRestore):
        proj = nn.Linear(width, width).to(norm.weight.device, norm.weight.dtype)
        with torch.no_grad():
            proj.weight.copy_(torch.eye(width))
            proj.bias.zero_()
        parent_name, _, attr = name.rpartition(".")
        setattr(_get(last, parent_name) if parent_name else last, attr, WidthRestore(norm, proj))
    for block in blocks:
        linears = block_linears(block, tower)
        for role in ("q", "k", "v", "fc1"):
            keep_cols_(linears[role][1], channels)
        for role in ("o", "fc2"):
            keep_rows_(linears[role][1], channels)
        for mod in block.modules():
            if isinstance(mod, nn.LayerNorm) and mod.normalized_shape == (width,):
                keep_norm_(mod, channels)
            elif isinstance(mod, WidthRestore):
                keep_cols_(mod.proj, channels)
