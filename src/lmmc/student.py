"""The student format, whose per-layer shapes let `load_student` rebuild a pruned student exactly.

`load_student` rebuilds the pruned architecture from the shapes and loads its weights strictly. A
student directory holds `config.json` (the teacher's config with only the layer counts changed and
`lmmc_teacher_layers` added, so `AutoConfig` and tokenizers read it as usual), the tokenizer/processor
files, and `lmmc.json`, whose
"structure" section lists per tower the layer count, the teacher layer each block came from, the head
dimension, the kept heads per layer, the FFN width per layer and the width of the residual stream
(`hidden`; below the config's hidden size the tower ends in a `WidthRestore` back to that size).

Where the config alone describes the model exactly (no pruning, or depth pruning only), the weights are
written as `model.safetensors` in the family's own layout (ModernBERT's split linears fused again), and
plain `from_pretrained` loads them exactly.
Where heads or FFN channels were removed, no standard config can describe the model: per-layer widths
differ. Then the weights go to `student.safetensors` and no `model.safetensors` is written, so plain
`from_pretrained` stops with "no file named model.safetensors" instead of loading a full-size model and
silently re-initialising every mismatched matrix (what `ignore_mismatched_sizes=True` would do), and a
`README.md` beside it says to load it with `lmmc.load_student(dir)`, which loads both kinds."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError
import torch
import transformers
from torch import nn
from transformers.initialization import no_init_weights

from lmmc.adapters import Adapter, block_linears, block_list, get_adapter, head_dim, tower_config
from lmmc.errors import LmmcError
from lmmc.surgery import group_size, hidden_width, keep_channels_, keep_heads_, keep_hidden_

FORMAT_VERSION = 1
STANDARD_WEIGHTS = "model.safetensors"
SHRUNK_WEIGHTS = "student.safetensors"
META_FILE = "lmmc.json"
# A student whose shapes config.json cannot describe: what a user who tried from_pretrained finds beside it.
CARD = "README.md"
_SHRUNK_CARD = """# A structurally pruned student

lmmc removed attention heads, FFN channels or hidden channels from this model, so its layers differ from
one another and from what `config.json` describes. `from_pretrained` cannot load it (there is no
`model.safetensors`); load it with lmmc, which rebuilds each layer's shapes from `lmmc.json`:

```python
import lmmc

model = lmmc.load_student("path/to/this/folder")
```

The ONNX and OpenVINO files of the same compile run without lmmc.
"""


def read_structure(model: nn.Module, adapter: Adapter) -> dict[str, dict[str, Any]]:
    """Per tower: layers, teacher_layers, head_dim, heads and kv_heads (query and key/value heads per
    layer; equal unless the attention is grouped-query), ffn (per layer) and hidden, read
    from the weights themselves so the record cannot drift from the model."""
    out = {}
    for tower in adapter.towers:
        _, blocks = block_list(model, tower)
        hd = head_dim(model, tower)
        heads, kv, ffn = [], [], []
        for block in blocks:
            lin = block_linears(block, tower)
            heads.append(lin["q"][1].out_features // hd)
            kv.append(lin["k"][1].out_features // hd)
            ffn.append(lin["fc1"][1].out_features)
        cfg = tower_config(model, tower)
        out[tower.name] = {
            "layers": len(blocks),
            "teacher_layers": list(getattr(cfg, "lmmc_teacher_layers", None) or range(len(blocks))),
            "head_dim": hd,
            "heads": heads,
            "kv_heads": kv,
            "ffn": ffn,
            "hidden": hidden_width(model, tower),
        }
    return out


def apply_structure_(model: nn.Module, adapter: Adapter, structure: dict[str, dict[str, Any]]) -> None:
    """Shrink a model built from the config to the recorded per-layer shapes (values are overwritten
    by the load that follows, so which units are kept does not matter)."""
    for tower in adapter.towers:
        rec = structure.get(tower.name)
        if rec is None:
            raise LmmcError(f"the student's structure record has no '{tower.name}' tower; it has "
                            f"{sorted(structure)}. The directory was not written by lmmc.save_student for this model")
        _, blocks = block_list(model, tower)
        if len(blocks) != rec["layers"] or len(rec["heads"]) != len(blocks) or len(rec["ffn"]) != len(blocks):
            raise LmmcError(f"the {tower.name} tower has {len(blocks)} blocks in config.json but the structure "
                            f"record lists {rec['layers']} (heads for {len(rec['heads'])}, ffn for {len(rec['ffn'])}); "
                            f"config.json and {META_FILE} do not belong together")
        hd = head_dim(model, tower)
        for i, (block, heads, width) in enumerate(zip(blocks, rec["heads"], rec["ffn"])):
            # Records written before grouped-query attention was supported have no kv_heads: multi-head.
            kv = (rec.get("kv_heads") or rec["heads"])[i]
            if heads != kv * group_size(block, tower, hd):
                raise LmmcError(f"the structure record gives block {i} of the {tower.name} tower {heads} query and "
                                f"{kv} key/value heads, but config.json groups its query heads "
                                f"{group_size(block, tower, hd)} to a key/value head; config.json and {META_FILE} "
                                f"do not belong together")
            keep_heads_(block, tower, hd, range(heads))
            keep_channels_(block, tower, range(width))
        # Records written before hidden channels could be removed have no "hidden": the full width.
        keep_hidden_(model, tower, range(rec.get("hidden") or hidden_width(model, tower)))


def _shape_map(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def is_standard(model: nn.Module) -> bool:
    """True when a model built from the config alone has exactly this model's tensors and shapes (in the
    family's own layout: `Adapter.standard_state`)."""
    adapter = get_adapter(model.config.model_type)
    state = model.state_dict()
    if adapter.standard_state is not None:
        state = adapter.standard_state(state)
    with torch.device("meta"):
        reference = type(model)(model.config)
    return _shape_map(reference) == {k: tuple(v.shape) for k, v in state.items()}


