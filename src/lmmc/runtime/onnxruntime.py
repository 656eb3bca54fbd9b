"""ONNX Runtime backend of lmmc.runtime: an ONNX file on the CPU, CUDA or TensorRT execution provider, the
providers chosen from the device and never silently replaced by the CPU."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmmc.errors import LmmcError
from lmmc.runtime import OUT_OF_RANGE, Model, TensorSpec, cast_feed, check_text_feed, manifest_positions, shapes_of

# ONNX Runtime's type strings -> numpy dtype names
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_INSTALL = ("pip install onnxruntime-gpu (it replaces the CPU-only onnxruntime package: run "
               "`pip uninstall onnxruntime` first, the two cannot be installed side by side)")

Provider = str | tuple[str, dict[str, str]]


@dataclass(frozen=True)
class TensorRTOptions:
    """ONNX Runtime's TensorRT execution provider: `fp16` lets TensorRT pick half-precision kernels
    (trt_fp16_enable), `sparsity` lets it use 2:4 sparse kernels on a 2:4 student (trt_sparsity_enable),
    `cache_dir` keeps the engines it builds so the next session does not build them again."""

    fp16: bool = False
    sparsity: bool = False
    cache_dir: Path | None = None


def parse_device(device: str) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", N) from "cpu", "cuda" or "cuda:N"."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise LmmcError(f"unknown device '{device}'; use cpu, cuda or cuda:N (N = GPU index)")
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


def providers_for(device: str = "cpu", tensorrt: TensorRTOptions | None = None) -> list[Provider]:
    """The execution providers, most preferred first, that run a graph on `device`: the CPU alone, or
    CUDA on GPU N with the CPU for the operators CUDA lacks; with `tensorrt`, TensorRT ahead of both."""
    kind, index = parse_device(device)
    if kind == "cpu":
        if tensorrt is not None:
            raise LmmcError("the TensorRT execution provider runs on a GPU; pass device='cuda' (or cuda:N) with it")
        return [CPU]
    providers: list[Provider] = [(CUDA, {"device_id": str(index)}), CPU]
    if tensorrt is not None:
        options = {"device_id": str(index), "trt_fp16_enable": "1" if tensorrt.fp16 else "0",
                   "trt_sparsity_enable": "1" if tensorrt.sparsity else "0"}
        if tensorrt.cache_dir is not None:
            options.update(trt_engine_cache_enable="1", trt_engine_cache_path=str(tensorrt.cache_dir))
        providers.insert(0, (TENSORRT, options))
    return providers


def check_available(providers: list[Provider], available: list[str]) -> None:
    """One clear error when a provider the device needs is not in this ONNX Runtime build."""
    missing = [name for name in (p if isinstance(p, str) else p[0] for p in providers) if name not in available]
    if not missing:
        return
    if TENSORRT in missing and CUDA not in missing:
        raise LmmcError(f"this ONNX Runtime has no TensorRT execution provider (it has {', '.join(available)}); "
                        f"install TensorRT 10 (pip install tensorrt) beside onnxruntime-gpu, or run on the CUDA "
                        f"provider alone")
    raise LmmcError(f"this ONNX Runtime has no {' or '.join(missing)} (it has {', '.join(available)}): the installed "
                    f"package runs on the CPU only. For an NVIDIA GPU, {GPU_INSTALL}; or use device cpu")


class OrtModel(Model):
    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, device: str = "cpu",
                 tensorrt: TensorRTOptions | None = None, spinning: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise LmmcError("ONNX Runtime is not installed; install it with `pip install onnxruntime` "
                            "(a dependency of lmmc: reinstall with `pip install lmmc`)") from None
        providers = providers_for(device, tensorrt)
        check_available(providers, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # a failing run raises with ORT's message; its log would print it twice
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types for unreadable files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not os.access(path, os.R_OK):
                why = "the file cannot be read; fix its permissions"
            elif path.suffix == ".xml":
                why = "the file is an OpenVINO IR, not an ONNX model; open it with backend='openvino'"
            else:
                why = "the file is corrupt or not an ONNX model; export it again with `lmmc compile`"
            raise LmmcError(f"ONNX Runtime cannot load '{path}': {first}. {why[0].upper()}{why[1:]}") from None
        self.path = path
        self.device = device
        self.providers = tuple(self.session.get_providers())
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if wanted not in self.providers:
            # a GPU build that cannot reach the GPU (no driver, CUDA or cuDNN libraries) registers only the
            # CPU provider for the session; running on it would report CPU figures as GPU ones
            raise LmmcError(f"ONNX Runtime could not start {wanted} for '{path.name}' on {device} (the session has "
                            f"only {', '.join(self.providers)}); check the NVIDIA driver and the CUDA and cuDNN "
                            f"libraries onnxruntime-gpu needs, or use device cpu")
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]
        texts = any(spec.name == "input_ids" for spec in self.inputs)
        self.rows = table_rows(path) if texts else {}
        self.tokens = manifest_positions(path) if texts else None

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = cast_feed(self, feed)
        check_text_feed(self.path.name, feed, self.rows, self.tokens)
        try:
            outputs = self.session.run(None, feed)
        except Exception as err:  # ORT's own InvalidArgument/Fail/... types
            if not type(err).__module__.startswith("onnxruntime"):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            hint = f" {OUT_OF_RANGE}" if "input_ids" in feed else ""
            raise LmmcError(f"ONNX Runtime could not run '{self.path.name}' on {shapes_of(feed)}: {first}.{hint}") from None
        return dict(zip(self.output_names, outputs))


def table_rows(path: Path) -> dict[str, int]:
    """Input name -> the rows of the table its ids index (a text tower's vocabulary), from the graph's
    Gathers of an input, through casts and reshapes, into an initialiser; read without the weights."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # the session read it; a graph this reader cannot is checked by ONNX Runtime alone
        return {}
    tables = {i.name: i.dims[0] for i in graph.initializer if i.dims}
    inputs = {i.name for i in graph.input}
    source = {n.output[0]: n.input[0] for n in graph.node
              if n.op_type in ("Cast", "Reshape", "Squeeze", "Unsqueeze") and n.output and n.input}
    rows: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in tables:
            continue
        name = node.input[1]
        while name in source:
            name = source[name]
        if name in inputs:
            rows[name] = min(rows.get(name, tables[node.input[0]]), tables[node.input[0]])
    return rows


def _spec(arg: Any) -> TensorSpec:
    return TensorSpec(arg.name, _DTYPES.get(arg.type, arg.type),
                      tuple(d if isinstance(d, int) else None for d in arg.shape))
