"""LLaVA (LlavaForConditionalGeneration): a CLIP or SigLIP vision tower, a projector, a Llama/Qwen2-style
decoder with grouped-query attention and a SwiGLU MLP.

Towers: "vision" (modality image: the vision tower's encoder blocks) and "language" (modality text: the
decoder's blocks; its inputs are input_ids, attention_mask and pixel_values, because the image features
replace the image tokens of input_ids before the first block). Decoder block roles: q/k/v/o, fc1 =
mlp.up_proj, gate = mlp.gate_proj (cut together with fc1), fc2 = mlp.down_proj.

The projector is the bridge "projector": roles fc1 = model.multi_modal_projector.linear_1 and fc2 =
model.multi_modal_projector.linear_2, pruned after the vision blocks and before the decoder's, so the
decoder calibrates on image features from the pruned vision tower and projector."""

import torch

from lmmc.adapters import Adapter, BlockLayout, BridgeSpec, ImageTokens, TowerSpec

_VISION_LAYOUT = BlockLayout(
    q=("self_attn.q_proj",), k=("self_attn.k_proj",), v=("self_attn.v_proj",),
    o=("self_attn.out_proj",), fc1=("mlp.fc1",), fc2=("mlp.fc2",),
)
DECODER_LAYOUT = BlockLayout(
    q=("self_attn.q_proj",), k=("self_attn.k_proj",), v=("self_attn.v_proj",),
    o=("self_attn.o_proj",), fc1=("mlp.up_proj",), fc2=("mlp.down_proj",), gate=("mlp.gate_proj",),
)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector's output per image [batch, image tokens, decoder hidden]: what the decoder reads at
    the image-token positions."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    return torch.stack(list(out.pooler_output))


def image_token_count(config) -> int:
    """Features one image becomes, as transformers computes them: the vision tower's patches, plus CLIP's
    class token, less the first feature under the "default" selection. The config's image_seq_length is
    only the processor's default; the model never reads it, and a checkpoint may carry a stale one."""
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + (vision.model_type == "clip_vision_model")
    return tokens - (config.vision_feature_select_strategy == "default")


def _vision(model, inputs):
    # get_image_features returns the vision tower's outputs, its last hidden state included, with the
    # projected features as their pooler_output: one pass through the tower gives both
    out = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    return out.last_hidden_state, torch.stack(list(out.pooler_output)).mean(1)


def language(model, inputs):
    """The decoder's last hidden state and its next-token logits. No KV cache: a cache object passed to
    every block would collect keys across the calibration batches that block-sequential pruning replays."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"], use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


ADAPTERS = (
    Adapter(
        family="llava",
        model_types=("llava",),
        towers=(
            TowerSpec("vision", "image", ("model.vision_tower.encoder.layers",
                                          "model.vision_tower.vision_model.encoder.layers"),
                      _VISION_LAYOUT, "vision_config", _vision),
            TowerSpec("language", "text", ("model.language_model.layers",), DECODER_LAYOUT, "text_config",
                      language, inputs=("input_ids", "attention_mask", "pixel_values")),
        ),
        auto_class="AutoModelForImageTextToText",
        task_metric="generation",
        kind="generative",
        bridges=(BridgeSpec("projector", "vision", (("fc1", "model.multi_modal_projector.linear_1"),
                                                    ("fc2", "model.multi_modal_projector.linear_2"))),),
        image_features=image_features,
        image_tokens=ImageTokens("image_token_index", image_token_count),
    ),
)
