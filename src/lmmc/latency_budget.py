"""Latency budgets for structured pruning: the recipe's target and deployment, the teacher's deployments
timed on it, unit costs in predicted milliseconds, and the fastest structure the floors allow."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field, model_validator
from torch import nn

from lmmc.adapters import Adapter, TowerSpec, block_linears, block_list
from lmmc.config import Config
from lmmc.errors import LmmcError
from lmmc.latency_model import LatencyModel, Target, tower_feed
from lmmc.runtime import MAX_THREADS
from lmmc.selection import Unit, select_units
from lmmc.surgery import group_size

TIMING_REPEATS = 15
TIMING_WARMUP = 1


class DeployConfig(Config):
    """Where the student will run: what the latency target is measured on."""

    runtime: Literal["openvino", "onnxruntime"] = Field("openvino", description="the deployment runtime")
    precision: Literal["int8", "fp32"] = Field("int8", description="int8: NNCF INT8 (OpenVINO) or static QDQ "
                                               "(ONNX Runtime), as lmmc's exports write them")
    threads: int = Field(2, gt=0, le=MAX_THREADS, description="intra-op threads of the runtime")
    batch: int = Field(8, gt=0, description="samples per timed batch")
    seq: int = Field(128, gt=0, description="tokens per text sample, capped at the model's positions (image "
                     "towers use their patch count)")

    def target(self) -> Target:
        return Target(runtime=self.runtime, precision=self.precision, threads=self.threads, batch=self.batch,
                      seq=self.seq)


class LatencyTargetConfig(Config):
    """One batch through every tower in `latency_ms`, or `speedup` times faster than the teacher's fastest
    deployment on the same runtime, timed in the same run."""

    latency_ms: float | None = Field(None, gt=0, description="milliseconds per batch, all towers together")
    speedup: float | None = Field(None, gt=1, description="times faster than the teacher's fastest deployment "
                                  "on the deploy runtime")

    @model_validator(mode="after")
    def _exactly_one(self) -> "LatencyTargetConfig":
        if (self.latency_ms is None) == (self.speedup is None):
            raise ValueError("target takes exactly one of latency_ms (e.g. {latency_ms: 15}) or speedup "
                             "(e.g. {speedup: 3})")
        return self


def block_width(block: nn.Module, tower: TowerSpec, head_dim: int) -> tuple[int, int]:
    """(attention heads, FFN channels) a block keeps now."""
    lin = block_linears(block, tower)
    return lin["q"][1].out_features // head_dim, lin["fc1"][1].out_features


class LatencyCosts:
    """Unit costs in predicted milliseconds of one batch at the target shape, read off a latency model
    that is linear in each block's heads and channels: a head and a channel cost the same in every block
    of a tower; a block costs its part with no heads or channels plus what it keeps now."""

    def __init__(self, model: LatencyModel, head_dims: dict[str, int]) -> None:
        self.model = model
        self.head_dims = head_dims

    def head(self, tower: TowerSpec, block: nn.Module) -> float:
        return self.model.towers[tower.name].head

    def channel(self, tower: TowerSpec, block: nn.Module) -> float:
        return self.model.towers[tower.name].channel

    def overhead(self, tower: TowerSpec) -> float:
        """A block with no heads and no channels: what removing a block saves beyond its units."""
        return self.model.towers[tower.name].block

    def block(self, tower: TowerSpec, block: nn.Module) -> float:
        return self.model.block_ms(tower.name, *block_width(block, tower, self.head_dims[tower.name]))

    def blocks(self, model: nn.Module, adapter: Adapter) -> dict[str, float]:
        """Per tower, the predicted milliseconds of its blocks."""
        return {t.name: sum(self.block(t, b) for b in block_list(model, t)[1]) for t in adapter.towers}

    def fixed(self) -> float:
        """Everything outside the blocks, all towers together."""
        return sum(t.fixed for t in self.model.towers.values())

    def floor_ms(self, model: nn.Module, adapter: Adapter, stages: set[str], min_layers: int, min_heads: int,
                 min_ffn: int, ffn_multiple: int = 1) -> float:
        """The fastest structure the floors allow, predicted: each stage in `stages` cut down to its floor
        (blocks keep their widths where a width stage takes no part; a block at least `ffn_multiple` wide
        keeps a multiple of it), the cheapest `min_layers` blocks kept when depth does."""
        total = self.fixed()
        for tower in adapter.towers:
            costs = []
            for block in block_list(model, tower)[1]:
                heads, channels = block_width(block, tower, self.head_dims[tower.name])
                if "heads" in stages:
                    heads = head_floor(heads, min_heads, group_size(block, tower, self.head_dims[tower.name]))
                channels = ffn_floor(channels, min_ffn, ffn_multiple) if "ffn" in stages else channels
                costs.append(self.model.block_ms(tower.name, heads, channels))
            total += sum(sorted(costs)[:min_layers] if "depth" in stages else costs)
        return total


def head_floor(heads: int, min_heads: int, group: int) -> int:
    """The fewest query heads a block of `heads` can keep: min_heads, rounded up to whole groups of `group`
    query heads sharing a key/value head (grouped-query attention removes a group at a time)."""
    return min(heads, -(-min_heads // group) * group)


def ffn_floor(width: int, min_ffn: int, multiple: int) -> int:
    """The fewest FFN channels a block of `width` can keep: min_ffn, rounded up to a multiple of `multiple`
    where the block is at least that wide (as antgmm's ffn_multiple rounds a cut block)."""
    if width < multiple:
        return min(width, min_ffn)
    return min(width, max(multiple, -(-min_ffn // multiple) * multiple))


def cover(units: list[Unit], remove: float, floors: dict[Any, int]) -> list[Unit]:
    """The fewest units, in `select_units`' order (floors kept, least importance per cost first), whose
    cost reaches `remove`: a latency target is a ceiling, so whole units may overshoot it but never fall
    short where the floors allow."""
    if remove <= 0:
        return []
    out, total = [], 0.0
    for unit in select_units(units, math.inf, floors).removed:
        if total >= remove:
            break
        out.append(unit)
        total += unit.cost
    return out


def time_deployments(teacher: nn.Module, adapter: Adapter, target: Target, folder: Path,
                     calib_feeds: dict[str, list[dict[str, np.ndarray]]], deploy_teacher: bool = True,
                     students: dict[str, tuple[str, Callable[[dict[str, np.ndarray]], Any]]] | None = None,
                     repeats: int = TIMING_REPEATS) -> dict[str, Any]:
    """Per tower, timed interleaved on the latency model's batch (`tower_feed`) with the target's threads: the teacher the
    ways `lmmc bench` deploys it (`deploy_teacher`), on the target's runtime only, whose fastest is the
    reference a speed-up is measured against; and the student's artifact (`students`: tower -> (label,
    run)) when given. Medians in ms; `teacher_ms` and `student_ms` sum the towers (one batch through
    every tower). Built files go to `folder`.

    The reference is the teacher as the latency model predicted it when the target was planned: at the
    target's precision (ONNX Runtime INT8: static QDQ, as the student's graph, not bench's dynamic one), at
    f32 inference, as the student's artifact runs (an IR's bf16 twin would set a bar the student is not
    timed against), and only while it keeps the teacher's own fidelity (`teacher_reference`); where none
    does, the runtime's other faithful deployments, said in `notes`."""
    from tqdm import tqdm

    from lmmc.bench import Candidate, interleaved_latency, teacher_deployments

    towers: dict[str, Any] = {}
    notes: list[str] = []
    with tqdm(disable=True) as quiet:
        for tower in adapter.towers:
            candidates = []
            if deploy_teacher:
                # the target's runtime only: the others' deployments would be built and held for nothing
                built = teacher_deployments(teacher, tower, folder, calib_feeds[tower.name], target.threads, notes,
                                            quiet, chosen=(target.runtime,))
                same = [c for c in built if c.backend == target.runtime and c.inference != "bf16"]
                planned = [c for c in same if c.precision == target.precision]
                if target.runtime == "onnxruntime" and target.precision == "int8":
                    planned = [_static_int8_teacher(teacher, adapter, tower, built, folder, calib_feeds[tower.name],
                                                    target.threads)]
                feeds = calib_feeds[tower.name][:4]
                candidates = teacher_reference(planned, built[0], feeds, notes)
                if not candidates:
                    notes.append(f"teacher {tower.name}: no faithful {target.precision} deployment on "
                                 f"{target.runtime}, the one the target was planned against; the reference is the "
                                 f"fastest of its others")
                    candidates = teacher_reference([c for c in same if c not in planned], built[0], feeds, notes)
            if students:
                label, run = students[tower.name]
                candidates.append(Candidate("student", tower.name, label, target.runtime, target.precision, None, run))
            feed = tower_feed(teacher, tower, target)
            times = interleaved_latency(candidates, feed, repeats, TIMING_WARMUP, quiet)
            ms = {c.label: statistics.median(times[i]) for i, c in enumerate(candidates) if c.model == "teacher"}
            result: dict[str, Any] = {"input": {n: list(v.shape) for n, v in feed.items()}}
            if ms:
                best = min(ms, key=ms.get)
                result["teacher"] = {"deployment": best, "ms": ms[best], "all_ms": ms}
            if students:
                result["student"] = {"artifact": students[tower.name][0], "ms": statistics.median(times[len(candidates) - 1])}
            towers[tower.name] = result
    out: dict[str, Any] = {"target": target.key(), "repeats": repeats, "towers": towers, "notes": notes}
    if deploy_teacher:
        out["teacher_ms"] = sum(t["teacher"]["ms"] for t in towers.values())
    if students:
        out["student_ms"] = sum(t["student"]["ms"] for t in towers.values())
    return out


def _static_int8_teacher(teacher: nn.Module, adapter: Adapter, tower, built: list, folder: Path,
                         feeds: list[dict[str, np.ndarray]], threads: int):
    """The teacher's static QDQ graph, quantised as the latency model and the ort export quantise theirs."""
    from lmmc.bench import Candidate
    from lmmc.export.ort import fc2_matmuls, quantize_static_onnx
    from lmmc.runtime import load

    plain = next(c for c in built if c.backend == "onnxruntime" and c.precision == "fp32" and "fused" not in c.label)
    dst = folder / f"{tower.name}.teacher.int8-static.onnx"
    quantize_static_onnx(plain.path, dst, feeds, exclude=fc2_matmuls(teacher, adapter, tower, plain.path))
    model = load(dst, "onnxruntime", threads)
    return Candidate("teacher", tower.name, "onnxruntime INT8 static", "onnxruntime", "int8", dst, model.run,
                     plain.parameters, model.device, model.providers)


def teacher_reference(candidates: list, eager, feeds: list[dict[str, np.ndarray]], notes: list[str]) -> list:
    """The teacher deployments that may set a speed-up's reference: those whose pooled embedding keeps a
    mean cosine of at least bench's TEACHER_MIN_COSINE to PyTorch eager (`eager`) on the calibration
    batches. A quantised teacher that has lost its own fidelity would make any target unreachable for a
    faithful student; each one passed over is named in `notes`."""
    from lmmc.bench import TEACHER_MIN_COSINE, embeddings, mean_cosine

    reference = embeddings(eager.run, feeds)
    kept = []
    for cand in candidates:
        cosine = mean_cosine(embeddings(cand.run, feeds), reference)
        if cosine >= TEACHER_MIN_COSINE:
            kept.append(cand)
        else:
            notes.append(f"teacher {cand.tower}: {cand.label} not a reference, its cosine to the teacher on the "
                         f"calibration batches is {cosine:.4f} (< {TEACHER_MIN_COSINE})")
    return kept


def check_target_exports(passes: list[tuple[str, Any]], exports: list[tuple[str, Any]]) -> None:
    """Refuse, at plan time, a latency target that validation could not time: the recipe's export steps
    ((name, config) each) must write the artifact of the target's runtime and precision, the one
    `lmmc.export.validate.target_artifact` measures."""
    steps = dict(exports)
    for i, (name, cfg) in enumerate(passes):
        if getattr(cfg, "target", None) is None:
            continue
        later = next((j for j, (other, _) in enumerate(passes) if j > i and other == "antgmm"), None)
        if later is not None:  # validation would time and gate another student than the one the target cut
            raise LmmcError(f"passes[{later}] 'antgmm' cuts the student again after passes[{i}] '{name}' cut it to its "
                            f"latency target, which validation then gates on a student it did not plan; cut once, "
                            f"with the target on the last antgmm pass")
        deploy = getattr(cfg, "deploy", None) or DeployConfig()
        if deploy.runtime == "openvino":
            ov = steps.get("openvino")
            ok = ov is not None and (ov.int8 is True if deploy.precision == "int8" else True)
            fix = "'openvino: {int8: true}'" if deploy.precision == "int8" else "'openvino'"
        elif deploy.precision == "int8":
            ok = "ort" in steps and "static" in steps["ort"].int8
            fix = "'ort: {int8: [static]}'"
        else:
            ok, fix = "onnx" in steps, "'onnx'"
        if not ok:
            raise LmmcError(f"passes[{i}] '{name}' sets a latency target on {deploy.runtime} {deploy.precision}, but "
                            f"the recipe exports no {deploy.runtime} {deploy.precision} artifact for validation to "
                            f"time it on; add {fix} under export (after 'onnx'), or set the target's deploy to a "
                            f"runtime and precision the recipe exports")
