"""One runtime for every exported artifact: `load` opens an ONNX file in ONNX Runtime, an OpenVINO IR or a
TensorRT engine behind the same small interface, `open_dir` turns a compile's output into an encoder and
`open_generative` a generative model's output into a greedy generator."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmmc.errors import LmmcError, missing_package

if TYPE_CHECKING:
    from lmmc.runtime.onnxruntime import TensorRTOptions

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
MANIFEST = "manifest.json"
# What every reader of a manifest takes from each of its artifacts.
ARTIFACT_KEYS = ("tower", "backend", "precision", "path")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, element type (numpy name) and shape; None marks a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


class Model:
    """What every backend's loaded artifact offers; a backend sets the four attributes and `run`."""

    backend: str
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    device: str = "cpu"  # where it runs: cpu, cuda or cuda:N
    providers: tuple[str, ...] = ()  # ONNX Runtime's execution providers the session uses; other backends: none

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def backend_for(path: Path) -> str:
    """The backend a file's suffix implies: .onnx -> onnxruntime, .xml -> openvino, .engine -> tensorrt."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnxruntime"
    if suffix == ".xml":
        return "openvino"
    if suffix == ".engine":
        return "tensorrt"
    raise LmmcError(f"'{path}' is neither an ONNX file (.onnx), an OpenVINO IR (.xml) nor a TensorRT engine "
                    f"(.engine); pass one of those, or name the backend with backend=...")


def load(path: str | Path, backend: str | None = None, threads: int | None = None, device: str | None = None,
         tensorrt: TensorRTOptions | None = None, inference_precision: str | None = None,
         static_shape: tuple[int, ...] | None = None) -> Model:
    """Open one exported artifact. `backend` defaults to what the suffix implies; `threads` sets the
    runtime's intra-op threads (None: the runtime's default). `inference_precision` (OpenVINO only): f32,
    the default, or bf16 to run an IR's fp32 layers in bf16 on a CPU that has the units. `device` (cpu,
    cuda or cuda:N) picks ONNX Runtime's execution providers, CUDA with the CPU for what CUDA lacks, and
    `tensorrt` (lmmc.runtime.onnxruntime.TensorRTOptions) puts its TensorRT provider first; a provider
    this ONNX Runtime lacks is an error naming the package to install, never a quiet fall-back to the
    CPU. None: the backend's own device (the CPU; a TensorRT engine's GPU). `static_shape` (OpenVINO
    only): (batch, seq), or (batch,) for images, compiles the IR for that one input shape, which runs
    faster than the dynamic IR; `run` then takes any batch in chunks of `batch`, pads each up to the shape
    (tokens the attention mask hides) and trims the outputs back, so a feed longer than `seq` is an error."""
    path = Path(path)
    if not path.is_file():
        raise LmmcError(f"artifact '{path}' does not exist; pass the path of an exported .onnx or .xml file")
    backend = backend or backend_for(path)
    if inference_precision is not None and backend != "openvino":
        raise LmmcError(f"inference_precision is OpenVINO's setting; {path.name} runs on {backend}")
    if static_shape is not None and backend != "openvino":
        raise LmmcError(f"static_shape is for OpenVINO IRs; {path.name} runs on {backend}")
    if backend == "onnxruntime":
        from lmmc.runtime.onnxruntime import OrtModel
        return OrtModel(path, threads, device or "cpu", tensorrt)
    if tensorrt is not None:
        raise LmmcError(f"tensorrt options are for ONNX Runtime's TensorRT provider; {path.name} runs on {backend}")
    if backend == "openvino":
        if device not in (None, "cpu"):
            raise LmmcError(f"lmmc runs OpenVINO IRs on the CPU only, not on '{device}'; load the ONNX artifact "
                            f"with device='{device}' instead")
        from lmmc.runtime.openvino import OpenVinoModel
        return OpenVinoModel(path, threads, inference_precision or "f32", static_shape)
    if backend == "tensorrt":
        if device not in (None, "cuda"):
            raise LmmcError(f"a TensorRT engine runs on the current NVIDIA GPU, not on '{device}'; pass device='cuda' "
                            f"or None, and choose the GPU with CUDA_VISIBLE_DEVICES")
        from lmmc.runtime.tensorrt import TrtModel
        model = TrtModel(path, threads)
        model.device = "cuda"
        return model
    raise LmmcError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")


def cast_feed(model: Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check the feed names the model's inputs and give each array the dtype the model declares, so a
    tokenizer's int32 ids or a float64 image work as they are."""
    missing = [s.name for s in model.inputs if s.name not in feed]
    if missing:
        raise LmmcError(f"{model.path.name} needs input(s) {missing}; the feed has {sorted(feed)}")
    return {s.name: np.ascontiguousarray(feed[s.name], dtype=s.dtype) for s in model.inputs}


