"""Loading teachers (a local Hugging Face directory or a hub id) and saving students."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import transformers

from lmmc.adapters import Adapter, get_adapter
from lmmc.errors import LmmcError
from lmmc.student import save


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).exists() or ref.count("/") > 1


def resolve_config(ref: str, trust_remote_code: bool = False) -> tuple[Any, Adapter]:
    """Read only the config, to pick the adapter before any weight loads."""
    path = Path(ref).expanduser()
    if _looks_like_path(ref):
        if not path.exists():
            raise LmmcError(f"model path '{ref}' does not exist; pass a Hugging Face model directory or a hub id")
        if not (path / "config.json").is_file():
            raise LmmcError(f"'{ref}' has no config.json; point lmmc at a directory saved with save_pretrained()")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path) if path.exists() else ref,
                                                         trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise LmmcError(f"cannot read the config of '{ref}': {err}. Pass --trust-remote-code only if you trust "
                        f"the model's own code") from None
    except OSError as err:
        raise LmmcError(f"'{ref}' is neither a local model directory nor reachable on the hub ({err}); "
                        f"check the name or download the model first") from None
    return config, get_adapter(config.model_type)


def load_preprocessor(ref: str) -> dict[str, Any]:
    """The tokenizer and/or image processor saved beside the model; absent ones are None."""
    out: dict[str, Any] = {"tokenizer": None, "image_processor": None}
    try:
        out["tokenizer"] = transformers.AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError, TypeError, KeyError):
        pass
    try:
        out["image_processor"] = transformers.AutoImageProcessor.from_pretrained(ref)
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return out


def load_teacher(ref: str, trust_remote_code: bool = False) -> tuple[torch.nn.Module, Adapter, dict[str, Any]]:
    config, adapter = resolve_config(ref, trust_remote_code)
    path = Path(ref).expanduser()
    source = str(path) if path.exists() else ref
    auto = getattr(transformers, adapter.auto_class)
    model = auto.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model, adapter, load_preprocessor(source)


def make_student(teacher: torch.nn.Module) -> torch.nn.Module:
    student = copy.deepcopy(teacher)
    student.eval()
    return student


def save_student(student: torch.nn.Module, preprocessor: dict[str, Any], out: Path, meta: dict[str, Any]) -> None:
    """config + safetensors weights + tokenizer/processor files + lmmc.json (how it was made, and the
    per-layer shapes that `lmmc.load_student` rebuilds a structurally pruned student from)."""
    save(student, out, meta)
    for proc in preprocessor.values():
        if proc is not None:
            proc.save_pretrained(out)
