"""TensorRT engines from the student's ONNX: optimisation profiles from the export's dynamic axes, a
timing cache kept beside the output, FP16/INT8 by builder flags (TensorRT 10) or by a typed graph
(TensorRT 11: an FP16 ONNX, a symmetric INT8 QDQ graph), SPARSE_WEIGHTS for 2:4 students, and a sparsity
report from the builder's log and the engine inspector, mapped back to PyTorch module names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper
from pydantic import Field, field_validator, model_validator

from lmmc.artifact import Artifact, ExportRecord
from lmmc.config import Config, on_off
from lmmc.errors import LmmcError
from lmmc.modelio import text_positions
from lmmc.pipeline import Pass, PassConfig, register

EXTRA = "pip install 'lmmc[tensorrt]'"
NOT_BUILT = "not installed — engine not built"
NO_GPU = "installed, no usable GPU — engine not built"
# The builder's INFO lines on 2:4 weights, as TensorRT's developer guide shows them (with or without
# trtexec's "[date] [I] [TRT]" prefix).
_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:\s*(.*?)\s*$")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:\s*(.*?)\s*$")
# Nodes between a MatMul and the initialiser holding its weight: a QDQ graph's DequantizeLinear, an FP16
# graph's Cast, a transposed weight's Transpose.
_WEIGHT_PATH_OPS = {"DequantizeLinear", "Cast", "Transpose", "Identity"}


class ShapeRange(Config):
    """Smallest, typical (tuned for) and largest size of one dynamic axis in the engine's profile."""

    min: int = Field(gt=0, description="smallest size the engine accepts")
    opt: int = Field(gt=0, description="the size its kernels are tuned for")
    max: int = Field(gt=0, description="largest size the engine accepts")

    @model_validator(mode="after")
    def _ordered(self) -> "ShapeRange":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got min={self.min}, opt={self.opt}, max={self.max}")
        return self


class TensorRtConfig(PassConfig):
    precision: list[Literal["fp32", "fp16", "int8"]] = Field(["fp16"], min_length=1, description="one engine "
                                                             "per precision and tower")
    batch: ShapeRange = Field(ShapeRange(min=1, opt=8, max=32), description="batch sizes the engine accepts")
    seq: ShapeRange | None = Field(None, description="tokens per text sample; default 1 / 128 / 128, capped at "
                                   "the model's position limit (CLIP: 77)")
    workspace_mb: int = Field(4096, gt=0, description="builder workspace limit (MiB)")

    @field_validator("precision")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists a precision twice ({v}); each builds one engine per tower")
        return v
    sparse: Literal["auto", "on", "off"] = Field("auto", description="SPARSE_WEIGHTS: auto sets it when a MatMul "
                                                 "weight of the export is 2:4 sparse")
    timing_cache: bool = Field(True, description="keep the builder's timing cache beside the output and reuse it")
    optional: bool = Field(False, description="without TensorRT, note 'engine not built' and finish the compile "
                           "instead of refusing the recipe")

    _sparse_on_off = field_validator("sparse", mode="before")(on_off)

    def check_model(self, adapter, config: Any = None) -> None:
        """seq shapes text inputs; a model without a text tower has none it could shape."""
        if self.seq is not None and not any(t.modality == "text" for t in adapter.towers):
            raise LmmcError(f"tensorrt.seq sets the tokens of a text, and this {adapter.family} model has no text "
                            f"tower; remove seq")


