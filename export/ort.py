"""ONNX Runtime deployment: the student's graph with attention, skip layer norm and bias GELU fused into
ONNX Runtime's contrib operators, and INT8 by dynamic (weights) and static QDQ (weights and activations)
quantisation calibrated on the compile's calibration batches."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)
from pydantic import Field, field_validator, model_validator

from lmmc.adapters import Adapter, TowerSpec, example_inputs, input_names, prunable_linears
from lmmc.artifact import Artifact, ExportRecord
from lmmc.config import Config, on_off
from lmmc.errors import LmmcError
from lmmc.export.fp16 import to_fp16_onnx
from lmmc.export.mixed_precision import MixedConfig, Runner, block_matrices, choose_precisions
from lmmc.export.onnx import quiet_exporter_logs
from lmmc.export.validate import cosine
from lmmc.modelio import text_positions
from lmmc.pipeline import Pass, PassConfig, register
from lmmc.runtime import MAX_THREADS, Model, load
from lmmc.scratch import scratch_folder
from lmmc.timing import time_interleaved

# Contrib operators the fusions produce; counted per tower.
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "FusedMatMul", "SkipSimplifiedLayerNormalization")


class FusionFailed(Exception):
    """No fusion level produced a graph that runs and agrees with the unfused one."""


def fused_op_counts(path: Path) -> dict[str, int]:
    counts = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node
                     if n.domain == "com.microsoft" and n.op_type in FUSED_OPS)
    return dict(sorted(counts.items()))


def _max_diff(a: Model, b: Model, feeds: list[dict[str, np.ndarray]]) -> float:
    """The worst output's max |a - b|, divided by its largest |a| where that exceeds 1: float sums that
    fusion reorders round in proportion to the activations, as validation's runtime gate allows for."""
    worst = 0.0
    for feed in feeds:
        got_a, got_b = a.run(feed), b.run(feed)
        worst = max(worst, *(float(np.abs(got_a[k] - got_b[k]).max()) / max(1.0, float(np.abs(got_a[k]).max()))
                             for k in got_a))
    return worst


def _fuse_levels():
    """The fusion levels to try, most complete first: onnxscript's whole ORT optimisation, then its
    transformer fusions alone, without the pattern rules (FusedMatMul) that onnxscript 0.7 can apply to
    a rank-2 weight where ORT needs equal ranks, as in SigLIP's attention-pooling head."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from onnxscript.rewriter.ort_fusions._core import fuse_xformers  # onnxscript exports no other entry to it

    return [("optimize_for_ort", lambda m: optimize_for_ort(m, clear_metadata=True)[0]),
            ("transformer fusions", lambda m: fuse_xformers(m)[0])]


def fuse_onnx(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]] | None = None, atol: float = 1e-4,
              notes: list[str] | None = None) -> dict[str, int]:
    """Write `src` with ONNX Runtime's fused operators to `dst`; return the fused operators per type.

    With `feeds`, each fusion level must run and agree with `src` within `atol` on them, else the next
    level is tried (each miss appended to `notes`); FusionFailed when none does."""
    quiet_exporter_logs()
    reference = load(src, "onnxruntime") if feeds else None
    # a source over protobuf's 2 GB limit keeps its weights beside it; so must the fused graph
    external = dst.name + ".data" if _external(src) else None
    misses = []
    for level, fuse in _fuse_levels():
        model = fuse(ir.load(str(src)))
        ir.save(model, str(dst), external_data=external)
        if reference is None:
            return fused_op_counts(dst)
        try:
            diff = _max_diff(reference, load(dst, "onnxruntime"), feeds)
        except Exception as err:  # a rewrite ORT cannot run surfaces only when the graph runs
            misses.append(f"{src.name}: {level} gave a graph ONNX Runtime cannot run ({str(err).splitlines()[0][:200]})")
            continue
        if diff <= atol:
            if notes is not None and misses:  # the fused graph kept is this level's, which ran and agreed
                notes.append(f"{'; '.join(misses)}; {src.name}'s graph of {level} ran and agreed, and is the one kept")
            return fused_op_counts(dst)
        misses.append(f"{src.name}: {level} changed the outputs by {diff:.2e} > {atol:.0e}")
    dst.unlink(missing_ok=True)
    if notes is not None:
        notes.extend(misses)
    raise FusionFailed("; ".join(misses))


def _external(src: Path) -> bool:
    """Whether an export keeps its weights in a file beside it (graphs of over 1.5 GB of weights, near
    protobuf's 2 GB)."""
    return src.with_name(src.name + ".data").exists()


class _QuantizerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "pre-processing before quantization" not in message and "Failed to infer data type" not in message


@contextlib.contextmanager
def quiet_quantizer():
    """onnxruntime.quantization logs two things through the root logger that say nothing about lmmc's
    graphs: advice to pre-process (their shapes are already inferred), once per graph, and that it cannot
    type the output of a fused contrib operator (ONNX's shape inference does not know them), which it then
    leaves in float; the INT8 graph is validated against the fp32 student either way."""
    noise = _QuantizerNoise()
    logging.getLogger().addFilter(noise)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(noise)


def quantize_dynamic_onnx(src: Path, dst: Path, exclude: list[str] | None = None) -> None:
    """INT8 weights, activations quantised on the fly per batch (no calibration data needed); nodes named
    in `exclude` stay fp32."""
    # ONNX's own Attention (opset 23 on) shares its name with ONNX Runtime's contrib operator, which the
    # quantizer maps to QAttention, carrying over attributes QAttention does not take: a graph that cannot load.
    standard_attention = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
                          if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    with quiet_quantizer():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=[*(exclude or []), *standard_attention], use_external_data_format=_external(src))


