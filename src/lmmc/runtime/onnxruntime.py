"""ONNX Runtime backend of lmmc.runtime: an ONNX file on the CPU execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmmc.errors import LmmcError
from lmmc.runtime import Model, TensorSpec, cast_feed

# ONNX Runtime's type strings -> numpy dtype names
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def _spec(arg) -> TensorSpec:
    return TensorSpec(arg.name, _DTYPES.get(arg.type, arg.type),
                      tuple(d if isinstance(d, int) else None for d in arg.shape))


class OrtModel(Model):
    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise LmmcError("ONNX Runtime is not installed; install it with `pip install onnxruntime` "
                            "(a dependency of lmmc: reinstall with `pip install lmmc`)") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # a failing run raises with ORT's message; its log would print it twice
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types for unreadable files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LmmcError(f"ONNX Runtime cannot load '{path}': {first}. The file is corrupt or not an ONNX "
                            f"model; export it again with `lmmc compile`") from None
        self.path = path
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, cast_feed(self, feed))))
