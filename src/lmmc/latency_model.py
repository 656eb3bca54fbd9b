"""A measured latency model per deployment target: structure variants cut from the teacher are deployed
and timed on the target itself, and a linear model of blocks, heads and FFN channels is fitted to them."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers
from torch import nn

from lmmc.adapters import Adapter, TowerSpec, block_list, example_inputs, input_names
from lmmc.errors import LmmcError
from lmmc.export.onnx import export_tower
from lmmc.modelio import text_positions
from lmmc.runtime import Model, load
from lmmc.scratch import clear_dead, scratch_folder
from lmmc.student import read_structure
from lmmc.surgery import keep_blocks_, keep_channels_, keep_heads_
from lmmc.timing import time_interleaved, usable_cpus

RUNTIMES = ("openvino", "onnxruntime")
PRECISIONS = ("int8", "fp32")
# Bumped whenever the variants or the fit change, so a cache written by another design is not reused.
DESIGN_VERSION = 3
# Timing-only variants are quantised on a small slice of the calibration data: INT8 speed does not
# depend on the activation ranges, and NNCF's statistics pass over a full calibration set dominates.
VARIANT_CALIB_BATCHES = 1
VARIANT_CALIB_SAMPLES = 2


@dataclass(frozen=True)
class Target:
    """Where the student will run: runtime, precision, device, threads, and the timed batch shape."""

    runtime: Literal["openvino", "onnxruntime"] = "openvino"
    precision: Literal["int8", "fp32"] = "int8"  # int8: NNCF INT8 (openvino) / static QDQ (onnxruntime)
    threads: int = 2
    batch: int = 8
    seq: int = 128  # tokens per text sample; image towers use their own patch count
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise LmmcError(f"unknown target runtime '{self.runtime}'; choose one of {', '.join(RUNTIMES)}")
        if self.precision not in PRECISIONS:
            raise LmmcError(f"unknown target precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}")
        for name in ("threads", "batch", "seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmmcError(f"target {name} = {value!r}; it must be a whole number of at least 1")
        if self.device != "cpu":
            raise LmmcError(f"target device '{self.device}': latency is measured on the CPU only; use device: cpu")

    def key(self) -> str:
        return (f"{self.runtime}-{self.precision}-{self.device}-threads{self.threads}"
                f"-batch{self.batch}-seq{self.seq}")


@dataclass(frozen=True)
class TowerLatency:
    """Milliseconds for one batch of the target shape through one tower: ms = fixed + Σ over blocks of
    (block + head·heads + channel·channels), at the residual width `hidden` the variants had."""

    fixed: float  # everything outside the blocks (embeddings, final norm, pooling)
    block: float  # one block with zero heads and zero FFN channels (norms, residuals, biases)
    head: float  # each attention head kept in a block
    channel: float  # each FFN channel kept in a block
    hidden: int  # the residual-stream width the coefficients were measured at


@dataclass
class LatencyModel:
    target: Target
    towers: dict[str, TowerLatency]
    fit: dict[str, Any] = field(default_factory=dict)  # per-variant measured vs predicted, held-out errors

    def block_ms(self, tower: str, heads: int, channels: int) -> float:
        c = self._tower(tower)
        return c.block + c.head * heads + c.channel * channels

    def predict(self, model: nn.Module, adapter: Adapter) -> dict[str, float]:
        """Per tower, the predicted ms, read off the model's actual depth and per-block heads and channels."""
        out = {}
        for name, rec in read_structure(model, adapter).items():
            c = self._tower(name)
            if rec["hidden"] != c.hidden:
                raise LmmcError(f"the {name} tower's residual stream is {rec['hidden']} channels wide, but this "
                                f"latency model was measured at {c.hidden}; it does not cover removed hidden "
                                f"channels: predict before the hidden stage, or leave 'hidden' out of the shares")
            out[name] = self.structure_ms(name, rec["heads"], rec["ffn"])
        return out

    def structure_ms(self, tower: str, heads: list[int], channels: list[int]) -> float:
        """The tower's ms with one block per list entry, of those heads and FFN channels."""
        blocks = zip(heads, channels, strict=True)
        return self._tower(tower).fixed + sum(self.block_ms(tower, h, c) for h, c in blocks)

    def _tower(self, name: str) -> TowerLatency:
        if name not in self.towers:
            raise LmmcError(f"the latency model has no '{name}' tower (it has {sorted(self.towers)}); fit it on "
                            f"the model this student comes from")
        return self.towers[name]

    def to_json(self) -> dict[str, Any]:
        return {"target": asdict(self.target), "towers": {k: asdict(v) for k, v in self.towers.items()},
                "fit": self.fit}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LatencyModel":
        return cls(Target(**d["target"]), {k: TowerLatency(**v) for k, v in d["towers"].items()}, d.get("fit", {}))


