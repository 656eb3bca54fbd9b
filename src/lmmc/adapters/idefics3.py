"""Idefics3 / SmolVLM (Idefics3ForConditionalGeneration): a SigLIP-style vision encoder, a connector
(pixel shuffle, then one linear), a Llama decoder with grouped-query attention and a SwiGLU MLP.

Towers: "vision" (modality image: model.vision_model.encoder.layers) and "language" (modality text:
model.text_model.layers, read with input_ids, attention_mask and pixel_values; decoder roles as in
LLaVA: fc1 = up_proj, gate = gate_proj, fc2 = down_proj). The bridge "projector" has one linear, role
"proj" = model.connector.modality_projection.proj. pixel_values carry an images axis
[batch, images, channels, height, width]; one image becomes (image_size / patch_size / scale_factor)²
image tokens. A processor that splits images into crops is refused (`_refuse_image_splitting`)."""

import json

import torch
from transformers.utils import cached_file

from lmmc.adapters import Adapter, BlockLayout, BridgeSpec, ImageTokens, TowerSpec
from lmmc.adapters.llava import DECODER_LAYOUT, language
from lmmc.errors import LmmcError

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


def _saved_image_processor(ref: str) -> tuple[str, dict] | None:
    """The image processor's settings saved with the model at `ref` (a directory or a hub id) and the file
    they are in: processor_config.json's "image_processor", else preprocessor_config.json; None when
    neither is there or readable (the processor check then says what is missing)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        try:
            path = cached_file(ref, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
            data = json.loads(open(path, encoding="utf-8").read()) if path else None
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("image_processor"), dict):
            return name, data["image_processor"]
        if isinstance(data, dict) and name == "preprocessor_config.json":
            return name, data
    return None


def _refuse_image_splitting(model) -> None:
    """Refuse a model whose processor splits images into crops (Idefics3ImageProcessor's default, with
    size.longest_edge above max_image_size.longest_edge).

    With splitting, one image becomes a number of crops that depends on its size, plus a global view, and
    as many image-token groups; calibration, the export and the runtime assume one encoder-sized image per
    <image>. The processor is read from the directory the config came from, since this runs when the
    model is built from its config, before the processor check, which would otherwise report a token
    count mismatch."""
    ref = getattr(model.config, "name_or_path", "")
    saved = _saved_image_processor(ref) if ref else None
    if saved is None:
        return
    name, settings = saved
    # Splitting resizes an image to size.longest_edge and cuts it into max_image_size squares: with a size
    # no larger than one square (and resizing on), every image stays one square, as without splitting.
    size, square = (settings.get(k) for k in ("size", "max_image_size"))
    size, square = (v.get("longest_edge") if isinstance(v, dict) else None for v in (size, square))
    one_square = settings.get("do_resize", True) is not False and isinstance(size, int) and isinstance(square, int) \
        and size <= square
    if settings.get("do_image_splitting", True) is not False and not one_square:
        raise LmmcError(f"the processor of '{ref}' splits images into crops (do_image_splitting: true in its "
                        f"{name}), which lmmc does not support yet for {model.config.model_type} models; set "
                        f"\"do_image_splitting\": false in {name}, so that each <image> stands for one image")


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
        prepare=_refuse_image_splitting,
    ),
)
