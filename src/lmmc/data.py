"""Calibration data: read text, image folders or image-text pairs, split deterministically into
calibration and held-out evaluation samples that never overlap, and encode them into batches."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmmc.errors import LmmcError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
# Random inputs say nothing about a trained model's activations; they are for tiny test models only.
RANDOM_MAX_PARAMS = 5_000_000

Batch = dict[str, torch.Tensor]


@dataclass
class CalibData:
    """Encoded batches per modality ("text", "image"). For image-text pairs the i-th text and image
    batches hold the same pairs in the same order."""

    calib: dict[str, list[Batch]]
    eval: dict[str, list[Batch]]
    source: str
    counts: dict[str, int] = field(default_factory=dict)

    def calib_batches(self, modality: str) -> list[Batch]:
        return self.calib.get(modality, [])

    def eval_batches(self, modality: str) -> list[Batch]:
        return self.eval.get(modality, [])


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Records with a "text" and/or an "image" (absolute path) key, in file order."""
    if not path.exists():
        raise LmmcError(f"calibration data '{path}' does not exist; pass --calib with a .txt, .jsonl or image folder")
    if path.is_dir():
        records = [{"image": str(p)} for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.suffix == ".txt":
        records = [{"text": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise LmmcError(f"{path}:{n}: not valid JSON ({err.msg}); each line must be an object") from None
            if not isinstance(obj, dict) or not ({"text", "image"} & obj.keys()):
                raise LmmcError(f"{path}:{n}: each line needs a \"text\" and/or an \"image\" key")
            rec = {}
            if "text" in obj:
                rec["text"] = str(obj["text"])
            if "image" in obj:
                image = Path(obj["image"])
                rec["image"] = str(image if image.is_absolute() else path.parent / image)
            records.append(rec)
    else:
        raise LmmcError(f"calibration data '{path}' has an unknown format; use .txt (one text per line), "
                        f".jsonl ({{\"text\": ..., \"image\": ...}} per line) or a folder of images")
    if not records:
        raise LmmcError(f"calibration data '{path}' holds no samples; give it at least a few texts or images")
    return records


def split(records: list[dict[str, Any]], n_calib: int, n_eval: int, seed: int) -> tuple[list, list]:
    """Deduplicate, shuffle with `seed`, and cut held-out samples first so they never overlap."""
    unique = list({json.dumps(r, sort_keys=True): r for r in records}.values())
    if len(unique) < 3:
        raise LmmcError(f"calibration data has {len(unique)} distinct samples; at least 3 are needed "
                        f"(some to calibrate on, two to validate on)")
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    n_eval = min(n_eval, max(2, len(unique) // 4))
    n_calib = min(n_calib, len(unique) - n_eval)
    held_out = [unique[i] for i in order[:n_eval]]
    calib = [unique[i] for i in order[n_eval:n_eval + n_calib]]
    return calib, held_out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def encode_text(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[Batch]:
    out = []
    for chunk in _chunks(texts, batch_size):
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def encode_images(image_processor, paths: list[str], batch_size: int) -> list[Batch]:
    from PIL import Image

    out = []
    for chunk in _chunks(paths, batch_size):
        images = []
        for p in chunk:
            try:
                images.append(Image.open(p).convert("RGB"))
            except (OSError, ValueError) as err:
                raise LmmcError(f"cannot read image '{p}': {err}") from None
        out.append({"pixel_values": image_processor(images=images, return_tensors="pt")["pixel_values"]})
    return out


def load_calibration(cfg, path: str | None, modalities: set[str], preprocessor: dict[str, Any]) -> CalibData:
    """Read, split and encode real calibration data for the modalities the model's towers need."""
    source = Path(path)
    calib_recs, eval_recs = split(read_samples(source), cfg.samples, cfg.eval_samples, cfg.seed)
    if "text" in modalities and "image" in modalities:
        # Dual encoders need pairs so both towers see matched samples and zero-shot agreement is defined.
        calib_recs = [r for r in calib_recs if "text" in r and "image" in r]
        eval_recs = [r for r in eval_recs if "text" in r and "image" in r]
    calib: dict[str, list[Batch]] = {}
    held: dict[str, list[Batch]] = {}
    for modality in sorted(modalities):
        key = "text" if modality == "text" else "image"
        c = [r[key] for r in calib_recs if key in r]
        e = [r[key] for r in eval_recs if key in r]
        if not c or len(e) < 2:
            kinds = "image-text pairs (.jsonl with \"text\" and \"image\")" if len(modalities) > 1 else f"{modality} samples"
            raise LmmcError(f"calibration data '{source}' has too few usable {modality} samples for this model; "
                            f"it needs {kinds}")
        if modality == "text":
            tok = preprocessor.get("tokenizer")
            if tok is None:
                raise LmmcError("the model directory has no tokenizer; save one beside the model to calibrate on text")
            calib[modality] = encode_text(tok, c, cfg.batch_size, cfg.max_length)
            held[modality] = encode_text(tok, e, cfg.batch_size, cfg.max_length)
        else:
            proc = preprocessor.get("image_processor")
            if proc is None:
                raise LmmcError("the model directory has no image processor config; save one beside the model")
            calib[modality] = encode_images(proc, c, cfg.batch_size)
            held[modality] = encode_images(proc, e, cfg.batch_size)
    counts = {"calibration": len(calib_recs), "held_out": len(eval_recs)}
    return CalibData(calib, held, str(source), counts)


def random_calibration(cfg, model: torch.nn.Module, adapter) -> CalibData:
    """Random token ids and pixels, for tiny random-weight test models only."""
    from lmmc.adapters import tower_config

    n_params = sum(p.numel() for p in model.parameters())
    if n_params > RANDOM_MAX_PARAMS:
        raise LmmcError(f"random calibration inputs are only for tiny test models (≤ {RANDOM_MAX_PARAMS:,} "
                        f"parameters; this one has {n_params:,}); give real data with --calib")
    gen = torch.Generator().manual_seed(cfg.seed)
    calib, held = {}, {}
    for tower in adapter.towers:
        tcfg = tower_config(model, tower)

        def batches(n: int) -> list[Batch]:
            out = []
            for size in [len(c) for c in _chunks(list(range(n)), cfg.batch_size)]:
                if tower.modality == "text":
                    seq = min(cfg.max_length, 16, getattr(tcfg, "max_position_embeddings", 16))
                    ids = torch.randint(0, tcfg.vocab_size, (size, seq), generator=gen)
                    mask = torch.ones_like(ids)
                    mask[size // 2:, seq * 3 // 4:] = 0  # some padding, so masks are exercised
                    out.append({"input_ids": ids, "attention_mask": mask})
                else:
                    shape = (size, getattr(tcfg, "num_channels", 3), tcfg.image_size, tcfg.image_size)
                    out.append({"pixel_values": torch.randn(shape, generator=gen)})
            return out

        calib[tower.modality] = batches(cfg.samples)
        held[tower.modality] = batches(cfg.eval_samples)
    return CalibData(calib, held, "random", {"calibration": cfg.samples, "held_out": cfg.eval_samples})
