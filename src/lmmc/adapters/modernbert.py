"""ModernBERT text encoders (gte-modernbert, modernbert-embed): one text tower whose fused linears are split.

ModernBERT computes q, k and v with one linear (`Wqkv`) and both halves of its GLU with another (`Wi`).
`prepare` splits each into one linear per role, whose outputs are concatenated in the fused order, so the
attention and MLP code run unchanged while every pass sees the roles it prunes as separate matrices."""

import torch
from torch import nn

from lmmc.adapters import Adapter, BlockLayout, TowerSpec
from lmmc.adapters.bert import embed_sentences


class SplitLinear(nn.Module):
    """A fused linear as one linear per part (`names`, in the fused output's order); the output is their
    concatenation, so the parts may shrink (fewer heads, fewer channels) as long as their order holds."""

    def __init__(self, fused: nn.Linear, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        width = fused.out_features // len(names)
        for i, name in enumerate(names):
            part = nn.Linear(fused.in_features, width, bias=fused.bias is not None, device=fused.weight.device,
                             dtype=fused.weight.dtype)
            if fused.weight.device.type != "meta":
                with torch.no_grad():
                    part.weight.copy_(fused.weight[i * width:(i + 1) * width])
                    if fused.bias is not None:
                        part.bias.copy_(fused.bias[i * width:(i + 1) * width])
            self.add_module(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.names], dim=-1)


_SPLITS = {"attn.Wqkv": ("q", "k", "v"), "mlp.Wi": ("up", "gate")}


def _prepare(model: nn.Module) -> None:
    # Only the teacher's first block reads the embeddings' own norm and has no attn_norm. A student whose
    # first block came from a later teacher block keeps that block's norm, which the config's build omits.
    cfg = model.config
    origin = getattr(cfg, "lmmc_teacher_layers", None)
    if origin and origin[0] != 0 and isinstance(model.layers[0].attn_norm, nn.Identity):
        model.layers[0].attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
    # Eager attention masks with a large negative number: a padded query whose window holds only padding
    # then gets finite weights. Under SDPA, OpenVINO's conversion turns such a row into NaN, which the next
    # block's zero attention weights carry into every token (0 * NaN).
    model.set_attn_implementation("eager")
    for layer in model.layers:
        if isinstance(layer.attn.Wqkv, nn.Linear):
            layer.attn.Wqkv = SplitLinear(layer.attn.Wqkv, _SPLITS["attn.Wqkv"])
        if isinstance(layer.mlp.Wi, nn.Linear):
            # ModernBertMLP: act(first half) * second half, the second half being the gate.
            layer.mlp.Wi = SplitLinear(layer.mlp.Wi, _SPLITS["mlp.Wi"])


def _standard_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The split linears' weights and biases concatenated back into ModernBERT's fused ones."""
    out = dict(state)
    for key in state:
        for fused, parts in _SPLITS.items():
            prefix, _, tail = key.partition(f".{fused}.{parts[0]}.")
            if tail:  # e.g. layers.0 / weight
                names = [f"{prefix}.{fused}.{p}.{tail}" for p in parts]
                out[f"{prefix}.{fused}.{tail}"] = torch.cat([state[n] for n in names])
                for n in names:
                    del out[n]
    return out


_LAYOUT = BlockLayout(
    q=("attn.Wqkv.q",), k=("attn.Wqkv.k",), v=("attn.Wqkv.v",), o=("attn.Wo",),
    fc1=("mlp.Wi.up",), fc2=("mlp.Wo",), gate=("mlp.Wi.gate",),
)

ADAPTERS = (
    Adapter(
        family="modernbert",
        model_types=("modernbert",),
        # The residual stream ends in the model's final_norm, outside every block: no hidden-size stage.
        towers=(TowerSpec("text", "text", ("layers",), _LAYOUT, None, embed_sentences),),
        auto_class="AutoModel",
        task_metric="neighbour",
        sentence_pooling=True,
        prepare=_prepare,
        standard_state=_standard_state,
    ),
)
