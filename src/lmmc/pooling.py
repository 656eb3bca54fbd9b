"""Sentence-embedding pooling as a sentence-transformers model declares it in its modules.json (CLS for
BGE, mean for MiniLM and E5, last token for decoder-style encoders), so a text encoder's student is
measured, distilled and deployed on the embedding its users get, not on a mean the model never used."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmmc.errors import LmmcError

# Mode -> its key in a Pooling module's config.json, in the order sentence-transformers concatenates them.
_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
         "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
         "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
DEFAULT = ("mean",)
# The model config's attributes that carry the modes, and whether the pipeline ends in a Normalize module,
# into the student and its saved config.json.
CONFIG_KEY = "sentence_pooling"
NORMALIZE_KEY = "sentence_normalize"
# Beside the weights, sentence-transformers reads these (its prompts, its sequence limit).
_TOP_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
_KNOWN = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class SentenceModules:
    """What a sentence-transformers directory adds to the transformer: its pooling, whether it normalises
    the pooled embedding, plus the small files that make a saved student load in sentence-transformers too."""

    modes: tuple[str, ...]
    normalize: bool = False
    files: dict[str, str] = field(default_factory=dict)  # path relative to the model directory -> text
    dirs: tuple[str, ...] = ()  # module directories without files (Normalize)

    def save_pretrained(self, out: Path | str) -> None:
        out = Path(out)
        for d in self.dirs:
            (out / d).mkdir(parents=True, exist_ok=True)
        for rel, text in self.files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(text)


def _reader(source: str):
    """(relative path -> text or None) for a local directory or a hub repository."""
    path = Path(source)
    if path.is_dir():
        return lambda rel: (path / rel).read_text() if (path / rel).is_file() else None

    def hub(rel: str) -> str | None:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(source, rel)).read_text()
        except Exception:  # absent from the repository, or offline: the file is not there to read
            return None
    return hub


def _modes(cfg: dict[str, Any], where: str) -> tuple[str, ...]:
    if cfg.get("include_prompt") is False:
        raise LmmcError(f"{where}: the pooling leaves the prompt's tokens out (include_prompt: false), which "
                        f"needs the prompt's length at every call; lmmc pools over every token. Compile the "
                        f"transformer without modules.json if mean pooling over the whole input is acceptable")
    modes = tuple(m for m, key in _KEYS.items() if cfg.get(key))
    if not modes:
        raise LmmcError(f"{where} sets no pooling mode; set one of pooling_mode_cls_token, "
                        f"pooling_mode_mean_tokens, pooling_mode_max_tokens, ... to true")
    return modes


def read_modules(source: str) -> SentenceModules | None:
    """The pooling of a sentence-transformers model directory (or hub id); None when it has no
    modules.json. A module lmmc does not carry into the student (a Dense projection, a custom module)
    is refused: the student's embeddings would not be the model's."""
    read = _reader(source)
    text = read("modules.json")
    if text is None:
        return None
    try:
        modules = json.loads(text)
    except json.JSONDecodeError as err:
        raise LmmcError(f"'{source}': modules.json is not valid JSON ({err.msg}); repair or remove it") from None
    files = {rel: t for rel in _TOP_FILES if (t := read(rel)) is not None}
    modes, dirs = DEFAULT, []
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        rel = str(module.get("path", ""))
        if kind not in _KNOWN:
            raise LmmcError(f"'{source}': modules.json lists a {module.get('type')} module after the transformer "
                            f"({rel or 'at the top'}); lmmc compiles the transformer and its pooling, so the "
                            f"student's embeddings would lack it. Compile a model whose modules are "
                            f"Transformer, Pooling and Normalize")
        if kind == "Pooling":
            cfg_text = read(f"{rel}/config.json")
            if cfg_text is None:
                raise LmmcError(f"'{source}': modules.json names a Pooling module at '{rel}' without "
                                f"'{rel}/config.json'; copy the whole sentence-transformers directory")
            modes = _modes(json.loads(cfg_text), f"'{source}/{rel}/config.json'")
            files[f"{rel}/config.json"] = cfg_text
        elif kind == "Normalize":
            dirs.append(rel)
    return SentenceModules(modes, bool(dirs), files, tuple(dirs))


def modes_of(config: Any) -> tuple[str, ...]:
    """The pooling a model's config carries; the mean when it carries none (a plain BERT)."""
    return tuple(getattr(config, CONFIG_KEY, None) or DEFAULT)


def normalises(config: Any) -> bool:
    """Whether the embedding users get from this model is L2-normalised: as its sentence-transformers
    modules say (a Normalize module, or none: a dot-product model, whose norms rank its results), and
    normalised for a model that declares no pipeline (a plain BERT, CLIP, SigLIP, ViT)."""
    value = getattr(config, NORMALIZE_KEY, None)
    return True if value is None else bool(value)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """[batch, tokens, d] -> [batch, d × len(modes)], each mode over the real tokens as
    sentence-transformers computes it."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    count = mask.sum(1).clamp(min=1e-9)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(mask == 0, -1e9).max(1).values)
        elif mode == "mean":
            out.append((hidden * mask).sum(1) / count)
        elif mode == "mean_sqrt_len":
            out.append((hidden * mask).sum(1) / count.sqrt())
        elif mode == "weightedmean":
            weights = mask * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)[None, :, None]
            out.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9))
        elif mode == "lasttoken":
            # The last real token, whichever side the padding is on.
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (attention_mask.to(positions.dtype) * positions).argmax(1)
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            raise ValueError(f"unknown pooling mode '{mode}'")
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)
