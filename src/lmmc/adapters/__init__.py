"""Model adapters: what a pass needs to know about an architecture, kept as data plus a few functions.

An adapter names the towers of a model (text, vision, language, ...), where each tower's transformer
blocks live, the attention and MLP linears inside a block, how a tower turns inputs into its pooled
embedding, and (generative models) the bridge linears between towers, such as LLaVA's projector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from lmmc.errors import LmmcError
from lmmc.pooling import normalises

ROLES = ("q", "k", "v", "o", "fc1", "fc2")
# A gated MLP (SwiGLU) has a third linear: gate = gate_proj, cut together with fc1 = up_proj.
OPTIONAL_ROLES = ("gate",)


@dataclass(frozen=True)
class BlockLayout:
    """Names of a block's linears relative to the block; the first name that exists wins, which keeps
    one adapter working across the renames transformers makes between releases."""

    q: tuple[str, ...]
    k: tuple[str, ...]
    v: tuple[str, ...]
    o: tuple[str, ...]
    fc1: tuple[str, ...]
    fc2: tuple[str, ...]
    gate: tuple[str, ...] = ()  # empty: the MLP has no gate


@dataclass(frozen=True)
class HiddenLayout:
    """Where a tower's residual stream starts and ends, for removing hidden channels: the module holding
    its embeddings (every nn.Embedding and LayerNorm in it is narrowed) and the LayerNorm, relative to a
    block, that produces the block's output (on the last block: the tower's last hidden state)."""

    embeddings: str
    final_norm: tuple[str, ...]


@dataclass(frozen=True)
class ImageTokens:
    """How a generative image-text model marks an image in its token sequence: the config attribute with
    the id of the image token, how many of them one image becomes, and whether pixel_values carry an
    images axis ([batch, images, channels, height, width]) rather than one image per sample."""

    id_key: str
    count: Callable[[object], int]  # config -> image tokens per image
    images_axis: bool = False

    def token_id(self, config) -> int:
        return int(getattr(config, self.id_key))


# (model, inputs) -> (last hidden state, pooled embedding before normalisation)
EmbedFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TowerSpec:
    name: str
    modality: Literal["text", "image"]
    layers: tuple[str, ...]  # dotted paths to the ModuleList of blocks, first existing wins
    layout: BlockLayout
    config_key: str | None  # sub-config with this tower's sizes ("text_config"), None = top level
    embed: EmbedFn
    hidden: HiddenLayout | None = None  # None: this tower's hidden channels cannot be removed
    # What `embed` reads, when not the modality's usual inputs: a decoder of an image-text model also
    # needs the pixels, since the image features are merged into its token embeddings.
    inputs: tuple[str, ...] = ()
    # (block, kept query heads) -> None, called before a block's heads are removed, for per-head state
    # outside the block's linears (MPNet: the relative-position bias all blocks share).
    keep_heads: Callable[[nn.Module, torch.Tensor], None] | None = None


@dataclass(frozen=True)
class BridgeSpec:
    """Linears between two towers that belong to no block (LLaVA's multi-modal projector). They are
    pruned as one group named `name`, as block 0, right after the blocks of tower `after`, whose output
    they read."""

    name: str
    after: str
    linears: tuple[tuple[str, str], ...]  # (role, dotted path of the nn.Linear in the model)


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    towers: tuple[TowerSpec, ...]
    auto_class: str  # transformers class that loads the whole model
    # "neighbour": nearest-neighbour agreement among held-out embeddings of one tower;
    # "zero_shot": image->text zero-shot agreement between two towers;
    # "generation": next-token agreement of a generative model (teacher-forced and greedy).
    task_metric: Literal["neighbour", "zero_shot", "generation"]
    # "encoder": towers map inputs to embeddings; "generative": the last tower is a decoder with an LM head.
    kind: Literal["encoder", "generative"] = "encoder"
    bridges: tuple[BridgeSpec, ...] = ()
    # Generative image-text models: (model, pixel_values) -> the image features as the decoder receives
    # them [batch, image tokens, hidden], i.e. the bridge's output that replaces the image tokens.
    image_features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    image_tokens: ImageTokens | None = None
    # Parameter-name prefixes of modules kept as the teacher has them: neither pruned nor distilled (BLIP-2's
    # Q-Former and its queries).
    fixed: tuple[str, ...] = ()
    # config -> the token that ends an answer, where the model's is not its tokenizer's eos (BLIP-2's OPT
    # decoders end a text with a newline, their text config's eos_token_id).
    answer_end: Callable[[object], int] | None = None
    # "max_length": every text is padded to the text tower's full length, as the model was trained
    # (SigLIP: its embedding is the last position's, which only then is the same for every text).
    text_padding: Literal["longest", "max_length"] = "longest"
    # Whether `embed` pools as a sentence-transformers modules.json says (lmmc.pooling), the mean without one.
    sentence_pooling: bool = False
    # Rewrites a model just built or loaded into the layout the towers name, in place (ModernBERT: fused
    # linears split per role); every model lmmc builds or loads of this family goes through it.
    prepare: Callable[[nn.Module], None] | None = None
    # The inverse of `prepare` on a state dict: the prepared model's tensors in the layout the family's own
    # class loads (ModernBERT: the split linears fused again), so a student whose shapes the config
    # describes is saved as a standard checkpoint.
    standard_state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def prepared(self, model: nn.Module) -> nn.Module:
        if self.prepare is not None:
            self.prepare(model)
        return model

    def tower(self, name: str) -> TowerSpec:
        for spec in self.towers:
            if spec.name == name:
                return spec
        raise KeyError(name)


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    mod = root
    for part in dotted.split("."):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


def block_list(model: nn.Module, tower: TowerSpec) -> tuple[str, nn.ModuleList]:
    """The tower's blocks and their dotted path in the model."""
    for path in tower.layers:
        mod = _get(model, path)
        if isinstance(mod, nn.ModuleList):
            return path, mod
    raise LmmcError(f"the {tower.name} tower has no blocks at {tower.layers}; this transformers version "
                    f"lays the model out differently than the adapter expects")


def block_linears(block: nn.Module, tower: TowerSpec) -> dict[str, tuple[str, nn.Linear]]:
    """Role ('q', 'k', ..., 'fc2', and 'gate' where the layout names one) -> (name relative to the block,
    the linear)."""
    out = {}
    for role in (*ROLES, *(r for r in OPTIONAL_ROLES if getattr(tower.layout, r))):
        for name in getattr(tower.layout, role):
            mod = _get(block, name)
            if isinstance(mod, nn.Linear):
                out[role] = (name, mod)
                break
        else:
            linears = sorted(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
            raise LmmcError(f"the {tower.name} tower's block ({type(block).__name__}) has no '{role}' linear at "
                            f"{getattr(tower.layout, role)}, only {linears}: lmmc does not support this layout (fused "
                            f"projections such as qkv_proj or gate_up_proj, for one); compile a model whose q, k, "
                            f"v and FFN matrices are linears of their own (for a decoder, Llama-, Qwen2- or "
                            f"Mistral-style)")
    return out


@dataclass(frozen=True)
class PrunableLinear:
    """One prunable matrix: its tower, block index, role and the full name of its weight."""

    tower: str
    block: int
    role: str
    param: str  # e.g. "encoder.layer.0.attention.self.query.weight"
    module: nn.Linear


def prunable_linears(model: nn.Module, adapter: Adapter) -> list[PrunableLinear]:
    """The 2-D weights inside transformer blocks of every tower, then the bridges' linears (their `tower`
    is the bridge's name, their block 0); embeddings and heads are excluded."""
    out = []
    for tower in adapter.towers:
        path, blocks = block_list(model, tower)
        for i, block in enumerate(blocks):
            for role, (name, lin) in block_linears(block, tower).items():
                out.append(PrunableLinear(tower.name, i, role, f"{path}.{i}.{name}.weight", lin))
    for bridge in adapter.bridges:
        for role, lin_path in bridge_linears(model, bridge).items():
            out.append(PrunableLinear(bridge.name, 0, role, f"{lin_path}.weight", _get(model, lin_path)))
    return out


def bridge_linears(model: nn.Module, bridge: BridgeSpec) -> dict[str, str]:
    """Role -> dotted path of each linear of a bridge, checked to exist."""
    out = {}
    for role, path in bridge.linears:
        if not isinstance(_get(model, path), nn.Linear):
            raise LmmcError(f"the {bridge.name} has no linear at '{path}'; this transformers version lays the "
                            f"model out differently than the adapter expects")
        out[role] = path
    return out


def tower_config(model: nn.Module, tower: TowerSpec):
    cfg = model.config
    return getattr(cfg, tower.config_key) if tower.config_key else cfg


def head_dim(model: nn.Module, tower: TowerSpec) -> int:
    cfg = tower_config(model, tower)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_heads(model: nn.Module, tower: TowerSpec) -> int:
    """Key/value heads of a block's attention: fewer than the query heads under grouped-query attention
    (each k/v head serves heads // kv_heads query heads), as many for multi-head attention."""
    cfg = tower_config(model, tower)
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def input_names(tower: TowerSpec) -> list[str]:
    if tower.inputs:
        return list(tower.inputs)
    return ["input_ids", "attention_mask"] if tower.modality == "text" else ["pixel_values"]


def dynamic_axes(tower: TowerSpec) -> dict[str, dict[int, str]]:
    """Input name -> {axis: symbolic name} for export: batch always, sequence for text."""
    if tower.modality == "text":
        return {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    return {"pixel_values": {0: "batch"}}


TRACE_TOKENS = 16  # the text length towers are traced at for export


def example_inputs(model: nn.Module, tower: TowerSpec, batch: int = 2,
                   seq: int = TRACE_TOKENS) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing and timing. Sizes above 1 so an exporter keeps batch and sequence symbolic."""
    cfg = tower_config(model, tower)
    gen = torch.Generator().manual_seed(0)
    if tower.modality == "text":
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
        return ids, torch.ones_like(ids)
    return (torch.randn(batch, getattr(cfg, "num_channels", 3), cfg.image_size, cfg.image_size, generator=gen),)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


class TowerModule(nn.Module):
    """One tower as a module with positional tensor inputs, for export and runtime comparison.

    Outputs: the last hidden state and the pooled embedding, L2-normalised for the passes' objectives;
    `deployed` gives the embedding as the model's users get it instead (`pooling.normalises`)."""

    def __init__(self, model: nn.Module, tower: TowerSpec, deployed: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tower = tower
        self.names = input_names(tower)
        self.normalise = normalises(model.config) if deployed else True

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.tower.embed(self.model, dict(zip(self.names, inputs)))
        return hidden, l2_normalise(pooled) if self.normalise else pooled


def _registry() -> dict[str, Adapter]:
    from lmmc.adapters import bert, blip2, clip, idefics3, llava, modernbert, mpnet, vit

    out = {}
    for adapter in (*bert.ADAPTERS, *mpnet.ADAPTERS, *modernbert.ADAPTERS, *vit.ADAPTERS, *clip.ADAPTERS,
                    *llava.ADAPTERS, *idefics3.ADAPTERS, *blip2.ADAPTERS):
        for model_type in adapter.model_types:
            out[model_type] = adapter
    return out


def generative_family(family: str | None) -> bool:
    """Whether `family` (the adapter an output's report.json names) is a generative model's."""
    return any(a.family == family and a.kind == "generative" for a in _registry().values())


def supported_model_types() -> list[str]:
    return sorted(_registry())


def get_adapter(model_type: str) -> Adapter:
    registry = _registry()
    if model_type not in registry:
        whole = {"clip_vision_model": "clip", "clip_text_model": "clip", "siglip_vision_model": "siglip",
                 "siglip_text_model": "siglip"}.get(model_type)
        if whole:  # one tower of a dual encoder, saved alone (CLIPVisionModelWithProjection, say)
            raise LmmcError(f"model_type '{model_type}' is one tower of a {whole} model saved alone; lmmc compiles the "
                            f"whole {whole} checkpoint it came from (both towers, model_type '{whole}'). To shrink "
                            f"one tower only, compile that checkpoint with a keep per tower, e.g. antgmm's "
                            f"keep: {{text: 1.0, vision: 0.5}}")
        # SigLIP 2 comes in two kinds: fixed resolution (SigLIP's architecture) and NaFlex (its own)
        naflex = (" (SigLIP 2's NaFlex checkpoints, whose vision tower reads images at their own aspect ratio; its "
                  "fixed-resolution checkpoints, e.g. google/siglip2-base-patch16-224, are model_type 'siglip', "
                  "which lmmc compiles)") if model_type == "siglip2" else ""
        raise LmmcError(f"model_type '{model_type}'{naflex} is not supported; supported model types: "
                        f"{', '.join(sorted(registry))}")
    return registry[model_type]
