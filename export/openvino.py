"""OpenVINO deployment: the student's ONNX export converted to OpenVINO IR in fp32, and INT8 by NNCF's
post-training quantisation for transformers, calibrated on the compile's calibration batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lmmc.artifact import Artifact, ExportRecord
from lmmc.errors import LmmcError
from lmmc.export.mixed_precision import MixedConfig, Runner, block_matrices, choose_precisions
from lmmc.pipeline import Pass, PassConfig, register

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


def to_openvino(onnx_path: Path, dst_xml: Path) -> Path:
    """Convert an ONNX file to an fp32 IR at `dst_xml` (and its .bin); returns `dst_xml`."""
    ov = _openvino()
    # save_model halves weights to fp16 by default; an fp32 artifact must hold fp32 weights.
    ov.save_model(ov.convert_model(str(onnx_path)), str(dst_xml), compress_to_fp16=False)
    return dst_xml


def _nncf_int8(src_xml: Path, feeds: list[dict[str, np.ndarray]], fp32_nodes: list[str] | None = None,
               compress_weights: bool = True):
    """The quantised ov.Model: NNCF's transformer preset, MatMul nodes in `fp32_nodes` left fp32."""
    ov, nncf = _openvino(), _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    # subset_size counts dataset items, here whole batches: use every one
    return nncf.quantize(ov.Core().read_model(str(src_xml)), nncf.Dataset(feeds),
                         model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds),
                         ignored_scope=nncf.IgnoredScope(names=list(fp32_nodes or [])),
                         advanced_parameters=AdvancedQuantizationParameters(
                             backend_params={"compress_weights": compress_weights}))


def quantize_openvino(src_xml: Path, dst_xml: Path, feeds: list[dict[str, np.ndarray]],
                      fp32_nodes: list[str] | None = None) -> Path:
    """NNCF INT8 of an IR with the transformer preset (smooth quant, fast bias correction, the ops that
    must stay fp32 kept so), activation ranges from `feeds`, the MatMul nodes named in `fp32_nodes` kept
    fp32; returns `dst_xml`."""
    ov = _openvino()
    ov.save_model(_nncf_int8(src_xml, feeds, fp32_nodes), str(dst_xml), compress_to_fp16=False)
    return dst_xml


def _compiled(model, threads: int) -> Runner:
    ov = _openvino()
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": str(threads)}
    compiled = ov.Core().compile_model(model, "CPU", config)
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
    ov = _openvino()
    search = feeds[:cfg.search_batches]
    fp32 = _compiled(ov.Core().read_model(str(src_xml)), threads)
    reference = [fp32(f) for f in search]
    base = _nncf_int8(src_xml, feeds, compress_weights=False)
    # NNCF's transformer preset leaves some MatMuls unquantised; only those it quantised have a choice
    quantised = {op.get_friendly_name() for op in base.get_ops() if op.get_type_name() == "MatMul"
                 and any(p.get_source_output().get_node().get_type_name() == "FakeQuantize" for p in op.inputs())}
    matrices = {n: m for n, m in matrices.items() if n in quantised}

    def quantise(exclude: list[str]) -> Runner:
        model = _nncf_int8(src_xml, feeds, exclude)
        ov.save_model(model, str(dst_xml), compress_to_fp16=False)
        return _compiled(model, threads)

    return choose_precisions(matrices, lambda nodes: _compiled(_without_quantisers(base, nodes), threads),
                             quantise, search, reference, cfg)


class Int8Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mixed: MixedConfig = Field(description="keep the block matrices whose quantisation costs the most cosine fp32")


class OpenVinoConfig(PassConfig):
    int8: bool | Int8Options = Field(True, description="also write the NNCF INT8 IR, calibrated on the calibration "
                                     "batches; {mixed: {max_cosine_drop: d}} keeps the matrices whose quantisation "
                                     "costs the most cosine fp32 instead")
    threads: int = Field(2, gt=0, description="OpenVINO threads when measuring the mixed-precision costs")


@register
class OpenVinoExportPass(Pass):
    """OpenVINO deployment: IR in fp32 and, with NNCF, INT8.

    Recipe: ``export: [onnx, {openvino: {int8: true}}]`` (after ``onnx``). Writes
    ``openvino/<tower>.xml`` and ``openvino/<tower>.int8.xml`` (each with its .bin); with
    ``int8: {mixed: {max_cosine_drop: 0.002}}``, ``openvino/<tower>.mixed.xml`` in place of the INT8 IR,
    its choice table under ``mixed`` in the pass's report."""

    name = "openvino"
    kind = "export"
    Config = OpenVinoConfig
    needs = frozenset({"onnx", "calib"})
    provides = frozenset({"exports"})

    def check(self, available: set[str]) -> None:
        """Also fail at recipe time, before any weight loads, when OpenVINO or NNCF is missing."""
        super().check(available)
        _openvino()
        if self.config.int8:
            _nncf()

    def run(self, art: Artifact) -> dict[str, Any]:
        from lmmc.export.ort import calibration_feeds

        folder = art.workdir / "openvino"
        folder.mkdir(exist_ok=True)
        metrics: dict[str, Any] = {}
        for tower in art.adapter.towers:
            fp32 = to_openvino(art.onnx[tower.name], folder / f"{tower.name}.xml")
            art.exports.append(ExportRecord(tower.name, "openvino", "fp32", "plain", fp32))
            written = [fp32.name]
            if isinstance(self.config.int8, Int8Options):
                mixed = folder / f"{tower.name}.mixed.xml"
                choice = quantize_openvino_mixed(fp32, mixed, calibration_feeds(art, tower),
                                                 block_matrices(art.student, art.adapter, tower, art.onnx[tower.name]),
                                                 self.config.int8.mixed, self.config.threads)
                art.exports.append(ExportRecord(tower.name, "openvino", "mixed", "nncf", mixed, source="plain",
                                                fp32_matrices=choice["fp32_matrices"]))
                written.append(mixed.name)
                metrics[tower.name] = {"files": written, "mixed": {mixed.name: choice}, "warnings": choice["warnings"]}
                continue
            if self.config.int8:
                feeds = calibration_feeds(art, tower)
                int8 = quantize_openvino(fp32, folder / f"{tower.name}.int8.xml", feeds)
                art.exports.append(ExportRecord(tower.name, "openvino", "int8", "nncf", int8, source="plain"))
                written.append(int8.name)
            metrics[tower.name] = {"files": written}
        return metrics
