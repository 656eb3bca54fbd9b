"""TensorRT backend of lmmc.runtime: a serialized engine run on the GPU with execute_async_v3, its input
shapes set on every call within the engine's optimisation profile."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from lmmc.errors import LmmcError
from lmmc.runtime import Model, TensorSpec, cast_feed

EXTRA = "pip install 'lmmc[tensorrt]'"


class TrtModel(Model):
    backend = "tensorrt"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        # `threads` is for the CPU runtimes; an engine runs on the GPU
        try:
            import tensorrt as trt
            from polygraphy import cuda  # device buffers and streams without a CUDA build of torch
        except ImportError:
            raise LmmcError(f"running a TensorRT engine needs TensorRT and an NVIDIA GPU; install the extra with "
                            f"`{EXTRA}`") from None
        self._trt, self._cuda = trt, cuda
        try:
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        except TypeError:  # the binding's factory returned no runtime: CUDA could not be initialised
            self._runtime = None
        if self._runtime is None:
            raise LmmcError(f"TensorRT is installed but finds no usable NVIDIA GPU (CUDA could not be initialised) to "
                            f"run '{path}'; run the engine on a machine with one, or the student's ONNX or OpenVINO "
                            f"export on this one")
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise LmmcError(f"TensorRT cannot load '{path}': an engine runs only with the TensorRT version and GPU "
                            f"model it was built for. Build it again on this machine with `lmmc compile`")
        self.context = self.engine.create_execution_context()
        self.path = path
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        specs = {n: TensorSpec(n, np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))).name,
                               tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(n))) for n in names}
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [specs[n] for n in names if is_input[n]]
        self.outputs = [specs[n] for n in names if not is_input[n]]
        self._stream = cuda.Stream()
        self._buffers = {n: cuda.DeviceArray(dtype=np.dtype(specs[n].dtype)) for n in names}
        # One context, stream and set of buffers hold one run at a time: threads take turns.
        self._lock = threading.Lock()

    def close(self) -> None:
        """Give the engine's device buffers and stream back to the GPU now; polygraphy's hold them until freed,
        so a process that loads engine after engine would otherwise run out of GPU memory."""
        with self._lock:
            for buffer in self._buffers.values():
                buffer.free()
            self._buffers = {}
            if self._stream is not None:
                self._stream.free()
                self._stream = None

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:  # a load that failed half-way has nothing to free
            self.close()

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = cast_feed(self, feed)
        with self._lock:
            return self._run(feed)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._stream is None:
            raise LmmcError(f"'{self.path}' was closed; load it again to run it")
        for spec in self.inputs:
            array = feed[spec.name]
            if not self.context.set_input_shape(spec.name, array.shape):
                low, _, high = self.engine.get_tensor_profile_shape(spec.name, 0)
                raise LmmcError(f"{self.path.name}: input '{spec.name}' of shape {list(array.shape)} is outside the "
                                f"engine's profile ({list(low)} to {list(high)}); split the batch, or rebuild with "
                                f"wider tensorrt.batch / seq in the recipe")
            buffer = self._buffers[spec.name].resize(array.shape)
            buffer.copy_from(array, self._stream)
            self.context.set_tensor_address(spec.name, buffer.ptr)
        outputs = {}
        for spec in self.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            self.context.set_tensor_address(spec.name, self._buffers[spec.name].resize(shape).ptr)
            outputs[spec.name] = np.empty(shape, dtype=spec.dtype)
        if not self.context.execute_async_v3(self._stream.ptr):
            raise LmmcError(f"TensorRT failed to run '{self.path}'; its error is printed above")
        for name, host in outputs.items():
            self._buffers[name].copy_to(host, self._stream)
        self._stream.synchronize()
        return outputs
