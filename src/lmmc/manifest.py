"""manifest.json: every deployment artifact of a compile's output with its backend, precision, inputs and
outputs, the preprocessing files that feed it, its tower and its validation figures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lmmc
from lmmc.adapters import dynamic_axes, tower_config
from lmmc.artifact import Artifact, ExportRecord
from lmmc.errors import LmmcError
from lmmc.modelio import local_dir, text_pad_length, text_positions
from lmmc.pooling import default_prompt, modes_of, normalises
from lmmc.runtime import MANIFEST, MANIFEST_FORMAT, PAD_TO_KEY, TensorSpec, load
from lmmc.runtime.generate import SPEC as GENERATIVE_SPEC

# Files of student/ that are weights or lmmc's own records (its model card among them), not preprocessing.
_NOT_PREPROCESSING = {"config.json", "lmmc.json", "generation_config.json", "README.md"}


def _io(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}


def _files(path: Path) -> list[Path]:
    """The artifact and the files it reads beside it: an IR's .bin, an ONNX file's external data."""
    beside = [path.with_suffix(".bin")] if path.suffix == ".xml" else [path.with_name(path.name + ".data")]
    return [path, *(p for p in beside if p.is_file())]


def _graph_axes(path: Path) -> dict[str, dict[str, str]]:
    """Input name -> {axis: symbolic name} as an ONNX graph declares them."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: {str(a): d.dim_param for a, d in enumerate(i.type.tensor_type.shape.dim) if d.dim_param}
            for i in graph.input}


def _dynamic_axes(art: Artifact, path: Path, tower) -> dict[str, dict[str, str]]:
    """A generative model's graphs take other inputs than its towers' (embeddings and a KV cache for the
    decoder), so their axes come from the ONNX file; an encoder tower's from its adapter."""
    if getattr(art.adapter, "kind", "encoder") == "generative" and path.suffix == ".onnx":
        return _graph_axes(path)
    return {name: {str(k): v for k, v in axes.items()} for name, axes in dynamic_axes(tower).items()}


def _generative(art: Artifact, root: Path) -> dict[str, Any] | None:
    """Where the runtime finds a generative export's spec and token table, and the token ids it uses."""
    specs = {p.parent / GENERATIVE_SPEC for p in art.onnx.values() if (p.parent / GENERATIVE_SPEC).is_file()}
    if not specs:
        return None
    spec_path = specs.pop()
    spec = json.loads(spec_path.read_text())
    folder = spec_path.parent
    return {"spec": str(spec_path.relative_to(root)),
            **{key: str((folder / spec[key]).relative_to(root)) for key in ("vision", "decoder", "embeddings")},
            **{key: spec[key] for key in ("image_token_index", "eos_token_id", "pad_token_id")}}


def artifact_records(art: Artifact) -> list[ExportRecord]:
    """The plain ONNX export of every tower followed by every further artifact, as records."""
    plain = [ExportRecord(t, "onnxruntime", "fp32", "plain", p) for t, p in art.onnx.items()]
    return plain + list(art.exports)


