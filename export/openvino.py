"""OpenVINO deployment: the student converted to OpenVINO IR in fp32 (by OpenVINO's PyTorch frontend, or
from its ONNX export), and INT8 by NNCF's post-training quantisation for transformers, calibrated on the
compile's calibration batches."""

from __future__ import annotations

import errno
import os
import signal
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers
from pydantic import Field, model_validator

from lmmc import process_state
from lmmc.adapters import TowerModule, TowerSpec, dynamic_axes, example_inputs, input_names
from lmmc.artifact import Artifact, ExportRecord
from lmmc.config import Config
from lmmc.errors import LmmcError
from lmmc.export.onnx import OUTPUT_NAMES
from lmmc.export.mixed_precision import MixedConfig, Runner, block_matrices, choose_precisions
from lmmc.pipeline import Pass, PassConfig, register
from lmmc.runtime import MAX_THREADS
from lmmc.runtime.openvino import core

EXTRA = "pip install 'lmmc[openvino]'"


def _openvino():
    try:
        import openvino
    except ImportError:
        raise LmmcError(f"the 'openvino' export needs OpenVINO; install the extra with `{EXTRA}`") from None
    return openvino


def _nncf():
    try:
        import nncf
    except ImportError:
        raise LmmcError(f"INT8 for OpenVINO needs NNCF; install the extra with `{EXTRA}`") from None
    return nncf


class FrontendFailed(LmmcError):
    """OpenVINO's PyTorch frontend could not convert a tower."""


def torch_to_openvino(model: torch.nn.Module, tower: TowerSpec, dst_xml: Path) -> Path:
    """Convert one tower straight from PyTorch through OpenVINO's PyTorch frontend to an fp32 IR at
    `dst_xml`, with the ONNX export's input and output names and dynamic axes; returns `dst_xml`.

    The frontend keeps attention as OpenVINO's ScaledDotProductAttention, which the CPU plugin runs as one
    fused kernel; from the ONNX export it arrives as separate products, softmax and mask ops (on MiniLM at
    8 x 128 the NNCF INT8 IR from PyTorch ran about 10 % faster)."""
    ov = _openvino()
    model = model.cpu().eval()
    module = TowerModule(model, tower, deployed=True).eval()
    names, axes = input_names(tower), dynamic_axes(tower)
    example = example_inputs(model, tower)
    shapes = [ov.PartialShape([-1 if i in axes.get(name, {}) else d for i, d in enumerate(x.shape)])
              for name, x in zip(names, example)]
    # The frontend traces with TorchScript, which warns about every data-dependent branch it freezes, and
    # reads every property of the model, whose `loss_function` warns that an encoder has no loss type.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    failed = None
    # An interrupt waits for the conversion: raised in the Python the frontend calls back into, it became a
    # conversion error (and the compile a bad input that discarded its finished passes) or aborted the process.
    with process_state.interrupts_deferred() as interrupted:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = ov.convert_model(module, example_input=example, input=shapes)
        except Exception as err:  # the frontend raises its own types, and RuntimeError from tracing
            failed = err
        finally:
            transformers.logging.set_verbosity(verbosity)
    for signum in interrupted:  # now to the handlers the caller had: lmmc's command stops, as on Ctrl-C
        signal.raise_signal(signum)
    if failed is not None:
        lines = [line.strip() for line in str(failed).strip().splitlines() if line.strip()] or [type(failed).__name__]
        # its first line names a source file; the operations it could not convert are said further down
        why = "; ".join(line for line in lines if "failed for" in line.lower()) or lines[0]
        raise FrontendFailed(f"OpenVINO's PyTorch frontend cannot convert the {tower.name} tower ({why}); "
                             f"convert the ONNX export instead with `openvino: {{frontend: onnx}}`")
    for port, name in zip(converted.inputs, names):
        port.get_tensor().set_names({name})
    for port, name in zip(converted.outputs, OUTPUT_NAMES):
        port.get_tensor().set_names({name})
    dst_xml.parent.mkdir(parents=True, exist_ok=True)
    save_ir(converted, dst_xml)
    return dst_xml


def save_ir(model, dst_xml: Path) -> None:
    """Save an fp32 or INT8 IR (save_model would halve fp32 weights to fp16). OpenVINO reports a file stopped
    by the shell's file-size limit ('ulimit -f') as "iostream error": where such a limit is set, that is the
    likely cause, said as the error it is."""
    import resource

    try:
        _openvino().save_model(model, str(dst_xml), compress_to_fp16=False)
    except RuntimeError as err:
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY:
            raise
        raise OSError(errno.EFBIG, f"{os.strerror(errno.EFBIG)}, likely: {' '.join(str(err).split())[:200]}",
                      str(dst_xml)) from None


