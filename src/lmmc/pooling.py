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
# sentence-transformers 3 and later write one "pooling_mode" (a name or a list, concatenated in the list's
# order) instead of the flags above; its names, mapped to lmmc's.
_NAMES = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len",
          "weightedmean": "weightedmean", "lasttoken": "lasttoken"}
DEFAULT = ("mean",)
# The model config's attributes that carry the modes, and whether the pipeline ends in a Normalize module,
# into the student and its saved config.json.
CONFIG_KEY = "sentence_pooling"
NORMALIZE_KEY = "sentence_normalize"
# Beside the weights, sentence-transformers reads these (its prompts, its sequence limit).
# The Transformer module's settings, under the first of these names that exists, as sentence-transformers looks
# for them (models saved by its early versions carry the later names).
BERT_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                "sentence_camembert_config.json", "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
                "sentence_xlnet_config.json")
_TOP_FILES = ("modules.json", "config_sentence_transformers.json", *BERT_CONFIGS)
_KNOWN = {"Transformer", "Pooling", "Normalize"}
# Settings of the model's loading that change nothing lmmc computes (where and how the files are read).
_LOAD_ONLY = {"trust_remote_code", "revision", "token", "cache_dir", "local_files_only", "torch_dtype", "dtype",
              "attn_implementation", "device_map", "low_cpu_mem_usage", "use_safetensors"}


@dataclass(frozen=True)
class SentenceModules:
    """What a sentence-transformers directory adds to the transformer: its pooling, whether it normalises
    the pooled embedding, plus the small files that make a saved student load in sentence-transformers too."""

    modes: tuple[str, ...]
    normalize: bool = False
    files: dict[str, str] = field(default_factory=dict)  # path relative to the model directory -> text
    dirs: tuple[str, ...] = ()  # module directories without files (Normalize)
    # What the compile should tell the user: settings of the model's files lmmc does not apply (a default prompt).
    warnings: tuple[str, ...] = ()

    def save_pretrained(self, out: Path | str) -> None:
        out = Path(out)
        for d in self.dirs:
            (out / d).mkdir(parents=True, exist_ok=True)
        for rel, text in self.files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(text)


def _reader(source: str, strict: bool = False):
    """(relative path -> text or None) for a local directory or a hub repository. Offline, a hub file the
    cache holds no record of reads as absent, or, `strict`, is refused: a sentence-transformers model's
    modules.json decides its pooling, and taken as absent would silently give it mean pooling."""
    path = Path(source)
    if path.is_dir():
        return lambda rel: (path / rel).read_text() if (path / rel).is_file() else None

    def hub(rel: str) -> str | None:
        from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(source, rel)).read_text()
        except LocalEntryNotFoundError as err:  # offline or unreachable, and not in the cache
            if not strict or try_to_load_from_cache(source, rel) is _CACHED_NO_EXIST:
                return None
            raise LmmcError(f"cannot tell whether the hub model '{source}' has {rel}, which decides its pooling as "
                            f"sentence-transformers runs it: the cache holds no record of it and the hub cannot be "
                            f"reached ({_first_sentence(err)}). Run once with the hub reachable (HF_HUB_OFFLINE "
                            f"unset) so the cache records it, or download the repository to a folder ("
                            f"hf download {source} --local-dir DIR) and compile DIR") from None
        except EntryNotFoundError:  # the repository has no such file
            return None
        except HfHubHTTPError as err:
            raise LmmcError(f"cannot read {rel} of the hub model '{source}': {_first_sentence(err)}") from None
    return hub


def _first_sentence(err: Exception) -> str:
    return " ".join(str(err).split()).split(". ")[0].rstrip(".") or type(err).__name__


def _json_object(text: str, where: str) -> dict[str, Any]:
    """A sentence-transformers file that must hold one JSON object; anything else is one clear error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LmmcError(f"{where} is not valid JSON ({err.msg}, line {err.lineno}); repair it, or save the "
                        f"model again with sentence-transformers") from None
    if not isinstance(value, dict):
        raise LmmcError(f"{where} holds a JSON {type(value).__name__}, not an object of settings; repair it, or "
                        f"save the model again with sentence-transformers")
    return value


def bert_config_text(read) -> tuple[str, str] | None:
    """(file name, text) of the Transformer module's settings file that sentence-transformers reads, if any."""
    return next(((name, text) for name in BERT_CONFIGS if (text := read(name)) is not None), None)