def tensorrt_module():
    """The tensorrt package, or None where it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def _require_tensorrt():
    trt = tensorrt_module()
    if trt is None:
        raise LmmcError(f"the 'tensorrt' export needs TensorRT 10 or later and an NVIDIA GPU; install the extra "
                        f"with `{EXTRA}`, or mark the step `tensorrt: {{optional: true}}` to finish the compile "
                        f"without an engine")
    return trt


def optimisation_profile(onnx_path: Path, ranges: dict[str, ShapeRange]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> (min, opt, max) shape: each symbolic axis of the ONNX file takes the range named like
    it (the export names them "batch" and "sequence"), each fixed axis its size."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    profile = {}
    for value in graph.input:
        shapes: list[list[int]] = [[], [], []]
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                sizes = (dim.dim_value,) * 3
            elif dim.dim_param in ranges:
                r = ranges[dim.dim_param]
                sizes = (r.min, r.opt, r.max)
            else:
                raise LmmcError(f"{onnx_path.name}: input '{value.name}' has an axis '{dim.dim_param or '?'}' with no "
                                f"size range; the tensorrt step knows {sorted(ranges)}. Export it again with "
                                f"`lmmc compile` (its exports name the axes batch and sequence)")
            for shape, size in zip(shapes, sizes):
                shape.append(size)
        profile[value.name] = tuple(tuple(s) for s in shapes)
    return profile


def is_two_four(weight: np.ndarray) -> bool:
    """Whether every group of 4 consecutive values along axis 0 holds at most 2 non-zeros: the 2:4 layout
    TensorRT's sparse kernels read from an exported MatMul weight ([in, out])."""
    if weight.ndim != 2 or weight.shape[0] % 4:
        return False
    groups = (weight != 0).reshape(weight.shape[0] // 4, 4, weight.shape[1])
    return bool((groups.sum(axis=1) <= 2).all())


def two_four_weights(onnx_path: Path) -> list[str]:
    """The MatMul weight initialisers of an ONNX file that are 2:4 sparse."""
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}
    weights = {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    return sorted(w for w in weights if is_two_four(numpy_helper.to_array(inits[w])))


def builder_setup(major: int, precision: str) -> tuple[str, list[str]]:
    """Which graph the engine of `precision` is built from ("plain", "fp16-onnx" or "qdq") and which
    BuilderFlag names to set, for TensorRT `major`.

    TensorRT 10 keeps the precision flags; 11 builds every network strongly typed, so the precision must
    be in the graph. (An fp32 build also clears TF32: see `build_engine`.)"""
    if precision == "fp32":
        return "plain", []
    if major < 11:
        return ("plain", ["FP16"]) if precision == "fp16" else ("qdq", ["INT8"])
    return ("fp16-onnx", []) if precision == "fp16" else ("qdq", [])


def parse_sparsity_log(lines: list[str]) -> dict[str, list[str]]:
    """The layers the builder found eligible for sparse math ("eligible") and those it picked a sparse
    kernel for ("picked"), from its INFO log; a key is absent when its line is (SPARSE_WEIGHTS off)."""
    found: dict[str, list[str]] = {}
    for line in lines:
        for key, pattern in (("eligible", _ELIGIBLE), ("picked", _PICKED)):
            match = pattern.search(line)
            if match:
                found.setdefault(key, []).extend(n for n in match.group(1).split(", ") if n)
    return found


def parse_inspector(engine_json: str) -> dict[str, bool]:
    """Layer name -> whether it runs with sparse weights, from the engine inspector's JSON (profiling
    verbosity DETAILED); layers without the field (reformats, activations) are left out."""
    layers = json.loads(engine_json).get("Layers", [])
    return {layer["Name"]: bool(layer["HasSparseWeights"]) for layer in layers
            if isinstance(layer, dict) and "HasSparseWeights" in layer}


def node_modules(onnx_path: Path, names: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    """ONNX MatMul node name -> the PyTorch module whose weight it multiplies by, through the export's
    initialiser map (`<tower>.names.json`). The weight is followed back through DequantizeLinear, Cast
    and Transpose, and a quantised copy's `_quantized` suffix is dropped, so the FP16 and QDQ graphs map
    like the plain one."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    out = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        name = node.input[1]
        while name not in inits and name in producer and producer[name].op_type in _WEIGHT_PATH_OPS:
            name = producer[name].input[0]
        hit = names.get(name) or names.get(name.removesuffix("_quantized"))
        if hit:
            out[node.name] = hit["param"].removesuffix(".weight")
    return out


def sparsity_table(log: dict[str, list[str]], inspector: dict[str, bool],
                   modules: dict[str, str]) -> list[dict[str, Any]]:
    """One row per layer the builder found eligible or ran sparse: layer, eligible, picked sparse (from the
    log, else the inspector; None where neither tells) and the PyTorch modules fused into it (TensorRT
    names a layer after its ONNX nodes, joined by " + ")."""
    eligible, picked = log.get("eligible"), log.get("picked")
    sparse_in_engine = [name for name, sparse in inspector.items() if sparse]
    rows = []
    for layer in dict.fromkeys([*(eligible or []), *(picked or []), *sparse_in_engine]):
        chosen = layer in picked if picked is not None else inspector.get(layer)
        rows.append({"layer": layer, "eligible": layer in eligible if eligible is not None else None,
                     "picked_sparse": chosen, "modules": [modules[n] for n in layer.split(" + ") if n in modules]})
    return rows


def unreported_sparsity(tower: str, precision: str, version: str) -> str:
    """Said when a build asked for sparse weights and TensorRT named no layer, eligible or sparse: the
    table is then empty for want of a report, not for want of 2:4 weights."""
    return (f"the {tower} {precision} engine was built with SPARSE_WEIGHTS, and TensorRT {version} named no layer "
            f"eligible for sparse math nor any running sparse weights (it compiles transformer blocks into fused "
            f"kernels whose layers it may not report); its sparsity table is empty, and its latency against a dense "
            f"build, not the table, tells whether the 2:4 weights paid")


def quantize_for_tensorrt(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], exclude: list[str]) -> None:
    """INT8 QDQ graph for TensorRT's explicit quantisation: MatMul weights per channel and activations per
    tensor, both signed and symmetric (zero point 0), the only INT8 form TensorRT reads; ranges from
    `feeds`, MatMul nodes in `exclude` kept fp32. (The `ort` pass's static graph has unsigned asymmetric
    activations, which suit ONNX Runtime's CPU kernels but which TensorRT refuses.)"""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from lmmc.export.ort import _FeedReader, quiet_quantizer

    with quiet_quantizer():
        quantize_static(src, dst, _FeedReader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        nodes_to_exclude=exclude, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


def timing_cache_path(workdir: Path) -> Path:
    """Where the timing cache lives: beside --out as `.<out>.tensorrt-timing.cache`, next to the compile's
    work area, so that the next compile to the same --out (a --force rebuild) reuses it; a workdir outside
    a work area keeps it in its tensorrt/ folder."""
    from lmmc.resume import OUTPUT_DIR, WORK_SUFFIX

    area = workdir.parent
    if workdir.name == OUTPUT_DIR and area.name.startswith(".") and area.name.endswith(WORK_SUFFIX):
        return area.parent / f"{area.name.removesuffix(WORK_SUFFIX)}.tensorrt-timing.cache"
    return workdir / "tensorrt" / "timing.cache"


def build_hint(errors: list[str]) -> str:
    """What to do about a failed build, from the builder's errors: memory, or what they say."""
    if any(word in e.lower() for e in errors for word in ("memory", "workspace", "allocat")):
        return "Raise tensorrt.workspace_mb, or narrow tensorrt.batch / seq"
    return "The builder's errors above say why; a narrower tensorrt.batch / seq or another precision may build"


def why_no_engines() -> str | None:
    """Why a tensorrt step can build no engine on this machine; None where it can."""
    trt = tensorrt_module()
    if trt is None:
        return "TensorRT is not installed"
    try:
        make_builder(trt, trt.Logger(trt.Logger.ERROR))
    except LmmcError:
        return "TensorRT finds no usable NVIDIA GPU"
    return None


def make_builder(trt, logger):
    """A TensorRT builder, or one LmmcError where TensorRT finds no usable GPU."""
    try:
        builder = trt.Builder(logger)
    except TypeError:  # the binding's factory returned no builder: CUDA could not be initialised
        builder = None
    if builder is None:
        raise LmmcError("TensorRT is installed but finds no usable NVIDIA GPU (CUDA could not be initialised); "
                        "build the engines on a machine with one, or mark the step `tensorrt: {optional: true}`")
    return builder


def parser_hint(onnx_path: Path, version: str) -> str:
    """What to do about a graph TensorRT's ONNX parser refused: a lower opset where the graph's is above the
    20 its parser documents, else the operator list of this TensorRT."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > 20:
        return f"Export with opset 20 or lower (`onnx: {{opset: 20}}`; this graph is opset {opset}), which its parser documents"
    return (f"The graph is opset {opset}, which the parser reads: an operator or attribute in it is one TensorRT "
            f"{version} does not take (onnx-tensorrt's operator list for that version says which)")


def build_engine(trt, onnx_path: Path, engine_path: Path, profile: dict[str, tuple[tuple[int, ...], ...]],
                 flags: list[str], workspace_bytes: int, cache: Path | None, fp32: bool) -> dict[str, Any]:
    """Parse `onnx_path`, build and write a serialized engine; return the builder's INFO-and-worse log
    lines, the engine inspector's JSON and whether an earlier timing cache was read. An `fp32` build clears
    TF32, which TensorRT enables by default and which would take a tenth of the mantissa off every matrix
    product; FP16 and INT8 builds keep it for the layers they leave in float."""

    class Log(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
            if severity <= trt.ILogger.Severity.INFO:  # VERBOSE would keep every tactic tried
                self.lines.append(msg)

    logger = Log()
    builder = make_builder(trt, logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LmmcError(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors}. "
                        f"{parser_hint(onnx_path, trt.__version__)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp32:
        config.clear_flag(trt.BuilderFlag.TF32)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector's per-layer JSON needs it
    shapes = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        shapes.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(shapes)
    reused = cache is not None and cache.is_file()
    if cache is not None:
        earlier = config.create_timing_cache(cache.read_bytes() if reused else b"")
        # the builder refuses a cache from another GPU or TensorRT version (ignore_mismatch=False), and
        # bytes it cannot read give no cache at all: start anew
        if earlier is None or not config.set_timing_cache(earlier, False):
            reused = False
            config.set_timing_cache(config.create_timing_cache(b""), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LmmcError(f"TensorRT could not build an engine from {onnx_path.name}: "
                        f"{' | '.join((logger.errors or logger.lines)[-3:]) or 'no message'}. {build_hint(logger.errors)}")
    _write_whole(engine_path, bytes(plan))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _write_whole(cache, bytes(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    inspector = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return {"log": logger.lines, "inspector": inspector, "cache_reused": reused}


@register
class TensorRtExportPass(Pass):
    """TensorRT engines, one per tower and precision, with a 2:4 sparsity report.

    Recipe: ``export: [onnx, {tensorrt: {precision: [fp16], batch: {min: 1, opt: 8, max: 32}}}]`` (after
    ``onnx``; INT8 needs calibration data). Writes ``tensorrt/<tower>.<precision>.engine`` (and the FP16
    ONNX or INT8 QDQ graph an engine was built from). Without TensorRT the recipe is refused, naming the
    extra, unless the step says ``optional: true``: then report and manifest say the engine was not built."""

    name = "tensorrt"
    kind = "export"
    Config = TensorRtConfig
    needs = frozenset({"onnx", "calib"})
    provides = frozenset({"exports"})

    def check(self, available: set[str]) -> None:
        """Refuse at recipe time, before any weight loads, a required step that cannot build."""
        super().check(available)
        if not self.config.optional:
            trt = _require_tensorrt()
            make_builder(trt, trt.Logger(trt.Logger.ERROR))  # installed without a GPU it can use: say so now

    def run(self, art: Artifact) -> dict[str, Any]:
        trt = tensorrt_module()
        if trt is None:
            return {"tensorrt": NOT_BUILT, "warnings": [f"TensorRT is not installed, so no engine was built (the step "
                                                        f"is optional); {EXTRA} on a machine with an NVIDIA GPU"]}
        cfg = self.config
        if cfg.optional:  # an optional step is skipped on a machine whose GPU TensorRT cannot use, as without it
            try:
                make_builder(trt, trt.Logger(trt.Logger.ERROR))
            except LmmcError:
                return {"tensorrt": NO_GPU, "warnings": ["TensorRT finds no usable NVIDIA GPU, so no engine was built "
                                                         "(the step is optional); build on a machine with one"]}
        major = int(trt.__version__.split(".")[0])
        folder = art.workdir / "tensorrt"
        folder.mkdir(exist_ok=True)
        cache = timing_cache_path(art.workdir) if cfg.timing_cache else None
        metrics: dict[str, Any] = {"tensorrt": {"version": trt.__version__,
                                                "timing_cache": str(cache) if cache else None}}
        for tower in art.adapter.towers:
            plain = art.onnx[tower.name]
            ranges = {"batch": cfg.batch}
            if tower.modality == "text":
                ranges["sequence"] = self._seq(art, tower)
            profile = optimisation_profile(plain, ranges)
            sparse_weights = two_four_weights(plain)
            sparse = cfg.sparse == "on" or (cfg.sparse == "auto" and bool(sparse_weights))
            names = json.loads(plain.with_suffix(".names.json").read_text())
            result: dict[str, Any] = {"profile": {k: [list(s) for s in v] for k, v in profile.items()},
                                      "two_four_weights": len(sparse_weights), "engines": {}}
            for precision in cfg.precision:
                source, flags = builder_setup(major, precision)
                flags += ["SPARSE_WEIGHTS"] if sparse else []
                src = self._source(art, tower, plain, source, folder)
                engine = folder / f"{tower.name}.{precision}.engine"
                built = build_engine(trt, src, engine, profile, flags, cfg.workspace_mb << 20, cache,
                                     fp32=precision == "fp32")
                table = sparsity_table(parse_sparsity_log(built["log"]), parse_inspector(built["inspector"]),
                                       node_modules(src, names)) if sparse else []
                variant = "builder-flags" if major < 11 else "strongly-typed"
                art.exports.append(ExportRecord(tower.name, "tensorrt", precision, variant, engine, source=source))
                result["engines"][precision] = {
                    "file": engine.name, "source": src.name, "flags": flags,
                    "timing_cache_reused": built["cache_reused"], "sparsity": table,
                    "picked_sparse": sum(bool(r["picked_sparse"]) for r in table),
                    "warnings": [unreported_sparsity(tower.name, precision, trt.__version__)] if sparse and not table
                    else [],
                }
            metrics[tower.name] = result
        return metrics

    def _seq(self, art: Artifact, tower) -> ShapeRange:
        limit = text_positions(art.student.config, tower)
        seq = self.config.seq or ShapeRange(min=1, opt=min(128, limit), max=min(128, limit))
        if seq.max > limit:
            raise LmmcError(f"tensorrt.seq.max = {seq.max}, but this model's {tower.name} tower takes at most "
                            f"{limit} tokens; set tensorrt.seq.max to {limit} or less")
        return seq

    def _source(self, art: Artifact, tower, plain: Path, source: str, folder: Path) -> Path:
        """The graph an engine is built from, made once per tower."""
        if source == "plain":
            return plain
        if source == "fp16-onnx":
            from lmmc.export.fp16 import to_fp16_onnx

            return _made_once(folder / f"{tower.name}.fp16.onnx", lambda dst: to_fp16_onnx(plain, dst))
        from lmmc.export.ort import calibration_feeds, fc2_matmuls

        return _made_once(folder / f"{tower.name}.int8-qdq.onnx", lambda dst: quantize_for_tensorrt(
            plain, dst, calibration_feeds(art, tower), fc2_matmuls(art.student, art.adapter, tower, plain)))


def _write_whole(dst: Path, data: bytes) -> None:
    """`data` at `dst` under a temporary name first: a kill or a full disk mid-write leaves no truncated
    engine or timing cache for the next build to read."""
    tmp = dst.with_name(f".{dst.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(dst)


def _made_once(dst: Path, make: Any) -> Path:
    """`dst`, written by `make` under a temporary name unless it exists: a kill mid-write leaves no file a
    resumed compile would take for a finished one."""
    if not dst.exists():
        tmp = dst.with_name(f".{dst.name}.partial")
        make(tmp)
        tmp.replace(dst)
    return dst