def to_openvino(onnx_path: Path, dst_xml: Path) -> Path:
    """Convert an ONNX file to an fp32 IR at `dst_xml` (and its .bin); returns `dst_xml`."""
    ov = _openvino()
    save_ir(ov.convert_model(str(onnx_path)), dst_xml)
    return dst_xml


def _nncf_int8(src_xml: Path, feeds: list[dict[str, np.ndarray]], fp32_nodes: list[str] | None = None,
               compress_weights: bool = True):
    """The quantised ov.Model: NNCF's transformer preset, MatMul nodes in `fp32_nodes` left fp32."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    # subset_size counts dataset items, here whole batches: use every one
    return nncf.quantize(core().read_model(str(src_xml)), nncf.Dataset(feeds),
                         model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds),
                         ignored_scope=nncf.IgnoredScope(names=list(fp32_nodes or [])),
                         advanced_parameters=AdvancedQuantizationParameters(
                             backend_params={"compress_weights": compress_weights}))


def quantize_openvino(src_xml: Path, dst_xml: Path, feeds: list[dict[str, np.ndarray]],
                      fp32_nodes: list[str] | None = None) -> Path:
    """NNCF INT8 of an IR with the transformer preset (smooth quant, fast bias correction, the ops that
    must stay fp32 kept so), activation ranges from `feeds`, the MatMul nodes named in `fp32_nodes` kept
    fp32; returns `dst_xml`."""
    save_ir(_nncf_int8(src_xml, feeds, fp32_nodes), dst_xml)
    return dst_xml


def _compiled(model, threads: int) -> Runner:
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": str(threads)}
    compiled = core().compile_model(model, "CPU", config)
    output = compiled.output("pooled_embedding")
    return lambda feed: np.array(compiled(feed)[output])


def _without_quantisers(model, nodes: set[str]):
    """A copy of an NNCF model (weights kept fp32 behind their FakeQuantize) whose MatMul nodes in
    `nodes` read their inputs from before their FakeQuantize nodes."""
    copy = model.clone()
    for op in copy.get_ops():
        if op.get_type_name() != "MatMul" or op.get_friendly_name() not in nodes:
            continue
        for port in op.inputs():
            source = port.get_source_output().get_node()
            if source.get_type_name() == "FakeQuantize":
                port.replace_source_output(source.input_value(0))
    return copy


def quantize_openvino_mixed(src_xml: Path, dst_xml: Path, feeds: list[dict[str, np.ndarray]],
                            matrices: dict[str, str], cfg: MixedConfig, threads: int) -> dict[str, Any]:
    """NNCF INT8 of an IR to `dst_xml` with the matrices (MatMul node -> module) whose quantisation costs
    the most pooled-embedding cosine kept fp32 through NNCF's ignored scope, per `cfg`; returns the choice
    table and figures. The costs are measured on one NNCF model whose weights NNCF leaves uncompressed,
    so that a node's FakeQuantize nodes can be bypassed in memory."""
    search = feeds[:cfg.search_batches]
    fp32 = _compiled(core().read_model(str(src_xml)), threads)
    reference = [fp32(f) for f in search]
    base = _nncf_int8(src_xml, feeds, compress_weights=False)
    # NNCF's transformer preset leaves some MatMuls unquantised; only those it quantised have a choice
    quantised = {op.get_friendly_name() for op in base.get_ops() if op.get_type_name() == "MatMul"
                 and any(p.get_source_output().get_node().get_type_name() == "FakeQuantize" for p in op.inputs())}
    matrices = {n: m for n, m in matrices.items() if n in quantised}

    def quantise(exclude: list[str]) -> Runner:
        model = _nncf_int8(src_xml, feeds, exclude)
        save_ir(model, dst_xml)
        return _compiled(model, threads)

    return choose_precisions(matrices, lambda nodes: _compiled(_without_quantisers(base, nodes), threads),
                             quantise, search, reference, cfg)


class Int8Options(Config):
    mixed: MixedConfig = Field(description="keep the block matrices whose quantisation costs the most cosine fp32")