def build_manifest(art: Artifact, root: Path, max_length: int | None) -> dict[str, Any]:
    """The manifest of an output directory `root` whose artifacts `art` lists; `max_length` is the
    tokenizer's truncation length for text towers."""
    validation = art.validation or {}
    by_path = {e["path"]: e for e in validation.get("exports", [])}
    artifacts = []
    for rec in artifact_records(art):
        rel = str(rec.path.relative_to(root))
        model = load(rec.path, rec.backend)
        tower = art.adapter.tower(rec.tower)
        entry: dict[str, Any] = {
            "tower": rec.tower, "backend": rec.backend, "precision": rec.precision, "variant": rec.variant,
            "path": rel, "files": [str(p.relative_to(root)) for p in _files(rec.path)],
            "bytes": sum(p.stat().st_size for p in _files(rec.path)),
            "inputs": [_io(s) for s in model.inputs], "outputs": [_io(s) for s in model.outputs],
            "dynamic_axes": _dynamic_axes(art, rec.path, tower),
        }
        if rec.source:
            entry["source"] = rec.source
        if rec.fp32_matrices is not None:
            entry["fp32_matrices"] = rec.fp32_matrices
        if rel in by_path:
            entry["validation"] = {k: v for k, v in by_path[rel].items() if k not in entry}
        elif rec.variant == "plain" and rec.backend == "onnxruntime" and rec.tower in validation.get("towers", {}):
            figures = validation["towers"][rec.tower]
            entry["validation"] = {"max_abs_diff": figures["runtime_max_abs_diff"],
                                   "cosine_to_teacher": figures["cosine_mean"],
                                   "cosine_to_teacher_min": figures["cosine_min"]}
        artifacts.append(entry)
    student = root / "student"
    preprocessing_files = sorted(str(p.relative_to(root)) for p in student.iterdir()
                                 if p.is_file() and p.name not in _NOT_PREPROCESSING
                                 and p.suffix not in {".safetensors", ".bin"}) if student.is_dir() else []
    modalities = {t.modality for t in art.adapter.towers}
    preprocessing: dict[str, Any] = {}
    if "text" in modalities:
        pad_to = text_pad_length(art.student.config, art.adapter)
        text = next(t for t in art.adapter.towers if t.modality == "text")
        preprocessing["text"] = {"kind": "tokenizer", "max_length": max_length,
                                 "padding": "longest" if pad_to is None else "max_length",
                                 # token ids at or past it index no row of the embedding table
                                 "vocab_size": int(tower_config(art.student, text).vocab_size),
                                 # the most tokens it takes: its position table's rows (RoBERTa's and MPNet's
                                 # offset taken off), which an IR's shape inference does not always find
                                 "positions": text_positions(art.student.config, text),
                                 "files": [f for f in preprocessing_files if "preprocessor" not in f]}
        tokenizer = (art.preprocessor or {}).get("tokenizer") or getattr((art.preprocessor or {}).get("processor"),
                                                                        "tokenizer", None)
        # where the pads go, as the tokenizer puts them: a model whose positions count them (or pooling the last
        # position, SigLIP) computes another embedding from the other side
        preprocessing["text"]["padding_side"] = getattr(tokenizer, "padding_side", None) or "right"
        if pad_to is not None:
            preprocessing["text"]["pad_to"] = pad_to
            preprocessing["text"]["pad_id"] = int(tokenizer.pad_token_id)
            # A tokenizer that returns no mask: the model reads its padding too (lmmc.data.encode_text).
            preprocessing["text"]["attend_to_padding"] = "attention_mask" not in tokenizer.model_input_names
        if art.adapter.sentence_pooling:
            preprocessing["text"]["pooling"] = list(modes_of(art.student.config))
        settings = student / "config_sentence_transformers.json"
        # prepended by sentence-transformers' encode, not by lmmc's, which encodes texts as they were validated
        if prompt := default_prompt(settings.read_text() if settings.is_file() else None):
            preprocessing["text"]["default_prompt"] = prompt
    if "image" in modalities:
        preprocessing["image"] = {"kind": "image_processor",
                                  "files": [f for f in preprocessing_files if "preprocessor" in f]}
    manifest = {
        "format": MANIFEST_FORMAT,
        "lmmc_version": lmmc.__version__,
        "teacher": _teacher_ref(art.model_ref),
        "adapter": art.adapter.family,
        "student": "student",
        "towers": {t.name: {"modality": t.modality, "normalized": normalises(art.student.config)}
                   for t in art.adapter.towers},
        "preprocessing": preprocessing,
        "artifacts": artifacts,
        "passed": validation.get("passed"),
    }
    generative = _generative(art, root)
    if generative:
        manifest["generative"] = generative
    # A tensorrt step says which TensorRT built its engines, or that none was built (not installed).
    trt = [r.metrics["tensorrt"] for r in art.records if r.name == "tensorrt" and "tensorrt" in r.metrics]
    if trt:
        manifest["tensorrt"] = trt[-1]
    return manifest


def _teacher_ref(ref: str) -> str:
    """The teacher as anyone reading the manifest finds it: a local directory as an absolute path, since a
    relative one would name another folder once read from elsewhere; a hub id as it is."""
    try:
        where = local_dir(ref)
    except LmmcError:  # the teacher's folder went away during the compile: keep what the user typed
        return ref
    return str(where) if where is not None else ref


def stamp_pad_to(path: Path, pad_to: int) -> None:
    """Write into a text artifact the one length it reads, so that a copy taken out of its output (away
    from manifest.json) still refuses ids of another length, which it would embed wrongly without a word."""
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
        kept = [p for p in model.metadata_props if p.key != PAD_TO_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        model.metadata_props.add(key=PAD_TO_KEY, value=str(pad_to))
        staged = path.with_name(path.name + ".stamping")
        try:
            onnx.save(model, str(staged))
            os.replace(staged, path)
        finally:  # what a failed write (a full disk) left
            staged.unlink(missing_ok=True)
    elif path.suffix == ".xml":
        import openvino as ov

        from lmmc.runtime.openvino import PAD_TO_PATH, core

        model = core().read_model(str(path))
        model.set_rt_info(str(pad_to), PAD_TO_PATH)
        xml = path.with_name(path.stem + ".stamping.xml")
        try:
            ov.save_model(model, str(xml), compress_to_fp16=False)  # the same weights, byte for byte
            del model  # it maps the .bin being replaced
            os.replace(xml.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(xml, path)
        finally:  # what a failed write (a full disk) left
            xml.unlink(missing_ok=True)
            xml.with_suffix(".bin").unlink(missing_ok=True)


def write_manifest(art: Artifact, root: Path, max_length: int | None) -> Path:
    """Write `root`/manifest.json; `root` holds the artifacts and the saved student. Text artifacts of a
    model that reads one length are stamped with it first."""
    pad_to = text_pad_length(art.student.config, art.adapter)
    if pad_to is not None:
        for rec in artifact_records(art):
            if art.adapter.tower(rec.tower).modality == "text":
                stamp_pad_to(rec.path, pad_to)
    path = root / MANIFEST
    path.write_text(json.dumps(build_manifest(art, root, max_length), indent=2))
    return path
