"""ONNX export of a generative vision-language model (LLaVA, Idefics3 / SmolVLM or BLIP-2 layout): the vision
encoder with its projector as one graph, the decoder with a key/value cache as another, and the token
embedding table as .npy."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn
from transformers import DynamicCache

from lmmc.adapters import get_adapter
from lmmc.artifact import Artifact
from lmmc.errors import LmmcError
from lmmc.export.onnx import save_program
from lmmc.pipeline import Pass, PassConfig, register
from lmmc.runtime.generate import SPEC

FORMAT = "lmmc-generative/1"
VISION = "vision.onnx"
DECODER = "decoder.onnx"
EMBEDDINGS = "embed_tokens.npy"
DECODER_INPUTS = ["inputs_embeds", "attention_mask", "position_ids"]


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The inner model, its decoder (LLaVA: language_model, Idefics3: text_model, BLIP-2: the OPT decoder of
    language_model) and the LM head, or one clear error."""
    inner = getattr(model, "model", None)
    decoder = next((getattr(inner, n) for n in ("language_model", "text_model") if hasattr(inner, n)), None)
    head = getattr(model, "lm_head", None)
    causal = getattr(model, "language_model", None)
    if decoder is None and hasattr(getattr(causal, "model", None), "decoder"):  # BLIP-2: a whole OPTForCausalLM
        inner, decoder, head = model, causal.model.decoder, getattr(causal, "lm_head", None)
    if decoder is None or head is None or not hasattr(inner, "get_image_features") or not hasattr(decoder, "layers"):
        raise LmmcError(f"{type(model).__name__} is not a generative vision-language model (a vision tower, a "
                        f"projector and a decoder with an LM head, laid out as LlavaForConditionalGeneration, "
                        f"Idefics3ForConditionalGeneration or Blip2ForConditionalGeneration); export encoder models "
                        f"with the 'onnx' pass instead")
    return inner, decoder, head


