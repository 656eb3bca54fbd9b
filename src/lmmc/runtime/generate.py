"""Greedy generation over an exported vision-language model: the vision graph's features replace the
image tokens' embeddings, the decoder graph runs the prompt once and then one token per step with its
key/value cache, until every sequence has emitted an end token or the token budget is spent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmmc.errors import LmmcError
from lmmc.runtime import _inside, load
from lmmc.runtime.images import READ_FIX, open_image, to_rgb

SPEC = "generative.json"


@dataclass(frozen=True)
class Generation:
    """New token ids [batch, steps] (finished rows padded with the pad id) and the prompt's last-position
    logits [batch, vocab] of the first step."""

    tokens: np.ndarray
    first_logits: np.ndarray


class Generator:
    """The three generative artifacts of one folder (vision.onnx, decoder.onnx, embed_tokens.npy) and the
    token ids generative.json records; `preprocessor` (the model's processor) is needed by `generate`."""

    def __init__(self, folder: str | Path, threads: int | None = None, preprocessor: Any = None) -> None:
        folder = Path(folder)
        spec_path = folder / SPEC
        if not spec_path.is_file():
            raise LmmcError(f"'{folder}' has no {SPEC}, so it holds no exported generative model; export one "
                            f"with the 'onnx_generative' pass (recipe: export: [{{onnx_generative: {{}}}}])")
        again = "export the model again with the 'onnx_generative' pass"
        try:
            self.spec = json.loads(spec_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LmmcError(f"{spec_path} is not JSON; {again}") from None
        if not _spec_ok(self.spec):
            raise LmmcError(f"{spec_path} lacks what generation reads (the graphs' and token table's files, the image, "
                            f"end and pad token ids); {again}")
        for key in ("vision", "decoder", "embeddings"):
            if not _inside(self.spec[key]):  # an edited spec may not have files elsewhere loaded, as a manifest may not
                raise LmmcError(f"{spec_path} names '{self.spec[key]}', which is not a file in '{folder}'; {again}")
            if not (folder / self.spec[key]).is_file():
                raise LmmcError(f"'{folder}' lacks {self.spec[key]}, which {SPEC} names; {again}")
        self.folder = folder
        # The vision graph runs once a request, then the decoder many times: its idle threads spinning for work would
        # take the cores from the decoder's (on 2 cores, 8 tokens of a small model: p90 13.5-14.2 ms, against 5.8-6.1
        # without; BENCHMARKS.md, "Timing generation").
        self.vision = load(folder / self.spec["vision"], "onnxruntime", threads, spinning=False)
        self.decoder = load(folder / self.spec["decoder"], "onnxruntime", threads)
        table = folder / self.spec["embeddings"]
        try:
            self.embeddings = np.load(table, allow_pickle=False)
        except (ValueError, EOFError, OSError) as err:
            raise LmmcError(f"the token table {table} cannot be read ({err}); {again}") from None
        width = next((s.shape[-1] for s in self.decoder.inputs if s.name == "inputs_embeds"), None)
        vocab = next((s.shape[-1] for s in self.decoder.outputs if s.name == "logits"), None)
        shape = self.embeddings.shape
        if (self.embeddings.ndim != 2 or self.embeddings.dtype.kind != "f" or (width and shape[1] != width)
                or (vocab and shape[0] != vocab)):  # the export writes one row per logit: another is another model's
            raise LmmcError(f"the token table {table} holds {self.embeddings.dtype} of shape {list(shape)}, and the "
                            f"decoder reads a float table of {vocab or 'its vocabulary'} rows x {width} columns; "
                            f"{again}")
        self.preprocessor = preprocessor
        self._past = [s for s in self.decoder.inputs if s.name.startswith("past_key_values.")]

    def embed(self, input_ids: np.ndarray, pixel_values: np.ndarray | None) -> np.ndarray:
        """Token embeddings with the image features written, in order, over the image-token positions."""
        embeds = self.embeddings[input_ids]
        image = input_ids == self.spec["image_token_index"]
        if pixel_values is None:
            if image.any():
                raise LmmcError("the prompt holds image tokens but no image was given; pass pixel_values")
            return embeds
        self._check_pixels(np.asarray(pixel_values), len(input_ids))
        features = self.vision.run({"pixel_values": pixel_values})["image_features"]
        features = features.reshape(-1, features.shape[-1])
        if image.sum() != len(features):
            per_image = self.spec.get("image_tokens_per_image", "as many as the vision graph gives")
            raise LmmcError(f"the prompt holds {int(image.sum())} image tokens but the images give {len(features)} "
                            f"features; expand each image token as the model's processor does ({per_image} per "
                            f"image)")
        embeds[image] = features
        return embeds

    def _check_pixels(self, pixel_values: np.ndarray, batch: int) -> None:
        """What the vision graph cannot take, refused before it runs: the wrong rank, or (with an images
        axis) a row count other than the prompts' or the all-zero images a processor pads a batch with when
        its prompts hold different numbers of images, which the model itself skips and the graph would encode."""
        axis = self.spec.get("images_axis", False)
        want = "[prompts, images, channels, height, width]" if axis else "[images, channels, height, width]"
        if pixel_values.ndim != (5 if axis else 4) or (axis and len(pixel_values) != batch) or 0 in pixel_values.shape:
            raise LmmcError(f"pixel_values must be {want} for {batch} prompt(s); got shape {pixel_values.shape}: "
                            f"preprocess with the model's saved processor")
        if axis and not pixel_values.reshape(*pixel_values.shape[:2], -1).any(-1).all():
            raise LmmcError("pixel_values hold all-zero padding images (prompts with different numbers of "
                            "images in one batch); the exported vision graph encodes every image it is given, "
                            "so give every prompt in a batch the same number of images, or run them one by one")

    def generate_ids(self, pixel_values: np.ndarray | None, input_ids: np.ndarray,
                     attention_mask: np.ndarray | None = None, max_new_tokens: int = 32,
                     eos_token_id: int | list[int] | None = None) -> Generation:
        """Greedy decoding of at most `max_new_tokens` per row; `input_ids` padded on the left (zeros in
        `attention_mask`) when the prompts differ in length. `eos_token_id` overrides the saved end ids."""
        given = np.asarray(input_ids)
        if given.dtype.kind not in "iuf" or (given.dtype.kind == "f" and not np.array_equal(given, np.trunc(given))):
            raise LmmcError(f"input_ids must be integer token ids; got {given.dtype} values: tokenise with the "
                            f"compile's saved processor")
        input_ids = given.astype(np.int64)
        whole = isinstance(max_new_tokens, (int, np.integer)) and not isinstance(max_new_tokens, bool)
        if not whole or max_new_tokens < 1:
            raise LmmcError(f"max_new_tokens must be a whole number of at least 1; got {max_new_tokens!r}")
        if input_ids.ndim != 2 or not input_ids.size:
            raise LmmcError(f"input_ids must be [batch, sequence] with at least one token and one row; got shape "
                            f"{input_ids.shape}")
        if attention_mask is None and len(input_ids) > 1 and (input_ids[:, 0] == self.spec["pad_token_id"]).any():
            raise LmmcError("input_ids hold rows padded on the left but no attention_mask, so the padding would be "
                            "read as tokens; pass the attention_mask the processor returned with them")
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != input_ids.shape:
            raise LmmcError(f"attention_mask {mask.shape} must match input_ids {input_ids.shape}")
        if not np.isin(mask, (0, 1)).all() or (mask.sum(axis=1) == 0).any():
            raise LmmcError("attention_mask must hold 0 (padding) and 1 (a token), with at least one token a row")
        # Decoding appends after the last position, which must be a token. Padding elsewhere is read as the mask
        # says: BLIP-2's processor writes the image's tokens before a row's left padding.
        if (mask[:, -1] == 0).any():
            raise LmmcError("attention_mask pads a row on the right; greedy decoding needs prompts padded on the left: "
                            "set the tokenizer's padding_side = 'left' before tokenising the batch")
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= len(self.embeddings)):
            raise LmmcError(f"token ids must lie in [0, {len(self.embeddings)}), the model's vocabulary; got "
                            f"{input_ids.min()}..{input_ids.max()}: tokenise with the compile's saved processor")
        limit = self.spec.get("max_positions")
        if isinstance(limit, int) and int(mask.sum(axis=1).max()) + max_new_tokens - 1 > limit:
            raise LmmcError(f"a prompt of {int(mask.sum(axis=1).max())} tokens (the image's included) and "
                            f"{max_new_tokens} new tokens take {int(mask.sum(axis=1).max()) + max_new_tokens - 1} "
                            f"positions, and the decoder has {limit} (max_position_embeddings): shorten the prompt "
                            f"or lower max_new_tokens")
        ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else eos_token_id
        if ids is not None and (not isinstance(ids, (list, tuple)) or not all(
                isinstance(e, (int, np.integer)) and not isinstance(e, bool) and 0 <= e < len(self.embeddings)
                for e in ids)):
            raise LmmcError(f"eos_token_id must be a token id, or a list of them, in [0, {len(self.embeddings)}); got "
                            f"{eos_token_id!r}")
        eos = np.asarray(self.spec["eos_token_id"] if ids is None else ids, dtype=np.int64)
        batch = len(input_ids)
        embeds = self.embed(input_ids, pixel_values)
        # Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
        positions = np.where(mask == 0, 0, mask.cumsum(-1) - 1)
        past = {s.name: np.zeros((batch, s.shape[1], 0, s.shape[3]), dtype=np.float32) for s in self._past}
        done = np.zeros(batch, dtype=bool)
        tokens, first = [], None
        for _ in range(max_new_tokens):
            out = self.decoder.run({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **past})
            logits = out["logits"][:, -1]
            first = logits if first is None else first
            step = np.where(done, self.spec["pad_token_id"], logits.argmax(-1))
            tokens.append(step)
            done |= np.isin(step, eos)
            if done.all():
                break
            past = {name.replace("present.", "past_key_values."): value
                    for name, value in out.items() if name.startswith("present.")}
            embeds = self.embeddings[step][:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        return Generation(np.stack(tokens, axis=1), first)

    def generate(self, image: Any, prompt: str | None, max_new_tokens: int = 32,
                 chat_template: bool | None = None) -> str:
        """Greedy answer to `prompt` about `image` (a PIL image or an image file's path), the prompt written
        as the compile calibrated and validated the model (`generative_prompt`): in the processor's chat
        template when the compile used it (None: as generative.json records; True or False to choose), else
        after the image token unless the prompt places it. The processor expands the image token into one per
        image feature. A prompt of None or "" asks about the image alone."""
        if self.preprocessor is None:
            raise LmmcError("generate() needs the model's processor (tokenizer and image processor); open the "
                            "compile's output with lmmc.runtime.open_generative, or pass preprocessor=")
        if not isinstance(prompt, (str, type(None))) or not isinstance(chat_template, (bool, type(None))):
            raise LmmcError(f"generate() takes a prompt as text (or None) and chat_template as True, False or None; "
                            f"got {type(prompt).__name__} and {chat_template!r}")
        if isinstance(image, (list, tuple, set)) or image is None:  # a list of three grey images read as one RGB
            raise LmmcError(f"generate() answers about one image (a PIL image, an array or a file's path); got "
                            f"{'None' if image is None else f'a {type(image).__name__} of {len(image)}'}: call it "
                            f"once per image")
        proc = self.preprocessor
        image = open_image(image, READ_FIX) if isinstance(image, (str, Path)) else to_rgb(image)
        template = bool(self.spec.get("chat_template")) if chat_template is None else chat_template
        prompt = "" if prompt is None else prompt  # no prompt: the image alone, as a calibration record without one
        token = image_token(proc)
        if template and token in prompt:
            raise LmmcError(f"the chat template places the picture; write the prompt without {token!r}")
        if prompt.count(token) > 1:  # one image is given, so one image token can stand for it
            raise LmmcError(f"the prompt holds {token!r} {prompt.count(token)} times, but generate() takes one "
                            f"image; write {token!r} once where the picture goes, or leave it out to put the "
                            f"picture before the prompt")
        prompt = generative_prompt(proc, prompt, template)
        # Idefics3's processor takes a list of images per prompt; its pixel_attention_mask is all ones for one
        # prompt (every crop fills the encoder's size), so the vision graph does not read it.
        enc = proc(images=[[image]] if self.spec.get("images_axis") else image, text=prompt, return_tensors="np")
        tokens = self.generate_ids(enc["pixel_values"], enc["input_ids"], enc["attention_mask"],
                                   max_new_tokens).tokens[0].tolist()
        ends = [i for i, t in enumerate(tokens) if t in self.spec["eos_token_id"]]
        return proc.tokenizer.decode(tokens[:ends[0]] if ends else tokens, skip_special_tokens=True)


def image_token(processor) -> str | None:
    """The processor's image token as text: BLIP-2's processor holds it as a tokenizer AddedToken."""
    token = getattr(processor, "image_token", None)
    return None if token is None else str(token)


def places_image(processor) -> bool:
    """Whether the processor writes an image's tokens before the text itself (BLIP-2's: num_query_tokens of
    them), so that a prompt holds no image token."""
    return getattr(processor, "num_query_tokens", None) is not None


def generative_prompt(processor, prompt: str | None, chat_template: bool) -> str:
    """The text before the answer, as lmmc calibrates, validates and generates it: the image token and the
    prompt (the image token where the prompt already holds one), in the chat template when asked for. A
    processor that places the image itself (`places_image`) gets the prompt alone, as written."""
    token = image_token(processor)
    if chat_template:
        if not getattr(processor, "chat_template", None):
            raise LmmcError("chat_template is asked for, but the model's processor has no chat template (no "
                            "chat_template.jinja beside it); save the model's chat template with its processor, or "
                            "leave chat_template off to use the prompts as written")
        content = [{"type": "image"}, *([{"type": "text", "text": prompt}] if prompt else [])]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        if text.count(token) != 1:  # the processor would find no place, or two, for the picture
            raise LmmcError(f"the processor's chat template writes the image token {token!r} "
                            f"{text.count(token)} time(s) for one image, not once: {text[:120]!r}; "
                            f"fix the template's image entry, or leave chat_template off to use the prompts as "
                            f"written")
        return text
    if places_image(processor):
        if prompt and token in prompt:
            raise LmmcError(f"this model's processor writes the picture's tokens before the prompt itself; write "
                            f"the prompt without {token!r}")
        return prompt or ""  # no newline after it: BLIP-2's OPT decoders end a text with one (eos_token_id)
    if prompt and token in prompt:  # the picture where the prompt puts it
        return f"{prompt}\n"
    return f"{token}\n{prompt}\n" if prompt else f"{token}\n"


def _spec_ok(spec: Any) -> bool:
    """Whether generative.json has the keys and types an export writes."""
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    return (isinstance(spec, dict) and all(isinstance(spec.get(k), str) for k in ("vision", "decoder", "embeddings"))
            and integer(spec.get("image_token_index")) and integer(spec.get("pad_token_id"))
            and isinstance(spec.get("eos_token_id"), list) and all(integer(e) for e in spec["eos_token_id"]))