def bert_config(source: str, strict: bool = False) -> dict[str, Any]:
    """The settings of a sentence-transformers directory's sentence_bert_config.json (or the older name it
    has; its max_seq_length, do_lower_case, tokenizer settings); empty without modules.json, since
    sentence-transformers reads it only as a module's."""
    read = _reader(source, strict)
    if read("modules.json") is None:
        return {}
    found = bert_config_text(read)
    if found is None:
        return {}
    where = f"'{source}/{found[0]}'"
    cfg = _json_object(found[1], where)
    length, lower = cfg.get("max_seq_length"), cfg.get("do_lower_case")
    if length is not None and (type(length) is not int or length < 1):
        raise LmmcError(f"{where}: max_seq_length {length!r} is not a positive whole number of tokens; write it "
                        f"as one (e.g. 256), or remove it to cut texts where the model's positions end")
    if lower is not None and type(lower) is not bool:
        raise LmmcError(f"{where}: do_lower_case {lower!r} is not true or false; write it as one")
    kwargs = cfg.get("processing_kwargs")
    if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(v, dict) for v in kwargs.values())):
        raise LmmcError(f"{where}: processing_kwargs {kwargs!r} is not an object of modality -> settings (e.g. "
                        f"{{\"text\": {{\"max_length\": 256}}}}); repair it, or save the model again with "
                        f"sentence-transformers")
    for key in ("common", "text"):
        cut = ((kwargs or {}).get(key) or {}).get("max_length")
        if cut is not None and (type(cut) is not int or cut < 1):
            raise LmmcError(f"{where}: processing_kwargs.{key}.max_length {cut!r} is not a positive whole number of "
                            f"tokens; write it as one (e.g. 256), or remove it")
    for key in ("tokenizer_args", "processor_kwargs", "config_args", "config_kwargs", "model_args", "model_kwargs"):
        if not isinstance(cfg.get(key, {}), dict):
            raise LmmcError(f"{where}: {key} {cfg[key]!r} is not an object of settings; repair it, or save the "
                            f"model again with sentence-transformers")
    cut = _tokenizer_settings(cfg).get("model_max_length")
    if cut is not None and (type(cut) is not int or cut < 1):
        raise LmmcError(f"{where}: model_max_length {cut!r} in its tokenizer settings is not a positive whole number "
                        f"of tokens; write it as one (e.g. 256), or remove it")
    return cfg


def _tokenizer_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What sentence-transformers passes to the tokenizer as it loads it: tokenizer_args, its older name,
    replaces processor_kwargs."""
    return (cfg["tokenizer_args"] if "tokenizer_args" in cfg else cfg.get("processor_kwargs")) or {}


def _unapplied(cfg: dict[str, Any], where: str) -> tuple[str, ...]:
    """Settings sentence-transformers applies to the model or tokenizer as it loads them, which lmmc does not."""
    tokenizer = [k for k in _tokenizer_settings(cfg) if k not in _LOAD_ONLY | {"model_max_length"}]
    model = [k for pair in (("config_args", "config_kwargs"), ("model_args", "model_kwargs"))
             for k in (cfg[pair[0]] if pair[0] in cfg else cfg.get(pair[1]) or {}) if k not in _LOAD_ONLY]
    if not tokenizer and not model:
        return ()
    return (f"{where} sets {', '.join(tokenizer + model)} for sentence-transformers to apply as it loads the "
            f"tokenizer or the model; lmmc loads them as saved, without these settings, so check that the "
            f"teacher's embeddings do not depend on them",)


def st_max_length(cfg: dict[str, Any]) -> int | None:
    """Where sentence-transformers cuts a text, from a checked sentence_bert_config.json: its
    processing_kwargs' max_length (common over text, as it calls a tokenizer), else the tokenizer's
    model_max_length as its settings give it, else max_seq_length."""
    kwargs = cfg.get("processing_kwargs") or {}
    for key in ("common", "text"):
        if (kwargs.get(key) or {}).get("max_length") is not None:
            return kwargs[key]["max_length"]
    return _tokenizer_settings(cfg).get("model_max_length", cfg.get("max_seq_length"))


def st_text_cut(modules: Any) -> tuple[str, int | None] | None:
    """(settings file, where sentence-transformers cuts a text) of a model read with `read_modules`, the
    cut None where the file sets none; None for a model without such a file."""
    found = bert_config_text(modules.files.get) if modules is not None else None
    return (found[0], st_max_length(json.loads(found[1]))) if found else None


def _refuse_task_heads(files: dict[str, str], source: str) -> None:
    """A CrossEncoder (a classification head scoring text pairs) or a SparseEncoder (the masked-LM head)
    outputs what its head computes, which lmmc neither compiles nor validates: compiled as an encoder, the
    student would keep the model's files without the head."""
    st = _json_object(files.get("config_sentence_transformers.json") or "{}",
                      f"'{source}/config_sentence_transformers.json'")
    name, text = bert_config_text(files.get) or ("sentence_bert_config.json", "{}")
    bert = _json_object(text, f"'{source}/{name}'")
    kind, task = st.get("model_type"), bert.get("transformer_task")
    if kind not in (None, "SentenceTransformer") or task not in (None, "feature-extraction"):
        raise LmmcError(f"'{source}' is a sentence-transformers {kind or 'model'} (transformer_task {task!r}): its "
                        f"output comes from a task head on the transformer, which lmmc neither compiles nor "
                        f"validates. Compile an embedding model (a SentenceTransformer) instead")


