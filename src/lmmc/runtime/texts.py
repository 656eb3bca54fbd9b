"""Texts cut before tokenizing: a tokenizer truncates only after tokenizing the whole text, which for a line of
megabytes takes seconds and gigabytes, to give the tokens of its first words."""

from __future__ import annotations

import re
from typing import Any

# Characters a token spans, generously: a text under this many per token of the limit is tokenized whole.
CHARS_PER_TOKEN = 32
_SPACE = re.compile(r"\s")


def clip_text(tokenizer: Any, text: str, max_length: int | None) -> str:
    """`text`, or a prefix of it ending before a space that holds more than `max_length` tokens, so truncating
    either to `max_length` gives the same tokens: the tokenizers lmmc reads split words at spaces before they
    split them into tokens. A text without a space near the cut is cut at a character. Texts a tokenizer
    truncates on the left are left whole."""
    if not max_length or getattr(tokenizer, "truncation_side", "right") != "right":
        return text
    budget = max_length * CHARS_PER_TOKEN
    while len(text) > budget:
        spaces = [m.start() for m in _SPACE.finditer(text, budget // 2, budget)]
        prefix = text[:spaces[-1]] if spaces else text[:budget]
        # verbose off: a prefix past the tokenizer's model_max_length is expected here, never fed to a model
        if len(tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]) > max_length:
            return prefix
        budget *= 4
    return text


def clip_texts(tokenizer: Any, texts: list[str], max_length: int | None) -> list[str]:
    return [clip_text(tokenizer, t, max_length) for t in texts]