# ---------------------------------------------------------------------------------------------------------
# Deploying and timing


def tower_feed(model: nn.Module, tower: TowerSpec, target: Target) -> dict[str, np.ndarray]:
    """The timed batch: target.batch samples of target.seq tokens (capped at the tower's position limit)
    for text, target.batch images at the model's own size for an image tower."""
    seq = min(target.seq, text_positions(model.config, tower)) if tower.modality == "text" else 1
    inputs = example_inputs(model, tower, batch=target.batch, seq=seq)
    return {n: t.numpy() for n, t in zip(input_names(tower), inputs)}


def deploy(model: nn.Module, adapter: Adapter, target: Target, folder: Path,
            calib_feeds: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, Path]:
    """Export every tower as lmmc deploys it on the target; the artifact to time per tower."""
    from lmmc.export import ort

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for tower in adapter.towers:
        feeds = calib_feeds.get(tower.name) if target.precision == "int8" else []
        if target.precision == "int8" and not feeds:
            raise LmmcError(f"an INT8 target needs calibration feeds for the {tower.name} tower; pass "
                            f"calib_feeds={{'{tower.name}': [feed, ...]}} (the compile's calibration batches)")
        if target.runtime == "onnxruntime":
            plain = folder / f"{tower.name}.onnx"
            export_tower(model, tower, plain)
            if target.precision == "fp32":
                out[tower.name] = plain
            else:
                dst = folder / f"{tower.name}.int8-static.onnx"
                ort.quantize_static_onnx(plain, dst, feeds, exclude=ort.fc2_matmuls(model, adapter, tower, plain))
                out[tower.name] = dst
            continue
        from lmmc.export.openvino import quantize_openvino, torch_to_openvino

        xml = torch_to_openvino(model, tower, folder / f"{tower.name}.xml")
        if target.precision == "int8":
            with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
                xml = quantize_openvino(xml, folder / f"{tower.name}.int8.xml", feeds)
        out[tower.name] = xml
    return out


