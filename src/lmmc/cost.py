"""Parameter and FLOP counts of transformer blocks and of the units structured pruning removes.

FLOPs count matrix products only (2 per multiply-add), as `torch.utils.flop_counter` does: the linears
of a block (the map back to the teacher's width included, where hidden channels were removed) plus the
two attention products (scores and weighted values), which grow with the tokens."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmmc.adapters import Adapter, TowerSpec, block_linears, block_list


@dataclass(frozen=True)
class Cost:
    """Parameters, and FLOPs for one sequence of `tokens` tokens."""

    params: int
    flops: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.flops + other.flops)

    def get(self, metric: str) -> int:
        return self.params if metric == "params" else self.flops


ZERO = Cost(0, 0)


def _bias(lin: nn.Linear) -> int:
    return 1 if lin.bias is not None else 0


def group_cost(block: nn.Module, tower: TowerSpec, head_dim: int, tokens: int) -> Cost:
    """What one attention head group of `block` costs: a key/value head (its k and v rows and biases)
    with the `g` query heads that share it (their q rows and biases, their output-projection columns and
    their share of the two attention products). Under multi-head attention g = 1: one head."""
    lin = block_linears(block, tower)
    q, k, v, o = (lin[r][1] for r in ("q", "k", "v", "o"))
    g = q.out_features // k.out_features
    q_params = head_dim * (q.in_features + _bias(q) + o.out_features)
    kv_params = head_dim * (k.in_features + _bias(k) + v.in_features + _bias(v))
    per_token = 2 * head_dim * (g * (q.in_features + o.out_features) + k.in_features + v.in_features) \
        + g * 2 * 2 * tokens * head_dim
    return Cost(g * q_params + kv_params, per_token * tokens)


def head_cost(block: nn.Module, tower: TowerSpec, head_dim: int, tokens: int) -> Cost:
    """What one query head of `block` costs with its share of its group's key/value rows (rounded down
    under grouped-query attention, where heads are only removed in whole groups: `group_cost`)."""
    group = group_cost(block, tower, head_dim, tokens)
    lin = block_linears(block, tower)
    g = lin["q"][1].out_features // lin["k"][1].out_features
    return Cost(group.params // g, group.flops // g)


def channel_cost(block: nn.Module, tower: TowerSpec, tokens: int) -> Cost:
    """What one FFN channel costs: an fc1 row (and bias entry), a gate row of a gated MLP (SwiGLU's
    three matrices) and an fc2 column."""
    lin = block_linears(block, tower)
    rows = [lin[r][1] for r in ("fc1", "gate") if r in lin]
    fc2 = lin["fc2"][1]
    params = sum(m.in_features + _bias(m) for m in rows) + fc2.out_features
    return Cost(params, 2 * (sum(m.in_features for m in rows) + fc2.out_features) * tokens)


def restore_cost(width: int, teacher_width: int, tokens: int) -> Cost:
    """The linear map (with bias) from `width` kept hidden channels back to the teacher's width."""
    return Cost(width * teacher_width + teacher_width, 2 * width * teacher_width * tokens)


def hidden_channel_cost(blocks: nn.ModuleList, tower: TowerSpec, tokens: int, teacher_width: int) -> Cost:
    """What one channel of the residual stream costs in the blocks: a q/k/v and fc1 input column and an
    output-projection and fc2 row (and bias entry) per block, a weight and bias in each LayerNorm over
    the stream, and an input column of the map back to the teacher's width."""
    params = flops = 0
    for block in blocks:
        lin = {r: m for r, (_, m) in block_linears(block, tower).items()}
        width = lin["q"].in_features
        touched = lin["q"].out_features + lin["k"].out_features + lin["v"].out_features + lin["o"].in_features \
            + lin["fc1"].out_features + lin["fc2"].in_features
        params += touched + _bias(lin["o"]) + _bias(lin["fc2"])
        params += sum(2 for m in block.modules() if isinstance(m, nn.LayerNorm) and m.normalized_shape == (width,))
        flops += 2 * touched * tokens
    column = restore_cost(1, teacher_width, tokens)
    return Cost(params + column.params - teacher_width, flops + column.flops)


def block_cost(block: nn.Module, tower: TowerSpec, head_dim: int, tokens: int) -> Cost:
    """The whole block: every parameter in it, every linear's FLOPs and the attention products."""
    params = sum(p.numel() for p in block.parameters())
    lin = block_linears(block, tower)
    linear_flops = sum(2 * m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear)) * tokens
    heads = lin["q"][1].out_features // head_dim
    return Cost(params, linear_flops + heads * 2 * 2 * tokens * head_dim * tokens)


def blocks_cost(model: nn.Module, adapter: Adapter, head_dims: dict[str, int], tokens: dict[str, int]) -> dict[str, Cost]:
    """Per tower, the summed cost of its blocks (one sequence through each tower)."""
    out = {}
    for tower in adapter.towers:
        _, blocks = block_list(model, tower)
        total = ZERO
        for block in blocks:
            total = total + block_cost(block, tower, head_dims[tower.name], tokens[tower.name])
        out[tower.name] = total
    return out
