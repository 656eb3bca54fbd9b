"""OpenVINO backend of lmmc.runtime: an IR (.xml beside its .bin) compiled for the CPU."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmmc.errors import LmmcError
from lmmc.runtime import (OUT_OF_RANGE, PAD_TO_KEY, Model, TensorSpec, cast_feed, check_static_pad, check_text_feed,
                          manifest_positions, shapes_of, text_pad_to)


def _spec(port, name: str) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorSpec(name, port.get_element_type().to_dtype().name, shape)


INFERENCE_PRECISIONS = ("f32", "bf16")
PAD_TO_PATH = PAD_TO_KEY.split(".")  # rt_info's nested keys


def reason(err: Exception) -> str:
    """What failed, from OpenVINO's message: a stack of "Exception from <file>" lines whose last says it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith("Exception from ")]
    return (said or lines or ["no reason given"])[-1]


def _openvino():
    try:
        import openvino
    except ImportError:
        raise LmmcError("OpenVINO is not installed; install the extra with `pip install 'lmmc[openvino]'`") from None
    return openvino


@functools.cache
def core():
    """The process's one OpenVINO Core, which every part of lmmc compiles and reads through.

    OpenVINO's CPU plugin gives the thread an alternate signal stack while it is loaded, and on release
    puts back the stack it found. Released in another order than loaded, two plugins leave a freed stack
    in place, and the next signal (Ctrl-C, SIGTERM) kills the process with a segmentation fault; one Core
    that lives as long as the process installs one stack and never frees it."""
    return _openvino().Core()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run layers in bf16 here (AVX512-BF16 or AMX)."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@dataclass(frozen=True)
class StaticShape:
    """The one input shape a model was compiled for, and which axes had been dynamic."""

    batch: int
    seq: int | None
    inputs: dict[str, list[int]]  # input name -> its formerly dynamic axes past the batch
    outputs: dict[str, list[int]]  # output name -> the same, trimmed back to the feed's length
    masked: bool  # the model takes an attention mask, so padded tokens do not change real ones


def make_static(model, shape: tuple[int, ...], path: Path) -> StaticShape:
    """Reshape an ov.Model in place to (batch,) or (batch, seq): every input's first axis to batch, its
    other dynamic axes to seq."""
    if not 1 <= len(shape) <= 2 or any(type(d) is not int or d < 1 for d in shape):
        raise LmmcError(f"static_shape must be (batch,) or (batch, seq) of positive integers, not {shape!r}")
    if any(d >= 2**31 for d in shape):  # OpenVINO's dimensions are 32-bit: it reports a negative one instead
        raise LmmcError(f"static_shape {shape!r} holds a size past 2**31 - 1, more than OpenVINO's dimensions take")
    batch, seq = shape[0], (shape[1] if len(shape) == 2 else None)

    def dynamic(port) -> list[int]:
        return [i for i, d in enumerate(port.get_partial_shape()) if i > 0 and not d.is_static]

    inputs = {p.get_any_name(): dynamic(p) for p in model.inputs}
    outputs = {p.get_any_name(): dynamic(p) for p in model.outputs}
    if seq is None and any(inputs.values()):
        raise LmmcError(f"{path.name} has inputs of dynamic length; give static_shape as (batch, seq)")
    shapes = {p.get_any_name(): [batch if i == 0 else (seq if i in inputs[p.get_any_name()] else d.get_length())
                                 for i, d in enumerate(p.get_partial_shape())] for p in model.inputs}
    try:
        model.reshape(shapes)
    except RuntimeError as err:
        first = reason(err)
        hint = "" if seq is None else (f"; a seq of {seq} past the model's position table is the usual cause: "
                                       f"encode() truncates texts to the manifest's preprocessing.text.max_length")
        raise LmmcError(f"OpenVINO cannot compile {path.name} for the input shapes {shapes} ({first}); choose a "
                        f"static_shape the model accepts{hint}") from None
    return StaticShape(batch, seq, inputs, outputs, "attention_mask" in inputs)


