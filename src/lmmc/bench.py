"""`lmmc bench`: every student artifact of a compile against the teacher's own deployments, timed
interleaved in one run, with fidelity to the fp32 teacher on held-out text and peak memory.

The teacher is deployed the ways a user could deploy it without lmmc: PyTorch eager, ONNX Runtime fp32,
fused and dynamic INT8, OpenVINO fp32 and OpenVINO INT8 by NNCF calibrated on the compile's own
calibration split; on a CUDA device, PyTorch and ONNX Runtime's CUDA provider (fp32, fused, fp16).
Those files live in a temporary directory; the only file bench writes is its JSON."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field, ValidationError

from lmmc.adapters import generative_family
from lmmc.config import Config
from lmmc.errors import LmmcError
from lmmc.memory import available_bytes
from lmmc.modelio import text_pad_length, text_positions, text_truncation
from lmmc.runtime import (ARTIFACT_KEYS, FILE_LIST, MANIFEST, MAX_THREADS, edited_files, file_list, load,
                           missing_preprocessing, output_fingerprint, read_manifest)
from lmmc.scratch import scratch_folder
from lmmc.timing import PER_VISIT, check_threads_start, time_interleaved, usable_cpus

JSON_KIND = "lmmc bench"
CPU_BACKENDS = ("onnxruntime", "openvino")
GPU_BACKENDS = ("onnxruntime", "tensorrt")
RUNTIMES = ("onnxruntime", "openvino", "tensorrt")  # what --backend may name; PyTorch eager is always timed
MEMORY_METHOD = ("peak RSS increase of a fresh process that has loaded the runtime, then loads the artifact "
                 "and runs one timing batch (Linux VmHWM after load+run minus VmRSS before, the peak reset "
                 "after the runtime loaded), MiB")


class BenchConfig(Config):
    """How `lmmc bench` measures; unset sizes come from the compile's recipe."""

    threads: int | None = Field(None, gt=0, le=MAX_THREADS, description="intra-op threads for every runtime (default: the recipe's)")
    batch: int | None = Field(None, gt=0, description="samples per timed batch (default: the recipe's latency_batch; "
                                "a generative model's: 1)")
    seq: int | None = Field(None, gt=0, description="tokens per text sample (default: the recipe's latency_seq)")
    repeats: int = Field(15, ge=1, description="timed runs per candidate, in visits of one untimed run and "
                         "three timed ones, candidates taking turns (rounded up to whole visits)")
    warmup: int = Field(1, ge=1, description="untimed rounds of visits before the timed ones")
    memory: bool = Field(True, description="measure peak memory, one fresh process per candidate")
    static: bool = Field(False, description="also run every OpenVINO IR compiled for the timed shape (batch x "
                         "seq), as a deployment that always pads to that shape would")
    corpora: tuple[Path, ...] = Field((), description="extra held-out corpora, fidelity reported per corpus")
    corpus_samples: int = Field(256, gt=1, description="samples drawn from each extra corpus")
    calib: Path | None = Field(None, description="the compile's calibration data, when it moved since (lmmc bench only, not a recipe)")
    teacher: Path | None = Field(None, description="the compile's teacher, when it moved since (lmmc bench only, not a recipe)")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="where ONNX Runtime and PyTorch run: "
                        "cpu, or cuda / cuda:N (ONNX Runtime's CUDA provider, from onnxruntime-gpu)")
    trust_remote_code: bool = Field(False, description="read a teacher tokenizer or processor that ships its own "
                                    "code, as a compile with --trust-remote-code did")
    teacher_cache: Path | None = Field(None, description="folder that keeps the teacher's deployments (its ONNX "
                                       "exports, INT8 graphs and IRs) for later benches of the same teacher, "
                                       "calibration data, runtimes and device; unset, each bench builds them anew")
    backends: tuple[Literal[RUNTIMES], ...] = Field((), description="only these runtimes' rows, the teacher's "
                                                     "deployments and the student's artifacts alike (the teacher in "
                                                     "PyTorch eager, fidelity's reference, is always timed); unset, "
                                                     "every runtime the device has")

    def runs(self, backend: str) -> bool:
        """Whether `backend`'s rows are benched."""
        return backend == "pytorch" or not self.backends or backend in self.backends


# A teacher deployment further than this from the fp32 teacher (e.g. an INT8 IR that bf16 inference
# degrades) is not the teacher any more, so the student is not measured against it.
TEACHER_MIN_COSINE = 0.99


@dataclass
class Candidate:
    """One deployment of one tower: something bench can time, embed with and measure."""

    model: str  # "teacher" or "student"
    tower: str
    label: str  # e.g. "onnxruntime fp32", or the artifact's path for a student
    backend: str  # "pytorch", "onnxruntime" or "openvino"
    precision: str
    path: Path | None
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None  # None once its rows are measured
    parameters: tuple[int, int] | None = None  # those the tower's outputs use, and how many of them are not zero
    device: str = "cpu"
    providers: tuple[str, ...] = ()  # ONNX Runtime's execution providers in use
    inference: str | None = None  # OpenVINO's inference precision: "f32", or "bf16" for an IR's bf16 twin
    static_shape: tuple[int, ...] | None = None  # OpenVINO: the one input shape the IR was compiled for
    row: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# What a compile output holds


def read_output(out_dir: Path) -> dict[str, Any]:
    """The compile's report, after checking `out_dir` is an lmmc output."""
    if not out_dir.exists():
        raise LmmcError(f"'{out_dir}' does not exist; pass the --out directory of an lmmc compile")
    if not out_dir.is_dir():
        raise LmmcError(f"'{out_dir}' is a file; pass the --out directory of an lmmc compile")
    report_path, meta_path = out_dir / "report.json", out_dir / "student" / "lmmc.json"
    if not report_path.is_file() or not meta_path.is_file():
        raise LmmcError(f"'{out_dir}' is not an lmmc output (no report.json or student/lmmc.json); "
                        f"run `lmmc compile MODEL --recipe R.yaml --out {out_dir}` first")
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as err:
        raise LmmcError(f"{report_path} is not valid JSON ({err.msg}); recompile to rewrite it") from None
    if not isinstance(report, dict) or not isinstance(report.get("model"), str):
        raise LmmcError(f"{report_path} does not name the model it was compiled from; recompile to rewrite it")
    return report