def _cache_shapes(decoder: nn.Module) -> list[tuple[int, int]]:
    """(key/value heads, head size) of every decoder layer, read from its weights: structured pruning
    leaves layers with different numbers of heads than the config states."""
    shapes = []
    for layer in decoder.layers:
        attn = layer.self_attn
        shapes.append((attn.k_proj.out_features // attn.head_dim, attn.head_dim))
    return shapes


class VisionModule(nn.Module):
    """LLaVA: pixel_values [batch, C, H, W] -> image features in the decoder's width, one row per image token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner = _parts(model)[0]
        # Only the vision side, so the weight map and the size check see no decoder weights.
        self.tower, self.projector = inner.vision_tower, inner.multi_modal_projector
        layer = inner.config.vision_feature_layer
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.start = 1 if inner.config.vision_feature_select_strategy == "default" else 0  # drops CLS

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The model's own get_image_features splits its result into a list per image, which would fix the
        # batch axis at export; this selects the same layers and CLS handling without splitting.
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        return self.projector(torch.cat([hidden[i][:, self.start:] for i in self.layers], dim=-1))


class Idefics3VisionModule(nn.Module):
    """Idefics3: pixel_values [batch, images, C, H, W] -> image features [batch, images x image tokens,
    decoder width], the images of a row one after the other, as the model writes them over its image tokens.

    Every image is a full square at the vision encoder's size, as Idefics3's processor gives it (image
    splitting, which the adapter refuses, would give crops of the same size), so the graph takes no
    pixel_attention_mask. It encodes every image it is given: the all-zero images a processor pads a
    batch with, when its prompts hold different numbers of images or crops, the model skips and the
    runtime refuses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner = _parts(model)[0]
        self.encoder, self.connector = inner.vision_model, inner.connector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, images = pixel_values.shape[:2]
        # Without a patch mask the encoder attends over every patch, as it does for an unpadded image.
        hidden = self.encoder(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state
        features = self.connector(hidden)
        return features.reshape(batch, images * features.shape[1], features.shape[2])


class Blip2VisionModule(nn.Module):
    """BLIP-2: pixel_values [batch, C, H, W] -> the projected Q-Former outputs [batch, num_query_tokens,
    decoder width], as get_image_features computes them, from the vision side's modules alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder, self.qformer, self.projector = model.vision_model, model.qformer, model.language_projection
        self.query_tokens = model.query_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.encoder(pixel_values=pixel_values).last_hidden_state
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask)
        return self.projector(out.last_hidden_state.to(image.dtype))


class DecoderModule(nn.Module):
    """One decoder step: embeddings, mask and positions plus a flat past cache -> logits and present cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _, self.decoder, self.head = _parts(model)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, use_cache=True)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (self.head(out.last_hidden_state), *present)


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs warnings with the whole traced graph (tens of KB) on stderr when it fails on a
    guard; keep torch's loggers to errors while exporting."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _summary(err: Exception) -> str:
    """The exporter's error in one line: the first line of its exception summary where it has one, and
    the source line it failed on."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if line.strip()]
    head = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "## Exception summary"),
                lines[0] if lines else type(err).__name__)
    where = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("The following call raised")),
                 "")
    return f"{head[:300]}{f' (at {where[:200]})' if where else ''}"


def _export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], dynamic_shapes: tuple,
            path: Path, opset: int) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # The exporter warns about every merged symbolic axis and deprecated internals; none is actionable.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # On a failure torch.export prints the partial graph (tens of KB) to stderr itself: keep it, and
        # hand it on with the error rather than to the terminal.
        printed = io.StringIO()
        try:
            with _quiet_torch_logs(), contextlib.redirect_stderr(printed):
                program = torch.onnx.export(module, args, input_names=names, output_names=outputs,
                                            dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                            verbose=False)
        except Exception as err:  # whatever torch.export raises, its message pages long
            # A model that passed check_config and still fails to trace is a bug: one line here, and the
            # exporter's full message and output stay chained to it, so the crash log's traceback keeps them.
            if printed.getvalue():
                err.add_note(f"the exporter printed:\n{printed.getvalue()}")
            raise RuntimeError(f"torch.onnx.export could not trace {type(module).__name__} for {path.name}: "
                               f"{_summary(err)}") from err
        sys.stderr.write(printed.getvalue())
    return save_program(program, path, module, opset)


def export_vision(model: nn.Module, path: Path, opset: int = 20) -> dict[str, Any]:
    """The vision tower and projector as one ONNX: pixel_values [batch, 3, H, W] (Idefics3: [batch,
    images, 3, H, W]) -> image_features [batch, image tokens, decoder width]; dynamic batch (and images)."""
    vision_cfg = model.config.vision_config
    side = vision_cfg.image_size
    image = (getattr(vision_cfg, "num_channels", 3), side, side)
    batch = torch.export.Dim("batch")
    adapter = get_adapter(model.config.model_type)
    if adapter.image_tokens.images_axis:
        module, pixels = Idefics3VisionModule(model), torch.randn(2, 3, *image)
        axes = {0: batch, 1: torch.export.Dim("images")}
    elif adapter.family == "blip-2":
        module, pixels, axes = Blip2VisionModule(model), torch.randn(2, *image), {0: batch}
    else:
        module, pixels, axes = VisionModule(model), torch.randn(2, *image), {0: batch}
    return _export(module.eval(), (pixels,), ["pixel_values"], ["image_features"], (axes,), path, opset)


def export_decoder(model: nn.Module, path: Path, opset: int = 20) -> dict[str, Any]:
    """The decoder and LM head as one ONNX with a key/value cache: inputs_embeds [batch, sequence, width],
    attention_mask [batch, past + sequence], position_ids [batch, sequence], past_key_values.{i}.key/value
    [batch, kv heads, past, head size] -> logits [batch, sequence, vocab] and present.{i}.key/value.

    One graph serves prefill and decode: it runs with an empty past (length 0), as every prefill in the
    runtime does, so no separate prefill graph is needed."""
    _, decoder, _ = _parts(model)
    shapes = _cache_shapes(decoder)
    width = decoder.config.hidden_size
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past", "total"))
    # Example sizes above 1 keep the exporter from specialising an axis to a constant.
    embeds = torch.randn(2, 3, width)
    mask = torch.ones(2, 5, dtype=torch.long)
    positions = torch.arange(2, 5).repeat(2, 1)
    cache = [torch.randn(2, heads, 2, size) for heads, size in shapes for _ in ("key", "value")]
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in cache))
    metrics = _export(DecoderModule(model).eval(), (embeds, mask, positions, *cache),
                      DECODER_INPUTS + past_names(len(shapes)), ["logits", *present_names(len(shapes))],
                      dynamic, path, opset)
    return {**metrics, "layers": len(shapes), "kv_heads": [h for h, _ in shapes]}


def export_embeddings(model: nn.Module, path: Path) -> dict[str, Any]:
    """The token embedding table as float32 .npy: what the model's input embedding gives for every id (a
    scaled embedding's factor included), so the runtime looks tokens up without PyTorch."""
    table = model.get_input_embeddings()
    with torch.no_grad():
        rows = table(torch.arange(table.num_embeddings)).float().cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, rows, allow_pickle=False)
    return {"file": path.name, "shape": list(rows.shape)}


def _token_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def export_generative(model: nn.Module, folder: Path, opset: int = 20, chat_template: bool = False) -> dict[str, Any]:
    """Write vision.onnx, decoder.onnx, embed_tokens.npy and generative.json (the token ids the runtime
    needs, and whether prompts go in the chat template, as the compile wrote them) into `folder`."""
    model = model.cpu().eval()
    _parts(model)
    image_tokens = get_adapter(model.config.model_type).image_tokens
    text_cfg = model.config.text_config
    gen_cfg = getattr(model, "generation_config", None)
    # transformers' generate stops at the generation config's end ids alone: none there means none at all
    eos = _token_ids(text_cfg.eos_token_id if gen_cfg is None else gen_cfg.eos_token_id)
    pad = getattr(gen_cfg, "pad_token_id", None)
    pad = pad if pad is not None else text_cfg.pad_token_id
    metrics = {"vision": export_vision(model, folder / VISION, opset),
               "decoder": export_decoder(model, folder / DECODER, opset),
               "embeddings": export_embeddings(model, folder / EMBEDDINGS)}
    spec = {"format": FORMAT, "vision": VISION, "decoder": DECODER, "embeddings": EMBEDDINGS,
            "image_token_index": image_tokens.token_id(model.config),
            "image_tokens_per_image": image_tokens.count(model.config),
            "images_axis": image_tokens.images_axis, "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
            "layers": metrics["decoder"]["layers"], "chat_template": chat_template,
            # the runtime refuses a prompt and answer longer than this, as the compile refuses such lengths
            "max_positions": int(text_cfg.max_position_embeddings)}
    (folder / SPEC).write_text(json.dumps(spec, indent=1))
    return metrics


def rope_types(text_config: Any) -> list[str]:
    """The rotary-embedding types of a decoder's config: rope_parameters (transformers 5) or rope_scaling,
    either one mapping or one mapping per layer type."""
    params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    nested = [v for v in params.values() if isinstance(v, dict)]
    return sorted({str(p.get("rope_type", p.get("type", "default"))) for p in (nested or [params])})


def check_config(config: Any) -> None:
    """Refuse a model config the generative export cannot trace, from its config alone (check_model with
    the config, which the export also runs before it traces).

    Dynamic NTK rotary embeddings ("dynamic") recompute their frequencies in Python whenever a position
    passes the longest sequence seen so far, a branch on the data that torch.export cannot trace; the
    other types (linear, llama3, yarn, longrope) are fixed or choose with torch.where and export."""
    text_config = getattr(config, "text_config", None)
    dynamic = [t for t in rope_types(text_config) if "dynamic" in t] if text_config is not None else []
    if dynamic:
        raise LmmcError(f"this {config.model_type} model's decoder uses rope_type {dynamic[0]!r}, whose rotary "
                        f"frequencies change with the sequence length in Python, which the 'onnx_generative' "
                        f"export cannot trace; it exports rope types such as linear, llama3 and yarn (or remove "
                        f"'onnx_generative' and set 'validate: false' to compress it without export)")


class GenerativeOnnxConfig(PassConfig):
    opset: int = Field(20, ge=18, le=23, description="ONNX opset")

    def check_model(self, adapter, config: Any = None) -> None:
        """What this export refuses of a model family and, given its config, of the model."""
        if getattr(adapter, "kind", "encoder") != "generative":
            raise LmmcError(f"the 'onnx_generative' pass exports generative models; {adapter.family} is an "
                            f"encoder family: use the 'onnx' pass")
        if config is not None:
            check_config(config)


@register
class GenerativeOnnxPass(Pass):
    """Export a generative vision-language student for greedy generation with a KV cache.

    Recipe: ``export: [{onnx_generative: {opset: 20}}]``. Writes ``onnx/vision.onnx`` (the vision tower's
    artifact), ``onnx/decoder.onnx`` (the language tower's), ``onnx/embed_tokens.npy`` and
    ``onnx/generative.json``; ``lmmc.runtime.open_generative`` reads them back."""

    name = "onnx_generative"
    kind = "export"
    generative = True
    Config = GenerativeOnnxConfig
    needs = frozenset({"student"})
    provides = frozenset({"onnx"})

    def run(self, art: Artifact) -> dict[str, Any]:
        self.config.check_model(art.adapter, art.student.config)
        folder = art.workdir / "onnx"
        metrics = export_generative(art.student, folder, self.config.opset, bool(art.calib and art.calib.chat_template))
        for tower in art.adapter.towers:
            art.onnx[tower.name] = folder / (VISION if tower.modality == "image" else DECODER)
        art.student.to(art.device)
        return metrics
