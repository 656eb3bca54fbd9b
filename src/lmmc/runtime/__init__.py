"""One runtime for every exported artifact: `load` opens an ONNX file in ONNX Runtime, an OpenVINO IR or a
TensorRT engine behind the same small interface, `open_dir` turns a compile's output into an encoder and
`open_generative` a generative model's output into a greedy generator."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from lmmc.errors import LmmcError, missing_package, refuse_own_code
from lmmc.runtime.images import IMAGE_SUFFIXES, READ_FIX, as_numpy, open_image, to_rgb
from lmmc.runtime.texts import clip_texts

# transformers imports its classes lazily, and a thread reading one while another thread's import is under
# way finds the module half-built (no attribute 'AutoTokenizer'): one thread at a time reads a preprocessor.
_READING = threading.Lock()
# Deployments whose locks a forked child renews: a lock that a parent's thread held at the fork stays held
# in the child, where no thread will ever release it.
_DEPLOYMENTS: "weakref.WeakSet[Deployment]" = weakref.WeakSet()


def _renew_locks() -> None:
    global _READING
    _READING = threading.Lock()
    for deployment in list(_DEPLOYMENTS):
        deployment._tokenizing = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks)

# The most intra-op threads a setting may ask for: far above any CPU's cores, far below what overflows
# the runtimes' C integers.
MAX_THREADS = 1024

if TYPE_CHECKING:
    from lmmc.runtime.onnxruntime import TensorRTOptions

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lmmc-manifest/1"  # what a manifest's "format" says; another is one this lmmc cannot read
FILE_LIST = ".lmmc-files.json"  # every file a compile wrote, each with its digest
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
    pad_to: int | None = None  # a text model read at one length (SigLIP pools its last position): the only one fed

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __reduce__(self):
        """Pickled (for a process pool's workers, say) as how `load` opened it: the worker opens the file again,
        since a runtime's session cannot be copied between processes."""
        opened = getattr(self, "_opened_with", None)
        if opened is None:
            raise LmmcError(f"this {type(self).__name__} was not opened by lmmc.runtime.load, so it cannot be sent to "
                            f"another process; call load() there")
        return load, opened


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


# Where a text artifact that reads one length says which (ONNX metadata_props; an IR's rt_info under
# lmmc/pad_to): a copy taken out of its output, away from manifest.json, must still refuse other lengths.
PAD_TO_KEY = "lmmc.pad_to"


def text_pad_to(path: Path, stamped: Any = None) -> int | None:
    """The one length an lmmc text artifact reads (SigLIP's 64): the artifact's own `stamped` value, else
    the manifest of the output it sits in (outputs written before artifacts carried it)."""
    if stamped is not None:
        with contextlib.suppress(ValueError, TypeError):
            return int(stamped)
    try:
        manifest = json.loads((path.parent.parent / MANIFEST).read_text())
        return int(manifest["preprocessing"]["text"]["pad_to"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def manifest_positions(path: Path) -> int | None:
    """The most tokens a text artifact takes, from the manifest of the output it sits in (None elsewhere, or
    for an output written before manifests recorded it)."""
    try:
        manifest = json.loads((path.parent.parent / MANIFEST).read_text())
        return int(manifest["preprocessing"]["text"]["positions"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_static_pad(name: str, static_shape: tuple[int, ...] | None, pad_to: int | None) -> None:
    # encode pads every text to that length; a static IR of another length could not take it
    if static_shape is not None and len(static_shape) == 2 and pad_to and static_shape[1] != pad_to:
        raise LmmcError(f"{name}'s text tower reads every text padded to {pad_to} tokens (as it was trained), so "
                        f"a static_shape for it gives {pad_to} as its length: static_shape=({static_shape[0]}, "
                        f"{pad_to})")


def load(path: str | Path, backend: str | None = None, threads: int | None = None, device: str | None = None,
         tensorrt: TensorRTOptions | None = None, inference_precision: str | None = None,
         static_shape: tuple[int, ...] | None = None, spinning: bool = True) -> Model:
    """Open one exported artifact. `backend` defaults to what the suffix implies; `threads` sets the
    runtime's intra-op threads (None: the runtime's default). `inference_precision` (OpenVINO only): f32,
    the default, or bf16 to run an IR's fp32 layers in bf16 on a CPU that has the units. `device` (cpu,
    cuda or cuda:N) picks ONNX Runtime's execution providers, CUDA with the CPU for what CUDA lacks, and
    `tensorrt` (lmmc.runtime.onnxruntime.TensorRTOptions) puts its TensorRT provider first; a provider
    this ONNX Runtime lacks is an error naming the package to install, never a quiet fall-back to the
    CPU. None: the backend's own device (the CPU; a TensorRT engine's GPU). `static_shape` (OpenVINO
    only): (batch, seq), or (batch,) for images, compiles the IR for that one input shape, which runs
    faster than the dynamic IR; `run` then takes any batch in chunks of `batch`, pads each up to the shape
    (tokens the attention mask hides) and trims the outputs back, so a feed longer than `seq` is an error.
    `spinning` (ONNX Runtime only): False stops idle worker threads from spinning for work, for a session
    that runs between another's runs, whose threads would otherwise take the cores from it."""
    if not isinstance(path, (str, os.PathLike)):
        raise LmmcError(f"load takes the path of an exported .onnx, .xml or .engine file, not {type(path).__name__}")
    if backend is not None and backend not in BACKENDS:  # "" too, which read as "by the suffix"
        raise LmmcError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}, or None for the one the "
                        f"file's suffix implies")
    path = Path(path)
    if path.is_dir() or path.name == MANIFEST:
        raise LmmcError(f"'{path}' is {'a directory' if path.is_dir() else 'a compile manifest'}; pass the path of an "
                        f"exported .onnx, .xml or .engine file, or open a compile's whole output with open_dir")
    if not path.is_file():
        raise LmmcError(f"artifact '{path}' does not exist; pass the path of an exported .onnx or .xml file")
    if threads is not None and (type(threads) is not int or not 1 <= threads <= MAX_THREADS):
        raise LmmcError(f"threads must be an integer from 1 to {MAX_THREADS} (or None for the runtime's default), "
                        f"not {threads!r}")
    backend = backend or backend_for(path)
    if not spinning and backend != "onnxruntime":
        raise LmmcError(f"spinning is ONNX Runtime's setting; {path.name} runs on {backend}")
    model = _load(path, backend, threads, device, tensorrt, inference_precision, static_shape, spinning)
    model._opened_with = (path.resolve(), backend, threads, device, tensorrt, inference_precision, static_shape,
                          spinning)
    return model


def _load(path: Path, backend: str, threads: int | None, device: str | None, tensorrt: TensorRTOptions | None,
          inference_precision: str | None, static_shape: tuple[int, ...] | None, spinning: bool = True) -> Model:
    if inference_precision is not None and backend != "openvino":
        raise LmmcError(f"inference_precision is OpenVINO's setting; {path.name} runs on {backend}")
    if static_shape is not None and not isinstance(static_shape, (tuple, list)):
        raise LmmcError(f"static_shape must be (batch,) or (batch, seq) of positive integers, not {static_shape!r}")
    if static_shape is not None and backend != "openvino":
        raise LmmcError(f"static_shape is for OpenVINO IRs; {path.name} runs on {backend}")
    if backend == "onnxruntime":
        from lmmc.runtime.onnxruntime import OrtModel
        model = OrtModel(path, threads, "cpu" if device is None else device, tensorrt, spinning)  # 0, "": no CPU
        model.pad_to = text_pad_to(path, model.session.get_modelmeta().custom_metadata_map.get(PAD_TO_KEY))
        return model
    if tensorrt is not None:
        raise LmmcError(f"tensorrt options are for ONNX Runtime's TensorRT provider; {path.name} runs on {backend}")
    if backend == "openvino":
        if device not in (None, "cpu"):
            raise LmmcError(f"lmmc runs OpenVINO IRs on the CPU only, not on '{device}'; pass device='cpu' or None, "
                            f"or load the ONNX artifact with device='cuda' for a GPU")
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


# Inputs with one value per token of input_ids.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _nonzero(values: Any) -> bool:
    try:
        return bool(np.any(np.asarray(values) != 0))
    except (ValueError, TypeError):  # ragged: refused as an unknown input all the same
        return False


def cast_feed(model: Model, feed: dict[str, np.ndarray], exact: bool = True) -> dict[str, np.ndarray]:
    """Check the feed names the model's inputs, with the rank and fixed sizes they declare (`exact`; a
    static-shape IR pads its feeds itself), one batch size, and no empty ids or pixels; give each array
    the dtype the model declares, so a tokenizer's int32 ids or a float64 image work as they are."""
    if not isinstance(feed, Mapping):
        raise LmmcError(f"{model.path.name} takes a dict of input name -> array, not {type(feed).__name__}; its "
                        f"inputs are {[s.name for s in model.inputs]}")
    missing = [s.name for s in model.inputs if s.name not in feed]
    if missing:
        raise LmmcError(f"{model.path.name} needs input(s) {missing}; the feed has {sorted(feed)}")
    unknown = sorted(str(k) for k in feed if k not in {s.name for s in model.inputs})
    if "token_type_ids" in unknown and _nonzero(feed["token_type_ids"]):
        raise LmmcError(f"{model.path.name} reads every token as segment 0, and the feed's token_type_ids mark a "
                        f"second segment (a sentence pair): lmmc's exports embed one text at a time, so pairs "
                        f"are not supported; encode each text alone")
    if "token_type_ids" in unknown:  # all segment 0, as the model reads every token: a tokenizer's output as it is
        unknown.remove("token_type_ids")
    if unknown:  # ONNX Runtime refuses them too; a value the model never reads must not pass as one it does
        raise LmmcError(f"{model.path.name} takes no input(s) {unknown}; its inputs are "
                        f"{[s.name for s in model.inputs]}: leave the others out of the feed")
    out = {}
    for spec in model.inputs:
        try:
            x = as_numpy(feed[spec.name])
        except (ValueError, TypeError) as err:  # ragged nested lists
            raise LmmcError(f"'{spec.name}' is not an array ({err}); feed a rectangular array") from None
        if x.dtype.kind not in "biuf":
            raise LmmcError(f"'{spec.name}' holds {x.dtype} values, and {model.path.name} takes numbers "
                            f"({spec.dtype}); tokenize texts first, or use encode()")
        if exact and (x.ndim != len(spec.shape) or any(d is not None and d != n for d, n in zip(spec.shape, x.shape))):
            wanted = [d if d is not None else "any" for d in spec.shape]
            raise LmmcError(f"{model.path.name} takes '{spec.name}' of shape {wanted}, and the feed has {list(x.shape)}")
        if spec.name == "input_ids" and model.pad_to and x.ndim == 2 and x.shape[1] != model.pad_to:
            raise LmmcError(f"{model.path.name} reads texts padded to {model.pad_to} tokens with the pad id (its "
                            f"pooling reads a fixed position), and the feed has {x.shape[1]}: pad it to "
                            f"{model.pad_to} as encode() does")
        if spec.name in ("input_ids", "pixel_values") and x.size == 0:
            raise LmmcError(f"'{spec.name}' of shape {list(x.shape)} is empty; feed at least one token or image")
        if x.dtype.kind == "b" and spec.name != "attention_mask":  # a mask passed as ids would run as ids 0 and 1
            raise LmmcError(f"'{spec.name}' holds booleans, and {model.path.name} takes {spec.dtype} values there; "
                            f"only attention_mask may be boolean")
        if np.issubdtype(np.dtype(spec.dtype), np.integer) and x.dtype.kind == "f" and not np.isfinite(x).all():
            raise LmmcError(f"'{spec.name}' holds NaN or infinite values, and {model.path.name} takes integers "
                            f"({spec.dtype})")
        if np.issubdtype(np.dtype(spec.dtype), np.integer) and x.dtype.kind == "f" and not np.array_equal(x, np.trunc(x)):
            raise LmmcError(f"'{spec.name}' holds fractions, and {model.path.name} takes integers ({spec.dtype})")
        if np.issubdtype(np.dtype(spec.dtype), np.integer) and x.size:
            info = np.iinfo(spec.dtype)
            if x.max() > info.max or x.min() < info.min:  # the cast would wrap it around
                raise LmmcError(f"'{spec.name}' holds {x.max() if x.max() > info.max else x.min()}, beyond the "
                                f"{spec.dtype} {model.path.name} takes; feed ids from the model's own tokenizer, "
                                f"as encode() does")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = np.ascontiguousarray(x, dtype=spec.dtype)
        # Checked after the cast: a float64 beyond float32's range becomes infinite in it.
        if cast.dtype.kind == "f" and not np.isfinite(cast).all():  # a NaN pixel would come back as a NaN embedding
            rows = sorted({int(i) for i in np.argwhere(~np.isfinite(cast))[:, 0]}) if cast.ndim else []
            raise LmmcError(f"'{spec.name}' holds NaN or infinite values, or values beyond {spec.dtype} (batch rows "
                            f"{rows[:5]}{' ...' if len(rows) > 5 else ''}); check the images or arrays fed")
        if spec.name == "input_ids" and cast.min() < 0:  # ONNX's Gather would read a negative id from the end
            raise LmmcError(f"'input_ids' holds id {cast.min()}; token ids are never negative: feed ids from the "
                            f"model's own tokenizer, as encode() does")
        out[spec.name] = cast
    batches = {x.shape[0] for x in out.values() if x.ndim}
    if len(batches) > 1:
        raise LmmcError(f"the inputs of {model.path.name} disagree on the batch size: {shapes_of(out)}")
    tokens = {name: x for name, x in out.items() if name in TOKEN_INPUTS}
    if "input_ids" in tokens and len({x.shape for x in tokens.values()}) > 1:
        # ONNX Runtime refuses it; OpenVINO runs it, and its request then returned stale outputs to later feeds
        raise LmmcError(f"the token inputs of {model.path.name} differ in shape: {shapes_of(tokens)}; give "
                        f"every one a value per token of input_ids")
    mask = tokens.get("attention_mask")
    if mask is not None and "input_ids" in tokens:
        if not np.isin(mask, (0, 1)).all():
            raise LmmcError(f"'attention_mask' holds values other than 0 and 1 ({np.unique(mask)[:5].tolist()}); "
                            f"1 marks a token to read, 0 padding")
        empty = np.flatnonzero(mask.reshape(mask.shape[0], -1).sum(axis=1) == 0) if mask.ndim else []
        if len(empty):  # backends disagree on a row that reads nothing: zeros from one, NaN from another
            raise LmmcError(f"'attention_mask' rows {empty[:5].tolist()} mark no token to read; every row needs "
                            f"at least one 1")
    return out


def shapes_of(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {list(x.shape)}" for name, x in feed.items())


# What a text tower's run that cannot index its inputs usually means.
OUT_OF_RANGE = ("More tokens than the model's position table or a token id beyond its vocabulary is the usual "
                "cause; truncate texts to the manifest's preprocessing.text.max_length, as encode() does")


def check_text_feed(name: str, feed: dict[str, np.ndarray], rows: dict[str, int], tokens: int | None) -> None:
    """Refuse ids outside the tables they index (`rows`: input -> table rows) and more tokens than the
    model takes, in words, before a runtime fails on them with its own message (or, OpenVINO, reads zeros)."""
    for key, count in rows.items():
        ids = feed.get(key)
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= count):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise LmmcError(f"'{key}' holds id {bad}, outside the {count} rows of the table {name} looks it up in; "
                            f"feed ids from the model's own tokenizer, as encode() does")
    ids = feed.get("input_ids")
    if tokens is not None and ids is not None and ids.ndim == 2 and ids.shape[1] > tokens:
        raise LmmcError(f"{name} takes at most {tokens} tokens, and the feed has {shapes_of(feed)}. {OUT_OF_RANGE}")


class Deployment:
    """A compile's output directory read through its manifest: one artifact per tower, chosen by backend,
    precision and variant, and the saved tokenizer / image processor to feed it."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], models: dict[str, Model],
                 trust_remote_code: bool = False) -> None:
        self.out_dir = out_dir
        self.manifest = manifest
        self.models = models  # tower -> loaded artifact
        self.trust_remote_code = trust_remote_code
        self._preprocessors: dict[str, Any] = {}
        # A fast tokenizer applies each call's truncation by changing its own state, so threads that share one
        # took each other's settings: texts came back uncut, with no error or failing on the position table.
        self._tokenizing = threading.Lock()
        _DEPLOYMENTS.add(self)
        self._opened_with: dict[str, Any] | None = None  # open_dir's settings, which pickling sends
        self._fingerprint: str | None = None

    def __reduce__(self):
        """Pickled (for a process pool's workers, say) as how `open_dir` opened it: each worker opens the output
        again, since a runtime's session cannot be copied between processes, and refuses one that a compile
        has replaced since."""
        if self._opened_with is None:
            raise LmmcError("this Deployment was not opened by lmmc.runtime.open_dir, so it cannot be sent to another "
                            "process; call open_dir() there")
        return _reopen, (self.out_dir, self._opened_with, self._fingerprint)

    def _preprocessor(self, modality: str):
        if modality not in self._preprocessors:
            with _READING:
                self._read_preprocessor(modality)
        return self._preprocessors[modality]

    def _read_preprocessor(self, modality: str) -> None:
        if modality in self._preprocessors:  # another thread read it while this one waited
            return
        try:
            import transformers
        except ImportError as err:
            raise missing_package(err, "the saved tokenizer or image processor") from None

        student = self.out_dir / "student"
        what = "tokenizer" if modality == "text" else "image processor"
        # transformers builds a tokenizer with an empty vocabulary from config.json alone: every word
        # would read as one unknown token, silently
        missing = [f for f in self.manifest["preprocessing"][modality]["files"] if not (self.out_dir / f).is_file()]
        if missing:
            raise LmmcError(f"{self.out_dir} lacks {missing}, the {what} files its manifest lists; copy the "
                            f"whole output directory, or compile again")
        if not self.trust_remote_code:
            refuse_own_code(student, "trust_remote_code=True")
        cls = transformers.AutoTokenizer if modality == "text" else transformers.AutoImageProcessor
        try:
            self._preprocessors[modality] = cls.from_pretrained(student, trust_remote_code=self.trust_remote_code)
        except ImportError as err:
            raise missing_package(err, f"the {what} in {student}") from None
        except (OSError, ValueError) as err:
            raise LmmcError(f"cannot read the {what} in {student}: {str(err).strip().splitlines()[0]}; copy the "
                            f"whole output directory, or compile again") from None

    def tower_for(self, modality: str) -> str:
        for name, tower in self.manifest["towers"].items():
            if tower["modality"] == modality:
                return name
        how = "; pass images as PIL images or pathlib.Path files (a str is read as text)" if modality == "text" else ""
        raise LmmcError(f"{self.out_dir} has no {modality} tower; its towers are {sorted(self.manifest['towers'])}{how}")

    def encode(self, items: Iterable, tower: str | None = None, batch_size: int = 16) -> np.ndarray:
        """Pooled embeddings of texts (str) or images (PIL images, pathlib.Path files, or arrays H x W,
        H x W x C or C x H x W), one row per item, L2-normalised unless the model's pipeline does not
        normalise (the manifest's `towers.<name>.normalized`). A dynamic INT8 artifact quantises each
        batch's activations on that batch's range, padding included, so an item's row depends on its batch
        (a cosine of 0.966 between an empty text alone and padded to 128 tokens, on MiniLM); batch_size=1
        makes each row its own."""
        items = _as_list(items)
        if type(batch_size) is not int or batch_size < 1:
            raise LmmcError(f"batch_size must be a positive integer, not {batch_size!r}")
        if tower is not None and (not isinstance(tower, str) or tower not in self.models):
            raise LmmcError(f"{self.out_dir} has no tower {tower!r}; its towers are {sorted(self.models)}")
        if not items:
            width = {s.shape[-1] for name, m in self.models.items() if tower in (None, name)
                     for s in m.outputs if s.name == "pooled_embedding"}
            return np.zeros((0, width.pop() if len(width) == 1 and None not in width else 0), dtype=np.float32)
        modality = _modality(items)
        if modality == "text" and tower is None and "image" in {t["modality"] for t in self.manifest["towers"].values()}:
            _refuse_image_paths(items, self.tower_for("text"))
        tower = tower or self.tower_for(modality)
        if self.manifest["towers"][tower]["modality"] != modality:
            raise LmmcError(f"the {tower} tower reads {self.manifest['towers'][tower]['modality']}, and the items are "
                            f"{modality}; pass tower= one of {sorted(self.models)} that reads {modality}")
        model = self.models[tower]
        static = getattr(model, "static", None)
        seq = static.seq if static is not None and modality == "text" else None
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            out.append(model.run(self._encode_inputs(modality, chunk, seq))["pooled_embedding"])
        emb = np.concatenate(out)
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if bad.size:  # an overflow in a reduced-precision artifact, say: never hand back NaN as an embedding
            raise LmmcError(f"the {tower} tower's artifact {model.path.name} gave NaN or infinite embeddings for "
                            f"item(s) {bad[:5].tolist()}{' ...' if bad.size > 5 else ''}; try the fp32 artifact")
        return emb

    def _encode_inputs(self, modality: str, chunk: list, seq: int | None) -> dict[str, np.ndarray]:
        """The model's inputs for `chunk`; texts cut to the manifest's length, or to `seq` tokens where the
        model was loaded for a static shape of fewer."""
        proc = self._preprocessor(modality)
        if modality == "text":
            text = self.manifest["preprocessing"]["text"]
            pad_to = text.get("pad_to")
            limits = [x for x in (text["max_length"], seq) if x]
            limit = min(limits) if limits else None
            if pad_to is not None:
                limit = min(limit or pad_to, pad_to)
            with self._tokenizing:
                chunk = clip_texts(proc, chunk, limit)
                if pad_to is None:
                    enc = proc(chunk, padding=True, truncation=True, max_length=limit, return_tensors="np",
                               return_attention_mask=True)
                else:  # a model read at a fixed length (SigLIP), as lmmc.data.encode_text pads and masks it
                    enc = proc.pad(proc(chunk, truncation=True, max_length=limit), padding="max_length",
                                   max_length=pad_to, return_tensors="np")
            mask = enc.get("attention_mask")
            return {"input_ids": enc["input_ids"],
                    "attention_mask": mask if mask is not None else np.ones_like(enc["input_ids"])}
        images = [open_image(i, READ_FIX) if isinstance(i, Path) else to_rgb(i) for i in chunk]
        return {"pixel_values": proc(images=images, return_tensors="np")["pixel_values"]}


def _refuse_image_paths(texts: list[str], text_tower: str) -> None:
    """A model with an image tower reads a str as text: one that names an image file was surely meant as the
    picture, and would come back as the embedding of its file name."""
    def names_image(text: str) -> bool:
        path = Path(text.strip())
        try:
            return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        except (OSError, ValueError):  # a sentence too long for a file name, or one holding a NUL
            return False

    for i, text in enumerate(texts):
        if names_image(text):
            raise LmmcError(f"item {i} of encode's list is the str '{text}', which names an image file; a str is "
                            f"always text: pass pathlib.Path('{text}') to encode the picture, or tower='{text_tower}' to "
                            f"encode the words")


def _as_list(items: Iterable) -> list:
    """encode's items as a list; one text or image alone is refused, since iterating it would encode its
    characters or its rows."""
    from PIL import Image

    if isinstance(items, (str, bytes, Path, Image.Image)):
        raise LmmcError(f"encode takes a list of texts or images, and got one {type(items).__name__}; wrap it in a "
                        f"list: encode([item])")
    if not isinstance(items, (list, tuple, np.ndarray)) and hasattr(items, "__array__"):  # a torch tensor, say
        items = as_numpy(items)
    if isinstance(items, np.ndarray) and items.dtype.kind in "biuf":  # iterating it would encode its rows as pictures
        raise LmmcError(f"encode takes a list of texts or images, and got one array of shape {list(items.shape)}; "
                        f"an array is one picture: wrap it in a list, encode([array]), or pass a stack of "
                        f"pictures as list(stack)")
    if isinstance(items, Mapping):  # iterating it would encode its keys
        raise LmmcError(f"encode takes a list of texts or images, not a {type(items).__name__}; pass "
                        f"list(d.values()) to encode its values")
    if isinstance(items, (set, frozenset)):  # its order, and so the rows', changes from one process to the next
        raise LmmcError(f"encode takes a list of texts or images, not a {type(items).__name__}, whose order is not "
                        f"the same in every process; pass a list (sorted(items) for a fixed order)")
    if isinstance(items, np.ndarray) and items.dtype.kind in "USO" and items.ndim != 1:
        raise LmmcError(f"encode takes a list of texts, and got an array of shape {list(items.shape)}; pass a "
                        f"one-dimensional one, array.ravel() or array.tolist() of its rows' texts")
    try:
        return list(items)
    except TypeError:
        raise LmmcError(f"encode takes a list of texts or images, not {type(items).__name__}") from None


def _modality(items: list) -> str:
    """text when every item is a str, image when none is (PIL images, Path files, arrays); a mix, or bytes
    and None, is refused naming the first item that does not fit."""
    first = "text" if isinstance(items[0], str) else "image"
    for i, item in enumerate(items):
        if isinstance(item, str) and not _utf8(item):
            raise LmmcError(f"item {i} of encode's list holds a lone surrogate, which is no text a tokenizer reads "
                            f"(bytes decoded with errors='surrogateescape'?); decode them with errors='replace'")
        unreadable = item is None or isinstance(item, (bytes, bytearray))
        if unreadable or (i == 0 and first == "image" and not _image_like(item)):
            raise LmmcError(f"item {i} of encode's list is {type(item).__name__}; pass texts as str and images as "
                            f"PIL images, pathlib.Path files or arrays")
        if isinstance(item, str) != (first == "text") or (first == "image" and not _image_like(item)):
            raise LmmcError(f"encode's items must all be texts (str) or all images (PIL images, pathlib.Path files, "
                            f"arrays); item {i} is {type(item).__name__} where item 0 is "
                            f"{type(items[0]).__name__}")
    return first


def _utf8(text: str) -> bool:
    """Whether `text` is text a tokenizer reads: a lone surrogate (of bytes decoded with surrogateescape,
    say) is none."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _image_like(item: Any) -> bool:
    from PIL import Image

    return isinstance(item, (Path, Image.Image)) or hasattr(item, "__array__")


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """A compile's manifest, its shape checked once for every reader (open_dir, lmmc bench): each artifact
    names its tower, backend, precision and path, and no file it names lies outside `out_dir`, so an edited
    manifest cannot make lmmc read files elsewhere."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise LmmcError(f"'{out_dir}' has no {MANIFEST}; give the output directory of 'lmmc compile'")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LmmcError(f"{path} is not valid JSON ({err.msg}); recompile to rewrite it") from None
    except UnicodeDecodeError:
        raise LmmcError(f"{path} is not UTF-8 text, so not a manifest lmmc wrote; recompile to rewrite it") from None
    except OSError as err:
        raise LmmcError(f"cannot read {path}: {err.strerror}; fix its permissions") from None
    written = manifest.get("format", MANIFEST_FORMAT) if isinstance(manifest, dict) else MANIFEST_FORMAT
    if written != MANIFEST_FORMAT:
        raise LmmcError(f"{path} is of format {written!r} (lmmc {manifest.get('lmmc_version', '?')} wrote it), and this "
                        f"lmmc reads {MANIFEST_FORMAT!r}; open it with the lmmc that wrote it, or recompile")
    malformed = LmmcError(f"{path} is not an lmmc manifest (each artifact needs a tower, backend, precision and "
                          f"path, each tower a modality and its preprocessing); recompile to rewrite it")
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
    sections = manifest.get("preprocessing", {})
    if not all(_preprocessing_ok(sections.get(t["modality"]), t["modality"]) for t in towers.values()):
        raise malformed
    for name in named:
        if not _inside(name):
            raise LmmcError(f"{path} names {name!r}, which is not a file inside '{out_dir}'; a manifest names only "
                            f"files of its own output directory: recompile to rewrite it")
    return manifest


def _preprocessing_ok(section: Any, modality: str) -> bool:
    """Whether a tower's preprocessing section has what encode reads: its files, and for text the length
    to cut at (None: the tokenizer's own) and, for a model read at a fixed length, that length."""
    def length(value: Any) -> bool:  # an edited manifest's 10**9 would have encode pad every text to it
        return value is None or (type(value) is int and 0 < value <= 1 << 20)

    return (isinstance(section, dict) and isinstance(section.get("files"), list)
            and (modality != "text" or ("max_length" in section and length(section["max_length"])
                                        and length(section.get("pad_to")))))


def _inside(name: Any) -> bool:
    """Whether `name` is a path within the output directory as written: not absolute, no '..'. A file that is a link
    elsewhere is the folder's own (a hub cache snapshot links every file to its blob)."""
    return (isinstance(name, str) and "\0" not in name and not Path(name).is_absolute()
            and bool(Path(name).parts) and ".." not in Path(name).parts)


def _named_files(manifest: dict[str, Any]) -> list:
    """Every file a manifest names: the artifacts and the files they read, the preprocessing files, and a
    generative export's spec, graphs and token table."""
    def listed(section: dict[str, Any]) -> list:
        files = section.get("files", [])
        if not isinstance(files, list):  # a string would be read as the names of its characters
            raise TypeError("files is not a list")
        return files

    names = [a["path"] for a in manifest["artifacts"]]
    names += [f for a in manifest["artifacts"] for f in listed(a)]
    names += [f for section in manifest.get("preprocessing", {}).values() for f in listed(section)]
    generative = manifest.get("generative", {})
    names += [generative[key] for key in ("spec", "vision", "decoder", "embeddings") if key in generative]
    return names


def digest_file(digest: Any, path: Path, name: str = "") -> None:
    """Feed one file to a SHA-256 as a compile's file list hashes it: its name there, size, then bytes."""
    digest.update(f"{name}\0{path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)


def file_list(out_dir: Path) -> dict[str, str | None] | None:
    """The files FILE_LIST names with their digests, or None without one (or with one that is not the JSON
    object a compile writes); an older lmmc's list of names alone counts as none, since a file edited under a
    listed name cannot be told from lmmc's."""
    try:
        listed = json.loads((Path(out_dir) / FILE_LIST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return listed if isinstance(listed, dict) else None


def edited_files(out_dir: Path, files: Iterable[str]) -> list[str]:
    """Those of `files` (relative to `out_dir`) that are not what the compile wrote, by the digests its file
    list keeps; none for an output from before lmmc kept them."""
    listed = file_list(out_dir) or {}
    edited = []
    for f in files:
        if not isinstance(listed.get(f), str):
            continue
        digest = hashlib.sha256()
        with contextlib.suppress(OSError):  # a missing file counts as edited
            digest_file(digest, Path(out_dir) / f)
        if digest.hexdigest() != listed[f]:
            edited.append(f)
    return edited


def output_fingerprint(out_dir: Path) -> str | None:
    """SHA-256 of the compile's file list, which names every file it wrote with that file's digest: what tells
    this output from one compiled into the same folder later. None for an output without the list."""
    try:
        return hashlib.sha256((Path(out_dir) / FILE_LIST).read_bytes()).hexdigest()
    except OSError:
        return None


def open_dir(out_dir: str | Path, backend: str = "onnxruntime", precision: str = "fp32",
             variant: str | None = None, threads: int | None = None, device: str | None = None,
             inference_precision: str | None = None, static_shape: tuple[int, ...] | None = None,
             trust_remote_code: bool = False, spinning: bool | None = None) -> Deployment:
    """Load one artifact per tower of a compile's output. `variant` None prefers the fused graph, which
    the compile keeps only when it is the faster, over the plain one, and otherwise takes the first the
    manifest lists (ONNX Runtime INT8: dynamic before static; name one with `variant`); `threads`, `device`,
    `inference_precision`, `static_shape` and `spinning` as in `load`, where `spinning` None leaves ONNX
    Runtime's idle threads spinning for a one-tower output and stops them for two towers, whose sessions
    run in turns. A tokenizer or image processor that ships its own code (compiled with
    --trust-remote-code) is read only with `trust_remote_code`."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise LmmcError(f"open_dir takes the path of a compile's output directory, not {type(out_dir).__name__}")
    if backend not in BACKENDS:  # None included: the manifest lists one artifact per backend, none "by default"
        raise LmmcError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    out_dir = Path(out_dir).resolve()
    if out_dir.name == MANIFEST and out_dir.is_file():
        out_dir = out_dir.parent
    elif out_dir.is_file():
        raise LmmcError(f"'{out_dir}' is a file; open one artifact with load(), or pass its compile's output "
                        f"directory to open_dir")
    fingerprint = output_fingerprint(out_dir)
    manifest = read_manifest(out_dir)
    if "generative" in manifest:
        raise LmmcError(f"{out_dir} holds a generative model's export, which generates text rather than encoding "
                        f"it: open it with lmmc.runtime.open_generative")
    if not manifest.get("towers"):
        raise LmmcError(f"{out_dir / MANIFEST} names no towers; recompile to rewrite it")
    pad_to = ((manifest.get("preprocessing") or {}).get("text") or {}).get("pad_to")
    prompt = ((manifest.get("preprocessing") or {}).get("text") or {}).get("default_prompt")
    if prompt:
        warnings.warn(f"{out_dir.name}'s model declares a default prompt, {prompt!r}, which sentence-transformers' "
                      f"encode prepends to every text; lmmc's encode() reads the texts as given, as the compile "
                      f"validated them: prepend it yourself where the model expects it", stacklevel=2)
    if static_shape is not None and not isinstance(static_shape, (tuple, list)):
        raise LmmcError(f"static_shape must be (batch,) or (batch, seq) of positive integers, not {static_shape!r}")
    check_static_pad(out_dir.name, static_shape, pad_to)
    reads = min(filter(None, (((manifest.get("preprocessing") or {}).get("text") or {}).get("max_length"),
                              pad_to)), default=None)
    if static_shape is not None and len(static_shape) == 2 and reads and static_shape[1] < reads:
        warnings.warn(f"static_shape's {static_shape[1]} tokens are fewer than the {reads} that {out_dir.name}'s "
                      f"encode() reads otherwise (its tokenizer's limit): encode() cuts every text to "
                      f"{static_shape[1]} tokens", stacklevel=2)
    if variant is not None and (not isinstance(variant, str) or not variant):
        raise LmmcError(f"variant must name one, such as 'fused', 'dynamic' or 'static', or be None; not {variant!r}")
    if not isinstance(precision, str):  # None would read as "any" in the message below, and match nothing
        held = sorted({a["precision"] for a in manifest["artifacts"] if a["backend"] == backend})
        raise LmmcError(f"precision must name one, not {precision!r}: {out_dir}'s {backend} artifacts are "
                        f"{', '.join(held) or 'none'}")
    if spinning is not None and (not isinstance(spinning, bool) or backend != "onnxruntime"):
        raise LmmcError(f"spinning is ONNX Runtime's setting, True, False or None; not {spinning!r} for {backend}")
    # A session's idle threads spin for work a while after each run. Two towers in turns, as a search service
    # embeds a query and then an image, each ran in the other's spin: a CLIP-size text tower 33 % slower, and
    # nothing was gained alone (BENCHMARKS.md, "Two towers in one process").
    spins = (len(manifest["towers"]) == 1 if spinning is None else spinning) if backend == "onnxruntime" else True
    models = {}
    for tower in manifest["towers"]:
        # read_manifest requires no variant (bench needs none): an artifact without one matches variant=None only
        chosen = [a for a in manifest["artifacts"] if a["tower"] == tower and a["backend"] == backend
                  and a["precision"] == precision and variant in (None, a.get("variant"))]
        if not chosen:
            have = sorted({(a["backend"], a["precision"], a.get("variant", "")) for a in manifest["artifacts"]
                           if a["tower"] == tower})
            wanted = " ".join(filter(None, (backend, precision, variant)))
            raise LmmcError(f"{out_dir} has no {wanted} artifact for the {tower} tower; it has {have}")
        chosen.sort(key=lambda a: a.get("variant") != "fused")
        entry = chosen[0]
        for name in dict.fromkeys([entry["path"], *entry.get("files", [])]):  # read_manifest checked their types
            if not (out_dir / name).is_file():  # an ONNX graph's external data or an IR's weights too
                raise LmmcError(f"'{name}' is listed in {out_dir / MANIFEST} but missing; copy the whole output "
                                f"directory, or compile again")
        models[tower] = load(out_dir / entry["path"], backend, threads, device,
                             inference_precision=inference_precision, static_shape=static_shape, spinning=spins)
        _check_signature(out_dir, entry, models[tower])
    _warn_if_failed(out_dir, manifest)
    # a swapped tokenizer, an entry pointed at another graph: encode() would differ without a word
    _warn_if_edited(out_dir, [MANIFEST, *(f for s in manifest.get("preprocessing", {}).values() for f in s["files"])])
    deployment = Deployment(out_dir, manifest, models, trust_remote_code)
    # Read now, with the artifacts: the first encodes of several threads would otherwise import transformers
    # together (which fails half-imported), and a folder moved or replaced after opening would pair these
    # artifacts with another compile's tokenizer.
    for tower in manifest["towers"].values():
        deployment._preprocessor(tower["modality"])
    _check_not_replaced(out_dir, fingerprint)
    deployment._opened_with = dict(backend=backend, precision=precision, variant=variant, threads=threads,
                                   device=device, inference_precision=inference_precision, static_shape=static_shape,
                                   trust_remote_code=trust_remote_code, spinning=spinning)
    deployment._fingerprint = fingerprint
    return deployment


def _reopen(out_dir: Path, settings: dict[str, Any], fingerprint: str | None) -> Deployment:
    """A pickled Deployment, opened again where it is unpickled."""
    deployment = open_dir(out_dir, **settings)
    if deployment._fingerprint != fingerprint:
        raise LmmcError(f"{out_dir} was compiled again since the process that sent this Deployment opened it, so its "
                        f"artifacts are not the ones opened there; open it again in that process")
    return deployment


def _warn_if_edited(out_dir: Path, files: list[str]) -> None:
    """The small files that steer what an artifact returns (the manifest, the preprocessing, a generative model's
    spec and token table), checked against their digests; the graphs themselves are too large to read at
    every opening."""
    edited = edited_files(out_dir, files)
    if edited:
        warnings.warn(f"{', '.join(edited)} in {out_dir} {'is' if len(edited) == 1 else 'are'} not what the compile "
                      f"wrote (the SHA-256 {FILE_LIST} keeps differs): edited or replaced since, so the figures "
                      f"{MANIFEST} lists do not vouch for what it returns; restore the compile's files, or compile "
                      f"again", UserWarning, stacklevel=3)


def _check_signature(out_dir: Path, entry: dict[str, Any], model: Model) -> None:
    """The loaded artifact has the inputs and outputs its manifest entry lists: a graph copied over it from
    another model (its digest is not checked, which would read every weight) would otherwise encode without
    a word, at another width."""
    def listed(key: str) -> list[tuple[str, str, list]] | None:
        specs = entry.get(key)
        try:
            return [(s["name"], s["dtype"], list(s["shape"])) for s in specs]
        except (TypeError, KeyError):  # an older or hand-written entry without them: nothing to compare
            return None

    for key, loaded in (("inputs", model.inputs), ("outputs", model.outputs)):
        want = listed(key)
        if want is None:
            continue
        have = [(s.name, s.dtype, list(s.shape)) for s in loaded]
        # a static_shape fixes axes the manifest leaves dynamic; only sizes both state must agree
        same = len(want) == len(have) and all(
            w[:2] == h[:2] and len(w[2]) == len(h[2]) and all(None in (a, b) or a == b for a, b in zip(w[2], h[2]))
            for w, h in zip(want, have))
        if not same:
            raise LmmcError(f"'{entry['path']}' in {out_dir} has {key} {_specs(have)}, but {MANIFEST} lists "
                            f"{_specs(want)}: the file was replaced by another model's; restore the compile's "
                            f"files, or compile again")


def _specs(specs: list[tuple[str, str, list]]) -> str:
    return ", ".join(f"{name} {dtype}[{', '.join('?' if d is None else str(d) for d in shape)}]"
                     for name, dtype, shape in specs)


def _check_not_replaced(out_dir: Path, fingerprint: str | None) -> None:
    """A compile --force that put another output in place while `out_dir` was opened (fingerprint taken
    before its manifest was read) would pair one compile's manifest with another's graphs."""
    if output_fingerprint(out_dir) != fingerprint:
        raise LmmcError(f"{out_dir} was replaced by a compile while it was being opened, so its manifest and its "
                        f"artifacts may belong to different compiles; open it again")


def missing_preprocessing(out_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The preprocessing files (tokenizer, image processor) a manifest lists that its output lacks."""
    return [f for section in manifest.get("preprocessing", {}).values() for f in section["files"]
            if not (out_dir / f).is_file()]


def _warn_if_failed(out_dir: Path, manifest: dict[str, Any]) -> None:
    """An output whose student missed a validation gate loads, for inspection, with a warning."""
    if manifest.get("passed") is False:
        warnings.warn(f"{out_dir} missed a validation gate when it was compiled (manifest.json: \"passed\": false): "
                      f"read its report.json before deploying this student", UserWarning, stacklevel=3)


def open_generative(out_dir: str | Path, threads: int | None = None, trust_remote_code: bool = False):
    """A compile's generative export (vision graph, KV-cache decoder, token table) with the saved processor,
    ready for `generate(image, prompt, max_new_tokens)`; see lmmc.runtime.generate. A processor that ships
    its own code is read only with `trust_remote_code`."""
    import transformers

    from lmmc.runtime.generate import Generator

    if not isinstance(out_dir, (str, os.PathLike)):
        raise LmmcError(f"open_generative takes the path of a compile's output directory, not {type(out_dir).__name__}")
    out_dir = Path(out_dir)
    if out_dir.name == MANIFEST and out_dir.is_file():
        out_dir = out_dir.parent
    fingerprint = output_fingerprint(out_dir)
    manifest = read_manifest(out_dir)
    if "generative" not in manifest:
        raise LmmcError(f"{out_dir} holds no generative export (no decoder with a KV cache); compile a generative "
                        f"model with the 'onnx_generative' export pass, or open an encoder's output with open_dir")
    missing = missing_preprocessing(out_dir, manifest)
    if missing:  # transformers would ask for a tokenizer package, or the hub, instead
        raise LmmcError(f"{out_dir} lacks {missing[:3]}, the processor files its manifest lists; copy the whole "
                        f"output directory, or compile again")
    if not trust_remote_code:
        refuse_own_code(out_dir / "student", "trust_remote_code=True")
    try:
        with _READING:
            processor = transformers.AutoProcessor.from_pretrained(out_dir / "student",
                                                                   trust_remote_code=trust_remote_code)
    except ImportError as err:
        raise missing_package(err, f"the processor in {out_dir / 'student'}") from None
    except (OSError, ValueError) as err:
        raise LmmcError(f"cannot read the processor in {out_dir / 'student'}: {str(err).strip().splitlines()[0]}; "
                        f"copy the whole output directory, or compile again") from None
    _warn_if_failed(out_dir, manifest)
    generator = Generator(out_dir / Path(manifest["generative"]["spec"]).parent, threads, processor)
    folder = Path(manifest["generative"]["spec"]).parent
    _warn_if_edited(out_dir, [MANIFEST, manifest["generative"]["spec"], str(folder / generator.spec["embeddings"]),
                              *(f for s in manifest.get("preprocessing", {}).values() for f in s["files"])])
    _check_not_replaced(out_dir, fingerprint)
    return generator
