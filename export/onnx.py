"""ONNX export: one file per tower, dynamic batch (and sequence) axes, fully checked, with a map from
every weight initialiser back to the PyTorch parameter it came from."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from pydantic import Field

from lmmc.adapters import TowerModule, TowerSpec, dynamic_axes, example_inputs, input_names
from lmmc.artifact import Artifact
from lmmc.pipeline import Pass, PassConfig, register

OUTPUT_NAMES = ["last_hidden_state", "pooled_embedding"]


class OnnxConfig(PassConfig):
    opset: int = Field(20, ge=18, le=23, description="ONNX opset; TensorRT's parser documents up to 20")


def _dynamic_shapes(tower: TowerSpec) -> tuple[tuple[dict[int, Any], ...]]:
    """The adapter's dynamic axes as export Dims; nested once because TowerModule takes *inputs."""
    dims: dict[str, Any] = {}
    return (tuple({axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in axes.items()}
                  for axes in dynamic_axes(tower).values()),)


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], str, str]:
    # the shape before ascontiguousarray, which turns a scalar into shape (1,): a scalar constant of the
    # graph (a mask's fill value 0.0) is no parameter of shape (1,) that holds the same number
    return array.shape, array.dtype.str, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def initializer_map(model_proto: onnx.ModelProto, module: torch.nn.Module) -> dict[str, dict[str, Any] | None]:
    """ONNX initialiser name -> {"param": PyTorch name, "transposed": bool}, matched by value.

    The exporter renames folded weights `val_N` (nn.Linear becomes MatMul with W stored as [in, out]),
    so names cannot be trusted; values can. Initialisers that are no parameter or buffer map to None."""
    known: dict[tuple, tuple[str, bool]] = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        array = tensor.detach().cpu().numpy()
        known.setdefault(_digest(array), (name, False))
        if array.ndim == 2:
            known.setdefault(_digest(array.T), (name, True))
    out: dict[str, dict[str, Any] | None] = {}
    for init in model_proto.graph.initializer:
        hit = known.get(_digest(numpy_helper.to_array(init)))
        out[init.name] = {"param": hit[0], "transposed": hit[1]} if hit else None
    return out


EXPORTER_LOGGERS = ("torch.onnx", "onnxscript.optimizer._constant_folding")


def quiet_exporter_logs() -> None:
    """torch's exporter and onnxscript's optimiser log what they skip in each graph (merged symbolic axes, a
    Split with several outputs left unfolded); none of it is actionable, and a ViT tower printed it per block."""
    for name in EXPORTER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def export_tower(model: torch.nn.Module, tower: TowerSpec, path: Path, opset: int = 20) -> dict[str, Any]:
    """Export one tower to `path` (single file, weights as initialisers) and check it fully."""
    model = model.cpu().eval()
    module = TowerModule(model, tower, deployed=True).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet_exporter_logs()
    # The exporter also warns about deprecated internals; none is actionable.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example_inputs(model, tower), input_names=input_names(tower), output_names=OUTPUT_NAMES,
            dynamic_shapes=_dynamic_shapes(tower), opset_version=opset, dynamo=True, verbose=False,
        )
    return save_program(program, path, model, opset)


# protobuf cannot hold a file over 2 GB: a graph's weights past this go to a file beside it (torch's
# exporter moves them out past 1536 MiB whatever it is told, so the limit sits below that)
EXTERNAL_BYTES = 1.5e9


def save_program(program: Any, path: Path, model: torch.nn.Module, opset: int) -> dict[str, Any]:
    """Save an exported program to `path`, check it fully and map its initialisers to `model`'s parameters
    (`<path>.names.json`). Its weights stay in the file unless the graph's own (one tower's, not the whole
    model's) exceed EXTERNAL_BYTES."""
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(str(path), external_data=weights > EXTERNAL_BYTES)
    onnx.checker.check_model(str(path), full_check=True)
    names = initializer_map(onnx.load(str(path)), model)
    path.with_suffix(".names.json").write_text(json.dumps(names, indent=1))
    return {"file": path.name, "opset": opset, "initializers": len(names),
            "mapped_to_parameters": sum(v is not None for v in names.values())}


@register
class OnnxExportPass(Pass):
    """Export every tower of the student to ONNX (ONNX Runtime is the default runtime).

    Recipe: ``export: [{onnx: {opset: 20}}]``. Writes ``onnx/<tower>.onnx`` and
    ``onnx/<tower>.names.json`` (initialiser -> PyTorch parameter)."""

    name = "onnx"
    kind = "export"
    Config = OnnxConfig
    needs = frozenset({"student"})
    provides = frozenset({"onnx"})

    def run(self, art: Artifact) -> dict[str, Any]:
        folder = art.workdir / "onnx"
        metrics = {}
        for tower in art.adapter.towers:
            path = folder / f"{tower.name}.onnx"
            metrics[tower.name] = export_tower(art.student, tower, path, self.config.opset)
            art.onnx[tower.name] = path
        art.student.to(art.device)
        return metrics
