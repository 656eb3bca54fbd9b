"""OpenVINO backend of lmmc.runtime: an IR (.xml beside its .bin) compiled for the CPU."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from lmmc.errors import LmmcError
from lmmc.runtime import Model, TensorSpec, cast_feed


def _spec(port) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), port.get_element_type().to_dtype().name, shape)


INFERENCE_PRECISIONS = ("f32", "bf16")


def _openvino():
    try:
        import openvino
    except ImportError:
        raise LmmcError("OpenVINO is not installed; install the extra with `pip install 'lmmc[openvino]'`") from None
    return openvino


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run layers in bf16 here (AVX512-BF16 or AMX)."""
    return "BF16" in _openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoModel(Model):
    backend = "openvino"

    def __init__(self, path: Path, threads: int | None = None, inference_precision: str = "f32") -> None:
        ov = _openvino()
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
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
            raise LmmcError(f"OpenVINO cannot load '{path}': {first}. The IR is corrupt or its .bin does not "
                            f"belong to it; export it again with `lmmc compile`") from None
        self.path = path
        self.inference_precision = inference_precision
        self.inputs = [_spec(p) for p in self.compiled.inputs]
        self.outputs = [_spec(p) for p in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.request.infer(cast_feed(self, feed))
        # infer() returns views into the request's buffers; copy so the next run cannot overwrite them
        return {spec.name: np.array(result[port]) for spec, port in zip(self.outputs, self.compiled.outputs)}