def save(model: nn.Module, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write config, weights and `lmmc.json` (meta plus the structure record); return the record."""
    adapter = get_adapter(model.config.model_type)
    standard = is_standard(model)
    record = {
        "format": FORMAT_VERSION,
        "class": type(model).__name__,
        "weights": STANDARD_WEIGHTS if standard else SHRUNK_WEIGHTS,
        "towers": read_structure(model, adapter),
    }
    if getattr(model.config, "auto_map", None) and type(model).__module__.startswith("transformers."):
        # Compiled as transformers' built-in class: a config naming the teacher's own code (not copied
        # here) would make a loader with trust_remote_code look for, or fetch, code the student never ran.
        del model.config.auto_map
    out.mkdir(parents=True, exist_ok=True)
    (out / STANDARD_WEIGHTS).unlink(missing_ok=True)
    (out / SHRUNK_WEIGHTS).unlink(missing_ok=True)
    if standard and adapter.standard_state is not None:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out)
        _save_generation_config(model, out)
        # A tied output layer is stored once, under the token embeddings' name, as save_pretrained stores it.
        state, _ = _untied_state(adapter.standard_state(model.state_dict()))
        save_tensors(state, out / STANDARD_WEIGHTS, metadata={"format": "pt"})
    elif standard:
        # A compile saves the student after every pass; transformers' per-save progress bar is noise there.
        shown = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            with write_errors(out / STANDARD_WEIGHTS):
                model.save_pretrained(out, safe_serialization=True)
        finally:
            if shown:
                transformers.utils.logging.enable_progress_bar()
    else:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out)
        _save_generation_config(model, out)
        state, tied = _untied_state(model.state_dict())
        if tied:
            record["tied"] = tied
        # One metadata entry: the writer orders several differently in each process, and a resumed
        # compile must write the same bytes as an uninterrupted one.
        save_tensors(state, out / SHRUNK_WEIGHTS, metadata={"format": "pt"})
        if not (out / CARD).exists():  # never over a card of someone else's
            (out / CARD).write_text(_SHRUNK_CARD)
    (out / META_FILE).write_text(json.dumps({**meta, "structure": record}, indent=2))
    for weights in out.glob("*.safetensors"):
        _readable_as_umask_allows(weights)
    return record


def _readable_as_umask_allows(path: Path) -> None:
    """safetensors writes its files owner-only (0600), unlike every other file of the output: a serving
    container running as another user could not read the weights."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _untied_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once (a decoder's output layer tied to its token embeddings:
    safetensors stores no aliases), and the dropped names -> the name they share with."""
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if where in first:
            tied[name] = first[where]
            continue
        first[where] = name
        state[name] = tensor.detach().contiguous()
    return state, tied


def _model_class(config: Any, record: dict[str, Any] | None) -> type[nn.Module]:
    """The class that wrote the student; else the class the adapter's auto class picks for the config."""
    name = (record or {}).get("class") or (config.architectures or [None])[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if (record or {}).get("class") and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
                                            and isinstance(config, cls.config_class)):
        raise LmmcError(f"{META_FILE} names the class {name!r}, which is no transformers model of this "
                        f"{config.model_type} config; the student directory is damaged: compile it again")
    if cls is None:
        with torch.device("meta"):
            cls = type(getattr(transformers, get_adapter(config.model_type).auto_class).from_config(config))
    return cls


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, a failed write raised as an OSError (see `write_errors`)."""
    with write_errors(path):
        safetensors.torch.save_file(tensors, str(path), metadata=metadata)


@contextlib.contextmanager
def write_errors(path: Path):
    """A safetensors write that failed (a full disk) raised as the OSError it is: safetensors raises an
    error of its own that names only the OS error's number."""
    try:
        yield
    except SafetensorError as err:
        number = re.search(r"\(os error (\d+)\)", str(err))
        if number is None:
            raise
        raise OSError(int(number[1]), os.strerror(int(number[1])), str(path)) from None