def shapes_of(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {list(x.shape)}" for name, x in feed.items())


# What a run that cannot index its inputs usually means for lmmc's towers.
OUT_OF_RANGE = ("More tokens than the model's position table or a token id beyond its vocabulary is the usual "
                "cause; truncate texts to the manifest's preprocessing.text.max_length, as encode() does")


class Deployment:
    """A compile's output directory read through its manifest: one artifact per tower, chosen by backend,
    precision and variant, and the saved tokenizer / image processor to feed it."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], models: dict[str, Model]) -> None:
        self.out_dir = out_dir
        self.manifest = manifest
        self.models = models  # tower -> loaded artifact
        self._preprocessors: dict[str, Any] = {}

    def _preprocessor(self, modality: str):
        if modality not in self._preprocessors:
            import transformers

            student = self.out_dir / "student"
            cls = transformers.AutoTokenizer if modality == "text" else transformers.AutoImageProcessor
            try:
                self._preprocessors[modality] = cls.from_pretrained(student)
            except ImportError as err:
                raise missing_package(err, f"the {'tokenizer' if modality == 'text' else 'image processor'} "
                                           f"in {student}") from None
        return self._preprocessors[modality]

    def tower_for(self, modality: str) -> str:
        for name, tower in self.manifest["towers"].items():
            if tower["modality"] == modality:
                return name
        raise LmmcError(f"{self.out_dir} has no {modality} tower; its towers are {sorted(self.manifest['towers'])}")

    def encode(self, items: list, tower: str | None = None, batch_size: int = 16) -> np.ndarray:
        """Pooled embeddings of texts (str) or images (PIL images or pathlib.Path files), L2-normalised
        unless the model's pipeline does not normalise (the manifest's `towers.<name>.normalized`)."""
        if not items:
            return np.zeros((0, 0), dtype=np.float32)
        modality = "text" if isinstance(items[0], str) else "image"
        tower = tower or self.tower_for(modality)
        model = self.models[tower]
        static = getattr(model, "static", None)
        seq = static.seq if static is not None and modality == "text" else None
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            out.append(model.run(self._encode_inputs(modality, chunk, seq))["pooled_embedding"])
        return np.concatenate(out)

    def _encode_inputs(self, modality: str, chunk: list, seq: int | None) -> dict[str, np.ndarray]:
        """The model's inputs for `chunk`; texts cut to the manifest's length, or to `seq` tokens where the
        model was loaded for a static shape of fewer."""
        proc = self._preprocessor(modality)
        if modality == "text":
            text = self.manifest["preprocessing"]["text"]
            pad_to = text.get("pad_to")
            limits = [x for x in (text["max_length"], seq) if x]
            limit = min(limits) if limits else None
            if pad_to is None:
                enc = proc(chunk, padding=True, truncation=True, max_length=limit, return_tensors="np")
            else:  # a model read at a fixed length (SigLIP), as lmmc.data.encode_text pads it
                limit = min(limit or pad_to, pad_to)
                enc = proc.pad(proc(chunk, truncation=True, max_length=limit), padding="max_length",
                               max_length=pad_to, return_tensors="np")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        from PIL import Image

        images = [Image.open(i).convert("RGB") if isinstance(i, Path) else i for i in chunk]
        return {"pixel_values": proc(images=images, return_tensors="np")["pixel_values"]}


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """A compile's manifest, its shape checked once for every reader (open_dir, lmmc bench): each artifact
    names its tower, backend, precision and path, and no file it names lies outside `out_dir`, so an edited
    manifest cannot make lmmc read files elsewhere."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise LmmcError(f"'{out_dir}' has no {MANIFEST}; give the output directory of 'lmmc compile'")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LmmcError(f"{path} is not valid JSON ({err.msg}); recompile to rewrite it") from None
    malformed = LmmcError(f"{path} is not an lmmc manifest (each artifact needs a tower, backend, precision and "
                          f"path, each tower a modality); recompile to rewrite it")
    artifacts = manifest.get("artifacts") if isinstance(manifest, dict) else None
    if not isinstance(artifacts, list) or not all(
            isinstance(a, dict) and all(isinstance(a.get(k), str) for k in ARTIFACT_KEYS) for a in artifacts):
        raise malformed
    towers = manifest.get("towers", {})
    if not isinstance(towers, dict) or not all(isinstance(t, dict) and isinstance(t.get("modality"), str)
                                               for t in towers.values()):
        raise malformed
    try:
        named = _named_files(manifest)
    except (AttributeError, TypeError):  # a "files" list or a section that is not what lmmc writes
        raise malformed from None
    root = Path(out_dir).resolve()
    for name in named:
        if not _inside(root, name):
            raise LmmcError(f"{path} names {name!r}, which is not a file inside '{out_dir}'; a manifest names only "
                            f"files of its own output directory: recompile to rewrite it")
    return manifest


