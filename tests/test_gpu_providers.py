"""GPU execution through lmmc.runtime, tested where there is no GPU: the execution providers each device
asks ONNX Runtime for, the one clear error of the CPU-only package (real ONNX Runtime, which lacks the
CUDA provider), and the FP16 artifact: written by the ort pass, gated by min_cosine_fp16, listed in the
manifest and run in ONNX Runtime on the CPU."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from lmmc.cli import main
from lmmc.errors import LmmcError
from lmmc.export.fp16 import to_fp16_onnx
from lmmc.export.onnx import export_tower
from lmmc.export.validate import cosine
from lmmc.manifest import build_manifest
from lmmc.runtime import load
from lmmc.runtime.onnxruntime import (CPU, CUDA, TENSORRT, TensorRTOptions, check_available, parse_device,
                                      providers_for)
from tests.test_ort import run, tiny_artifact

NO_CUDA = pytest.mark.skipif(CUDA in ort.get_available_providers(),
                             reason="this ONNX Runtime has the CUDA provider; the test is of the CPU-only package")


def test_providers_for_each_device_and_tensorrt_options(tmp_path):
    assert providers_for() == providers_for("cpu") == [CPU]
    assert providers_for("cuda") == [(CUDA, {"device_id": "0"}), CPU]
    assert providers_for("cuda:3") == [(CUDA, {"device_id": "3"}), CPU]
    assert providers_for("cuda:1", TensorRTOptions()) == [
        (TENSORRT, {"device_id": "1", "trt_fp16_enable": "0", "trt_sparsity_enable": "0"}),
        (CUDA, {"device_id": "1"}), CPU]
    assert providers_for("cuda", TensorRTOptions(fp16=True, sparsity=True, cache_dir=tmp_path))[0] == (
        TENSORRT, {"device_id": "0", "trt_fp16_enable": "1", "trt_sparsity_enable": "1",
                   "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(tmp_path)})
    assert parse_device("cuda:12") == ("cuda", 12)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(LmmcError, match="use cpu, cuda or cuda:N"):
            providers_for(bad)
    with pytest.raises(LmmcError, match="runs on a GPU; pass device='cuda'"):
        providers_for("cpu", TensorRTOptions(fp16=True))


def test_a_missing_provider_names_the_package_to_install():
    check_available([CPU], [CPU])  # nothing missing, nothing raised
    check_available(providers_for("cuda"), [TENSORRT, CUDA, CPU])
    with pytest.raises(LmmcError) as err:
        check_available(providers_for("cuda"), ["AzureExecutionProvider", CPU])
    assert "no CUDAExecutionProvider" in str(err.value) and "pip install onnxruntime-gpu" in str(err.value)
    assert "pip uninstall onnxruntime" in str(err.value)  # the GPU package replaces the CPU one
    with pytest.raises(LmmcError, match="no TensorRT execution provider.*pip install tensorrt"):
        check_available(providers_for("cuda", TensorRTOptions()), [CUDA, CPU])


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    art = tiny_artifact("bert", tmp_path_factory.mktemp("gpu"))
    path = art.workdir / "text.onnx"
    export_tower(art.student, art.adapter.towers[0], path)
    return path


@NO_CUDA
def test_cuda_with_the_cpu_package_is_one_clear_error(tiny_onnx):
    cpu = load(tiny_onnx)
    assert (cpu.device, cpu.providers) == ("cpu", (CPU,))  # what the session really uses
    for device, options in (("cuda", None), ("cuda:1", None), ("cuda", TensorRTOptions(fp16=True, sparsity=True))):
        with pytest.raises(LmmcError, match=r"runs on the CPU only. For an NVIDIA GPU, pip install onnxruntime-gpu"):
            load(tiny_onnx, device=device, tensorrt=options)
    with pytest.raises(LmmcError, match="OpenVINO IRs on the CPU only"):
        load(tiny_onnx, "openvino", device="cuda")  # refused before the file is read


def _fake_output(path):
    """What bench reads before it deploys anything: an lmmc output's report and student record."""
    (path / "student").mkdir(parents=True)
    (path / "student" / "lmmc.json").write_text("{}")
    (path / "report.json").write_text(json.dumps({"model": "unused"}))
    return path


@NO_CUDA
def test_bench_on_cuda_without_the_gpu_package_exits_2_naming_it(tmp_path):
    out = _fake_output(tmp_path / "out")
    result = CliRunner().invoke(main, ["bench", str(out), "--device", "cuda", "--quick"])
    assert result.exit_code == 2, result.output
    assert "pip install onnxruntime-gpu" in result.output
    assert not (out / "bench.json").exists()
    result = CliRunner().invoke(main, ["bench", str(out), "--device", "gpu0", "--quick"])
    assert result.exit_code == 2 and "--device" in result.output