def _prompt_warnings(text: str | None, source: str) -> tuple[str, ...]:
    """sentence-transformers' encode prepends the default prompt to every text; lmmc encodes the text as
    given, so a model that declares one is measured and deployed on other inputs than its users'."""
    if text is None:
        return ()
    where = f"'{source}/config_sentence_transformers.json'"
    cfg = _json_object(text, where)
    name = cfg.get("default_prompt_name")
    prompts = cfg.get("prompts", {})
    # sentence-transformers refuses either when it loads the model; so does the student, which keeps the file
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise LmmcError(f"{where}: \"prompts\" must map each prompt's name to its text, got {json.dumps(prompts)}; "
                        f"repair it, or save the model again with sentence-transformers")
    if name is not None and (not isinstance(name, str) or name not in prompts):
        raise LmmcError(f"{where}: default_prompt_name {json.dumps(name)} names no prompt (its prompts: "
                        f"{', '.join(map(repr, prompts)) or 'none'}); name one of them, or remove default_prompt_name")
    prompt = prompts.get(name)
    if not prompt:
        return ()
    return (f"'{source}' sets default_prompt_name '{name}' (config_sentence_transformers.json), which "
            f"sentence-transformers prepends to every text ({prompt!r}); lmmc calibrates, validates and encodes "
            f"the texts as given, without it: prepend {prompt!r} to the calibration texts and to the texts you "
            f"encode with the student",)


def default_prompt(text: str | None) -> str | None:
    """The prompt sentence-transformers' encode prepends to every text, from config_sentence_transformers.json
    as the compile checked it (`_prompt_warnings`); None without one."""
    cfg = json.loads(text) if text else {}
    return (cfg.get("prompts") or {}).get(cfg.get("default_prompt_name")) or None


def _declared_prompts(text: str | None, source: str) -> list[str]:
    """The names of the non-empty prompts config_sentence_transformers.json declares."""
    if text is None:
        return []
    prompts = _json_object(text, f"'{source}/config_sentence_transformers.json'").get("prompts")
    return sorted(str(k) for k, v in prompts.items() if v) if isinstance(prompts, dict) else []


def _modes(cfg: dict[str, Any], where: str, prompts: list[str]) -> tuple[str, ...]:
    # Without a prompt, sentence-transformers pools over every token whatever include_prompt says.
    if cfg.get("include_prompt") is False and prompts:
        raise LmmcError(f"{where}: the pooling leaves a prompt's tokens out (include_prompt: false), and the model "
                        f"declares prompts ({', '.join(prompts)}); lmmc encodes texts without prompts and pools over "
                        f"every token, so it cannot give the embeddings sentence-transformers gives with them. "
                        f"Remove the prompts from config_sentence_transformers.json to compile the model for use "
                        f"without them")
    if "pooling_mode" in cfg:  # sentence-transformers 3 and later
        value = cfg["pooling_mode"]
        names = [value] if isinstance(value, str) else value
        valid = ", ".join(_NAMES)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in _NAMES for n in names):
            raise LmmcError(f"{where}: pooling_mode {value!r} is not a pooling mode or a list of them; use "
                            f"{valid}")
        return tuple(_NAMES[n] for n in names)
    modes = tuple(m for m, key in _KEYS.items() if cfg.get(key))
    if not modes:
        raise LmmcError(f"{where} sets no pooling mode; set one of pooling_mode_cls_token, "
                        f"pooling_mode_mean_tokens, pooling_mode_max_tokens, ... to true")
    return modes