class OpenVinoConfig(PassConfig):
    int8: bool | Int8Options = Field(True, description="also write the NNCF INT8 IR, calibrated on the calibration "
                                     "batches; {mixed: {max_cosine_drop: d}} keeps the matrices whose quantisation "
                                     "costs the most cosine fp32 instead")
    threads: int = Field(2, gt=0, le=MAX_THREADS, description="OpenVINO threads when measuring the mixed-precision costs")
    frontend: Literal["pytorch", "onnx"] = Field("pytorch", description="what the IR is converted from: the "
                                                        "PyTorch student (attention fused; the default) or its "
                                                        "ONNX export (needs the onnx step first; what int8: "
                                                        "{mixed} uses, since it names the ONNX graph's matrices)")

    @model_validator(mode="before")
    @classmethod
    def _frontend(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        mixed = isinstance(data.get("int8"), (dict, Int8Options))
        if data.get("frontend") is None:
            return {**data, "frontend": "onnx" if mixed else "pytorch"}
        if mixed and data["frontend"] == "pytorch":
            raise ValueError("int8: {mixed: ...} names the matrices of the ONNX export; use frontend: onnx "
                             "(or leave frontend out)")
        return data


@register
class OpenVinoExportPass(Pass):
    """OpenVINO deployment: IR in fp32 and, with NNCF, INT8.

    Recipe: ``export: [onnx, {openvino: {int8: true}}]``. Writes
    ``openvino/<tower>.xml`` and ``openvino/<tower>.int8.xml`` (each with its .bin); with
    ``int8: {mixed: {max_cosine_drop: 0.002}}``, ``openvino/<tower>.mixed.xml`` in place of the INT8 IR,
    its choice table under ``mixed`` in the pass's report."""

    name = "openvino"
    kind = "export"
    Config = OpenVinoConfig
    needs = frozenset({"student", "calib"})
    provides = frozenset({"exports"})

    def check(self, available: set[str]) -> None:
        """Also fail at recipe time, before any weight loads, when OpenVINO or NNCF is missing, or when
        the IR is to come from an ONNX export that no earlier step writes."""
        super().check(available)
        if self.config.frontend == "onnx" and "onnx" not in available:
            raise LmmcError("the openvino step converts the ONNX export here (frontend: onnx"
                            + (", which int8: {mixed} needs" if isinstance(self.config.int8, Int8Options) else "")
                            + "); put 'onnx' before it under export")
        _openvino()
        if self.config.int8:
            _nncf()

    def run(self, art: Artifact) -> dict[str, Any]:
        from lmmc.export.ort import calibration_feeds

        folder = art.workdir / "openvino"
        folder.mkdir(exist_ok=True)
        metrics: dict[str, Any] = {}
        for tower in art.adapter.towers:
            fp32 = folder / f"{tower.name}.xml"
            if self.config.frontend == "onnx":
                to_openvino(art.onnx[tower.name], fp32)
            else:
                torch_to_openvino(art.student, tower, fp32)
            art.exports.append(ExportRecord(tower.name, "openvino", "fp32", "plain", fp32))
            written = [fp32.name]
            if isinstance(self.config.int8, Int8Options):
                mixed = folder / f"{tower.name}.mixed.xml"
                choice = quantize_openvino_mixed(fp32, mixed, calibration_feeds(art, tower, short=True),
                                                 block_matrices(art.student, art.adapter, tower, art.onnx[tower.name]),
                                                 self.config.int8.mixed, self.config.threads)
                art.exports.append(ExportRecord(tower.name, "openvino", "mixed", "nncf", mixed, source="plain",
                                                fp32_matrices=choice["fp32_matrices"],
                                                max_cosine_drop=choice["max_cosine_drop"],
                                                all_fp32=len(choice["fp32_matrices"]) == len(choice["matrices"])))
                written.append(mixed.name)
                # its warnings once, named after the file (the report gathers every "warnings" list)
                warned = [f"{mixed.name}: {w}" for w in choice.pop("warnings")]
                metrics[tower.name] = {"files": written, "mixed": {mixed.name: choice}, "warnings": warned}
                continue
            if self.config.int8:
                feeds = calibration_feeds(art, tower, short=True)
                int8 = quantize_openvino(fp32, folder / f"{tower.name}.int8.xml", feeds)
                art.exports.append(ExportRecord(tower.name, "openvino", "int8", "nncf", int8, source="plain"))
                written.append(int8.name)
            metrics[tower.name] = {"files": written, "frontend": self.config.frontend}
        art.student.to(art.device)
        return metrics