def interleaved_ms(runs: dict[Any, tuple[Model, dict[str, np.ndarray]]], repeats: int) -> dict[Any, float]:
    """Median ms per entry (a model and its feed), the entries timed in turns (`time_interleaved`)."""
    times = time_interleaved({k: functools.partial(m.run, feed) for k, (m, feed) in runs.items()}, repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def _backend(target: Target) -> str:
    return "openvino" if target.runtime == "openvino" else "onnxruntime"


def measure_ms(model: nn.Module, adapter: Adapter, target: Target, folder: Path,
               calib_feeds: dict[str, list[dict[str, np.ndarray]]], repeats: int = 20) -> dict[str, float]:
    """Per tower, the median ms of one target-shaped batch, deployed as lmmc deploys it on the target
    (files written to `folder`), run with target.threads threads, towers interleaved."""
    if repeats < 1:
        raise LmmcError(f"repeats = {repeats}; time at least one run")
    paths = deploy(model, adapter, target, folder, calib_feeds)
    runs = {t.name: (load(paths[t.name], _backend(target), target.threads), tower_feed(model, t, target))
            for t in adapter.towers}
    return interleaved_ms(runs, repeats)


# ---------------------------------------------------------------------------------------------------------
# Structure variants


@dataclass(frozen=True)
class Variant:
    """Per tower, the heads and FFN channels of each kept block (depth = list length)."""

    name: str
    held_out: bool
    heads: dict[str, list[int]]
    ffn: dict[str, list[int]]


def variants(structure: dict[str, dict[str, Any]]) -> list[Variant]:
    """The structures measured: four that pin the coefficients down one by one (the teacher, one block,
    one head per block, a thin FFN), two uneven ones fitted with them, and three uneven ones held out.
    Uneven sizes are drawn from a fixed seed and are mostly not multiples of 8, as pruning leaves them."""
    rng = np.random.default_rng(0)
    shapes: dict[str, list[tuple[list[int], list[int]]]] = {}
    for tower, rec in structure.items():
        n, heads, ffn = rec["layers"], max(rec["heads"]), max(rec["ffn"])

        def uneven(depth: int) -> tuple[list[int], list[int]]:
            return ([int(h) for h in rng.integers(1, heads + 1, depth)],
                    [int(c) for c in rng.integers(max(1, ffn // 16), ffn + 1, depth)])

        shapes[tower] = [([heads] * n, [ffn] * n), ([heads], [ffn]), ([1] * n, [ffn] * n),
                         ([heads] * n, [max(1, ffn // 8 + 3)] * n), uneven(n), uneven(max(1, (n + 1) // 2)),
                         uneven(n), uneven(max(1, n - 1)), uneven(max(1, (2 * n + 2) // 3))]
    names = ["teacher", "one block", "one head per block", "thin FFN", "uneven A", "uneven B",
             "held-out C", "held-out D", "held-out E"]
    return [Variant(name, name.startswith("held-out"), {t: s[i][0] for t, s in shapes.items()},
                    {t: s[i][1] for t, s in shapes.items()}) for i, name in enumerate(names)]


def cut(teacher: nn.Module, adapter: Adapter, variant: Variant) -> nn.Module:
    """A copy of the teacher cut to the variant's depth, heads and FFN widths (which units are kept does
    not matter for latency: the first ones are)."""
    from lmmc.adapters import head_dim

    model = copy.deepcopy(teacher).eval()
    for tower in adapter.towers:
        heads, ffn = variant.heads[tower.name], variant.ffn[tower.name]
        keep_blocks_(model, tower, range(len(heads)))
        hd = head_dim(model, tower)
        for block, h, c in zip(block_list(model, tower)[1], heads, ffn):
            keep_heads_(block, tower, hd, range(h))
            keep_channels_(block, tower, range(c))
    return model


# ---------------------------------------------------------------------------------------------------------
# The fit


def _features(heads: list[int], ffn: list[int]) -> list[float]:
    return [1.0, float(len(heads)), float(sum(heads)), float(sum(ffn))]


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin |a x - b| over x >= 0, exactly, by trying every set of free coefficients (four here: 16
    small solves) and keeping the best feasible one."""
    best, best_err = np.zeros(a.shape[1]), float(np.sum(b ** 2))
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            sol = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if np.all(sol >= 0):
                x = np.zeros(a.shape[1])
                x[list(cols)] = sol
                err = float(np.sum((a @ x - b) ** 2))
                if err < best_err - 1e-12:
                    best, best_err = x, err
    return best


def fit_tower(rows: list[tuple[list[int], list[int], float]]) -> tuple[float, float, float, float]:
    """fixed, block, head, channel >= 0 minimising the squared relative error over (heads, ffn, ms) rows."""
    a = np.array([_features(h, c) for h, c, _ in rows])
    y = np.array([ms for *_, ms in rows])
    # Rows scaled by 1/ms: a small structure's few ms count as much as the teacher's, relatively.
    x = nonnegative_lstsq(a / y[:, None], np.ones(len(rows)))
    return tuple(float(v) for v in x)


# ---------------------------------------------------------------------------------------------------------
# Cache


# The instruction-set flags the runtimes' kernels choose by: a virtual machine may name two CPU
# generations alike ("Intel(R) Xeon(R) Processor"), one with AMX and one without.
_ISA = ("avx", "amx", "vnni", "fma", "f16c", "bf16")


def machine() -> dict[str, Any]:
    """The CPU the timings hold for: its model name, its vector and matrix instruction sets, and the cores
    this process may use."""
    name, isa = platform.processor() or platform.machine(), []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        isa = sorted(f for f in flags if any(k in f for k in _ISA))
    cores = usable_cpus()
    return {"cpu": name, "isa": isa, "cores": cores}


def runtime_versions(target: Target) -> dict[str, str]:
    if target.runtime == "onnxruntime":
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}
    try:
        import openvino
    except ImportError:
        raise LmmcError("an OpenVINO target needs OpenVINO; install the extra with `pip install 'lmmc[openvino]'`") from None
    versions = {"openvino": openvino.__version__}
    if target.precision == "int8":
        try:
            import nncf
        except ImportError:
            raise LmmcError("an OpenVINO INT8 target needs NNCF; install the extra with "
                            "`pip install 'lmmc[openvino]'`") from None
        versions["nncf"] = nncf.__version__
    return versions


def cache_key(teacher: nn.Module, adapter: Adapter, target: Target) -> dict[str, Any]:
    """Everything the measurements depend on: machine, runtime versions, target, the teacher's
    architecture and the timed input shapes, and the variant design."""
    arch = {name: {k: rec[k] for k in ("layers", "head_dim", "heads", "ffn", "hidden")}
            for name, rec in read_structure(teacher, adapter).items()}
    for tower in adapter.towers:  # the FFN's activation costs what it costs (ReLU against GELU: about 12 %)
        tcfg = getattr(teacher.config, tower.config_key) if tower.config_key else teacher.config
        arch[tower.name]["activation"] = str(getattr(tcfg, "hidden_act", getattr(tcfg, "hidden_activation", None)))
        # relative position terms add products to every attention
        arch[tower.name]["positions"] = str(getattr(tcfg, "position_embedding_type", None))
    shapes = {t.name: {n: list(v.shape) for n, v in tower_feed(teacher, t, target).items()} for t in adapter.towers}
    # the exporter decides the graph the runtime times
    exporter = {"torch": torch.__version__, "transformers": transformers.__version__}
    return {"design": DESIGN_VERSION, "machine": machine(), "runtime": {**runtime_versions(target), **exporter},
            # batch and tokens as the inputs below have them: an image tower reads no seq, a text one at most its positions
            "target": f"{target.runtime}-{target.precision}-{target.device}-threads{target.threads}",
            "model": {"class": type(teacher).__name__, "model_type": teacher.config.model_type, "towers": arch,
                      "inputs": shapes}}


def cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"latency-model-{digest}.json"


def _digest(model_json: Any) -> str:
    return hashlib.sha256(json.dumps(model_json, sort_keys=True).encode()).hexdigest()


def write_cache(path: Path, key: dict[str, Any], model: LatencyModel) -> None:
    """Store a fit with the digest of its figures, by which a read tells a fit from an edited one."""
    stored = model.to_json()
    # a temporary file of its own: two compiles sharing a cache write it at once
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's file is its owner's alone; a shared cache is read by others
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"key": key, "model": stored, "sha256": _digest(stored)}, indent=1))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _read_cache(path: Path, key: dict[str, Any], towers: list[str]) -> LatencyModel | None:
    try:
        stored = json.loads(path.read_text())
        # an edited fit plans with milliseconds nobody measured, however plausible they look
        if not isinstance(stored, dict) or stored.get("key") != key or stored.get("sha256") != _digest(stored["model"]):
            return None
        model = LatencyModel.from_json(stored["model"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, LmmcError):
        return None  # missing or unreadable: measure again and rewrite it

    def sound(t: TowerLatency) -> bool:  # what a fit writes: finite, non-negative, a block costing something
        costs = (t.fixed, t.block, t.head, t.channel)
        return (all(type(c) in (int, float) and math.isfinite(c) and c >= 0 for c in costs)
                and t.block + t.head + t.channel > 0)

    # an edited or damaged fit would plan with NaN or negative milliseconds: measure again instead
    return model if sorted(model.towers) == sorted(towers) and all(map(sound, model.towers.values())) else None


def _variant_feeds(calib_feeds: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, list[dict[str, np.ndarray]]]:
    return {t: [{n: v[:VARIANT_CALIB_SAMPLES] for n, v in f.items()} for f in feeds[:VARIANT_CALIB_BATCHES]]
            for t, feeds in calib_feeds.items()}


VARIANTS = "latency-variants-"  # the folders of the variant models a fit measures, in its cache


def fit_latency_model(teacher: nn.Module, adapter: Adapter, target: Target, cache_dir: Path,
                      calib_feeds: dict[str, list[dict[str, np.ndarray]]], repeats: int = 20) -> LatencyModel:
    """Measure structure variants cut from the teacher on the target, fit each tower's coefficients and
    report the held-out relative errors; a cached fit for the same machine, runtime, target and
    architecture in `cache_dir` is returned without measuring anything."""
    cache_dir = Path(cache_dir)
    key = cache_key(teacher, adapter, target)
    path = cache_file(cache_dir, key)
    clear_dead(cache_dir, VARIANTS)  # a shared cache kept every killed fit's exported models
    cached = _read_cache(path, key, [t.name for t in adapter.towers])
    if cached is not None:
        cached.fit = {**cached.fit, "reused_from": str(path)}  # the figures are that fit's, not this compile's
        return cached
    if path.exists():  # the file named for this key, unusable
        print(f"lmmc: the latency model cached in '{path}' is damaged, edited or of another lmmc version; fitting "
              f"it again, which replaces that file", file=sys.stderr)
    if repeats < 3:
        raise LmmcError(f"repeats = {repeats}; a median needs at least 3 timed runs per variant")
    cache_dir.mkdir(parents=True, exist_ok=True)
    structure = read_structure(teacher, adapter)
    chosen = variants(structure)
    feeds = _variant_feeds(calib_feeds)
    started = time.perf_counter()
    runs: dict[tuple[str, str], tuple[Model, dict[str, np.ndarray]]] = {}
    with scratch_folder(VARIANTS, cache_dir) as tmp:
        for i, variant in enumerate(chosen):
            model = cut(teacher, adapter, variant)
            paths = deploy(model, adapter, target, Path(tmp) / f"v{i}", feeds)
            for tower in adapter.towers:
                runs[(variant.name, tower.name)] = (load(paths[tower.name], _backend(target), target.threads),
                                                    tower_feed(model, tower, target))
        deployed = time.perf_counter()
        ms = interleaved_ms(runs, repeats)
    timed = time.perf_counter()
    towers = {}
    for tower in adapter.towers:
        rows = [(v.heads[tower.name], v.ffn[tower.name], ms[(v.name, tower.name)]) for v in chosen if not v.held_out]
        coef = fit_tower(rows)
        towers[tower.name] = TowerLatency(*coef, hidden=structure[tower.name]["hidden"])
    model = LatencyModel(target, towers)
    model.fit = _fit_report(model, chosen, ms, {"deploy": deployed - started, "timing": timed - deployed},
                            repeats, key)
    write_cache(path, key, model)
    return model


def _fit_report(model: LatencyModel, chosen: list[Variant], ms: dict[tuple[str, str], float],
                seconds: dict[str, float], repeats: int, key: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for v in chosen:
        for tower in model.towers:
            predicted = model.structure_ms(tower, v.heads[tower], v.ffn[tower])
            measured = ms[(v.name, tower)]
            rows.append({"variant": v.name, "tower": tower, "held_out": v.held_out, "heads": v.heads[tower],
                         "ffn": v.ffn[tower], "measured_ms": measured, "predicted_ms": predicted,
                         "rel_error": (predicted - measured) / measured})

    def summary(held_out: bool) -> dict[str, dict[str, float]]:
        out = {}
        for tower in model.towers:
            errs = [abs(r["rel_error"]) for r in rows if r["tower"] == tower and r["held_out"] == held_out]
            out[tower] = {"max": max(errs), "mean": sum(errs) / len(errs)}
        return out

    return {"variants": rows, "held_out_rel_error": summary(True), "fit_rel_error": summary(False),
            "seconds": {k: round(v, 2) for k, v in seconds.items()}, "repeats": repeats,
            "calibration": f"first {VARIANT_CALIB_SAMPLES} samples of {VARIANT_CALIB_BATCHES} calibration batch(es) "
                           f"per variant", "inputs": key["model"]["inputs"], "machine": key["machine"],
            "runtime": key["runtime"], "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
