"""Loading teachers (a local Hugging Face directory or a hub id) and saving students, with the checks
that keep a broken teacher or a broken tokenizer from ever producing a student."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import transformers

from lmmc.adapters import Adapter, TowerSpec, get_adapter, supported_model_types
from lmmc.errors import LmmcError, missing_package, refuse_own_code
from lmmc.pooling import CONFIG_KEY, NORMALIZE_KEY, bert_config, read_modules, st_text_cut
from lmmc.runtime.generate import generative_prompt, image_token
from lmmc.student import save

# Words any real tokenizer of a natural-language model knows; a stand-in maps them all to unknown.
ORDINARY_TEXT = "the water is cold and the house of a man was on the road"
# RoBERTa-style models number positions from pad_token_id + 1, so that many slots are never usable;
# MPNet from 2, whatever its pad_token_id (transformers fixes its padding index at 1).
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert"}


def local_dir(ref: str) -> Path | None:
    """The model's directory when `ref` names a local path, None for a hub id.

    A reference is a path when it starts with '.', '/' or '~', exists, has more than one '/', or its
    first part is an existing local directory ('modles/bert' with 'modles/' present is a typo'd path,
    not a hub id). Raises when it looks like a path but is not a model directory."""
    path = Path(os.path.expanduser(ref))
    first = Path(os.path.expanduser(ref.split("/")[0])) if "/" in ref else None
    looks_local = (ref.startswith((".", "/", "~")) or path.exists() or ref.count("/") > 1
                   or (first is not None and first.is_dir()))
    if not looks_local:
        return None
    where = path.resolve()
    if not path.exists():
        raise LmmcError(f"no such directory: model path '{ref}' does not exist (relative paths are resolved "
                        f"against the current directory, giving {where}); check the spelling of the path")
    if not path.is_dir():
        raise LmmcError(f"model path '{ref}' is a file; pass the directory saved with save_pretrained()")
    if not (path / "config.json").is_file():
        _refuse_broken_link(path / "config.json")
        inner = sorted(p.parent.name for p in path.glob("*/config.json") if (path / "modules.json").is_file())
        if inner:  # an older sentence-transformers layout: the transformer is saved in a module directory
            # Pointed at the module directory alone, lmmc would miss the pooling and normalisation.
            raise LmmcError(f"'{ref}' has no config.json: it is a sentence-transformers directory in the older "
                            f"layout, its transformer in '{inner[0]}/'. Save it again in the current layout, "
                            f"which lmmc reads whole: SentenceTransformer('{ref}').save('NEW_DIR'), then compile "
                            f"NEW_DIR")
        raise LmmcError(f"'{ref}' has no config.json; point lmmc at a directory saved with save_pretrained()")
    return where


def resolve_config(ref: str, trust_remote_code: bool = False) -> tuple[Any, Adapter]:
    """Read only the config, to pick the adapter before any weight loads."""
    path = local_dir(ref)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path or ref), trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise LmmcError(_config_error(ref, path, err, trust_remote_code)) from None
    except OSError as err:
        if path:
            raise LmmcError(f"'{ref}': its config.json cannot be read ({err}); save the model again") from None
        from huggingface_hub import constants

        for snapshot in sorted((Path(constants.HF_HUB_CACHE) / f"models--{ref.replace('/', '--')}").glob("snapshots/*")):
            _refuse_broken_link(snapshot / "config.json")
        raise LmmcError(f"no such directory: '{ref}' (relative to the current directory {Path.cwd()}), and no hub "
                        f"model of that name could be loaded (offline, or no such id); check the spelling of the "
                        f"path or the hub id, or download the model first") from None
    return config, get_adapter(config.model_type)


def _config_error(ref: str, path: Path | None, err: ValueError, trust_remote_code: bool) -> str:
    """What transformers' refusal of a config means to an lmmc user, in one line: a model type it does not
    know, or code of the model's own that runs only when asked."""
    try:
        declared = json.loads((path / "config.json").read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        declared = {}
    kind = declared.get("model_type") if isinstance(declared, dict) else None
    supported = ", ".join(supported_model_types())
    if isinstance(declared, dict) and declared.get("auto_map") and not trust_remote_code:
        return (f"'{ref}' declares model_type {kind!r}, whose code ships with the model (auto_map in config.json) "
                f"and runs only with --trust-remote-code; pass it only if you trust that code. lmmc compiles these "
                f"architectures: {supported}")
    if kind is not None:
        return (f"'{ref}' declares model_type {kind!r}, which transformers {transformers.__version__} does not "
                f"know; lmmc compiles these architectures: {supported}")
    return f"cannot read the config of '{ref}': {' '.join(str(err).split())}"


# More blocks than any tower holds (the largest models have about 130): a config declaring 100,000 built for
# minutes, taking 50 KB a block, and crashed.
_MOST_LAYERS = 1024


def meta_model(config: Any, adapter: Adapter, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model built on the meta device: every shape, no memory and no weights read. A model whose code
    ships with it is built from that code only with `trust_remote_code` (transformers would otherwise ask
    on the terminal)."""
    for tower in adapter.towers:
        layers = getattr(getattr(config, tower.config_key, None) if tower.config_key else config, "num_hidden_layers", 0)
        if isinstance(layers, int) and layers > _MOST_LAYERS:
            raise LmmcError(f"the config.json of this {config.model_type} model declares {layers} blocks in its "
                            f"{tower.name} tower, more than any model has (at most {_MOST_LAYERS} here); fix "
                            f"config.json, or save the model again")
    try:
        with torch.device("meta"):
            return adapter.prepared(getattr(transformers, adapter.auto_class).from_config(
                config, trust_remote_code=trust_remote_code))
    except (ValueError, TypeError, ZeroDivisionError) as err:  # e.g. a hidden size no head count divides
        raise LmmcError(f"the config.json of this {config.model_type} model describes no model transformers can "
                        f"build ({' '.join(str(err).split())}); fix config.json, or save the model again") from None


def text_positions(config: Any, tower: TowerSpec) -> int:
    """How many tokens the text tower accepts (CLIP: 77)."""
    tcfg = getattr(config, tower.config_key) if tower.config_key else config
    n = int(tcfg.max_position_embeddings)
    if config.model_type in _OFFSET_POSITIONS:
        n -= int(getattr(tcfg, "pad_token_id", 1) or 0) + 1
    elif config.model_type == "mpnet":
        n -= 2
    return n


def text_truncation(config: Any, adapter: Adapter, preprocessor: dict[str, Any]) -> int | None:
    """The length the deployed text towers cut a text to, as the model's users get it: sentence-transformers'
    cut where the model sets one (processing_kwargs' max_length, else max_seq_length), else the tokenizer's
    model_max_length, within the position table. None for a model without a text tower."""
    text = [t for t in adapter.towers if t.modality == "text"]
    if not text:
        return None
    limit = min(text_positions(config, t) for t in text)
    # read_modules has checked the file (bert_config)
    declared = (st_text_cut(preprocessor.get("sentence_modules")) or (None, None))[1]
    if declared is None:
        declared = getattr(preprocessor.get("tokenizer"), "model_max_length", None)
    # transformers writes a huge sentinel for "no limit"; the position table is the limit then
    return min(limit, int(declared)) if isinstance(declared, int) and declared > 0 else limit


def text_pad_length(config: Any, adapter: Adapter) -> int | None:
    """The length every text is padded to for a model read at a fixed length (SigLIP: 64), else None."""
    if adapter.text_padding != "max_length":
        return None
    return min(text_positions(config, t) for t in adapter.towers if t.modality == "text")


INDEX = "model.safetensors.index.json"


def index_files(index: Path, ref: str) -> list[str]:
    """The weight files a safetensors index names; an index naming anything but safetensors files (a
    pickle such as pytorch_model-00001-of-00002.bin) is refused, since loading it would unpickle it."""
    try:
        files = sorted({str(f) for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise LmmcError(f"'{index}' is not a valid safetensors index ({err}); save the model again") from None
    other = [f for f in files if not f.endswith(".safetensors")]
    if other:
        raise LmmcError(f"the safetensors index of '{ref}' names {', '.join(other[:2])}{' ...' if len(other) > 2 else ''}, "
                        f"which is not a safetensors file; lmmc loads safetensors weights only (never pickle): "
                        f"convert them once yourself, from_pretrained('{ref}') and then save_pretrained(DIR, "
                        f"safe_serialization=True), and pass DIR")
    return files


def _refuse_foreign_prefix(ref: str, keys: Any, model: torch.nn.Module) -> None:
    """Refuse weights all named under a prefix transformers does not strip (a training wrapper's "module."
    or "_orig_mod."): the model would find none of them. The base model's own prefix ("bert.") and a name
    the model has at its top are no wrapper."""
    keys = list(keys)
    first = keys[0].split(".")[0] if keys else ""
    if len(keys) < 2 or not all(k.startswith(first + ".") for k in keys):
        return
    base = getattr(model, "base_model_prefix", "")
    if first == base or hasattr(model, first):
        return
    raise LmmcError(f"the weights of '{ref}' name every tensor under the prefix '{first}.' ('{keys[0]}'), which "
                    f"transformers does not strip{f' (it strips {base!r} only)' if base else ''}: the model would "
                    f"find none of them. Save the model's own weights, e.g. from_pretrained of the model the "
                    f"wrapper holds, then save_pretrained")


def _as_loaded(names: list[str], model: torch.nn.Module) -> dict[str, str]:
    """Each saved tensor's name as transformers names it once loaded (ViT's encoder.layer.N.attention.
    attention.query becomes layers.N.attention.q_proj) -> its saved name, so headers compare with the
    model's own names. Left as saved for a family whose loading also merges or splits tensors."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):  # another transformers: the names as saved
        transforms = []
    if not transforms or not all(isinstance(t, WeightRenaming) for t in transforms):
        return {k: k for k in names}
    return {rename_source_key(k, transforms, [])[0]: k for k in names}


def check_weights(path: Path, model: torch.nn.Module, adapter: Adapter) -> None:
    """Read only the safetensors headers: a truncated or corrupt file, pickle-only weights, a weight whose
    shape disagrees with config.json, or blocks config.json has no place for fail here, before anything
    loads (load_teacher refuses the same)."""
    from safetensors import SafetensorError, safe_open

    index = path / INDEX
    for name in ("model.safetensors", INDEX):
        _refuse_broken_link(path / name)
    if (path / "model.safetensors").is_file():  # what transformers loads first, beside an index or not
        files = ["model.safetensors"]
    elif index.is_file():
        files = index_files(index, str(path))
    else:
        raise LmmcError(f"'{path}' has no model.safetensors; lmmc loads safetensors weights only (never pickle): "
                        f"save the model with save_pretrained(..., safe_serialization=True)")
    shapes: dict[str, list[int]] = {}
    held: dict[str, str] = {}  # tensor -> the file holding it
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    if key in held:  # transformers loads the copy it reads last, whichever the index names
                        raise LmmcError(f"the weights of '{path}' hold the tensor '{key}' twice, in {held[key]} and "
                                        f"{name}, and the two need not agree; remove the copy {INDEX} does not name, "
                                        f"or save the model again")
                    held[key] = name
                    shapes[key] = list(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            if (path / name).is_file() and not os.access(path / name, os.R_OK):  # safetensors says "No such file"
                raise LmmcError(f"weights file '{path / name}' cannot be read by this user (permission denied); fix "
                                f"its permissions") from None
            state = "missing" if not (path / name).is_file() else "corrupt or truncated"
            raise LmmcError(f"weights file '{path / name}' is {state} ({err}); copy or download it again") from None
    _refuse_foreign_prefix(str(path), shapes, model)
    saved = _as_loaded(list(shapes), model)
    shapes = {k: shapes[s] for k, s in saved.items()}
    extra = []
    modules = {name for name, _ in model.named_modules()}
    for tower in adapter.towers:
        for path_ in tower.layers:
            try:
                built = len(model.get_submodule(path_))
            except AttributeError:  # another family's name for the blocks
                continue
            # a task checkpoint's keys carry a prefix ("bert.encoder.layer.3...")
            block = re.compile(rf"(?:^|\.){re.escape(path_)}\.(\d+)\.")
            # a block past the config's count, or a module the config does not build inside one (the
            # distance embedding of a relative-position BERT, which this transformers no longer builds);
            # modules, not tensor names, since transformers renames some tensors as it loads
            extra += [k for k in shapes if (m := block.search(k)) and not k.endswith("inv_freq")
                      and (int(m[1]) >= built or not _builds(modules, k.rsplit(".", 1)[0]))]
    extra = sorted(saved[k] for k in extra)
    if extra:
        raise LmmcError(f"the weights of '{path}' hold {len(extra)} tensor(s) of transformer blocks that the model "
                        f"its config.json describes has no place for ({', '.join(extra[:3])}); {no_place(extra)}")
    mismatched = []
    for name, param in model.state_dict().items():
        # checkpoints of a task model carry a prefix ("bert.")
        key = name if name in shapes else next((k for k in shapes if k.endswith("." + name)), None)
        if key is not None and shapes[key] != list(param.shape):
            mismatched.append(f"{saved[key]} {shapes[key]} in the weights, {list(param.shape)} by config.json")
    if mismatched:
        raise LmmcError(f"the weights in '{path}' do not match its config.json: {'; '.join(mismatched[:3])}"
                        f"{' ...' if len(mismatched) > 3 else ''}; restore the config.json saved with these weights")


NO_PLACE = ("the config does not fit these weights: it names fewer layers, say, or a kind of attention or position "
            "embedding this version of transformers no longer builds. Use the config.json saved with them")


def no_place(extra: list[str]) -> str:
    """Why block tensors have no place in the model, and what to do: relative-position BERTs (their
    blocks' distance embeddings) cannot be compiled at all, since transformers 5, which lmmc needs, builds none."""
    if any(".distance_embedding." in k for k in extra):
        return ("they are the distance embeddings of a relative-position BERT (position_embedding_type relative_key "
                "or relative_key_query), which transformers 5, the version lmmc runs on, no longer builds: lmmc "
                "cannot compile this model; use a BERT-family model with absolute positions")
    return NO_PLACE


def _builds(modules: set[str], module: str) -> bool:
    """Whether the model has `module`, read without a task checkpoint's prefix ("bert.")."""
    parts = module.split(".")
    return any(".".join(parts[i:]) in modules for i in range(len(parts)))


def not_safetensors(ref: str, reason: str) -> LmmcError:
    return LmmcError(f"the weights of '{ref}' cannot be read as safetensors ({reason}); lmmc loads safetensors "
                     f"weights only (never pickle such as pytorch_model.bin): convert them once yourself, "
                     f"from_pretrained('{ref}') and then save_pretrained(DIR, safe_serialization=True), and pass DIR")


def _refuse_broken_link(path: Path) -> None:
    """A hub snapshot's files are links into its blobs: a download stopped early leaves one pointing nowhere,
    which reads as no file at all."""
    if path.is_symlink() and not path.exists():
        raise LmmcError(f"'{path}' is a link to '{os.readlink(path)}', which is not there (a download that did not "
                        f"finish); download the model again")


def check_hub_weights(ref: str, model: torch.nn.Module, adapter: Adapter) -> None:
    """What a dry run can know of a hub model's weights without downloading them: their headers where the
    snapshot is cached, else the repository's file list (offline, the cached snapshot's); pickle-only
    weights and an index naming pickle shards are refused, as the real run refuses them."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    config_file = transformers.utils.cached_file(ref, "config.json", _raise_exceptions_for_missing_entries=False,
                                                 _raise_exceptions_for_connection_errors=False)
    snapshot = Path(config_file).parent if config_file else None
    if snapshot and any((snapshot / name).is_file() or (snapshot / name).is_symlink()
                        for name in (INDEX, "model.safetensors")):
        if (snapshot / INDEX).is_file():
            index_files(snapshot / INDEX, ref)  # named by the hub id, not the cache's path
        check_weights(snapshot, model, adapter)
        return
    try:
        files = set(huggingface_hub.list_repo_files(ref))
    except (OSError, HfHubHTTPError):  # offline, or not reachable: the cache is what loads
        if snapshot is None:
            return
        files = {p.name for p in snapshot.iterdir()}
    if INDEX in files:
        index = transformers.utils.cached_file(ref, INDEX, _raise_exceptions_for_connection_errors=False)
        if index:
            index_files(Path(index), ref)
    elif "model.safetensors" not in files:
        raise not_safetensors(ref, f"{ref} has no model.safetensors or {INDEX}")


# Any of these beside a model is a tokenizer; without one, transformers 5 returns a 5-token stand-in.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")


def hub_revision(ref: str) -> str | None:
    """The commit of the hub snapshot `ref` resolves to now (the cache's, offline), or None."""
    try:
        hit = transformers.utils.cached_file(ref, "config.json", _raise_exceptions_for_missing_entries=False,
                                             _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):  # not a repository id
        return None
    return Path(hit).parent.name if hit else None


def hub_cache(ref: str) -> Path | None:
    """The folder of a hub model's cached snapshots (models--org--name), where it has one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(ref, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached under it
        return None
    # .../models--org--name/snapshots/<commit>/config.json, itself a link into blobs/: not resolved
    return Path(hit).parents[2].resolve() if isinstance(hit, str) else None


def offline_if_unreachable(ref: str) -> str | None:
    """A hub id while the hub cannot be reached: read from its cached snapshot, offline, and return a warning
    saying so (huggingface_hub would retry every file it looks for, minutes in all); refuse at once one that
    is not cached. Not probed behind a proxy, which a direct connection would bypass."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                              "ALL_PROXY", "all_proxy"))
    # the environment as well: huggingface_hub read it when imported, perhaps before the caller set it
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if constants.HF_HUB_OFFLINE or proxied or (offline or "").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    try:
        if local_dir(ref) is not None:
            return None
    except LmmcError:  # a path that is no model directory: resolve_config says so
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
        return None
    except OSError as err:
        reason = err.strerror or type(err).__name__
    if hub_cache(ref) is None:
        raise LmmcError(f"'{ref}' is not a local directory nor in the hub cache, and the hub ({constants.ENDPOINT}) "
                        f"cannot be reached ({reason}): for a hub id, connect to the network; for a local model, "
                        f"check the spelling of its path")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # for the processes lmmc starts, too
    return (f"the hub ({constants.ENDPOINT}) cannot be reached ({reason}): '{ref}' was read from its cached "
            f"snapshot, offline")


def _remember_file_settings(tok: Any, folder: Path) -> None:
    """Keeps the truncation and padding of the teacher's tokenizer.json: each call of a fast tokenizer overwrites
    them (the calibration's max_length; a LLaVA processor's own call as it loads), and the student's file would
    carry that."""
    source = getattr(tok, "backend_tokenizer", None)
    if source is None:
        return
    if (folder / "tokenizer.json").is_file():
        import tokenizers

        source = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))  # the tokenizer read it already
    tok.lmmc_file_settings = (source.truncation, source.padding)


def _restore_file_settings(tok: Any) -> None:
    if not hasattr(tok, "lmmc_file_settings"):
        return
    truncation, padding = tok.lmmc_file_settings
    backend = tok.backend_tokenizer
    backend.no_truncation() if truncation is None else backend.enable_truncation(**truncation)
    backend.no_padding() if padding is None else backend.enable_padding(**padding)


def _snapshot(ref: str) -> Path:
    """The hub snapshot a model's tokenizer and processor configs are fetched into (from the cache offline)."""
    hits = [transformers.utils.cached_file(ref, name, _raise_exceptions_for_missing_entries=False,
                                           _raise_exceptions_for_connection_errors=False)
            for name in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json")]
    return next((Path(hit).parent for hit in hits if hit), Path(ref))


def load_preprocessor(ref: str, generative: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """The tokenizer and/or image processor saved beside the model; absent ones are None. A generative
    image-text model also gets its "processor" (tokenizer + image processor + image-token expansion),
    whose own tokenizer and image processor then fill the other two keys. Code that ships with them runs
    only with `trust_remote_code`."""
    out: dict[str, Any] = {"tokenizer": None, "image_processor": None}
    path = Path(ref)
    if not trust_remote_code:
        refuse_own_code(path if local_dir(ref) else _snapshot(ref), name=ref)
    if generative:
        try:
            out["processor"] = transformers.AutoProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code)
        except ImportError as err:
            raise missing_package(err, f"the processor of '{ref}'") from None
        except (OSError, ValueError, TypeError, KeyError):
            out["processor"] = None
        proc = out["processor"]
        if proc is not None and hasattr(proc, "tokenizer") and hasattr(proc, "image_processor"):
            out["tokenizer"], out["image_processor"] = proc.tokenizer, proc.image_processor
            _remember_file_settings(out["tokenizer"], path)
            return out
    try:
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise OSError(f"no tokenizer files in {path}")
        out["tokenizer"] = transformers.AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except ImportError as err:  # SigLIP's SentencePiece tokenizer without the sentencepiece package
        raise missing_package(err, f"the tokenizer of '{ref}'") from None
    except Exception:  # noqa: BLE001 - a broken file raises anything (tokenizers: a bare Exception); the check says why
        pass
    _remember_file_settings(out["tokenizer"], path)
    if out["tokenizer"] is not None and bert_config(ref).get("do_lower_case") is True:
        _lowercase(out["tokenizer"], ref)
    try:
        out["image_processor"] = transformers.AutoImageProcessor.from_pretrained(ref,
                                                                                 trust_remote_code=trust_remote_code)
    except ImportError as err:
        raise missing_package(err, f"the image processor of '{ref}'") from None
    except Exception:  # noqa: BLE001 - as for the tokenizer: the check reports a present but unreadable file
        pass
    return out


def _lowercase(tok: Any, ref: str) -> None:
    """Make the tokenizer lowercase its input, as sentence-transformers does for a model whose
    sentence_bert_config.json sets do_lower_case: a Lowercase normalizer ahead of the tokenizer's own, so
    every encode, and the tokenizer.json saved with the student, lowercase too."""
    from tokenizers.normalizers import BertNormalizer, Lowercase, Sequence

    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise LmmcError(f"'{ref}' sets do_lower_case (sentence_bert_config.json), which lmmc applies to fast "
                        f"tokenizers only, and the tokenizer of '{ref}' is a slow {type(tok).__name__}; save the "
                        f"model with its fast tokenizer (tokenizer.json)")
    backend = tok.backend_tokenizer
    current = backend.normalizer
    steps = list(current) if isinstance(current, Sequence) else [] if current is None else [current]
    if any(isinstance(n, Lowercase) or (isinstance(n, BertNormalizer) and n.lowercase) for n in steps):
        return  # it lowercases already (an uncased BERT, or a student saved by lmmc)
    backend.normalizer = Sequence([Lowercase(), *steps])
    # transformers rebuilds a model's own tokenizer class (BertTokenizer, ...) from its settings and drops
    # the normalizer of tokenizer.json; save_student marks the saved tokenizer to be read as tokenizer.json has it.
    tok.lmmc_lowercase = True


def check_preprocessor(ref: str, config: Any, adapter: Adapter, preprocessor: dict[str, Any],
                       chat_template: bool = False) -> None:
    """Refuse a missing or degenerate tokenizer / image processor: the student ships with it. A
    generative model needs its processor, and a chat template when `chat_template` asks for one."""
    ref = os.path.expanduser(ref)  # '~/model': its files are looked for where they are
    if adapter.kind == "generative":
        _check_processor(ref, config, adapter, preprocessor.get("processor"), chat_template)
    for tower in adapter.towers:
        tcfg = getattr(config, tower.config_key) if tower.config_key else config
        if tower.modality == "text":
            _check_tokenizer(ref, preprocessor.get("tokenizer"), int(tcfg.vocab_size),
                             pads=adapter.kind != "generative")
        else:
            _check_image_processor(ref, preprocessor.get("image_processor"), _square_rgb(ref, tower.name, tcfg))


def _square_rgb(ref: str, tower: str, tcfg: Any) -> int:
    """The side of the square RGB pictures a vision tower takes: lmmc feeds three-channel pictures of one
    side (its calibration, export shapes and runtime), so another kind of input is refused here."""
    size, channels = tcfg.image_size, getattr(tcfg, "num_channels", 3)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool):
        raise LmmcError(f"the {tower} tower of '{ref}' takes {size} pictures (image_size); lmmc compiles models of "
                        f"square pictures only")
    if channels != 3:
        raise LmmcError(f"the {tower} tower of '{ref}' takes {channels}-channel pictures (num_channels); lmmc "
                        f"feeds three-channel RGB pictures, so it compiles RGB models only")
    return size


def _check_processor(ref: str, config: Any, adapter: Adapter, proc: Any, chat_template: bool) -> None:
    """The processor of an image-text generative model: it exists, marks images with the token the model
    replaces by image features, and expands one image to as many tokens as the model produces."""
    fix = "save the model's processor beside it (processor.save_pretrained(dir), e.g. a LlavaProcessor)"
    if proc is None or not hasattr(proc, "tokenizer") or not hasattr(proc, "image_processor"):
        raise LmmcError(f"'{ref}' has no processor (processor_config.json with a tokenizer and an image "
                        f"processor); {fix}")
    token = image_token(proc)
    token_id = proc.tokenizer.convert_tokens_to_ids(token) if token else None
    model_id = adapter.image_tokens.token_id(config)
    if token_id != model_id:
        raise LmmcError(f"the processor of '{ref}' marks images with {token!r} (id {token_id}), but the model "
                        f"replaces id {model_id} by image features; it is not this model's processor: {fix}")
    from PIL import Image

    try:
        text = generative_prompt(proc, None, False)  # the image token, or none where the processor places the image
        ids = proc(images=[[Image.new("RGB", (48, 40))]], text=[text], return_tensors="pt")["input_ids"][0]
    except Exception as err:  # any failure of a third-party processor on a plain image means it is unusable
        raise LmmcError(f"the processor of '{ref}' fails on a plain RGB image ({err}); {fix}") from None
    expected = adapter.image_tokens.count(config)
    got = int((ids == token_id).sum())
    if got != expected:
        raise LmmcError(f"the processor of '{ref}' expands one image to {got} image tokens but the model makes "
                        f"{expected} image features per image; its patch size, image size or feature selection "
                        f"does not match the model: {fix}")
    if chat_template and not getattr(proc, "chat_template", None):
        raise LmmcError(f"the recipe sets calibration.chat_template: true, but the processor of '{ref}' has no "
                        f"chat template (no chat_template.jinja beside the model); save the model's chat template "
                        f"with its processor, or set calibration.chat_template: false to calibrate on "
                        f"'<image> prompt answer' without one")


def _check_tokenizer(ref: str, tok: Any, vocab_size: int, pads: bool = True) -> None:
    """The model's own tokenizer: present, readable, of the model's vocabulary, and (`pads`: an encoder,
    whose batches lmmc pads) with a pad token."""
    fix = ("save the model's own tokenizer beside it (tokenizer.save_pretrained(dir)); the student ships "
           "with this tokenizer")
    if tok is None:
        present = [n for n in TOKENIZER_FILES if (Path(ref) / n).is_file()]
        if present:  # files there that transformers cannot read: say why rather than that there are none
            try:
                transformers.AutoTokenizer.from_pretrained(ref)
            except Exception as err:  # whatever a third-party tokenizer raises on a broken file
                raise LmmcError(f"'{ref}' has {', '.join(present)}, but its tokenizer cannot be read "
                                f"({type(err).__name__}: {' '.join(str(err).split())[:300]}); {fix}") from None
        raise LmmcError(f"'{ref}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {fix}")
    size = len(tok)
    if size > vocab_size:
        raise LmmcError(f"the tokenizer of '{ref}' has {size:,} tokens but the model's embedding table only "
                        f"{vocab_size:,}; its ids would index past the table. It is not this model's tokenizer: {fix}")
    if size < vocab_size // 2:
        raise LmmcError(f"the tokenizer of '{ref}' has {size:,} tokens for a model with {vocab_size:,}; it is a "
                        f"stand-in (missing tokenizer files) or another model's, not this model's tokenizer: {fix}")
    ids = tok(ORDINARY_TEXT, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids or (tok.unk_token_id is not None and all(i == tok.unk_token_id for i in ids)):
        raise LmmcError(f"the tokenizer of '{ref}' maps every ordinary word to the unknown token; it is not "
                        f"the model's tokenizer: {fix}")
    if pads and tok.pad_token_id is None:
        raise LmmcError(f"the tokenizer of '{ref}' has no pad token, and lmmc pads the texts of a batch to one "
                        f"length; set the one the model was trained with and save it beside the model "
                        f"(tokenizer.pad_token = '[PAD]', or the token its model card names; then "
                        f"tokenizer.save_pretrained(dir))")


def _check_image_processor(ref: str, proc: Any, image_size: int) -> None:
    fix = "save the model's image processor beside it (processor.save_pretrained(dir))"
    if proc is None:
        if (Path(ref) / "preprocessor_config.json").is_file():  # there, but transformers cannot read it: say why
            try:
                transformers.AutoImageProcessor.from_pretrained(ref)
            except Exception as err:  # noqa: BLE001 - whatever a broken file raises
                raise LmmcError(f"'{ref}' has preprocessor_config.json, but its image processor cannot be read "
                                f"({type(err).__name__}: {' '.join(str(err).split())[:300]}); {fix}") from None
        raise LmmcError(f"'{ref}' has no image processor config (preprocessor_config.json); {fix}")
    # before a picture is resized to it: an edited size of 10**6 x 10**6 took all the machine's memory
    sizes = []
    for size in (getattr(proc, "size", None), getattr(proc, "crop_size", None)):  # a dict, a SizeDict or an int
        fields = size if isinstance(size, dict) else getattr(size, "__dict__", {"side": size})
        sizes += [fields[k] for k in ("side", "height", "width", "shortest_edge", "longest_edge", "max_height",
                                      "max_width") if type(fields.get(k)) is int]
    if any(v > 16 * image_size for v in sizes):
        raise LmmcError(f"the image processor of '{ref}' resizes pictures to {max(sizes)} pixels a side, and the model "
                        f"takes {image_size}x{image_size} images; {fix}")
    from PIL import Image

    try:
        shape = tuple(proc(images=[Image.new("RGB", (48, 40))], return_tensors="pt")["pixel_values"].shape)
    except Exception as err:  # any failure of a third-party processor on a plain RGB image means it is unusable
        raise LmmcError(f"the image processor of '{ref}' fails on a plain RGB image ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:300]}); {fix}") from None
    if shape[-2:] != (image_size, image_size):
        square = tuple(proc(images=[Image.new("RGB", (48, 48))], return_tensors="pt")["pixel_values"].shape)
        if square[-2:] == (image_size, image_size):  # the model's processor, set to keep a picture's aspect
            raise LmmcError(f"the image processor of '{ref}' keeps a picture's aspect (one 48 wide and 40 high "
                            f"becomes {shape[-1]} wide and {shape[-2]} high) but the model takes "
                            f"{image_size}x{image_size} images; set do_center_crop: true with crop_size "
                            f"{image_size}, or size {{height: {image_size}, width: {image_size}}}, in its "
                            f"preprocessor_config.json")
        raise LmmcError(f"the image processor of '{ref}' makes images {shape[-1]} wide and {shape[-2]} high but the "
                        f"model takes {image_size}x{image_size}; it is not this model's processor: {fix}")


def check_finite(model: torch.nn.Module, what: str,
                 fix: str = "repair or re-download the weights (a model with non-finite weights cannot be "
                            "compressed or validated)") -> None:
    """Refuse NaN or Inf in a model's weights: every number computed from them would be meaningless."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LmmcError(f"the {what} has {bad} NaN/Inf value(s) in '{name}'; {fix}")


class _LoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def load_teacher(ref: str, trust_remote_code: bool = False) -> tuple[torch.nn.Module, Adapter, dict[str, Any]]:
    config, adapter = resolve_config(ref, trust_remote_code)
    source = str(local_dir(ref) or ref)
    auto = getattr(transformers, adapter.auto_class)
    from safetensors import SafetensorError

    # transformers prints absent weights as "newly initialized"; lmmc acts on the same loading info below
    # (zeroes what no embedding reads and names it in the report, refuses the rest), so its table would mislead.
    # transformers reads whatever a safetensors index names, a pickle included; a hub snapshot's index is
    # fetched alone (a small file) and checked before any weight is.
    try:
        index = transformers.utils.cached_file(source, INDEX, _raise_exceptions_for_missing_entries=False,
                                               _raise_exceptions_for_connection_errors=False)
    except OSError:
        index = None
    local = local_dir(ref)
    if index and not (local and (local / "model.safetensors").is_file()):  # transformers reads that file first
        index_files(Path(index), ref)
    report_logger, quiet = logging.getLogger("transformers.modeling_utils"), _LoadReport()
    report_logger.addFilter(quiet)
    try:
        model, info = auto.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                           output_loading_info=True, use_safetensors=True)
    except SafetensorError as err:
        raise LmmcError(f"the weights of '{ref}' are corrupt or truncated ({err}); copy or download them again") from None
    except RuntimeError as err:  # transformers' refusal of tensors whose shapes the config does not give
        if "ignore_mismatched_sizes" not in str(err) and "size mismatch" not in str(err):
            raise
        raise LmmcError(f"the weights of '{ref}' do not match its config.json ({' '.join(str(err).split())[:300]}); "
                        f"restore the config.json saved with these weights") from None
    except OSError as err:  # a hub snapshot with pytorch_model.bin alone (plan checks only a local directory's files)
        if "safetensors" not in str(err):
            raise
        # transformers' first sentence says what is missing; its advice (drop use_safetensors) is not for users
        reason = " ".join(str(err).split()).split(". ")[0]
        raise not_safetensors(ref, reason) from None
    finally:
        report_logger.removeFilter(quiet)
    adapter.prepared(model).eval()
    absent = sorted(info.get("missing_keys") or [])
    # A task checkpoint (google/vit-base-patch16-224, roberta-base) lacks the base model's pooler, which no
    # embedding lmmc computes reads: zeroed and named in the report rather than refused.
    unread = _unread(model, adapter, absent) if absent and adapter.kind != "generative" else set()
    missing = [k for k in absent if k not in unread] + sorted(info.get("mismatched_keys") or [])
    # A task head beside the base model's weights is expected; tensors of blocks the config does not build (a
    # config.json of fewer layers) would be dropped, and the teacher silently cut.
    if 2 * len(absent) > len(model.state_dict()):  # a head's unexpected keys beside a whole model are no wrapper
        _refuse_foreign_prefix(ref, info.get("unexpected_keys") or [], model)
    paths = [p for tower in adapter.towers for p in tower.layers]
    extra = [k for k in sorted(info.get("unexpected_keys") or [])
             if any(k.startswith(f"{p}.") or f".{p}." in k for p in paths) and not k.endswith("inv_freq")]
    if extra:
        raise LmmcError(f"the weights of '{ref}' hold {len(extra)} tensor(s) of transformer blocks that the model its "
                        f"config.json describes has no place for ({', '.join(extra[:3])}); {no_place(extra)}")
    if missing:
        raise LmmcError(f"the weights of '{ref}' lack or mis-shape {len(missing)} tensor(s) the model needs "
                        f"({', '.join(map(str, missing[:3]))}); transformers would fill them with random values. "
                        f"Use the weights saved with this config.json")
    with torch.no_grad():
        for name in sorted(unread):
            model.get_parameter(name).zero_()
    model.lmmc_absent_weights = sorted(unread)
    # A task head (a classifier, a masked-LM head) is not part of the embedding lmmc compiles: the student has none.
    # Buffers the model makes itself (position and token-type ids, rotary frequencies) are saved by some
    # checkpoints and read by none: no head is lost with them.
    buffers = tuple({name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()} | {"position_ids", "inv_freq"})
    model.lmmc_dropped_weights = [k for k in sorted(info.get("unexpected_keys") or []) if not k.endswith(buffers)]
    check_finite(model, f"teacher '{ref}'")
    preprocessor = load_preprocessor(source, adapter.kind == "generative", trust_remote_code)
    if adapter.sentence_pooling:
        modules = read_modules(source)
        if modules is not None:
            preprocessor["sentence_modules"] = modules
            # modules.json decides, as in sentence-transformers: keys a config.json carries from an earlier
            # lmmc student whose modules were changed since must not override it.
            setattr(model.config, CONFIG_KEY, list(modules.modes))
            setattr(model.config, NORMALIZE_KEY, modules.normalize)
    return model, adapter, preprocessor


def _unread(model: torch.nn.Module, adapter: Adapter, names: list[str]) -> set[str]:
    """Those of the parameters `names` that no tower's outputs depend on: they get no gradient through a
    forward of every tower."""
    from lmmc.adapters import TowerModule, example_inputs

    params = dict(model.named_parameters())
    if not all(n in params for n in names):
        return set()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for tower in adapter.towers:
            hidden, pooled = TowerModule(model, tower)(*example_inputs(model, tower))
            (hidden.float().sum() + pooled.float().sum()).backward()
    unread = {n for n in names if params[n].grad is None}
    model.zero_grad(set_to_none=True)
    return unread


def make_student(teacher: torch.nn.Module) -> torch.nn.Module:
    student = copy.deepcopy(teacher)
    student.eval()
    return student


def save_student(student: torch.nn.Module, preprocessor: dict[str, Any], out: Path, meta: dict[str, Any]) -> None:
    """config + safetensors weights + tokenizer/processor files + lmmc.json (how it was made, and the
    per-layer shapes that `lmmc.load_student` rebuilds a structurally pruned student from)."""
    save(student, out, meta)
    _restore_file_settings(preprocessor.get("tokenizer"))  # tokenizer.json cuts and pads as the teacher's does
    for proc in preprocessor.values():
        for tok in (proc, getattr(proc, "tokenizer", None)):
            # set by the loading under HF_HUB_OFFLINE, and saved by transformers as a setting of the tokenizer: the
            # student's files would depend on the compile's environment
            getattr(tok, "init_kwargs", {}).pop("local_files_only", None)
    if preprocessor.get("processor") is not None:  # it saves its own tokenizer and image processor
        preprocessor["processor"].save_pretrained(out)
        return
    for proc in preprocessor.values():
        if proc is not None:
            proc.save_pretrained(out)
    tok = preprocessor.get("tokenizer")
    if getattr(tok, "lmmc_lowercase", False) and (out / "tokenizer_config.json").is_file():
        # Read back as the generic tokenizer of tokenizer.json, which keeps its Lowercase normalizer
        # (see _lowercase); transformers, sentence-transformers and lmmc.runtime then lowercase alike.
        settings = json.loads((out / "tokenizer_config.json").read_text())
        settings["tokenizer_class"] = "TokenizersBackend"
        (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