def _inside(root: Path, name: Any) -> bool:
    """Whether `name` is a path that resolves inside `root` (links followed; an absolute path or '..' may not)."""
    try:
        return isinstance(name, str) and (root / name).resolve().is_relative_to(root)
    except (OSError, ValueError):  # a NUL character, a link loop
        return False


def _named_files(manifest: dict[str, Any]) -> list:
    """Every file a manifest names: the artifacts and the files they read, the preprocessing files, and a
    generative export's spec, graphs and token table."""
    names = [a["path"] for a in manifest["artifacts"]]
    names += [f for a in manifest["artifacts"] for f in a.get("files", [])]
    names += [f for section in manifest.get("preprocessing", {}).values() for f in section.get("files", [])]
    generative = manifest.get("generative", {})
    names += [generative[key] for key in ("spec", "vision", "decoder", "embeddings") if key in generative]
    return names


def open_dir(out_dir: str | Path, backend: str = "onnxruntime", precision: str = "fp32",
             variant: str | None = None, threads: int | None = None, device: str | None = None,
             inference_precision: str | None = None, static_shape: tuple[int, ...] | None = None) -> Deployment:
    """Load one artifact per tower of a compile's output. `variant` None prefers the fused graph, which
    the compile keeps only when it is the faster, over the plain one; `threads`, `device`,
    `inference_precision` and `static_shape` as in `load`."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest.get("towers"):
        raise LmmcError(f"{out_dir / MANIFEST} names no towers; recompile to rewrite it")
    models = {}
    for tower in manifest["towers"]:
        # read_manifest requires no variant (bench needs none): an artifact without one matches variant=None only
        chosen = [a for a in manifest["artifacts"] if a["tower"] == tower and a["backend"] == backend
                  and a["precision"] == precision and variant in (None, a.get("variant"))]
        if not chosen:
            have = sorted({(a["backend"], a["precision"], a.get("variant", "")) for a in manifest["artifacts"]
                           if a["tower"] == tower})
            raise LmmcError(f"{out_dir} has no {backend} {precision} {variant or ''} artifact for the {tower} tower; "
                            f"it has {have}")
        chosen.sort(key=lambda a: a.get("variant") != "fused")
        models[tower] = load(out_dir / chosen[0]["path"], backend, threads, device,
                             inference_precision=inference_precision, static_shape=static_shape)
    return Deployment(out_dir, manifest, models)


def open_generative(out_dir: str | Path, threads: int | None = None):
    """A compile's generative export (vision graph, KV-cache decoder, token table) with the saved processor,
    ready for `generate(image, prompt, max_new_tokens)`; see lmmc.runtime.generate."""
    import transformers

    from lmmc.runtime.generate import Generator

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if "generative" not in manifest:
        raise LmmcError(f"{out_dir} holds no generative export (no decoder with a KV cache); compile a generative "
                        f"model with the 'onnx_generative' export pass, or open an encoder's output with open_dir")
    try:
        processor = transformers.AutoProcessor.from_pretrained(out_dir / "student")
    except ImportError as err:
        raise missing_package(err, f"the processor in {out_dir / 'student'}") from None
    return Generator(out_dir / Path(manifest["generative"]["spec"]).parent, threads, processor)