def kept_fp32(art: Artifact, tower: TowerSpec, base: Path, fc2: bool) -> list[str]:
    """The block linears (PyTorch modules) whose weights a dynamic INT8 graph of `base` leaves fp32: q, k and
    v where ONNX Runtime's fused Attention holds them (its quantiser skips that operator), fc2 where asked."""
    fused = any(n.op_type == "Attention" and n.domain == "com.microsoft"
                for n in onnx.load(str(base), load_external_data=False).graph.node)
    roles = ({"q", "k", "v"} if fused else set()) | ({"fc2"} if fc2 else set())
    return [p.param.removesuffix(".weight") for p in prunable_linears(art.student, art.adapter)
            if p.tower == tower.name and p.role in roles]


def pooled(graph: Path, feeds: list[dict[str, np.ndarray]], threads: int) -> np.ndarray:
    """A graph's pooled embeddings over `feeds`, in ONNX Runtime."""
    model = load(graph, "onnxruntime", threads)
    return np.concatenate([model.run(f)["pooled_embedding"] for f in feeds])


# Rows a static calibration run reads at most. ORT's calibration graph outputs every activation's range, so
# no activation of a run is freed before it ends: 32 images through a SigLIP-B/16 tower held 12 GB at once.
# Min-max ranges over the same rows are the same however they are batched.
CALIBRATION_ROWS = 8


