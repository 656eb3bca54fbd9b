"""Idefics3 / SmolVLM (Idefics3ForConditionalGeneration): a SigLIP-style vision encoder, a connector
(pixel shuffle, then one linear), a Llama decoder with grouped-query attention and a SwiGLU MLP.

Towers: "vision" (modality image: model.vision_model.encoder.layers) and "language" (modality text:
model.text_model.layers, read with input_ids, attention_mask and pixel_values; decoder roles as in
LLaVA: fc1 = up_proj, gate = gate_proj, fc2 = down_proj). The bridge "projector" has one linear, role
"proj" = model.connector.modality_projection.proj. pixel_values carry an images axis
[batch, images, channels, height, width]; one image becomes (image_size / patch_size / scale_factor)²
image tokens (image splitting off)."""

import torch

from lmmc.adapters import Adapter, BlockLayout, BridgeSpec, ImageTokens, TowerSpec
from lmmc.adapters.llava import DECODER_LAYOUT, language

_VISION_LAYOUT = BlockLayout(
    q=("self_attn.q_proj",), k=("self_attn.k_proj",), v=("self_attn.v_proj",),
    o=("self_attn.out_proj",), fc1=("mlp.fc1",), fc2=("mlp.fc2",),
)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The connector's output per image [images, image tokens, decoder hidden]."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    return torch.stack(list(out.pooler_output))


def _vision(model, inputs):
    pixels = inputs["pixel_values"]
    out = model.model.vision_model(pixel_values=pixels.flatten(0, 1).to(model.dtype))
    return out.last_hidden_state, image_features(model, pixels).mean(1)


def _image_tokens(config) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2


ADAPTERS = (
    Adapter(
        family="idefics3",
        model_types=("idefics3",),
        towers=(
            TowerSpec("vision", "image", ("model.vision_model.encoder.layers",), _VISION_LAYOUT, "vision_config",
                      _vision),
            TowerSpec("language", "text", ("model.text_model.layers",), DECODER_LAYOUT, "text_config", language,
                      inputs=("input_ids", "attention_mask", "pixel_values")),
        ),
        auto_class="AutoModelForImageTextToText",
        task_metric="generation",
        kind="generative",
        bridges=(BridgeSpec("projector", "vision", (("proj", "model.connector.modality_projection.proj"),)),),
        image_features=image_features,
        image_tokens=ImageTokens("image_token_id", _image_tokens, images_axis=True),
    ),
)