def test_validating_on_cuda_without_the_gpu_package_is_refused_by_the_recipe():
    """Refused when the recipe is read, not after every pass and export has run."""
    if CUDA in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider: there is nothing to refuse")
    from lmmc.recipe import parse_recipe

    with pytest.raises(LmmcError, match="pip install onnxruntime-gpu"):
        parse_recipe({"calibration": {"random": True}, "validate": {"device": "cuda"}})
    assert parse_recipe({"calibration": {"random": True}, "validate": {"device": "cpu"}}).validated


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_ort_pass_writes_an_fp16_artifact_that_keeps_the_student(kind, tmp_path, one_thread):
    art = tiny_artifact(kind, tmp_path)
    run(art, "onnx")
    metrics = run(art, "ort", fuse="off", int8=[], fp16=True).metrics
    towers = [t.name for t in art.adapter.towers]
    assert [(r.tower, r.backend, r.precision, r.variant, r.path.relative_to(tmp_path).as_posix()) for r in art.exports] == [
        (t, "onnxruntime", "fp16", "plain", f"ort/{t}.fp16.onnx") for t in towers]
    for t in towers:
        assert metrics[t]["fp16"]["float16_initializers"] > 0
        # valid to ONNX's own tools: the layer norm weights kept float32 were labelled float16
        onnx.checker.check_model(str(tmp_path / f"ort/{t}.fp16.onnx"), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(tmp_path / f"ort/{t}.fp16.onnx"), str(tmp_path / "inferred.onnx"),
                                               strict_mode=True)
    # min_cosine_int8 1.0 would fail every fp16 artifact if fp16 were still gated as INT8
    validation = run(art, "validate", latency=False, min_cosine_int8=1.0).metrics
    gates = {g["name"]: g for g in validation["gates"]}
    for t in towers:
        gate = gates[f"{t}: onnxruntime fp16 plain: cosine to fp32 student"]
        assert gate["threshold"] == 0.999 and gate["passed"] and gate["value"] >= 0.999
    assert validation["passed"]
    for e in validation["exports"]:
        assert (e["device"], e["providers"]) == ("cpu", ["CPUExecutionProvider"])
        assert e["cosine_to_student_min"] >= 0.999


def test_min_cosine_fp16_fails_an_fp16_artifact_that_drifted(tmp_path, one_thread):
    art = tiny_artifact("bert", tmp_path)
    run(art, "onnx")
    run(art, "ort", fuse="off", int8=[], fp16=True)
    # the fp16 file replaced by one of a student whose weights drifted: it must miss the fp16 gate
    drifted = copy.deepcopy(art.student)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in drifted.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    tower = art.adapter.towers[0]
    export_tower(drifted, tower, tmp_path / "drifted.onnx")
    to_fp16_onnx(tmp_path / "drifted.onnx", art.exports[0].path)
    validation = run(art, "validate", latency=False, min_cosine_int8=0.0, min_cosine_fp16=0.999).metrics
    [gate] = [g for g in validation["gates"] if g["name"] == "text: onnxruntime fp16 plain: cosine to fp32 student"]
    assert gate["threshold"] == 0.999 and gate["value"] < 0.999 and not gate["passed"]
    assert not validation["passed"]
    # without the gate the same artifact passes: nothing else judges its cosine to the student
    validation = run(art, "validate", latency=False, min_cosine_fp16=None).metrics
    assert not any("fp16" in g["name"] for g in validation["gates"]) and validation["passed"]


def test_manifest_lists_the_fp16_artifact_and_it_loads(tmp_path, one_thread):
    art = tiny_artifact("bert", tmp_path)
    run(art, "onnx")
    run(art, "ort", fuse="off", int8=[], fp16=True)
    run(art, "validate", latency=False)
    manifest = build_manifest(art, tmp_path, 12)
    [entry] = [a for a in manifest["artifacts"] if a["precision"] == "fp16"]
    assert (entry["tower"], entry["backend"], entry["variant"], entry["path"]) == (
        "text", "onnxruntime", "plain", "ort/text.fp16.onnx")
    assert entry["source"] == "plain" and entry["validation"]["cosine_to_student"] >= 0.999
    assert entry["validation"]["providers"] == ["CPUExecutionProvider"]
    # fp16 inside, the fp32 student's interface outside: the same feed runs both
    assert [i["dtype"] for i in entry["inputs"]] == ["int64", "int64"]
    assert [o["dtype"] for o in entry["outputs"]] == ["float32", "float32"]
    half, full = load(tmp_path / entry["path"]), load(tmp_path / "onnx" / "text.onnx")
    feed = {"input_ids": np.array([[2, 7, 9, 11, 3, 0]]), "attention_mask": np.array([[1, 1, 1, 1, 1, 0]])}
    assert cosine(half.run(feed)["pooled_embedding"], full.run(feed)["pooled_embedding"]).min() >= 0.999