class _FeedReader(CalibrationDataReader):
    """onnxruntime.quantization's calibration reader over a list of feeds, CALIBRATION_ROWS rows a run."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = ({k: v[i:i + CALIBRATION_ROWS] for k, v in feed.items()}
                    for feed in feeds for i in range(0, len(next(iter(feed.values()))), CALIBRATION_ROWS))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_static_onnx(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]],
                         exclude: list[str] | None = None) -> None:
    """INT8 weights and MatMul activations as QDQ pairs, activation ranges from `feeds` (min-max);
    MatMul nodes named in `exclude` stay fp32.

    Only MatMul inputs are quantised: INT8 softmax, layer norm and GELU outputs cost transformers most
    of their accuracy and little of their time."""
    with quiet_quantizer():
        quantize_static(src, dst, _FeedReader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        nodes_to_exclude=exclude or [], per_channel=True, activation_type=QuantType.QUInt8,
                        use_external_data_format=_external(src), weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def qdq_without(qdq: onnx.ModelProto, weights: dict[str, onnx.TensorProto], nodes: set[str]) -> onnx.ModelProto:
    """A copy of a QDQ graph whose MatMul nodes in `nodes` are no longer quantised, as the quantiser's
    `nodes_to_exclude` leaves them: they read the weight from the plain export's initialisers `weights`,
    and an activation stays quantised for all its readers (a residual Add too) only while a quantised
    MatMul reads or writes it."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    graph = out.graph
    producer = {name: node for node in graph.node for name in node.output}
    present = {init.name for init in graph.initializer}

    def quantized_activation(name: str) -> str | None:
        """The float tensor behind a DequantizeLinear(QuantizeLinear(x)) output, else None."""
        dq = producer.get(name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None

    still_quantized = set()
    for node in graph.node:
        if node.op_type == "MatMul" and node.name not in nodes:
            still_quantized.update(node.output)
            still_quantized.update(filter(None, map(quantized_activation, node.input)))
    for node in graph.node:
        for i, name in enumerate(node.input):
            activation = quantized_activation(name)
            if activation is not None:
                # as onnxruntime.quantization does, a node kept fp32 reads an activation that a quantised
                # sibling still quantises through the shared DequantizeLinear: only its weight is float
                if activation not in still_quantized:
                    node.input[i] = activation
                continue
            dq = producer.get(name)
            if node.name not in nodes or dq is None or dq.op_type != "DequantizeLinear":
                continue
            weight = dq.input[0].removesuffix("_quantized")  # onnxruntime.quantization's name for the INT8 copy
            node.input[i] = weight
            if weight not in present:
                graph.initializer.append(weights[weight])
                present.add(weight)
    return out


def _quantised_nodes(qdq: onnx.ModelProto) -> set[str]:
    """MatMul nodes that read a dequantised input."""
    dq = {name for node in qdq.graph.node if node.op_type == "DequantizeLinear" for name in node.output}
    return {n.name for n in qdq.graph.node if n.op_type == "MatMul" and any(i in dq for i in n.input)}


def _pooled(session: ort.InferenceSession) -> Runner:
    return lambda feed: session.run(["pooled_embedding"], feed)[0]


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3  # the INT8 weights a reverted node no longer reads are reported unused
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def quantize_static_mixed(plain: Path, dst: Path, feeds: list[dict[str, np.ndarray]], matrices: dict[str, str],
                          cfg: MixedConfig, threads: int) -> dict[str, Any]:
    """Static QDQ INT8 of `plain` to `dst` with the matrices (MatMul node -> module) whose quantisation
    costs the most pooled-embedding cosine kept fp32, per `cfg`; returns the choice table and figures.

    The costs are measured on one QDQ graph of every MatMul, its nodes set back to float in memory."""
    if _external(plain):
        raise LmmcError(f"{plain.name} keeps its weights outside the ONNX file (over 1.5 GB); the mixed-precision "
                        f"search runs graphs in memory, which protobuf caps at 2 GB: drop `mixed` from ort.int8")
    search = feeds[:cfg.search_batches]
    fp32 = load(plain, "onnxruntime", threads)
    reference = [fp32.run(f)["pooled_embedding"] for f in search]
    with scratch_folder("lmmc-mixed-") as tmp:
        full = Path(tmp) / "search.onnx"
        quantize_static_onnx(plain, full, feeds)
        qdq = onnx.load(str(full))
    weights = {init.name: init for init in onnx.load(str(plain)).graph.initializer}
    quantised = _quantised_nodes(qdq)
    matrices = {n: m for n, m in matrices.items() if n in quantised}

    def quantise(exclude: list[str]) -> Runner:
        quantize_static_onnx(plain, dst, feeds, exclude=exclude)
        model = load(dst, "onnxruntime", threads)
        return lambda feed: model.run(feed)["pooled_embedding"]

    return choose_precisions(matrices, lambda nodes: _pooled(_session(qdq_without(qdq, weights, nodes), threads)),
                             quantise, search, reference, cfg)


def fc2_matmuls(model: torch.nn.Module, adapter: Adapter, tower: TowerSpec, plain: Path,
                graph: Path | None = None) -> list[str]:
    """The MatMul nodes that hold a block's second FFN weight, in the plain export or in `graph` made from
    it (the fused graph keeps its weights' names), found through the plain export's initialiser map. Their
    input is the GELU output, whose few large values stretch a min-max INT8 range until the rest rounds
    to zero (held-out cosine 0.95 instead of 0.99 on MiniLM, static; 0.96 on all-mpnet-base-v2, dynamic)."""
    names = json.loads(plain.with_suffix(".names.json").read_text())
    fc2 = {p.param for p in prunable_linears(model, adapter) if p.tower == tower.name and p.role == "fc2"}
    weights = {init for init, hit in names.items() if hit and hit["param"] in fc2}
    nodes = onnx.load(str(graph or plain), load_external_data=False).graph.node
    return [n.name for n in nodes if n.op_type == "MatMul" and n.input[1] in weights]


def calibration_feeds(art: Artifact, tower: TowerSpec, short: bool = False) -> list[dict[str, np.ndarray]]:
    """The compile's calibration batches (never the held-out ones) as runtime feeds; with `short`, a text
    tower's also the short texts cut from them (`data.short_texts`)."""
    batches = art.calib.calib_batches(tower.modality) + (art.calib.short if short and tower.modality == "text" else [])
    return [{n: b[n].numpy() for n in input_names(tower)} for b in batches]


def median_ms(models: dict[str, Model], feed: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    """Median latency per model, the models timed in turns (`time_interleaved`)."""
    times = time_interleaved({k: functools.partial(m.run, feed) for k, m in models.items()}, repeats)
    return {k: statistics.median(v) for k, v in times.items()}


class StaticOptions(Config):
    mixed: MixedConfig = Field(description="keep the block matrices whose quantisation costs the most cosine fp32")


class StaticMixed(Config):
    """``{static: {mixed: {max_cosine_drop: 0.002}}}`` in ``int8``: static QDQ in mixed precision."""

    static: StaticOptions = Field(description="static QDQ with these options")


class OrtConfig(PassConfig):
    fuse: Literal["auto", "on", "off"] = Field("auto", description="fused graph: auto keeps it only when it "
                                               "is faster than the plain one in ONNX Runtime; on keeps it, off skips it")
    int8: list[Literal["dynamic", "static"] | StaticMixed] = Field(
        ["dynamic", "static"], description="INT8 artifacts: dynamic (weights), static (weights and MatMul "
        "activations, QDQ; the second FFN matrices kept fp32), or {static: {mixed: {max_cosine_drop: d}}} (static "
        "QDQ, the matrices kept fp32 chosen by their measured cosine cost)")
    fp16: bool = Field(False, description="also write ort/<tower>.fp16.onnx: fp16 weights and matrix work, layer "
                       "norm, softmax and reductions kept fp32, inputs and outputs fp32 (for GPUs; slow on a CPU)")
    atol: float = Field(1e-4, gt=0, description="largest |fused - plain| allowed on the calibration batches, "
                        "divided by an output's largest |value| where that exceeds 1 (as validate.max_runtime_diff)")
    threads: int = Field(2, gt=0, le=MAX_THREADS, description="ONNX Runtime threads when timing plain against fused")
    latency_batch: int = Field(8, gt=0, description="samples per timed batch when timing plain against fused")
    latency_seq: int | None = Field(None, gt=0, description="tokens per text sample when timing; default: 128 "
                                    "or the model's position limit if lower (CLIP: 77)")
    repeats: int = Field(12, gt=2, description="timed runs per graph for fuse: auto; medians compared")
    dynamic_min_cosine: float = Field(0.99, ge=0, le=1, description="dynamic INT8 quantises every MatMul (on a "
                                      "fused graph, ONNX Runtime leaves the Attention operator's q/k/v projection "
                                      "fp32) unless its pooled embedding then falls below this mean cosine to the "
                                      "fp32 graph's on the calibration batches; then the second FFN matrices stay "
                                      "fp32 too. The manifest lists the matrices left fp32")

    _fuse_on_off = field_validator("fuse", mode="before")(on_off)

    @field_validator("int8")
    @classmethod
    def _once_each(cls, modes: list) -> list:
        names = ["static" if isinstance(m, StaticMixed) else m for m in modes]
        if len(set(names)) < len(names):
            raise ValueError(f"int8 lists a mode twice ({names}); give dynamic and static at most once each, "
                             f"static either plain or as {{static: {{mixed: ...}}}}")
        return modes

    @model_validator(mode="after")
    def _writes_something(self) -> "OrtConfig":
        if self.fuse == "off" and not self.int8 and not self.fp16:
            raise ValueError("fuse: off, int8: [] and no fp16 write nothing; ask for an artifact (int8: [dynamic], "
                             "say) or remove the ort step")
        return self


@register
class OrtExportPass(Pass):
    """ONNX Runtime deployment: fused graph (kept when faster) and INT8, dynamic and static.

    Recipe: ``export: [onnx, {ort: {fuse: auto, int8: [dynamic, static]}}]`` (after ``onnx``). Writes
    ``ort/<tower>.fused.onnx`` (when kept) and ``ort/<tower>.int8-<mode>.onnx``: dynamic from the kept
    graph, static QDQ from the plain one, calibrated on the calibration batches. A static entry given as
    ``{static: {mixed: {max_cosine_drop: 0.002}}}`` writes ``ort/<tower>.mixed-static.onnx`` instead, its
    choice table under ``mixed`` in the pass's report."""

    name = "ort"
    kind = "export"
    Config = OrtConfig
    needs = frozenset({"onnx", "calib"})
    provides = frozenset({"exports"})

    def run(self, art: Artifact) -> dict[str, Any]:
        cfg = self.config
        folder = art.workdir / "ort"
        folder.mkdir(exist_ok=True)
        metrics: dict[str, Any] = {}
        for tower in art.adapter.towers:
            plain = art.onnx[tower.name]
            feeds = calibration_feeds(art, tower)
            result: dict[str, Any] = {"warnings": []}
            base, variant = plain, "plain"
            if cfg.fuse != "off":
                base, variant = self._fuse(art, tower, plain, folder, feeds, result)
            result["kept"] = variant
            for mode in cfg.int8:
                if isinstance(mode, StaticMixed):
                    dst = folder / f"{tower.name}.mixed-static.onnx"
                    choice = quantize_static_mixed(plain, dst, feeds, block_matrices(art.student, art.adapter, tower, plain),
                                                   mode.static.mixed, cfg.threads)
                    # its warnings once, named after the file (the report gathers every "warnings" list)
                    result["warnings"].extend(f"{dst.name}: {w}" for w in choice.pop("warnings"))
                    result.setdefault("mixed", {})[dst.name] = choice
                    art.exports.append(ExportRecord(tower.name, "onnxruntime", "mixed", "static", dst, source="plain",
                                                    fp32_matrices=choice["fp32_matrices"],
                                                    max_cosine_drop=choice["max_cosine_drop"],
                                                    all_fp32=len(choice["fp32_matrices"]) == len(choice["matrices"])))
                    continue
                dst = folder / f"{tower.name}.int8-{mode}.onnx"
                kept = None
                if mode == "dynamic":
                    result["dynamic"] = self._dynamic(art, tower, plain, base, dst, feeds)
                    source = variant
                    kept = kept_fp32(art, tower, base, result["dynamic"]["fp32_fc2"])
                else:
                    # QDQ has no quantiser for the fused Attention operator: on the fused graph the q/k/v
                    # projections would stay fp32, so static INT8 always starts from the plain graph.
                    quantize_static_onnx(plain, dst, feeds, exclude=fc2_matmuls(art.student, art.adapter, tower, plain))
                    source = "plain"
                art.exports.append(ExportRecord(tower.name, "onnxruntime", "int8", mode, dst, source=source,
                                                fp32_matrices=kept))
            if cfg.fp16:
                result["fp16"] = self._fp16(art, tower, plain, folder)
            metrics[tower.name] = result
        return metrics

    def _dynamic(self, art: Artifact, tower: TowerSpec, plain: Path, base: Path, dst: Path,
                 feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        """Dynamic INT8 of `base`, every MatMul quantised (but a fused Attention's q/k/v); where that moves
        the pooled embedding too far from fp32 on the calibration batches, again with the second FFN
        matrices kept fp32."""
        cfg = self.config
        reference = pooled(base, feeds, cfg.threads)

        def agreement() -> float:
            return float(cosine(reference, pooled(dst, feeds, cfg.threads)).mean())

        quantize_dynamic_onnx(base, dst)
        out: dict[str, Any] = {"cosine_to_fp32": agreement(), "fp32_fc2": False}
        if out["cosine_to_fp32"] < cfg.dynamic_min_cosine:
            quantize_dynamic_onnx(base, dst, exclude=fc2_matmuls(art.student, art.adapter, tower, plain, base))
            out = {"cosine_every_matmul": out["cosine_to_fp32"], "fp32_fc2": True, "cosine_to_fp32": agreement()}
        return out

    def _fp16(self, art: Artifact, tower: TowerSpec, plain: Path, folder: Path) -> dict[str, int]:
        """The FP16 graph, from the plain one: ONNX Runtime's CUDA provider runs ORT's fused operators in
        fp16 on its own, and the plain graph is the one every provider reads."""
        if _external(plain):
            raise LmmcError(f"ort.fp16: {plain.name} keeps its weights outside the ONNX file (over 1.5 GB), and the "
                            f"fp16 conversion works on a graph in memory, which protobuf caps at 2 GB; set fp16: false")
        dst = folder / f"{tower.name}.fp16.onnx"
        counts = to_fp16_onnx(plain, dst)
        art.exports.append(ExportRecord(tower.name, "onnxruntime", "fp16", "plain", dst, source="plain"))
        return counts

    def _fuse(self, art: Artifact, tower: TowerSpec, plain: Path, folder: Path,
              feeds: list[dict[str, np.ndarray]], result: dict[str, Any]) -> tuple[Path, str]:
        """Fuse, time against the plain graph, and return the graph to keep with its variant name."""
        cfg = self.config
        dst = folder / f"{tower.name}.fused.onnx"
        try:
            counts = fuse_onnx(plain, dst, feeds[:2], cfg.atol, result["warnings"])
        except FusionFailed:
            result["warnings"].append(f"{tower.name}: no fused graph agrees with the plain one; kept the plain graph")
            result["reason"] = "fusion failed"
            return plain, "plain"
        result["fused_ops"] = counts
        if not counts.get("Attention") and not counts.get("MultiHeadAttention"):
            result["warnings"].append(f"{tower.name}: no attention pattern matched; the fused graph has {counts or 'no fused operators'}")
        threads = cfg.threads
        models = {"plain": load(plain, "onnxruntime", threads), "fused": load(dst, "onnxruntime", threads)}
        seq = cfg.latency_seq or (min(128, text_positions(art.student.config, tower)) if tower.modality == "text" else 1)
        inputs = example_inputs(art.student, tower, batch=cfg.latency_batch, seq=seq)
        feed = {n: t.numpy() for n, t in zip(input_names(tower), inputs)}
        ms = median_ms(models, feed, cfg.repeats)
        result["latency_ms"] = {"threads": threads, "input": {n: list(v.shape) for n, v in feed.items()}, **ms}
        keep_fused = cfg.fuse == "on" or ms["fused"] < ms["plain"]
        if not keep_fused:
            dst.unlink()
            result["reason"] = f"the fused graph is slower ({ms['fused']:.3g} ms vs {ms['plain']:.3g} ms plain)"
            return plain, "plain"
        art.exports.append(ExportRecord(tower.name, "onnxruntime", "fp32", "fused", dst))
        return dst, "fused"