def table_rows(model) -> dict[str, int]:
    """Input name -> the rows of the table its ids index (a text tower's vocabulary). OpenVINO's Gather
    returns zeros for an id past the table where ONNX Runtime fails, so `run` checks the ids itself."""
    rows: dict[str, int] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Gather":
            continue
        source = op.input_value(1).get_node()
        while source.get_type_name() in ("Convert", "Reshape", "Squeeze", "Unsqueeze"):  # the ids' values kept
            source = source.input_value(0).get_node()
        table = op.input_value(0).get_partial_shape()
        if source.get_type_name() == "Parameter" and table.rank.is_static and table[0].is_static:
            name = source.output(0).get_any_name()
            rows[name] = min(rows.get(name, table[0].get_length()), table[0].get_length())
    return rows


def max_tokens(model, limit: int = 1 << 14) -> int | None:
    """The most tokens a text IR takes (its position table's rows), found by OpenVINO's own shape
    inference on copies reshaped to (1, n): running a longer feed is undefined (it returned a previous
    run's outputs, or crashed). None: an IR without token inputs of dynamic length, or no limit below
    `limit` (rotary positions)."""
    if not any(p.get_any_name() == "input_ids" and p.get_partial_shape()[1].is_dynamic for p in model.inputs):
        return None

    def fits(n: int) -> bool:
        copy = model.clone()
        try:
            copy.reshape({p.get_any_name(): [1, n] for p in copy.inputs})
        except RuntimeError:
            return False
        return True

    if fits(limit):
        return None
    low, high = 1, limit - 1  # binary search: about 14 reshapes, 0.1-0.2 s on MiniLM
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _trim(x, rows: int, axes: list[int], length: int | None) -> np.ndarray:
    """A copy of one padded output: its first `rows` rows, its sequence axes cut to `length`."""
    index = [slice(0, rows)] + [slice(None)] * (x.ndim - 1)
    for axis in axes:
        index[axis] = slice(0, length)
    return np.array(x[tuple(index)])


