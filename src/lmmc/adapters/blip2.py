"""BLIP-2 with an OPT decoder (Blip2ForConditionalGeneration): a ViT-style vision encoder, a Q-Former whose
learned queries read the image, a projector, and an OPT decoder.

Towers: "vision" (modality image: vision_model.encoder.layers) and "language" (modality text: the OPT
decoder's blocks, language_model.model.decoder.layers, read with input_ids, attention_mask and
pixel_values). The Q-Former and its queries stay the teacher's (`fixed`: not pruned, not distilled). The
bridge "projector" has one linear, role "proj" = language_projection, which maps the Q-Former's
num_query_tokens outputs into the decoder's width; they replace the num_query_tokens image tokens that
Blip2Processor writes before the text.

The vision encoder computes q, k and v with one linear (`self_attn.qkv`, its bias holding the q and v
biases with zeros for k). `prepare` splits it into one linear per role under the same name, and gives the
attention a forward that reads its head count from those linears, so heads may be removed block by block;
`standard_state` fuses them back into qkv.weight and qkv.bias."""

import torch
from torch import nn
from transformers.models.blip_2.modeling_blip_2 import ALL_ATTENTION_FUNCTIONS, Blip2Attention, eager_attention_forward

from lmmc.adapters import Adapter, BlockLayout, BridgeSpec, ImageTokens, TowerSpec
from lmmc.adapters.modernbert import SplitLinear
from lmmc.errors import LmmcError

_QKV = ("q", "k", "v")

_VISION_LAYOUT = BlockLayout(
    q=("self_attn.qkv.q",), k=("self_attn.qkv.k",), v=("self_attn.qkv.v",),
    o=("self_attn.projection",), fc1=("mlp.fc1",), fc2=("mlp.fc2",),
)
# OPT's MLP linears sit on the block itself.
_OPT_LAYOUT = BlockLayout(
    q=("self_attn.q_proj",), k=("self_attn.k_proj",), v=("self_attn.v_proj",),
    o=("self_attn.out_proj",), fc1=("fc1",), fc2=("fc2",),
)


class SplitQkvAttention(Blip2Attention):
    """Blip2Attention over a split qkv: the heads are as many as the q linear's rows give, not the config's
    count, which the fused reshape assumes (the head width times the heads equals the hidden size)."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        q, k, v = (getattr(self.qkv, role)(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
                   for role in _QKV)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(self, q, k, v, attention_mask=None,
                              dropout=self.attention_dropout if self.training else 0.0, scaling=self.scale, **kwargs)
        return self.projection(out.reshape(batch, length, -1).contiguous()), weights


def _refuse_unsupported(config) -> None:
    text = config.text_config
    if not config.use_decoder_only_language_model:
        raise LmmcError(f"this BLIP-2 model's language model is {text.model_type}, an encoder-decoder (the Flan-T5 "
                        f"variants); lmmc compiles BLIP-2 with a decoder-only OPT language model (e.g. "
                        f"Salesforce/blip2-opt-2.7b): compile one of those")
    if text.model_type != "opt":
        raise LmmcError(f"this BLIP-2 model's language model is {text.model_type}; lmmc compiles BLIP-2 with an OPT "
                        f"language model only (e.g. Salesforce/blip2-opt-2.7b)")
    if text.word_embed_proj_dim != text.hidden_size:
        raise LmmcError(f"this BLIP-2 model's OPT decoder embeds tokens in {text.word_embed_proj_dim} channels and "
                        f"computes in {text.hidden_size} (word_embed_proj_dim != hidden_size), but BLIP-2 writes "
                        f"image features of {text.hidden_size} channels over the token embeddings, which needs the "
                        f"two equal (as in the released BLIP-2 OPT checkpoints); compile a BLIP-2 whose OPT decoder "
                        f"has word_embed_proj_dim = hidden_size")
    if config.image_token_index is None:
        raise LmmcError("this BLIP-2 model's config.json has no image_token_index, so the decoder cannot tell "
                        "where the image goes in the prompt; save it with a transformers version that writes one "
                        "(with a Blip2Processor that has num_query_tokens), or set image_token_index to the id of "
                        "the processor's image token")


def _prepare(model: nn.Module) -> None:
    _refuse_unsupported(model.config)
    for layer in model.vision_model.encoder.layers:
        attention = layer.self_attn
        if isinstance(attention.qkv, nn.Linear):
            attention.qkv = SplitLinear(attention.qkv, _QKV)
        attention.__class__ = SplitQkvAttention


def _standard_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The split q/k/v weights and biases concatenated back into BLIP-2's fused qkv."""
    out = dict(state)
    for key in state:
        prefix, _, tail = key.partition(".self_attn.qkv.q.")
        if tail:  # e.g. vision_model.encoder.layers.0 / weight
            names = [f"{prefix}.self_attn.qkv.{role}.{tail}" for role in _QKV]
            out[f"{prefix}.self_attn.qkv.{tail}"] = torch.cat([state[n] for n in names])
            for n in names:
                del out[n]
    return out


def _image_tokens(config) -> int:
    """One image becomes one feature per Q-Former query."""
    return int(config.num_query_tokens)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector's output per image [batch, num_query_tokens, decoder hidden]."""
    return model.get_image_features(pixel_values=pixel_values).pooler_output


def _vision(model, inputs):
    # get_image_features keeps the vision encoder's last hidden state beside the projected queries
    out = model.get_image_features(pixel_values=inputs["pixel_values"])
    return out.last_hidden_state, out.pooler_output.mean(1)


def _language(model, inputs):
    """The decoder's last hidden state and its next-token logits, without a KV cache (see llava.language)."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"], use_cache=False, output_hidden_states=True)
    return out.language_model_outputs.hidden_states[-1], out.logits


ADAPTERS = (
    Adapter(
        family="blip-2",
        model_types=("blip-2",),
        towers=(
            TowerSpec("vision", "image", ("vision_model.encoder.layers",), _VISION_LAYOUT, "vision_config", _vision),
            TowerSpec("language", "text", ("language_model.model.decoder.layers",), _OPT_LAYOUT, "text_config",
                      _language, inputs=("input_ids", "attention_mask", "pixel_values")),
        ),
        auto_class="AutoModelForImageTextToText",
        task_metric="generation",
        kind="generative",
        bridges=(BridgeSpec("projector", "vision", (("proj", "language_projection"),)),),
        image_features=image_features,
        image_tokens=ImageTokens("image_token_index", _image_tokens),
        fixed=("qformer.", "query_tokens"),
        answer_end=lambda config: int(config.text_config.eos_token_id),
        prepare=_prepare,
        standard_state=_standard_state,
    ),
)
