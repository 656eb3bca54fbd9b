"""OpenVINO deployment: the student's ONNX export converted to OpenVINO IR in fp32, and INT8 by NNCF's
post-training quantisation for transformers, calibrated on the compile's calibration batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from lmmc.artifact import Artifact, ExportRecord
from lmmc.errors import LmmcError
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


def quantize_openvino(src_xml: Path, dst_xml: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """NNCF INT8 of an IR with the transformer preset (smooth quant, fast bias correction, the ops that
    must stay fp32 kept so), activation ranges from `feeds`; returns `dst_xml`."""
    ov, nncf = _openvino(), _nncf()
    # subset_size counts dataset items, here whole batches: use every one
    quantized = nncf.quantize(ov.Core().read_model(str(src_xml)), nncf.Dataset(feeds),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
    ov.save_model(quantized, str(dst_xml), compress_to_fp16=False)
    return dst_xml


class OpenVinoConfig(PassConfig):
    int8: bool = Field(True, description="also write the NNCF INT8 IR, calibrated on the calibration batches")


@register
class OpenVinoExportPass(Pass):
    """OpenVINO deployment: IR in fp32 and, with NNCF, INT8.

    Recipe: ``export: [onnx, {openvino: {int8: true}}]`` (after ``onnx``). Writes
    ``openvino/<tower>.xml`` and ``openvino/<tower>.int8.xml`` (each with its .bin)."""

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
            if self.config.int8:
                feeds = calibration_feeds(art, tower)
                int8 = quantize_openvino(fp32, folder / f"{tower.name}.int8.xml", feeds)
                art.exports.append(ExportRecord(tower.name, "openvino", "int8", "nncf", int8, source="plain"))
                written.append(int8.name)
            metrics[tower.name] = {"files": written}
        return metrics