class OpenVinoModel(Model):
    backend = "openvino"

    def __init__(self, path: Path, threads: int | None = None, inference_precision: str = "f32",
                 static_shape: tuple[int, ...] | None = None) -> None:
        ov = _openvino()
        if path.suffix.lower() != ".xml":
            raise LmmcError(f"OpenVINO opens an IR (.xml with its .bin), and '{path.name}' is not one; convert it "
                            f"with an 'openvino' export step, or open it with backend='onnxruntime'")
        if inference_precision not in INFERENCE_PRECISIONS:
            raise LmmcError(f"unknown OpenVINO inference precision '{inference_precision}'; choose one of "
                            f"{', '.join(INFERENCE_PRECISIONS)}")
        if inference_precision == "bf16" and not cpu_has_bf16():
            raise LmmcError("this CPU has no bf16 units OpenVINO can use (no AVX512-BF16 or AMX); run the IR with "
                            "inference_precision='f32'")
        if not path.with_suffix(".bin").is_file():
            raise LmmcError(f"OpenVINO IR '{path}' has no weights file '{path.with_suffix('.bin').name}' beside it; "
                            f"copy the .xml and .bin together, or export it again with `lmmc compile`")
        # One stream and a latency hint: a single request runs on all the given threads, as ORT does.
        # f32 by default: on CPUs with bf16 units OpenVINO's own default runs fp32 layers in bf16 (2e-4
        # off), which is faster and is asked for with inference_precision="bf16".
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": inference_precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        try:
            model = core().read_model(str(path))
            # a text model read at one length (SigLIP pools its last position): padding moves it
            self.pad_to = text_pad_to(path, model.get_rt_info(PAD_TO_PATH).astype(str)
                                      if model.has_rt_info(PAD_TO_PATH) else None)
            check_static_pad(path.name, static_shape, self.pad_to)
            self.static = None if static_shape is None else make_static(model, static_shape, path)
            self.compiled = core().compile_model(model, "CPU", config)
        except RuntimeError as err:
            raise LmmcError(f"OpenVINO cannot load '{path}': {reason(err)}. The IR is corrupt or its .bin does not "
                            f"belong to it; export it again with `lmmc compile`") from None
        self.path = path
        self.inference_precision = inference_precision
        # Names from the IR as read: compiled for a static shape, a port may gain names such as '45'.
        self.inputs = [_spec(p, q.get_any_name()) for p, q in zip(self.compiled.inputs, model.inputs)]
        self.outputs = [_spec(p, q.get_any_name()) for p, q in zip(self.compiled.outputs, model.outputs)]
        self.rows = table_rows(model)
        # Shape inference finds a position table sliced by length (BERT, CLIP), not one indexed by computed
        # positions (MPNet, RoBERTa), whose rows past the end read as zeros: the manifest knows it then.
        texts = any(p.get_any_name() == "input_ids" for p in model.inputs)
        self.tokens = ((max_tokens(model) if self.static is None else None) or manifest_positions(path)) if texts \
            else None
        # One infer request per thread: a request's buffers hold one run, so threads sharing one would
        # read each other's outputs. A compiled model serves several requests at once.
        self._local = threading.local()

    @property
    def request(self):
        if not hasattr(self._local, "request"):
            self._local.request = self.compiled.create_infer_request()
        return self._local.request

    def _infer(self, feed: dict[str, np.ndarray]):
        try:
            return self.request.infer(feed)
        except RuntimeError as err:
            raise LmmcError(f"OpenVINO could not run '{self.path.name}' on {shapes_of(feed)}: {reason(err)}") from None

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = cast_feed(self, feed, exact=self.static is None)
        check_text_feed(self.path.name, feed, self.rows, self.tokens)
        if self.static is not None:
            return self._run_static(feed)
        result = self._infer(feed)
        # infer() returns views into the request's buffers; copy so the next run cannot overwrite them
        outputs = {spec.name: np.array(result[port]) for spec, port in zip(self.outputs, self.compiled.outputs)}
        # What max_tokens could not rule out: an index out of range is no error to OpenVINO, which returns
        # empty outputs or a previous run's.
        batch = len(next(iter(feed.values())))
        if any(x.size == 0 or len(x) != batch for x in outputs.values()):
            raise LmmcError(f"OpenVINO ran '{self.path.name}' on {shapes_of(feed)} and returned "
                            f"{shapes_of(outputs)}, which belong to no such feed. {OUT_OF_RANGE}")
        return outputs

    def _run_static(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a feed of any batch on a model compiled for one shape: in chunks of its batch, each padded
        up to the compiled shape (rows of zeros; tokens the attention mask hides), outputs trimmed back."""
        static = self.static
        n = len(next(iter(feed.values())))
        length = None
        for spec in self.inputs:
            x = feed[spec.name]
            if x.ndim != len(spec.shape) or any(x.shape[a] != spec.shape[a] for a in range(1, x.ndim)
                                                if a not in static.inputs[spec.name]):
                raise LmmcError(f"{self.path.name} takes '{spec.name}' of shape {list(spec.shape)} (any batch), and "
                                f"the feed has {list(x.shape)}")
            for axis in static.inputs[spec.name]:
                if x.shape[axis] > spec.shape[axis]:
                    raise LmmcError(f"{self.path.name} was compiled for inputs of {spec.shape[axis]} on axis {axis} of "
                                    f"'{spec.name}', and the feed has {x.shape[axis]}; load it with a larger "
                                    f"static_shape, or without one")
                length = x.shape[axis]
        if length is not None and length < static.seq and not static.masked:
            raise LmmcError(f"{self.path.name} has no attention mask, so padding its sequence would change its "
                            f"outputs; feed exactly {static.seq} tokens, or load it without static_shape")
        chunks = []
        for start in range(0, n, static.batch):
            padded = {}
            for spec in self.inputs:
                x = feed[spec.name][start:start + static.batch]
                padded[spec.name] = np.pad(x, [(0, want - have) for want, have in zip(spec.shape, x.shape)])
            result = self._infer(padded)
            rows = min(static.batch, n - start)
            chunks.append({spec.name: _trim(result[port], rows, static.outputs[spec.name], length)
                           for spec, port in zip(self.outputs, self.compiled.outputs)})
        return {spec.name: np.concatenate([c[spec.name] for c in chunks]) for spec in self.outputs}
