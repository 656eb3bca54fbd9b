"""The one state object that flows through every pass of a compile."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmmc.adapters import Adapter
from lmmc.data import CalibData


@dataclass
class PassRecord:
    """What the runner remembers about one finished pass."""

    name: str
    config: dict[str, Any]
    seconds: float
    metrics: dict[str, Any]


@dataclass
class ExportRecord:
    """One deployment artifact beyond the plain ONNX export: which tower, runtime, precision and variant."""

    tower: str
    backend: str  # "onnxruntime" or "openvino"
    precision: str  # "fp32", "int8" or "mixed" (INT8 with the matrices in fp32_matrices kept fp32)
    variant: str  # "fused", "plain", "dynamic", "static" (ORT INT8), "nncf" (OpenVINO INT8)
    path: Path  # inside the work directory while compiling
    source: str | None = None  # the graph a quantised artifact was made from ("fused" or "plain")
    fp32_matrices: list[str] | None = None  # precision "mixed": the block matrices (PyTorch modules) kept fp32
    max_cosine_drop: float | None = None  # precision "mixed": the drop its matrices were chosen for
    all_fp32: bool = False  # precision "mixed": every block matrix was kept fp32


@dataclass
class Artifact:
    """Everything a pass may read or write. Passes change it in place; nothing hides on the model.

    Keys that passes declare in `needs`/`provides` name the fields below: "teacher", "student",
    "calib", "masks", "allocation", "onnx", "exports", "validation".
    """

    model_ref: str
    adapter: Adapter
    teacher: torch.nn.Module
    student: torch.nn.Module
    preprocessor: Any = None
    calib: CalibData | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workdir: Path | None = None
    # The running pass's folder in the compile's work area (kept when a compile is killed), and whether
    # the pass continues from what an interrupted run left there (`lmmc compile --resume`).
    scratch: Path | None = None
    resume: bool = False
    # Parameter name -> boolean keep-mask (True = weight survives), shaped like the weight.
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    # Parameter name -> target sparsity chosen by an allocation pass (local pruners read it).
    allocation: dict[str, float] = field(default_factory=dict)
    # Tower name -> exported ONNX file.
    onnx: dict[str, Path] = field(default_factory=dict)
    # Every further deployment artifact (fused graph, INT8, OpenVINO IR), in the order written.
    exports: list[ExportRecord] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)

    def available(self) -> set[str]:
        """The state keys that currently hold something, for checking a pass's `needs`."""
        keys = {"teacher", "student"}
        for key in ("calib", "masks", "allocation", "onnx", "exports", "validation"):
            if getattr(self, key):
                keys.add(key)
        return keys
