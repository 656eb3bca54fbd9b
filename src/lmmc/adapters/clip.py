"""Dual encoders (CLIP, SigLIP): a text and a vision tower whose embeddings share one space."""

from lmmc.adapters import Adapter, BlockLayout, TowerSpec

_LAYOUT = BlockLayout(
    q=("self_attn.q_proj",), k=("self_attn.k_proj",), v=("self_attn.v_proj",),
    o=("self_attn.out_proj",), fc1=("mlp.fc1",), fc2=("mlp.fc2",),
)


def _clip_text(model, inputs):
    out = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return out.last_hidden_state, model.text_projection(out.pooler_output)


def _clip_vision(model, inputs):
    out = model.vision_model(pixel_values=inputs["pixel_values"])
    return out.last_hidden_state, model.visual_projection(out.pooler_output)


def _siglip_text(model, inputs):
    # SigLIP's pooler output already includes its head; there is no separate projection.
    out = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return out.last_hidden_state, out.pooler_output


def _siglip_vision(model, inputs):
    out = model.vision_model(pixel_values=inputs["pixel_values"])
    return out.last_hidden_state, out.pooler_output


ADAPTERS = (
    Adapter(
        family="clip",
        model_types=("clip",),
        towers=(
            TowerSpec("text", "text", ("text_model.encoder.layers",), _LAYOUT, "text_config", _clip_text),
            TowerSpec("vision", "image", ("vision_model.encoder.layers",), _LAYOUT, "vision_config", _clip_vision),
        ),
        auto_class="AutoModel",
        task_metric="zero_shot",
    ),
    Adapter(
        family="siglip",
        model_types=("siglip",),
        towers=(
            TowerSpec("text", "text", ("text_model.encoder.layers",), _LAYOUT, "text_config", _siglip_text),
            TowerSpec("vision", "image", ("vision_model.encoder.layers",), _LAYOUT, "vision_config", _siglip_vision),
        ),
        auto_class="AutoModel",
        task_metric="zero_shot",
        text_padding="max_length",
    ),
)