def student_artifacts(out_dir: Path, towers: list[str], device: str = "cpu",
                      chosen: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """Every student file the device's runtimes can run (the manifest's list when there is one, else
    onnx/*.onnx), of the `chosen` runtimes when given, and a note for each listed artifact of another backend:
    on the CPU a TensorRT engine needs a GPU; on a GPU an OpenVINO IR runs on the CPU, and an engine needs
    TensorRT installed."""
    if (out_dir / MANIFEST).is_file():
        manifest = read_manifest(out_dir)
        missing = missing_preprocessing(out_dir, manifest)
        if missing:  # the figures would be the teacher's tokenizer's, for a deployment that cannot run
            raise LmmcError(f"{out_dir} lacks {missing[:3]}, the preprocessing files its manifest lists, without which "
                            f"its artifacts cannot encode as deployed; copy the whole output directory, or compile "
                            f"again")
        entries = [{k: e[k] for k in ARTIFACT_KEYS} for e in manifest["artifacts"]]
        # an IR's weights (.bin) too, which OpenVINO reads only after the teacher's exports
        lost = {e["path"]: f for e in manifest["artifacts"] if e["tower"] in towers for f in e.get("files") or []
                if f != e["path"] and not (out_dir / f).is_file()}
        files = {e["path"]: e.get("files") or [e["path"]] for e in manifest["artifacts"]}
        preprocessing = [MANIFEST, *(f for section in manifest.get("preprocessing", {}).values()
                                     for f in section["files"])]
    else:
        entries = [{"tower": p.stem, "backend": "onnxruntime", "precision": "fp32",
                    "path": str(p.relative_to(out_dir))} for p in sorted((out_dir / "onnx").glob("*.onnx"))]
        lost, files, preprocessing = {}, {e["path"]: [e["path"]] for e in entries}, []
        unlisted = sorted(str(p.relative_to(out_dir)) for pattern in ("ort/*.onnx", "openvino/*.xml", "tensorrt/*.engine")
                          for p in out_dir.glob(pattern))
    if device == "cpu":
        backends, where = CPU_BACKENDS, "on the CPU"
    else:
        import importlib.util

        backends = GPU_BACKENDS if importlib.util.find_spec("tensorrt") else ("onnxruntime",)
        where = f"on {device}" + ("" if "tensorrt" in backends else " (tensorrt: not installed)")
    skipped = [f"student {e['path']}: {e['backend']} artifacts are not benched {where}" for e in entries
               if e["backend"] not in backends]
    if chosen:
        mine = [e for e in entries if e["tower"] in towers and e["backend"] in backends]
        if mine and not any(e["backend"] in chosen for e in mine):
            held = sorted({e["backend"] for e in mine})
            raise LmmcError(f"'{out_dir}' holds no {' or '.join(chosen)} student artifact to bench (its artifacts run in "
                            f"{', '.join(held)}); pass --backend {held[0]}, or leave --backend out")
        left = [e["path"] for e in mine if e["backend"] not in chosen]
        if left:
            skipped.append(f"--backend {' '.join(chosen)}: student artifacts {', '.join(left[:4])}"
                           f"{' ...' if len(left) > 4 else ''} not benched")
        backends = tuple(b for b in backends if b in chosen)
    if not (out_dir / MANIFEST).is_file() and unlisted:
        skipped.append(f"{out_dir} has no {MANIFEST}, which names each artifact's tower and backend: only onnx/*.onnx "
                       f"is benched, and {', '.join(unlisted[:4])}{' ...' if len(unlisted) > 4 else ''} are left out "
                       f"(compile again to write the manifest)")
    found = [{**e, "label": e["path"], "path": out_dir / e["path"]} for e in entries
             if e["tower"] in towers and e["backend"] in backends]
    if not found:
        raise LmmcError(f"'{out_dir}' holds no student artifact to bench (no {MANIFEST} entries and no "
                        f"onnx/<tower>.onnx for towers {towers}); compile with an export step such as 'export: [onnx]'")
    for a in found:
        if not a["path"].is_file():
            what = "not a file" if a["path"].exists() else "missing"
            raise LmmcError(f"student artifact '{a['path']}' is listed in {MANIFEST} but {what}; recompile '{out_dir}'")
    for path, f in lost.items():
        if any(a["label"] == path for a in found):
            raise LmmcError(f"'{out_dir / f}', a file of student artifact '{path}' listed in {MANIFEST}, is missing; "
                            f"copy the whole output directory, or recompile '{out_dir}'")
    listed = out_dir / FILE_LIST
    if not listed.is_file():  # nothing to check the files against: say so, never pass in silence
        skipped.append(f"{out_dir} has no {FILE_LIST}, the digests of the files its compile wrote, so its artifacts "
                       f"and report.json were not checked against them (an older lmmc's output, or the list was removed)")
    elif file_list(out_dir) is None:
        raise LmmcError(f"'{listed}' is damaged (not the JSON object of digests the compile wrote), so the output's "
                        f"files cannot be checked against it; recompile '{out_dir}'")
    # the report (its recipe draws the held-out split and sets the gate), the manifest and the student's
    # tokenizer or image processor too: what the deployment reads with them
    _check_unchanged(out_dir, ["report.json", *preprocessing, *(f for a in found for f in files.get(a["label"], []))])
    return found, skipped


def _check_unchanged(out_dir: Path, files: list[str]) -> None:
    """Each file is the one the compile wrote, by the SHA-256 its file list keeps: a damaged or edited artifact
    is refused now, not after the minutes the teacher's deployments take, nor benched as the compile's."""
    edited = edited_files(out_dir, files)
    if edited:
        raise LmmcError(f"'{out_dir / edited[0]}' is not the file the compile wrote (its SHA-256 differs from the one "
                        f"{FILE_LIST} keeps): it was edited or damaged since; restore it, or recompile "
                        f"'{out_dir}'")


def _refuse_running_compile(out_dir: Path) -> None:
    """A compile writing to `out_dir` (--force) replaces what bench would time, and with it the bench's JSON."""
    from lmmc.resume import WorkArea

    owner = WorkArea(out_dir).running()
    if owner is not None:
        raise LmmcError(f"a compile ({owner}) is writing to '{out_dir}' and will replace it; run lmmc bench once it "
                        f"has finished")


def check_backends(device: str = "cpu", chosen: tuple[str, ...] = (), option: str = "--backend") -> dict[str, str]:
    """Versions of the runtimes bench needs; a missing one, an ONNX Runtime without the device's execution
    provider, or a `chosen` runtime the device does not run (`option` names where it was chosen), is bad input
    naming what to do."""
    import onnxruntime
    import torch

    from lmmc.runtime.onnxruntime import check_available, providers_for

    offered = CPU_BACKENDS if device == "cpu" else GPU_BACKENDS
    other = [b for b in chosen if b not in offered]
    if other:
        device_option = "bench.device" if option.startswith("bench.") else "--device"
        fix = f"set {device_option} to cuda on a machine with an NVIDIA GPU" if device == "cpu" else \
            f"leave out {device_option}"
        raise LmmcError(f"{option} {other[0]}: bench runs {' and '.join(offered)} on {device}, not {other[0]}; {fix}")
    check_available(providers_for(device), onnxruntime.get_available_providers())
    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    if device != "cpu" or (chosen and "openvino" not in chosen):
        return versions  # OpenVINO and NNCF deploy the teacher on the CPU only
    try:
        import nncf
        import openvino
    except ImportError as err:
        raise LmmcError(f"lmmc bench deploys the teacher with OpenVINO and NNCF, and {err.name} is not "
                        f"installed; install the extra: pip install 'lmmc[openvino]'") from None
    versions.update(openvino=openvino.__version__, nncf=nncf.__version__)
    return versions


def _digest(result: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(result, indent=2, allow_nan=False).encode()).hexdigest()


def is_bench_json(path: Path, here: bool = False) -> bool:
    """Whether `path` holds JSON that lmmc bench wrote, unedited since (its digest), and with `here`, wrote at
    this path: a copy kept elsewhere (a baseline) is the user's. A JSON from before bench signed its files
    passes on its kind alone."""
    try:
        data = json.loads(path.read_text())
        if data.get("kind") != JSON_KIND:
            return False
        if "digest" not in data:
            return True
        digest = data.pop("digest")
        return _digest(data) == digest and (not here or data.get("json") == str(path.resolve()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError, ValueError, TypeError):
        return False


def _elsewhere(path: Path, out_dir: Path) -> bool:
    """Whether `path` is not the output's own bench.json, the one place whose name alone marks it as bench's."""
    return path.resolve() != (out_dir / "bench.json").resolve()


def check_seq(seq: int | None, config: Any, adapter: Any, teacher: str, option: str = "--seq") -> int | None:
    """A timing length the teacher's text tower takes; `option` names where it was given (a recipe's
    bench.seq). Returns the text tower's positions (None: no text tower)."""
    positions = min((text_positions(config, t) for t in adapter.towers if t.modality == "text"), default=None)
    fix = (lambda what: f"pass {option} {what}") if option.startswith("--") else (lambda what: f"set {option} to {what}")
    if seq and positions is None:
        raise LmmcError(f"{option} sets the tokens of a text sample, and {teacher} has no text tower "
                        f"(towers: {', '.join(t.name for t in adapter.towers)}); drop {option}")
    if seq and positions and seq > positions:
        raise LmmcError(f"{option} {seq} is more tokens than the teacher's text tower takes ({positions} positions); "
                        f"{fix(f'{positions} or less')}")
    return positions


def timing_seq(seq: int | None, latency_seq: int | None, positions: int | None) -> int | None:
    """The tokens bench times a text at: its own seq, else the recipe's latency_seq, else 128 capped at the
    text tower's positions; None where no tower reads text."""
    return (seq or latency_seq or min(128, positions)) if positions else None


def check_json_target(path: Path, out_dir: Path) -> None:
    """bench may replace its own earlier JSON, never a file it did not write: outside the output, only one it
    wrote at that very path."""
    if str(path) == "-":  # many tools read it as standard output; a file of that name is not what was meant
        raise LmmcError("--json - would write a file named '-': bench saves its result to a file and prints its "
                        "table; give a file path, e.g. --json bench.json")
    if path.is_symlink():  # replacing it would drop the user's link (a dangling one too)
        raise LmmcError(f"--json '{path}' is a symbolic link, which lmmc never writes; remove it, or pass --json "
                        f"with another path")
    if path.is_dir():
        raise LmmcError(f"--json '{path}' is a directory; give a file path such as {path / 'bench.json'}")
    if _elsewhere(path, out_dir) and path.resolve().is_relative_to(out_dir.resolve()):
        raise LmmcError(f"--json '{path}' is inside the output {out_dir}, where bench writes only bench.json (`lmmc "
                        f"compile --force` would not replace an output holding a file it did not write); leave --json "
                        f"out, or pass a path outside {out_dir}")
    if not path.exists():
        if not path.parent.is_dir():
            raise LmmcError(f"cannot write '{path}': folder '{path.parent}' does not exist")
        return
    if not is_bench_json(path, here=_elsewhere(path, out_dir)):
        other = path.name == "bench.json" and (path.parent / "report.json").is_file() and is_bench_json(path)
        what = (f"is the bench result of another output, {path.parent}" if other else
                "exists and was not written there by lmmc bench, or was edited since")
        raise LmmcError(f"'{path}' {what}; pass --json with another path")


def _partial(path: Path) -> Path:
    """Where the JSON is written before it is renamed into place (a name --force knows as bench's)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def check_writable(path: Path) -> None:
    """A new file can be made beside `path` (one is created and removed), so a folder that refuses the JSON
    fails now rather than after the whole run."""
    from lmmc.resume import write_new

    probe = _partial(path)
    try:
        write_new(probe, "")
        probe.unlink()
    except OSError as err:
        raise LmmcError(f"cannot write '{path}': folder '{path.parent}' refuses new files ({err.strerror or err}); "
                        f"make it writable or pass --json with a path in a writable folder") from None


def _check_outside_inputs(json_path: Path, teacher_ref: str, calib_cfg: Any, corpora: list[Path],
                          out_dir: Path | None = None, cache: Path | None = None) -> None:
    """The JSON and the teacher cache may not land inside what bench reads: a file added to the teacher's folder
    or to a data folder changes the inputs, and every later bench would refuse them as changed since the
    compile. The cache may not be inside the output either, whose files a bench checks are unchanged at its end."""
    from lmmc.modelio import local_dir

    reads = [("the teacher's folder", local_dir(teacher_ref)),
             ("the calibration data", Path(calib_cfg.path) if calib_cfg.path else None),
             *(("the corpus", Path(c)) for c in corpora)]
    written = [("--json", json_path, reads)]
    if cache is not None:
        written.append(("--teacher-cache", cache, [*reads, ("the output", out_dir)]))
    for option, path, places in written:
        target = path.resolve()
        for what, place in places:
            if place is not None and place.is_dir() and target.is_relative_to(place.resolve()):
                raise LmmcError(f"{option} '{path}' is inside {what} ({place}), which bench reads; pass {option} "
                                f"with a path outside it")


class NotSaved(LmmcError):
    """The bench ran to the end but its JSON could not be saved; `result` holds what it measured, so the
    table can still be printed."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def finite(value: Any) -> Any:
    """`value` with every NaN/Inf replaced by None, so it is strict JSON (a broken artifact's NaN cosine)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, result: dict[str, Any], out_dir: Path) -> None:
    """Strict JSON written whole or not at all: into a new temporary file beside `path`, then renamed over
    it once `path` is checked again, since a file someone put there during the run is not bench's to replace.
    It holds where it was written (outside the output) and the digest of the rest, by which bench knows it
    again."""
    from lmmc.resume import write_new

    partial = _partial(path)
    if _elsewhere(path, out_dir):
        result = {**result, "json": str(path.resolve())}
    try:
        write_new(partial, json.dumps({**result, "digest": _digest(result)}, indent=2, allow_nan=False))
        check_json_target(path, out_dir)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# The teacher's deployments


def torch_runner(model, tower, device: str = "cpu") -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The model in PyTorch eager on `device`, with the runtime's interface: numpy in, the tower's outputs
    out (copied back to the host, which also waits for the GPU to finish)."""
    import torch

    from lmmc.adapters import TowerModule

    # a copy goes to the GPU: the teacher itself stays on the CPU for the exports that follow
    module = TowerModule(model if device == "cpu" else copy.deepcopy(model).to(device), tower, deployed=True).eval()

    @torch.inference_mode()
    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hidden, pooled = module(*[torch.from_numpy(feed[n]).to(device) for n in module.names])
        return {"last_hidden_state": hidden.cpu().numpy(), "pooled_embedding": pooled.cpu().numpy()}

    return run


def _parameters(row: dict[str, Any]) -> str:
    """The table's count: the tower's parameters, and the non-zero ones where pruning left zeros."""
    total, nonzero = row["parameters"], row.get("nonzero_parameters")
    if total is None:
        return "-"
    return f"{total:,}" if nonzero in (None, total) else f"{total:,} ({nonzero:,} nonzero)"


def tower_parameters(model, tower) -> tuple[int, int]:
    """Parameters the tower's outputs depend on: those that receive a gradient through one forward
    (a BERT pooler the embedding never uses, or the other tower of a dual encoder, does not count); and
    how many of them are not zero, which is what unstructured pruning removes."""
    import torch

    from lmmc.adapters import TowerModule, example_inputs

    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        hidden, pooled = TowerModule(model, tower)(*example_inputs(model, tower))
        (hidden.sum() + pooled.sum()).backward()
    used = [p for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return sum(p.numel() for p in used), sum(int(p.count_nonzero()) for p in used)


TEACHER_ENTRY = "teacher-"  # a cached entry: teacher-<tower>-<key>/, complete once its entry.json is written
TEACHER_BUILD = ".teacher-build-"  # where an entry is built before it is moved into place


def teacher_cache_key(teacher, tower, calib: list[dict[str, np.ndarray]], device: str,
                      chosen: tuple[str, ...] = ()) -> str:
    """A digest of everything the teacher's deployments are built from: its weights and config, the
    calibration batches NNCF calibrates on, the device, the runtimes built for (an entry of some holds no
    files of the others), lmmc's export code and the versions that run it."""
    import importlib.metadata

    import torch

    import lmmc
    from lmmc.export import fp16, onnx, openvino, ort

    packages = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf")
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    digest = hashlib.sha256(json.dumps({
        "lmmc": lmmc.__version__, "versions": versions, "tower": tower.name, "device": device,
        "class": type(teacher).__name__, "config": teacher.config.to_json_string(use_diff=False),
        **({"runtimes": sorted(chosen)} if chosen else {}),  # every runtime's entries keep their earlier keys
    }, sort_keys=True).encode())
    for module in (onnx, ort, openvino, fp16):  # a changed exporter builds other graphs under the same version
        digest.update(Path(module.__file__).read_bytes())
    for name, tensor in teacher.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for batch in calib:
        for name in sorted(batch):
            digest.update(f"{name}:{batch[name].dtype}:{batch[name].shape}".encode())
            digest.update(np.ascontiguousarray(batch[name]).tobytes())
    return digest.hexdigest()


def _sound_entry(entry: Path, key: str) -> dict[str, Any] | None:
    """The record of a complete entry built from `key`, its files all there at the sizes written; else None."""
    try:
        record = json.loads((entry / "entry.json").read_text())
        if record.get("key") != key or not isinstance(record.get("notes"), list):
            return None
        sizes = record["files"]
        return record if all((entry / name).stat().st_size == size for name, size in sizes.items()) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def cached_teacher(cache: Path, folder: Path, teacher, tower, calib: list[dict[str, np.ndarray]], notes: list[str],
                   progress, device: str, chosen: tuple[str, ...] = ()) -> Path:
    """The folder of the teacher's deployments in `cache`, built there first when no earlier bench did. An entry
    is built aside and moved into place whole, so a killed bench leaves none half-written, and of two benches
    building the same one at once the first to finish keeps its entry. The notes the build made (a fusion
    that failed) are kept with it and given again. A damaged entry is left as it is, and the deployments are
    built into `folder` instead."""
    key = teacher_cache_key(teacher, tower, calib, device, chosen)
    entry = cache / f"{TEACHER_ENTRY}{tower.name}-{key[:24]}"
    record = _sound_entry(entry, key)
    if record is None and not entry.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LmmcError(f"cannot make the teacher cache '{cache}' ({err.strerror or err}); pass --teacher-cache "
                            f"with a writable folder, or leave it out") from None
        with scratch_folder(TEACHER_BUILD, cache) as tmp:
            built = Path(tmp) / entry.name
            built.mkdir()
            made: list[str] = []
            build_teacher(teacher, tower, built, calib, made, progress, device, chosen)
            files = {p.name: p.stat().st_size for p in built.iterdir()}
            (built / "entry.json").write_text(json.dumps({"key": key, "notes": made, "files": files}, indent=1))
            with contextlib.suppress(OSError):  # another bench moved the same entry into place first
                os.rename(built, entry)
            notes.extend(made)
        record = _sound_entry(entry, key)
        if record is not None:
            return entry
    if record is None:  # damaged or edited: built again here, and left as it is for whoever looks at it
        notes.append(f"teacher {tower.name}: the deployments cached in '{entry}' are incomplete or changed since "
                     f"they were built, so they were built again for this bench; remove that folder to cache them anew")
        build_teacher(teacher, tower, folder, calib, notes, progress, device, chosen)
        return folder
    progress.update(teacher_steps(device, chosen))
    notes.extend(n for n in record["notes"] if n not in notes)
    return entry


def teacher_files(folder: Path, tower) -> dict[str, Path]:
    return {"plain": folder / f"teacher-{tower.name}.onnx", "fused": folder / f"teacher-{tower.name}.fused.onnx",
            "int8": folder / f"teacher-{tower.name}.int8-dynamic.onnx", "fp16": folder / f"teacher-{tower.name}.fp16.onnx",
            "ov": folder / f"teacher-{tower.name}.xml", "ov8": folder / f"teacher-{tower.name}.int8.xml"}


def build_teacher(teacher, tower, folder: Path, calib: list[dict[str, np.ndarray]], notes: list[str], progress,
                  device: str = "cpu", chosen: tuple[str, ...] = ()) -> None:
    """Build the teacher's deployments for the `chosen` runtimes (all when empty) into `folder`
    (`teacher_files`), one progress step each."""
    from lmmc.export.fp16 import to_fp16_onnx
    from lmmc.export.onnx import export_tower
    from lmmc.export.openvino import FrontendFailed, quantize_openvino, to_openvino, torch_to_openvino
    from lmmc.export.ort import FusionFailed, fuse_onnx, quantize_dynamic_onnx

    files = teacher_files(folder, tower)

    def fuse() -> None:
        try:
            # two batches are enough to catch a fusion that changes the outputs
            fuse_onnx(files["plain"], files["fused"], calib[:2], notes=notes)
        except FusionFailed as err:
            notes.append(f"teacher {tower.name}: no fused ONNX Runtime graph ({err})")

    def to_ir() -> None:
        try:
            torch_to_openvino(teacher, tower, files["ov"])
        except FrontendFailed as err:
            notes.append(f"teacher {tower.name}: OpenVINO IR converted from the ONNX export ({err})")
            if not files["plain"].is_file():  # no ONNX Runtime rows asked for, so not exported yet
                export_tower(teacher, tower, files["plain"])
            to_openvino(files["plain"], files["ov"])

    actions: dict[str, Callable[[], Any]] = {
        "export": lambda: export_tower(teacher, tower, files["plain"]),
        "fuse": fuse,
        "ORT INT8": lambda: quantize_dynamic_onnx(files["plain"], files["int8"]),
        "OpenVINO": to_ir,
        "NNCF INT8": lambda: quantize_openvino(files["ov"], files["ov8"], calib),
        "ORT FP16": lambda: to_fp16_onnx(files["plain"], files["fp16"]),
    }
    for what in teacher_step_names(device, chosen):
        progress.set_postfix_str(f"teacher {tower.name}: {what}", refresh=False)
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is for the table
            actions[what]()
        progress.update(1)


# which runtime each of the teacher's build steps makes a deployment for
STEP_RUNTIME = {"export": "onnxruntime", "fuse": "onnxruntime", "ORT INT8": "onnxruntime", "ORT FP16": "onnxruntime",
                "OpenVINO": "openvino", "NNCF INT8": "openvino"}


def teacher_step_names(device: str, chosen: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The teacher's build steps on `device` for the `chosen` runtimes (all when empty), in order; one
    progress step each."""
    steps = ("export", "fuse", "ORT INT8", "OpenVINO", "NNCF INT8") if device == "cpu" else \
        ("export", "fuse", "ORT FP16")  # ORT's dynamic INT8 and OpenVINO run on the CPU
    return tuple(s for s in steps if not chosen or STEP_RUNTIME[s] in chosen)


def teacher_steps(device: str, chosen: tuple[str, ...] = ()) -> int:
    return len(teacher_step_names(device, chosen))


def no_teacher_deployment(device: str, chosen: tuple[str, ...]) -> str | None:
    """The note for `chosen` runtimes the teacher is not deployed in on `device` (bench builds it no TensorRT
    engine), whose students are then compared with the teacher in PyTorch eager alone; else None."""
    if not chosen or teacher_step_names(device, chosen):
        return None
    return (f"--backend {' '.join(chosen)}: bench deploys the teacher in none of these runtimes on {device}, so the "
            f"student is compared with the teacher in PyTorch eager; add --backend onnxruntime to compare it with the "
            f"teacher's ONNX Runtime deployments")


def teacher_deployments(teacher, tower, folder: Path, calib: list[dict[str, np.ndarray]], threads: int,
                        notes: list[str], progress, device: str = "cpu", torch_device: str = "cpu",
                        static_shape: tuple[int, ...] | None = None, cache: Path | None = None,
                        chosen: tuple[str, ...] = ()) -> list[Candidate]:
    """The teacher the ways a user would deploy it without lmmc, built into `folder` (or taken from `cache`,
    where an earlier bench built them from the same inputs): PyTorch eager, ONNX Runtime plain, fused (when a
    fusion holds) and, on the CPU, dynamic INT8, OpenVINO fp32 (converted from PyTorch, as OpenVINO
    recommends) and NNCF INT8, each IR also run in bf16 (OpenVINO's own default on a CPU with bf16 units) and,
    with `static_shape`, compiled for that one shape; on a CUDA device ONNX Runtime fp16 instead of the CPU
    ones (ORT's dynamic INT8 and OpenVINO run on the CPU). With `chosen`, PyTorch eager and those runtimes'."""
    if cache is None:
        build_teacher(teacher, tower, folder, calib, notes, progress, device, chosen)
    else:
        folder = cached_teacher(Path(cache), folder, teacher, tower, calib, notes, progress, device, chosen)
    files = teacher_files(folder, tower)
    params = tower_parameters(teacher, tower)
    spec = [("onnxruntime fp32", "onnxruntime", "fp32", "plain"),
            ("onnxruntime fused fp32", "onnxruntime", "fp32", "fused"),
            ("onnxruntime INT8 dynamic", "onnxruntime", "int8", "int8"),
            ("onnxruntime fp16", "onnxruntime", "fp16", "fp16"),
            ("openvino fp32", "openvino", "fp32", "ov"), ("openvino INT8 (NNCF)", "openvino", "int8", "ov8")]
    out = [Candidate("teacher", tower.name, "PyTorch eager fp32", "pytorch", "fp32", None,
                     torch_runner(teacher, tower, torch_device), params, torch_device)]
    for label, backend, precision, key in spec:
        if files[key].is_file() and (not chosen or backend in chosen):
            check_room(files[key], f"the teacher's {tower.name} tower, {label}")
            model = load(files[key], backend, threads, device if backend == "onnxruntime" else None)
            out.append(Candidate("teacher", tower.name, label, backend, precision, files[key], model.run, params,
                                 model.device, model.providers, "f32" if backend == "openvino" else None))
            if backend == "openvino":
                bf16 = "openvino bf16" if precision == "fp32" else f"{label} bf16"
                out += openvino_twins(out[-1], bf16, threads, notes, static_shape)
    return out


def student_candidates(artifact: dict[str, Any], tower: str, params: tuple[int, int], run: "_Run",
                       static: tuple[int, ...] | None) -> list[Candidate]:
    """A student artifact loaded, and for an IR its twins. ONNX files run on the bench's device; an IR on the
    CPU, an engine on its GPU."""
    backend = artifact["backend"]
    device = run.device if backend == "onnxruntime" else ("cuda" if backend == "tensorrt" else None)
    check_room(artifact["path"], f"the student's {tower} tower, {artifact['label']}")
    model = load(artifact["path"], backend, run.threads, device)
    ov = backend == "openvino"
    cand = Candidate("student", tower, artifact["label"], backend, artifact["precision"], artifact["path"],
                     model.run, params, model.device, model.providers, "f32" if ov else None)
    return [cand, *(openvino_twins(cand, f"{artifact['label']} bf16", run.threads, run.notes, static) if ov else [])]


def openvino_twins(cand: Candidate, bf16_label: str, threads: int, notes: list[str],
                   static_shape: tuple[int, ...] | None) -> list[Candidate]:
    """The same OpenVINO IR run with bf16 inference, as OpenVINO runs it by default on a CPU with bf16
    units (an fp32 IR's twin counts as bf16, an INT8 one stays INT8, its unquantised layers in bf16), and,
    with `static_shape`, each of the two compiled for that one shape."""
    twins = [cand]
    if bf16_openvino(notes):
        check_room(cand.path, f"the {cand.model}'s {cand.tower} tower, {bf16_label}")
        model = load(cand.path, "openvino", threads, inference_precision="bf16")
        twins.append(Candidate(cand.model, cand.tower, bf16_label, "openvino",
                               "bf16" if cand.precision == "fp32" else cand.precision, cand.path, model.run,
                               cand.parameters, model.device, inference="bf16"))
    if static_shape is not None:
        for twin in list(twins):
            check_room(cand.path, f"the {cand.model}'s {cand.tower} tower, {twin.label} static")
            model = load(cand.path, "openvino", threads, inference_precision=twin.inference, static_shape=static_shape)
            twins.append(Candidate(cand.model, cand.tower, f"{twin.label} static", "openvino", twin.precision,
                                   cand.path, model.run, cand.parameters, model.device, inference=twin.inference,
                                   static_shape=static_shape))
    return twins[1:]


def bf16_openvino(notes: list[str]) -> bool:
    """Whether bench also runs every IR in bf16 (the CPU has the units); says so in `notes` once when
    it does not."""
    from lmmc.runtime.openvino import cpu_has_bf16

    if cpu_has_bf16():
        return True
    note = "openvino bf16: not run, this CPU has no bf16 units (AVX512-BF16 or AMX)"
    if note not in notes:
        notes.append(note)
    return False


# ---------------------------------------------------------------------------------------------------------
# Measurements


def interleaved_latency(candidates: list[Candidate], feed: dict[str, np.ndarray], repeats: int, warmup: int,
                        progress) -> dict[int, list[float]]:
    """Milliseconds per timed run of each candidate (by index), timed in turns (`time_interleaved`)."""
    runs = {i: functools.partial(c.run, feed) for i, c in enumerate(candidates)}
    return time_interleaved(runs, repeats, warmup, on_round=lambda: progress.update(1))


def embeddings(run: Callable, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([run(b)["pooled_embedding"] for b in batches])


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    from lmmc.export.validate import cosine

    return float(cosine(a, b).mean())


def file_size(path: Path | None) -> int | None:
    """Bytes on disk of an artifact with its companions (ONNX external data, OpenVINO .bin)."""
    if path is None:
        return None
    total = path.stat().st_size
    companion = path.with_suffix(".bin") if path.suffix == ".xml" else path.with_name(path.name + ".data")
    return total + (companion.stat().st_size if companion.is_file() else 0)


def check_room(path: Path, label: str) -> None:
    """Refuse a deployment that would not fit, before the out-of-memory killer ends the bench: every
    deployment of a tower is held at once to be timed in turns, and loading one takes about twice its files."""
    need, available = 2 * (file_size(path) or 0), available_bytes()
    if available is not None and need > available:
        raise LmmcError(f"no room to load {label}: it takes about {need / 2 ** 30:.1f} GiB and "
                        f"{available / 2 ** 30:.1f} GiB are available beside the deployments loaded before it, which "
                        f"are held to be timed in turns; free memory, or let lmmc bench time one runtime at a time "
                        f"(--backend onnxruntime, then --backend openvino)")


class NoRoom(Exception):
    """A deployment whose memory process would not fit beside the bench's own models: not measured, and said."""


def memory_process(code: str, spec: dict[str, Any], label: str, weights_bytes: int = 0) -> float | None:
    """Runs `code`, a memory child that reads `spec` as its argument, in a fresh process; the peak RSS increase
    it prints, MiB. Raises NoRoom when twice `weights_bytes` (read from disk and held) is more than the machine
    has available: the bench holds its own copies meanwhile, and the kernel's out-of-memory killer would end
    the largest process, the bench."""
    if not Path("/proc/self/clear_refs").exists():
        return None  # the measurement needs Linux's /proc; elsewhere the column stays empty
    available = available_bytes()
    if available is not None and 2 * weights_bytes > available:
        raise NoRoom(f"peak memory of {label} is not measured: loading it once more in a fresh process takes about "
                     f"{2 * weights_bytes / 2 ** 30:.1f} GiB, and {available / 2 ** 30:.1f} GiB are available beside "
                     f"the bench's own models; bench it with more memory free, or pass --no-memory")
    # a hub teacher is in the local cache by now: the child needs no network
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the memory of {label} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_increase_mib"]


ENCODER_CHILD = "from lmmc.peak_memory import encoder_child; encoder_child()"  # its imports are the runtime's alone


def peak_memory_mib(cand: Candidate, teacher_ref: str, feed_path: Path, threads: int,
                    trust_remote_code: bool = False, weights_bytes: int = 0) -> float | None:
    spec = {"backend": cand.backend, "inference": cand.inference, "static": cand.static_shape,
            "path": str(cand.path) if cand.path else None,
            "model": teacher_ref, "tower": cand.tower, "feed": str(feed_path), "threads": threads,
            "trust_remote_code": trust_remote_code}
    return memory_process(ENCODER_CHILD, spec,
                          f"the {cand.model}'s {cand.tower} tower, {cand.label}", weights_bytes)


def model_bytes(model: torch.nn.Module) -> int:
    """What a model's parameters and buffers take in memory."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def measured_peak(future, row: dict[str, Any], notes: list[str]) -> None:
    """A memory process's figure into its row; one that had no room leaves the row's figure None and says so."""
    try:
        row["peak_rss_mib"] = future.result()
    except NoRoom as err:
        notes.append(str(err))


# ---------------------------------------------------------------------------------------------------------
# Data


def _recipe_calibration(report: dict[str, Any], cfg: BenchConfig, report_path: Path):
    """The compile's calibration settings, --calib applied; the recipe's validate section, which bench reads
    next, is checked here too."""
    from lmmc.config import explain
    from lmmc.recipe import CalibrationConfig

    recipe = report.get("recipe")
    if (not isinstance(recipe, dict) or not isinstance(recipe.get("calibration"), dict)
            or not isinstance(recipe.get("validate") or {}, dict)):
        raise LmmcError(f"{report_path} lacks its recipe's calibration or validate section, from which lmmc bench "
                        f"takes the held-out split and the timing settings; recompile to rewrite it")
    try:
        calib = CalibrationConfig.model_validate(recipe["calibration"])
    except ValidationError as err:
        raise LmmcError(f"{report_path} holds a bad calibration section in its recipe; recompile to rewrite it:\n"
                        f"{explain(err)}") from None
    if cfg.calib is not None and calib.random:
        raise LmmcError(f"--calib gives the compile's calibration data where it now is, and this compile read none "
                        f"(its recipe's calibration.random draws random inputs); leave --calib out")
    if cfg.calib is not None:
        calib = calib.model_copy(update={"path": str(cfg.calib)})
    if calib.path and not Path(calib.path).exists():
        if cfg.calib is not None:
            raise LmmcError(f"--calib '{calib.path}' does not exist; pass the compile's calibration data where it "
                            f"now is")
        if Path(calib.path).is_absolute():  # no working directory finds it
            raise LmmcError(f"the compile's calibration data '{calib.path}' is not there any more; put it back, or "
                            f"pass --calib with the same file where it now is")
        raise LmmcError(f"the compile's calibration data '{calib.path}' is not found from {Path.cwd()}; run "
                        f"lmmc bench from where the compile ran, or pass --calib with the same file")
    return calib


def _recipe_validate(report: dict[str, Any], report_path: Path):
    """The recipe's validate section (timing sizes, threads, the fidelity gate), checked as the compile did."""
    from lmmc.export.validate import ValidateConfig
    from lmmc.config import explain

    try:
        return ValidateConfig.model_validate(report["recipe"].get("validate") or {})
    except ValidationError as err:
        raise LmmcError(f"{report_path} holds a bad validate section in its recipe; recompile to rewrite it:\n"
                        f"{explain(err)}") from None


def corpus_names(paths: list[Path]) -> list[str]:
    """Each --corpus's column name: its file name, or the path as given where two share a name (or one is
    called held-out), so no corpus hides another."""
    names = [p.name for p in paths]
    out = [str(p) if names.count(p.name) > 1 or p.name == "held-out" else p.name for p in paths]
    return [str(p.absolute()) if n == "held-out" else n for n, p in zip(out, paths)]  # given as ./held-out


def _recorded(report: dict[str, Any], *keys: str) -> Any:
    """report["inputs"][keys...], or None where an older or edited report lacks it."""
    node: Any = report.get("inputs")
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def compiled_teacher(report: dict[str, Any]) -> str:
    """Where the compile read its teacher: the absolute path it recorded, so a bench run from elsewhere
    finds the same model, else the name the compile was given (a hub id, or an older report)."""
    path = _recorded(report, "model", "path")
    return path if isinstance(path, str) else report["model"]


def check_unchanged(report: dict[str, Any], teacher_ref: str, calib_cfg, out_dir: Path) -> None:
    """The teacher and the calibration data bench reads are the files the compile read: another model
    would give other fidelity figures, other data another held-out split."""
    from lmmc.modelio import hub_revision, local_dir
    from lmmc.resume import hash_data, hash_files

    model_dir, model_sha = local_dir(teacher_ref), _recorded(report, "model", "sha256")
    if model_dir is not None and isinstance(model_sha, str) and hash_files(model_dir) != model_sha:
        raise LmmcError(f"the teacher '{teacher_ref}' is not the model {out_dir} was compiled from: its files differ "
                        f"from those the compile read ({_recorded(report, 'model', 'path') or report['model']}); "
                        f"pass --teacher with that model")
    revision = _recorded(report, "model", "revision")
    if model_dir is None and isinstance(revision, str) and hub_revision(teacher_ref) not in (None, revision):
        raise LmmcError(f"the hub model '{teacher_ref}' now resolves to revision {hub_revision(teacher_ref)}, and "
                        f"{out_dir} was compiled from revision {revision}; pass --teacher with a copy of that one "
                        f"(hf download {teacher_ref} --revision {revision} --local-dir DIR)")
    data_sha = _recorded(report, "data", "calibration", "sha256")
    if calib_cfg.path and isinstance(data_sha, str) and hash_data(Path(calib_cfg.path)) != data_sha:
        raise LmmcError(f"the calibration data '{calib_cfg.path}' is not the data {out_dir} was compiled with (its "
                        f"files differ), so its held-out split would be another; pass --calib with that data")


def load_data(calib_cfg, teacher, adapter, preprocessor):
    """The compile's calibration and held-out split, re-derived deterministically from its recipe and
    encoded as the compile encoded them: texts cut by default where the model's users get them cut."""
    from lmmc.data import load_calibration, random_calibration

    if calib_cfg.path:
        return load_calibration(calib_cfg, calib_cfg.path, {t.modality for t in adapter.towers}, preprocessor,
                                text_truncation(teacher.config, adapter, preprocessor),
                                text_pad_length(teacher.config, adapter))
    if calib_cfg.random:
        return random_calibration(calib_cfg, teacher, adapter)
    raise LmmcError("the compile's recipe names no calibration data, so there is no held-out split to measure "
                    "fidelity on; pass --calib with the data the student should be judged on")


@dataclass(frozen=True)
class Trained:
    """What the compile calibrated or distilled on: its calibration split and every corpus a distill pass
    read. Fidelity on them is not held-out fidelity."""

    keys: frozenset[str] = frozenset()  # texts and images as `part_keys` reads them
    texts: tuple[str, ...] = ()  # the texts as written, which the tokenizer reads to find texts read alike
    _tokens: dict[int, set[tuple[int, ...]]] = field(default_factory=dict, compare=False, repr=False)

    def tokens(self, tokenizer, length: int) -> set[tuple[int, ...]]:
        """The texts' tokens cut to `length`, read once for all the corpora of a bench."""
        from lmmc.data import token_ids

        if length not in self._tokens:
            self._tokens[length] = set(token_ids(tokenizer, list(self.texts), length))
        return self._tokens[length]


def distilled_records(report: dict[str, Any], notes: list[str]) -> list[dict[str, Any]]:
    """The records of every corpus a distill pass of the compile read, each checked unchanged since the compile
    read it; a corpus that is gone is a note, its samples then not told apart from unseen ones."""
    from lmmc.data import read_corpus
    from lmmc.resume import hash_data

    def corpora(node: Any) -> list[str]:
        if isinstance(node, dict):
            given = node.get("corpus")  # a file, or a list of files read as one corpus
            return ([given] if isinstance(given, str) else given if isinstance(given, list) else []) + \
                [c for v in node.values() for c in corpora(v)]
        return [c for v in node for c in corpora(v)] if isinstance(node, list) else []

    recorded = {e["path"]: e.get("sha256") for k, e in (_recorded(report, "data") or {}).items()
                if "corpus" in k and isinstance(e, dict) and "path" in e}
    records = []
    for corpus in dict.fromkeys(corpora(report["recipe"].get("passes"))):
        if not Path(corpus).exists():
            notes.append(f"the distillation corpus {corpus} is not there any more: --corpus samples it held are "
                         f"not told apart from unseen ones")
            continue
        if recorded.get(corpus) and hash_data(Path(corpus)) != recorded[corpus]:
            raise LmmcError(f"the distillation corpus {corpus} changed since the compile read it, so bench cannot "
                            f"tell which --corpus samples the student was distilled on; restore that file, or bench "
                            f"without --corpus")
        records += read_corpus(Path(corpus), "the distillation corpus")
    return records


def distills_on_calibration(report: dict[str, Any]) -> bool:
    """Whether a distill pass of the compile read no corpus of its own, and so trained on the calibration split."""
    passes = report["recipe"].get("passes") or []
    return any(isinstance(p, dict) and isinstance(p.get("distill"), dict) and not p["distill"].get("corpus")
               for p in passes)


def trained_on(report: dict[str, Any], data, modalities: set[str], notes: list[str]) -> Trained:
    """What the compile calibrated or distilled on (`Trained`)."""
    from lmmc.data import part_keys

    seen, texts = set(data.calibrated), list(data.calibration_texts)
    records = distilled_records(report, notes)
    seen.update(k for r in records for k in part_keys(r, modalities).values())
    texts += [r["text"] for r in records if "text" in r and "text" in modalities]
    return Trained(frozenset(seen), tuple(dict.fromkeys(texts)))


def corpus_batches(path: Path, adapter, preprocessor, calib_cfg, n: int, positions: int | None,
                   pad_to: int | None = None, trained: Trained = Trained(),
                   notes: list[str] | None = None, floor: int = 2) -> dict[str, list[dict]]:
    """An extra held-out corpus, encoded for every tower whose modality it holds as the compile encodes its
    held-out split (texts cut by default at `positions`, where the model's users get them cut): modality ->
    batches of up to `n` distinct items each. Texts and images in `trained` (what the compile trained on) are
    left out, and `notes` says so; a tower given fewer than `floor` distinct items is an error."""
    from lmmc.data import (DEFAULT_MAX_LENGTH, encode_images, encode_text, part_keys, read_corpus, sample_key,
                           text_length, unseen_texts)
    from lmmc.runtime.texts import clip_texts

    modalities = sorted({t.modality for t in adapter.towers})
    records = read_corpus(path, "--corpus")
    unique = list({sample_key(r): r for r in records}.values())
    parts = [part_keys(r, modalities) for r in unique]
    kept = [{m: r[m] for m, k in p.items() if k not in trained.keys} for r, p in zip(unique, parts)]
    dropped = sum(len(k) < len(p) for k, p in zip(kept, parts))
    if dropped and not any(kept):
        raise LmmcError(f"--corpus '{path}': the compile calibrated or distilled on every sample of it, so it cannot "
                        f"judge held-out fidelity; give a corpus the compile did not read")
    if dropped and notes is not None:
        notes.append(f"--corpus {path}: {dropped} of its {len(unique)} distinct samples were calibrated or distilled "
                     f"on (their texts or images) and are left out of its fidelity")
    # Each tower's own distinct items: captions repeat across images ("a photo of a dog") and one image can
    # carry several captions, so counted by pair one text or one picture stood for a whole column.
    distinct = {m: list({p[m]: k[m] for k, p in zip(kept, parts) if m in k}.values()) for m in modalities}
    # the default length as load_calibration sets it for the compile's held-out split
    max_length = calib_cfg.max_length or (min(DEFAULT_MAX_LENGTH, positions) if positions else None)
    tokenizer = preprocessor.get("tokenizer")
    if distinct.get("text") and tokenizer is not None:
        # A text that differs from one the compile read only past the cut reads as the same tokens, as the
        # compile's own held-out split leaves out; so does one that reads as another of the corpus's texts.
        length = text_length(tokenizer, max_length, pad_to)
        texts = distinct["text"]
        distinct["text"] = [texts[i] for i in unseen_texts(tokenizer, texts, trained.tokens(tokenizer, length), length)]
        twins = len(texts) - len(distinct["text"])
        if twins and notes is not None:
            notes.append(f"--corpus {path}: {twins} of its texts read, cut to {length} tokens, as a text the compile "
                         f"calibrated or distilled on or as another of its texts, and are left out of its fidelity")
    gen = random.Random(calib_cfg.seed)
    items = {m: gen.sample(found, min(n, len(found))) for m, found in distinct.items()}
    most = max(len(i) for i in items.values())
    if most == 0:
        raise LmmcError(f"--corpus '{path}' holds nothing this model's towers read; give "
                        f"{' or '.join(m + 's' for m in modalities)}")
    if most < 2:
        raise LmmcError(f"--corpus '{path}' holds only 1 distinct sample this model reads; needs at least 2: add "
                        f"more {' or '.join(m + 's' for m in modalities if items[m])}")
    if most < floor:
        raise LmmcError(f"--corpus '{path}' holds at most {most} distinct "
                        f"{'/'.join(m + 's' for m in modalities if len(items[m]) == most)} this compile did not train "
                        f"on, and fidelity on fewer than {floor} certifies nothing (the floor of the recipe's "
                        f"validate.min_held_out); give at least {floor}")
    for modality, found in distinct.items():
        if len(found) > n and notes is not None:
            notes.append(f"--corpus {path}: {n} of its {len(found)} distinct {modality}s, drawn with the "
                         f"calibration seed, are scored")
    out: dict[str, list[dict]] = {}
    for modality, found in items.items():
        if len(found) < floor:  # a mixed corpus (captions of a few classes, say): the modalities it holds enough of
            if found and notes is not None:
                notes.append(f"--corpus {path}: its {modality}s are {len(found)} distinct {modality}(s), fewer than "
                             f"the {floor} fidelity needs, so the {modality} tower's fidelity is not measured on it")
            continue
        if modality == "text":
            out[modality] = encode_text(tokenizer, found, calib_cfg.batch_size, max_length, pad_to)
            length = text_length(tokenizer, max_length, pad_to)
            # one token more than the cut, each text cut to its first words first: a line may be megabytes
            cut = sum(len(ids) > length for ids in tokenizer(clip_texts(tokenizer, found, length + 1), truncation=True,
                                                             max_length=length + 1)["input_ids"])
            if cut and pad_to is None and notes is not None:  # padded to a fixed length, every mask may be full
                notes.append(f"--corpus {path}: {cut} of its {len(found)} texts are cut to {length} tokens, as the "
                             f"compile cut its held-out split")
        else:
            out[modality] = encode_images(preprocessor["image_processor"], found, calib_cfg.batch_size)
    return out


def _numpy(batches: list[dict]) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in b.items()} for b in batches]


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    """What every tower's measurement shares."""

    cfg: BenchConfig
    teacher: Any
    student: Any
    teacher_ref: str
    data: Any
    corpora: dict[str, dict[str, list]]  # corpus name -> modality -> batches
    threads: int
    batch: int
    seq: int | None  # None: no tower reads text
    min_cosine: float | None  # the recipe's fidelity gate, which the best student artifact must keep
    notes: list[str]
    device: str = "cpu"  # ONNX Runtime's
    torch_device: str = "cpu"  # PyTorch eager's: the CPU when torch sees no GPU
    memory: bool = True


def bench(out_dir: Path, cfg: BenchConfig, json_path: Path | None = None) -> dict[str, Any]:
    """Measure every candidate of every tower of `out_dir`; write and return the result."""
    from lmmc import process_state

    with process_state.kept():
        return _bench(out_dir, cfg, json_path)


def _bench(out_dir: Path, cfg: BenchConfig, json_path: Path | None) -> dict[str, Any]:
    import torch

    import lmmc
    from lmmc.modelio import load_teacher, offline_if_unreachable, resolve_config

    out_dir = Path(out_dir)
    report = read_output(out_dir)
    _refuse_running_compile(out_dir)
    fingerprint = output_fingerprint(out_dir)
    json_path = Path(json_path) if json_path else out_dir / "bench.json"
    check_json_target(json_path, out_dir)
    check_writable(json_path)
    for corpus in cfg.corpora:
        if not corpus.exists():
            raise LmmcError(f"corpus '{corpus}' does not exist; pass --corpus with a .txt, .jsonl or image folder")
    if generative_family(report.get("adapter")):
        from lmmc.bench_generative import bench_generative

        return _save(bench_generative(out_dir, cfg, report, fingerprint, json_path), out_dir, json_path, fingerprint)
    versions = check_backends(cfg.device, cfg.backends)
    teacher_ref = str(cfg.teacher) if cfg.teacher else compiled_teacher(report)
    offline = offline_if_unreachable(teacher_ref)
    try:
        config, adapter = resolve_config(teacher_ref, cfg.trust_remote_code)
    except LmmcError as err:
        if cfg.teacher:
            raise LmmcError(f"cannot open --teacher '{teacher_ref}': {err}") from None
        raise LmmcError(f"cannot open the teacher '{teacher_ref}' that {out_dir} was compiled from ({err}); if it "
                        f"moved, pass --teacher with its new place") from None
    if adapter.kind == "generative":  # a report that does not name its adapter
        from lmmc.bench_generative import bench_generative

        return _save(bench_generative(out_dir, cfg, report, fingerprint, json_path), out_dir, json_path, fingerprint)
    calib_cfg = _recipe_calibration(report, cfg, out_dir / "report.json")
    validate = _recipe_validate(report, out_dir / "report.json")
    _check_outside_inputs(json_path, teacher_ref, calib_cfg, cfg.corpora, out_dir, cfg.teacher_cache)
    check_unchanged(report, teacher_ref, calib_cfg, out_dir)  # before its towers are read: another model's mislead
    positions = check_seq(cfg.seq, config, adapter, f"the teacher '{teacher_ref}'")
    artifacts, skipped = student_artifacts(out_dir, [t.name for t in adapter.towers], cfg.device, cfg.backends)
    skipped += [note for note in (offline, no_teacher_deployment(cfg.device, cfg.backends)) if note]
    torch_device, measure_memory = cfg.device, cfg.memory
    if cfg.device != "cpu":
        if not torch.cuda.is_available():
            torch_device = "cpu"
            skipped.append(f"PyTorch eager runs on the CPU: this torch ({torch.__version__}) sees no CUDA GPU")
        if measure_memory:
            measure_memory = False
            skipped.append("peak memory is not measured on a GPU: it is the host process's RSS")
    teacher, adapter, preprocessor = load_teacher(teacher_ref, cfg.trust_remote_code)
    data = load_data(calib_cfg, teacher, adapter, preprocessor)
    corpora = {"held-out": {m: data.eval_batches(m) for m in {t.modality for t in adapter.towers}}}
    seen = trained_on(report, data, {t.modality for t in adapter.towers}, skipped) if cfg.corpora else Trained()
    for name, path in zip(corpus_names(cfg.corpora), cfg.corpora):
        corpora[name] = corpus_batches(path, adapter, preprocessor, calib_cfg, cfg.corpus_samples,
                                       text_truncation(teacher.config, adapter, preprocessor),
                                       text_pad_length(teacher.config, adapter), seen, skipped,
                                       validate.min_held_out)
    seq = timing_seq(cfg.seq, validate.latency_seq, positions)
    longest = max((b["input_ids"].shape[1] for c in corpora.values() for b in c.get("text", [])), default=0)
    if cfg.static and seq and longest > seq:
        # A static IR takes no more tokens than it was compiled for, and fidelity runs every candidate on the
        # same held-out texts.
        raise LmmcError(f"--static compiles the IRs for {seq} tokens, and the texts fidelity is measured on run to "
                        f"{longest} tokens (the longest, as tokenised); pass --seq {longest} or more, or leave out --static")
    run = _Run(cfg, teacher, lmmc.load_student(out_dir / "student"), teacher_ref, data, corpora,
               threads=cfg.threads or validate.threads, batch=cfg.batch or validate.latency_batch,
               seq=seq, min_cosine=validate.min_cosine, notes=skipped, device=cfg.device,
               torch_device=torch_device, memory=measure_memory)
    check_threads_start(run.threads, "--threads" if cfg.threads else "the recipe's validate.threads")
    cpus = usable_cpus()
    if run.threads > cpus:  # ONNX Runtime starts every thread asked for; OpenVINO runs no more than the cores
        run.notes.append(f"threads {run.threads} is above the {cpus} CPU(s) this process may use: ONNX Runtime's "
                         f"threads wait for a core while OpenVINO runs {cpus}, so the rows compare runtimes at unequal "
                         f"threads; pass --threads {cpus} or fewer")

    started = time.perf_counter()
    result: dict[str, Any] = {
        "kind": JSON_KIND, "lmmc_version": lmmc.__version__, "out_dir": str(out_dir.resolve()), "output": fingerprint,
        "teacher": teacher_ref,
        "device": run.device, "threads": run.threads, "batch": run.batch, "seq": run.seq, "repeats": cfg.repeats, "warmup": cfg.warmup,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "system": platform.platform()},
        "versions": versions, "memory": MEMORY_METHOD if run.memory else None,
        "teacher_cache": str(cfg.teacher_cache.resolve()) if cfg.teacher_cache else None,
        "backends": list(cfg.backends) or None,  # None: every runtime the device has
        "corpora": {name: {m: sum(len(next(iter(b.values()))) for b in bs) for m, bs in c.items()}
                    for name, c in corpora.items()},
        "towers": {}, "notes": run.notes,
    }
    threads_before = torch.get_num_threads()
    torch.set_num_threads(run.threads)
    try:
        with scratch_folder("lmmc-bench-") as tmp:
            for tower in adapter.towers:
                mine = [a for a in artifacts if a["tower"] == tower.name]
                result["towers"][tower.name] = _bench_tower(run, tower, mine, Path(tmp))
    finally:
        torch.set_num_threads(threads_before)
    result["seconds"] = time.perf_counter() - started
    return _save(result, out_dir, json_path, fingerprint)


def _save(result: dict[str, Any], out_dir: Path, json_path: Path, fingerprint: str) -> dict[str, Any]:
    """Write the result as bench.json unless the output changed during the run; return what was written."""
    from lmmc.resume import WorkArea

    result = finite(result)  # what is returned (and printed) is what is saved
    if WorkArea(out_dir).running() is not None or output_fingerprint(out_dir) != fingerprint:
        raise NotSaved(f"lmmc bench measured everything but saved nothing: '{out_dir}' was replaced or is being "
                       f"replaced by a compile since the run began, so these figures describe the output as it was; "
                       f"run lmmc bench again once the compile has finished", result)
    try:
        write_json(json_path, result, out_dir)
    except LmmcError as err:  # the target changed during the run
        raise NotSaved(f"lmmc bench measured everything but saved nothing, as '{json_path}' changed during the "
                       f"run: {err}", result) from None
    except OSError as err:
        raise NotSaved(f"lmmc bench measured everything but saved nothing: cannot write '{json_path}' "
                       f"({err.strerror or err}); make '{json_path.parent}' writable or pass --json with another "
                       f"path", result) from None
    return result


def _bench_tower(run: _Run, tower, artifacts: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from lmmc.adapters import example_inputs, input_names

    cfg, modality = run.cfg, tower.modality
    inputs = example_inputs(run.teacher, tower, batch=run.batch, seq=run.seq)
    feed = {n: t.numpy() for n, t in zip(input_names(tower), inputs)}
    feed_path = tmp / f"feed-{tower.name}.npz"
    np.savez(feed_path, **feed)
    evaluated = {name: _numpy(c[modality]) for name, c in run.corpora.items() if c.get(modality)}
    # an image tower's only dynamic axis is the batch
    static = ((run.batch, run.seq) if modality == "text" else (run.batch,)) if cfg.static else None
    # the candidates: the teacher's (PyTorch; ONNX Runtime plain, fused, INT8; two IRs, each in bf16 too) and
    # the student's, each IR with its bf16 twin, and with --static one more of each IR and twin
    irs = 2 * cfg.runs("openvino") + sum(a["backend"] == "openvino" for a in artifacts)
    n = 1 + 3 * cfg.runs("onnxruntime") + 2 * irs + len(artifacts) - sum(a["backend"] == "openvino" for a in artifacts)
    n += 2 * irs if static else 0
    steps = teacher_steps(run.device, cfg.backends) + cfg.warmup + math.ceil(cfg.repeats / PER_VISIT)
    with tqdm(total=steps + n * (2 if run.memory else 1), desc=f"bench {tower.name}", unit="step",
              leave=False) as progress:
        candidates = teacher_deployments(run.teacher, tower, tmp, _numpy(run.data.calib_batches(modality)),
                                         run.threads, run.notes, progress, run.device, run.torch_device, static,
                                         cfg.teacher_cache, cfg.backends)
        params = tower_parameters(run.student, tower)
        for a in artifacts:
            candidates += student_candidates(a, tower.name, params, run, static)
        progress.set_postfix_str(f"{tower.name}: timing", refresh=False)
        times = interleaved_latency(candidates, feed, cfg.repeats, cfg.warmup, progress)
        # Nothing below is timed: the memory processes run one after another beside the fidelity runs.
        with ThreadPoolExecutor(max_workers=1) as pool:
            # the child loads the whole teacher (every tower) in PyTorch, and an artifact with its files
            memory = [pool.submit(peak_memory_mib, c, run.teacher_ref, feed_path, run.threads, cfg.trust_remote_code,
                                  model_bytes(run.teacher) if c.backend == "pytorch" else file_size(c.path) or 0)
                      for c in candidates] if run.memory else []
            reference = {name: embeddings(candidates[0].run, b) for name, b in evaluated.items()}
            for i, cand in enumerate(candidates):
                progress.set_postfix_str(f"{tower.name}: fidelity {cand.model} {cand.label}", refresh=False)
                ms = times[i]  # in the order timed, so drift over the run stays visible
                cand.row = {
                    "model": cand.model, "artifact": cand.label, "backend": cand.backend,
                    "precision": cand.precision, "inference_precision": cand.inference,
                    "static_shape": list(cand.static_shape) if cand.static_shape else None,
                    "device": cand.device, "providers": list(cand.providers),
                    # absolute, as out_dir: bench.json is read from other directories than the one it ran in
                    "file": str(Path(cand.path).resolve()) if cand.model == "student" else None,
                    "size_bytes": file_size(cand.path), "parameters": cand.parameters[0] if cand.parameters else None,
                    "nonzero_parameters": cand.parameters[1] if cand.parameters else None,
                    "latency_ms": {"p50": statistics.median(ms), "p90": float(np.percentile(ms, 90)), "runs": ms},
                    "throughput_per_s": run.batch / statistics.median(ms) * 1e3,
                    # the first candidate, PyTorch eager fp32, is the reference itself
                    "cosine_to_teacher": {name: 1.0 if i == 0 else mean_cosine(embeddings(cand.run, b), reference[name])
                                          for name, b in evaluated.items()},
                    "peak_rss_mib": None,
                }
                # Its runtime goes, with the buffers the fidelity batches grew, before the next one's runs: held
                # to the end, a base-size tower's dozen or more deployments raised the bench's peak by a seventh.
                cand.run = None
                progress.update(1)
            progress.set_postfix_str(f"{tower.name}: memory", refresh=False)
            for cand, measured in zip(candidates, memory):
                measured_peak(measured, cand.row, run.notes)
                progress.update(1)
    rows = [c.row for c in candidates]
    return {"input": {n: list(v.shape) for n, v in feed.items()}, "rows": rows,
            "best": best_pair(rows, run.min_cosine)}


def best_pair(rows: list[dict[str, Any]], min_cosine: float | None = None) -> dict[str, Any]:
    """The fastest student artifact against the fastest teacher deployment, by median latency. A teacher
    deployment competes only while it is still the teacher: held-out cosine to the fp32 teacher at least
    TEACHER_MIN_COSINE (PyTorch eager always is). With the recipe's `min_cosine`, only student artifacts
    that keep it on the held-out split compete; when none does, the fastest one is compared and the
    result says so."""
    def fastest(candidates: list[dict[str, Any]]) -> dict[str, Any]:
        return min(candidates, key=lambda r: r["latency_ms"]["p50"])

    def sound(r: dict[str, Any]) -> bool:  # a broken artifact's cosine is NaN (None in bench.json)
        return finite(r["cosine_to_teacher"]["held-out"]) is not None

    students = [r for r in rows if r["model"] == "student"]
    students = [r for r in students if sound(r)] or students
    passing = [r for r in students
               if sound(r) and (min_cosine is None or r["cosine_to_teacher"]["held-out"] >= min_cosine)]
    teachers = [r for r in rows if r["model"] == "teacher" and r["cosine_to_teacher"]["held-out"] >= TEACHER_MIN_COSINE]
    s, t = fastest(passing or students), fastest(teachers or [r for r in rows if r["model"] == "teacher"])
    return {"student": s["artifact"], "teacher": t["artifact"], "min_cosine": min_cosine,
            "student_meets_min_cosine": bool(passing),
            "latency_ratio": s["latency_ms"]["p50"] / t["latency_ms"]["p50"],
            "student_cosine": s["cosine_to_teacher"], "teacher_cosine": t["cosine_to_teacher"]}


# ---------------------------------------------------------------------------------------------------------
# Printing


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f}" if size >= 1e6 else f"{size / 1e6:.3f}"  # a 45 KB artifact read 0.0


def format_table(result: dict[str, Any]) -> str:
    """The bench table, one block per tower, with the comparison that matters last."""
    if result.get("generative"):
        from lmmc.bench_generative import format_generative

        return format_generative(result)
    device = result.get("device", "cpu")
    # every candidate is timed in whole turns, so the runs can be more than the repeats asked for
    timed = math.ceil(result["repeats"] / PER_VISIT) * PER_VISIT
    asked = "" if timed == result["repeats"] else f" (repeats {result['repeats']} rounded up to whole turns)"
    lines = [("" if device == "cpu" else f"device {device} (each row's ONNX Runtime providers are in the JSON), ")
             + f"threads {result['threads']}, batch {result['batch']}, "
             + ("" if result["seq"] is None else f"seq {result['seq']}, ")
             + f"{result['warmup']} warm-up round{'s' * (result['warmup'] != 1)} + {timed} timed runs a candidate"
             f"{asked}, in turns of 1 untimed + {PER_VISIT} timed; cosine: mean to the fp32 teacher (PyTorch) per corpus",
             f"{result['machine']['cpus']} CPUs ({result['machine']['processor']}); "
             + ", ".join(f"{k} {v.split('-')[0]}" for k, v in result["versions"].items())]
    if result.get("backends"):
        lines.append(f"runtimes: {' and '.join(result['backends'])} only (--backend), and the teacher in PyTorch eager")
    if result["memory"]:
        lines.append(f"peak MiB: {result['memory']}")
    if result.get("corpora"):  # a bench JSON of an earlier lmmc has no counts
        lines.append("samples: " + "; ".join(f"{c} " + ", ".join(f"{n} {m}{'s' * (n != 1)}" for m, n in counts.items())
                                             for c, counts in result["corpora"].items()))
    for name, tower in result["towers"].items():
        corpora = list(tower["rows"][0]["cosine_to_teacher"])
        on = () if device == "cpu" else ("device",)  # PyTorch stays on the CPU where torch sees no GPU
        header = ("model", "artifact", *on, "p50 ms", "p90 ms", "items/s", "peak MiB", "MB", "tower params",
                  *[f"cos {c}" for c in corpora])
        table = [header]
        for r in tower["rows"]:
            table.append((r["model"], r["artifact"], *[r["device"] for _ in on],
                          f"{r['latency_ms']['p50']:.2f}", f"{r['latency_ms']['p90']:.2f}",
                          f"{r['throughput_per_s']:.1f}",
                          "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}",
                          "-" if r["size_bytes"] is None else _megabytes(r["size_bytes"]),
                          _parameters(r),
                          *[_cosine(r["cosine_to_teacher"][c]) for c in corpora]))
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines.append(f"\n{name} tower, input {tower['input']}")
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines += [f"note: {note}" for note in result["notes"]]
    for name, tower in result["towers"].items():
        b = tower["best"]
        cos = ", ".join(f"{c} {_cosine(b['student_cosine'][c])} (teacher {_cosine(b['teacher_cosine'][c])})"
                        for c in b["student_cosine"])
        which = "fastest student" if b["min_cosine"] is None else (
            f"fastest student with held-out cosine >= {b['min_cosine']}" if b["student_meets_min_cosine"]
            else f"fastest student (none keeps the recipe's min_cosine {b['min_cosine']})")
        lines.append(f"\n{name}: {which} {b['student']} vs fastest teacher {b['teacher']}: "
                     f"latency ratio {b['latency_ratio']:.2f} (the student is {_times(b['latency_ratio'])}); "
                     f"cosine {cos}")
    return "\n".join(lines)


def _cosine(value: float | None) -> str:
    """A cosine as the table shows it; None is the JSON's NaN (an artifact whose outputs are not numbers)."""
    return "nan" if value is None else f"{value:.4f}"


def _times(ratio: float) -> str:
    if round(ratio, 2) == 1 or round(1 / ratio, 2) == 1:  # "1.00x slower" read as a difference it is not
        return "as fast, within 0.5 %"
    return f"{1 / ratio:.2f}x faster" if ratio < 1 else f"{ratio:.2f}x slower"
