"""Parameter and FLOP counts of transformer blocks and of the units structured pruning removes.

FLOPs count matrix products only (2 per multiply-add), as `torch.utils.flop_counter` does: the linears
of a block plus the two attention products (scores and weighted values), which grow with the tokens."""

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


def head_cost(block: nn.Module, tower: TowerSpec, head_dim: int, tokens: int) -> Cost:
    """What one attention head of `block` costs: its q/k/v rows (and biases), its output-projection
    columns, and its share of the two attention products."""
    lin = block_linears(block, tower)
    hidden = lin["q"][1].in_features
    params = head_dim * (3 * hidden + sum(_bias(lin[r][1]) for r in ("q", "k", "v"))) + head_dim * lin["o"][1].out_features
    per_token = 2 * head_dim * (3 * hidden + lin["o"][1].out_features) + 2 * 2 * tokens * head_dim
    return Cost(params, per_token * tokens)


def channel_cost(block: nn.Module, tower: TowerSpec, tokens: int) -> Cost:
    """What one FFN channel costs: an fc1 row (and bias entry) and an fc2 column."""
    lin = block_linears(block, tower)
    fc1, fc2 = lin["fc1"][1], lin["fc2"][1]
    return Cost(fc1.in_features + _bias(fc1) + fc2.out_features, 2 * (fc1.in_features + fc2.out_features) * tokens)


def block_cost(block: nn.Module, tower: TowerSpec, head_dim: int, tokens: int) -> Cost:
    """The whole block: every parameter in it, every linear's FLOPs and the attention products."""
    params = sum(p.numel() for p in block.parameters())
    lin = block_linears(block, tower)
    linear_flops = sum(2 * m.in_features * m.out_features for m in (lin[r][1] for r in lin)) * tokens
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