def read_modules(source: str) -> SentenceModules | None:
    """The pooling of a sentence-transformers model directory (or hub id); None when it has no
    modules.json. A module lmmc does not carry into the student (a Dense projection, a custom module)
    is refused: the student's embeddings would not be the model's."""
    read = _reader(source, strict=True)
    text = read("modules.json")
    if text is None:
        return None
    try:
        modules = json.loads(text)
    except json.JSONDecodeError as err:
        raise LmmcError(f"'{source}': modules.json is not valid JSON ({err.msg}); repair or remove it") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise LmmcError(f"'{source}': modules.json is not a list of modules (objects with a type and a path); "
                        f"repair it, or save the model again with sentence-transformers")
    files = {rel: t for rel in _TOP_FILES if (t := read(rel)) is not None}
    _refuse_task_heads(files, source)
    # Read now so that a broken file is refused before anything loads, not when the manifest is written.
    settings = bert_config(source, strict=True)
    found = bert_config_text(files.get)
    warnings = (*_prompt_warnings(files.get("config_sentence_transformers.json"), source),
                *(_unapplied(settings, f"'{source}/{found[0]}'") if found else ()))
    kinds = [_kind(m) for m in modules]
    if all(k in _KNOWN for k in kinds) and kinds not in (["Transformer", "Pooling"],
                                                         ["Transformer", "Pooling", "Normalize"]):
        # sentence-transformers runs the modules in this order; another order computes something else, and
        # without a Pooling its encode has no sentence embedding at all
        raise LmmcError(f"'{source}': modules.json lists {' -> '.join(kinds) or 'no modules'}; lmmc compiles "
                        f"Transformer -> Pooling, then Normalize if the model has one, in that order. Repair "
                        f"modules.json, or save the model again with sentence-transformers")
    modes, dirs = DEFAULT, []
    for module in modules:
        kind = _kind(module)
        if not isinstance(module.get("path"), str):  # sentence-transformers cannot load the directory either
            raise LmmcError(f"'{source}': modules.json lists a {module.get('type')} module without a \"path\" (the "
                            f"folder of its files, \"\" for the top); repair modules.json, or save the model again "
                            f"with sentence-transformers")
        rel = module["path"]
        if kind == "Transformer" and rel.strip("./"):
            # sentence-transformers loads the transformer, and its sentence_bert_config.json, from that folder
            raise LmmcError(f"'{source}': modules.json keeps the transformer in '{rel}/', an older "
                            f"sentence-transformers layout; lmmc reads the transformer at the top of the directory. "
                            f"Save it again in the current layout, which lmmc reads whole: "
                            f"SentenceTransformer('{source}').save('NEW_DIR'), then compile NEW_DIR")
        if kind not in _KNOWN:
            raise LmmcError(f"'{source}': modules.json lists a {module.get('type')} module ({rel or 'at the top'}); "
                            f"lmmc compiles sentence-transformers' Transformer, Pooling and Normalize modules and "
                            f"nothing else, so the student would lack it. Compile a model whose modules are those")
        if kind == "Pooling":
            cfg_text = read(f"{rel}/config.json")
            if cfg_text is None:
                raise LmmcError(f"'{source}': modules.json names a Pooling module at '{rel}' without "
                                f"'{rel}/config.json'; copy the whole sentence-transformers directory")
            where = f"'{source}/{rel}/config.json'"
            modes = _modes(_json_object(cfg_text, where), where,
                           _declared_prompts(files.get("config_sentence_transformers.json"), source))
            files[f"{rel}/config.json"] = cfg_text
        elif kind == "Normalize":
            cfg_text = read(f"{rel}/config.json")
            if cfg_text is not None:
                where = f"'{source}/{rel}/config.json'"
                cfg = _json_object(cfg_text, where)
                taken = cfg.get("module_input_name", "sentence_embedding")
                if taken != "sentence_embedding" or cfg.get("module_output_name") not in (None, taken):
                    raise LmmcError(f"{where}: the Normalize module reads '{taken}' and writes "
                                    f"'{cfg.get('module_output_name') or taken}', not the sentence embedding; lmmc "
                                    f"compiles a Normalize of the pooled sentence embedding only")
                files[f"{rel}/config.json"] = cfg_text
            dirs.append(rel)
    return SentenceModules(modes, bool(dirs), files, tuple(dirs), warnings)


def _kind(module: dict[str, Any]) -> str:
    """A module's class name where it is one of sentence-transformers' own (any of its module paths), else its
    whole type: a class of another package that shares the name computes something else."""
    kind = str(module.get("type", ""))
    return kind.rsplit(".", 1)[-1] if kind.startswith("sentence_transformers.") else kind


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
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    # The first real token, whichever side the padding is on: the count of positions before it (left
    # padding). Computed from the mask, so the exported graphs follow each batch's padding too; a row
    # without a real token reads position 0, as sentence-transformers' argmax does.
    real = attention_mask.to(positions.dtype)
    first = (real.cumsum(1) == 0).to(positions.dtype).sum(1) * real.amax(1)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[rows, first])
        elif mode == "max":
            out.append(hidden.masked_fill(mask == 0, -1e9).max(1).values)
        elif mode == "mean":
            out.append((hidden * mask).sum(1) / count)
        elif mode == "mean_sqrt_len":
            out.append((hidden * mask).sum(1) / count.sqrt())
        elif mode == "weightedmean":
            # Weights count from 1 at the first real token, as sentence-transformers counts them.
            weights = mask * (positions[None, :] + 1 - first[:, None]).to(hidden.dtype).unsqueeze(-1)
            out.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9))
        elif mode == "lasttoken":
            # The last real token, whichever side the padding is on.
            last = (attention_mask.to(positions.dtype) * positions).argmax(1)
            out.append(hidden[rows, last])
        else:
            raise ValueError(f"unknown pooling mode '{mode}'")
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)