def load_student(path: str | Path) -> nn.Module:
    """Rebuild a student saved by lmmc (pruned or not) and load its weights strictly; eval mode, CPU."""
    path = Path(os.path.expanduser(path))
    if not (path / "config.json").is_file():
        raise LmmcError(f"'{path}' has no config.json; pass the 'student' directory of a compile output")
    meta_path = path / META_FILE
    record = _structure(meta_path) if meta_path.is_file() else None
    if record is not None and record.get("format") != FORMAT_VERSION:
        raise LmmcError(f"'{meta_path}' uses student format {record.get('format')}; this lmmc reads format "
                        f"{FORMAT_VERSION}. Load it with the lmmc version that wrote it")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LmmcError(f"'{path / 'config.json'}' cannot be read as a model config ({first}); the student "
                        f"directory is damaged: compile it again") from None
    adapter = get_adapter(config.model_type)
    cls = _model_class(config, record)
    weights = (record or {}).get("weights", STANDARD_WEIGHTS)
    if not (path / weights).is_file():
        names = f"which its {META_FILE} names as the weights file" if record else \
            f"and no {META_FILE} naming another weights file"
        raise LmmcError(f"'{path}' has no {weights}, {names}: the student is incomplete; copy the whole output of "
                        f"the compile again, or compile it again")
    try:
        model = _load_weights(path, config, adapter, cls, record, weights)
    except (SafetensorError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LmmcError(f"'{path / weights}' cannot be read ({first}): the file is truncated or damaged; copy "
                        f"the student directory again, or compile it again") from None
    from lmmc.modelio import check_finite  # modelio imports this module
    check_finite(model, f"student in '{path}'", "the file is damaged (a compile never writes such a student); "
                                                "copy the student directory again, or compile it again")
    return model


def _structure(meta_path: Path) -> dict[str, Any] | None:
    """The structure record of a student's lmmc.json, checked to be of the shape lmmc writes."""
    damaged = f"the student directory is damaged: restore '{meta_path.name}' or compile it again"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmmcError(f"'{meta_path}' is not valid JSON ({err}); {damaged}") from None
    record = meta.get("structure") if isinstance(meta, dict) else []
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("towers", {}), dict)
                                   and ("towers" in record or record.get("weights") in (None, STANDARD_WEIGHTS))):
        raise LmmcError(f"'{meta_path}' is not of the shape lmmc writes (an object whose 'structure' gives the "
                        f"student's towers); {damaged}")
    weights = (record or {}).get("weights", STANDARD_WEIGHTS)
    if not isinstance(weights, str) or Path(weights).name != weights:  # an edited record may not point elsewhere
        raise LmmcError(f"'{meta_path}' names the weights file {weights!r}, which is not a file name inside the "
                        f"student directory; {damaged}")
    return record


def _save_generation_config(model: nn.Module, out: Path) -> None:
    """A generative student's end and pad tokens, as save_pretrained writes them: without the file, a reload
    falls back to config.json's and generates past the teacher's end token."""
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out)


def _load_weights(path: Path, config: Any, adapter: Adapter, cls: type[nn.Module], record: dict[str, Any] | None,
                  weights: str) -> nn.Module:
    if weights == STANDARD_WEIGHTS:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, dtype="auto",
                                           use_safetensors=True)
        bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if bad:
            raise LmmcError(f"'{path}' does not load exactly into {cls.__name__}: {bad}")
        return adapter.prepared(model).eval()
    with no_init_weights():
        model = adapter.prepared(cls(config))
    if (path / transformers.utils.GENERATION_CONFIG_NAME).is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    apply_structure_(model, adapter, record["towers"])
    state = safetensors.torch.load_file(str(path / weights))
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    tied = record.get("tied", {})
    for name, source in tied.items():
        if source in state:
            state[name] = state[source]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise LmmcError(f"the weights in '{path / weights}' do not match the shapes recorded in {META_FILE}: "
                        f"{err}") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, source in tied.items():  # shared again, as the saved model had them
        if name in params and source in params:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, params[source])
    return model.eval()