@pytest.mark.e2e
def test_minilm_fp16_artifact_validates_in_onnx_runtime_cpu(minilm, tmp_path):
    """The real teacher through the ort pass's fp16 option and validate: cosine to fp32 >= 0.999."""
    from lmmc.artifact import Artifact
    from lmmc.data import load_calibration
    from lmmc.modelio import load_teacher, make_student
    from lmmc.recipe import CalibrationConfig
    from tests.conftest import CORPUS

    torch.set_num_threads(2)
    teacher, adapter, preprocessor = load_teacher(str(minilm))
    cfg = CalibrationConfig(path=str(CORPUS), samples=32, eval_samples=64, batch_size=16, max_length=128)
    art = Artifact(model_ref=str(minilm), adapter=adapter, teacher=teacher, student=make_student(teacher),
                   workdir=tmp_path)
    art.calib = load_calibration(cfg, cfg.path, {"text"}, preprocessor)
    run(art, "onnx")
    run(art, "ort", fuse="off", int8=[], fp16=True)
    validation = run(art, "validate", latency=False, min_held_out=32).metrics
    [fp16] = validation["exports"]
    assert fp16["precision"] == "fp16" and fp16["cosine_to_student"] >= 0.999
    [gate] = [g for g in validation["gates"] if g["name"] == "text: onnxruntime fp16 plain: cosine to fp32 student"]
    assert gate["threshold"] == 0.999 and gate["passed"]


def test_bench_on_cuda_keeps_the_artifacts_a_gpu_runs_and_shows_each_rows_device(tmp_path):
    from lmmc.bench import format_table, student_artifacts

    (tmp_path / "onnx").mkdir()
    entries = [{"tower": "text", "backend": "onnxruntime", "precision": p, "path": f"onnx/text.{p}.onnx"}
               for p in ("fp32", "fp16")]
    entries += [{"tower": "text", "backend": "openvino", "precision": "int8", "path": "openvino/text.int8.xml"},
                {"tower": "text", "backend": "tensorrt", "precision": "fp16", "path": "tensorrt/text.fp16.engine"}]
    for e in entries:
        (tmp_path / e["path"]).parent.mkdir(exist_ok=True)
        (tmp_path / e["path"]).write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": entries}))
    (tmp_path / ".lmmc-files.json").write_text("{}")  # a digest list, which holds none of these stand-ins
    found, skipped = student_artifacts(tmp_path, ["text"], "cuda:1")
    assert [a["label"] for a in found] == ["onnx/text.fp32.onnx", "onnx/text.fp16.onnx"]  # this machine: no TensorRT
    assert skipped == [f"student {p}: {b} artifacts are not benched on cuda:1 (tensorrt: not installed)"
                       for p, b in (("openvino/text.int8.xml", "openvino"), ("tensorrt/text.fp16.engine", "tensorrt"))]
    found, skipped = student_artifacts(tmp_path, ["text"])  # the CPU: the IR runs, the engine does not
    assert [a["backend"] for a in found] == ["onnxruntime", "onnxruntime", "openvino"]

    def row(model, artifact, device, p50):
        return {"model": model, "artifact": artifact, "device": device, "latency_ms": {"p50": p50, "p90": p50},
                "throughput_per_s": 8 / p50 * 1e3, "peak_rss_mib": None, "size_bytes": None, "parameters": None,
                "cosine_to_teacher": {"held-out": 1.0}}

    rows = [row("teacher", "PyTorch eager fp32", "cpu", 9.0), row("teacher", "onnxruntime fp16", "cuda:1", 2.0),
            row("student", "onnx/text.fp16.onnx", "cuda:1", 1.0)]
    best = {"student": "onnx/text.fp16.onnx", "teacher": "onnxruntime fp16", "min_cosine": None,
            "student_meets_min_cosine": True, "latency_ratio": 0.5, "student_cosine": {"held-out": 1.0},
            "teacher_cosine": {"held-out": 1.0}}
    result = {"device": "cuda:1", "threads": 1, "batch": 8, "seq": 16, "warmup": 1, "repeats": 3, "memory": None,
              "machine": {"cpus": 2, "processor": "x86_64"}, "versions": {"onnxruntime": "1.32.0"},
              "towers": {"text": {"input": {}, "rows": rows, "best": best}}, "notes": []}
    lines = format_table(result).splitlines()
    assert lines[0].startswith("device cuda:1")
    header = next(line for line in lines if line.startswith("model"))
    assert header.split()[:3] == ["model", "artifact", "device"]
    # each row's device, the column before the seven figures
    assert [line.split()[-8] for line in lines if line.startswith(("teacher", "student"))] == ["cpu", "cuda:1", "cuda:1"]
