"""What a compile refuses at plan time and prints at the end, per kind of model: validate gates of the
other family are refused (they would be silently skipped), and a generative model's summary shows its
generation figures and per-tower sparsity instead of an empty encoder table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lmmc.cli import main, summary_table
from lmmc.errors import LmmcError
from tests.conftest import save_tiny, save_tiny_llava, spelled
from tests.test_llava import write_pairs


def _dry_run(tmp_path: Path, model: Path, calib: Path, validate: dict, calibration: dict | None = None,
             export: list | None = None):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"samples": 12, "eval_samples": 4, "batch_size": 4,
                                                      **(calibration or {})},
                                      "passes": [{"wanda": {"sparsity": 0.5}}],
                                      **({"export": export} if export is not None else {}),
                                      "validate": {"min_held_out": 4, **validate}}))
    return CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "--calib", str(calib),
                                     "-o", str(tmp_path / "out"), "--dry-run"])


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("llava")
    return save_tiny_llava(folder / "teacher", "clip"), write_pairs(folder)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("bert")
    calib = folder / "texts.txt"
    calib.write_text("\n".join(f"the water is cold {spelled(i)}" for i in range(24)))
    return save_tiny("bert", folder / "bert"), calib


@pytest.mark.parametrize("gates, named", [
    ({"min_cosine": 0.8}, "min_cosine is a gate for encoders"),
    ({"min_cosine_int8": 0.9, "max_kl": 1.0}, "min_cosine_int8 is a gate for encoders"),
    ({"max_latency_miss": 0.2}, "max_latency_miss is a gate for encoders"),
])
def test_an_encoder_gate_on_a_generative_model_is_refused_at_plan_time(tmp_path, llava, gates, named):
    model, calib = llava
    result = _dry_run(tmp_path, model, calib, gates, {"chat_template": True})
    assert result.exit_code == 2, result.output
    assert named in result.output and "this llava model is a generative model" in result.output
    assert ("the gates that apply to it are max_kl, min_top1_agreement, min_generation_agreement, "
            "max_runtime_diff, min_held_out, min_task_metric, min_task_metric_ratio") in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("timing", [{"latency_seq": 1000}, {"repeats": 5}, {"latency_batch": 2}])
def test_timing_a_generative_model_is_refused_at_plan_time(tmp_path, llava, timing):
    """Nothing times a generative student: the settings would do nothing (and latency_seq was even refused
    against the decoder's positions)."""
    model, calib = llava
    result = _dry_run(tmp_path, model, calib, timing, {"chat_template": True})
    assert result.exit_code == 2, result.output
    assert (f"validate: {', '.join(timing)} set how the student is timed, and a llava model is not timed"
            in result.output)
    for untimed in ({"latency": False}, {"latency": True, "latency_batch": 8}):  # the defaults time nothing either
        assert _dry_run(tmp_path, model, calib, untimed, {"chat_template": True}).exit_code == 0


def test_encoder_validation_settings_on_a_generative_model_are_refused(tmp_path, llava, monkeypatch):
    """agreement_k and a GPU device were accepted and did nothing: a generative student is validated by its
    greedy generation, on the CPU."""
    from lmmc.recipe import parse_recipe

    model, calib = llava
    result = _dry_run(tmp_path, model, calib, {"agreement_k": 3}, {"chat_template": True})
    assert result.exit_code == 2, result.output
    assert ("validate: agreement_k sets the top-k agreement of a dual encoder's retrieval, and a llava model's task "
            "metric is its greedy generation") in result.output
    import onnxruntime  # a GPU build's providers: the recipe checks the device's before the model's family

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    recipe = parse_recipe({"calibration": {"path": str(calib)}, "passes": [{"magnitude": {"sparsity": 0.5}}],
                           "export": ["onnx_generative"], "validate": {"device": "cuda:1"}})
    with pytest.raises(LmmcError, match=r"^validate: device cuda:1 runs an encoder's ONNX artifacts on the GPU, and "
                                        r"a llava model's generative export is validated on the CPU; remove device"):
        recipe.check_gates("llava", "generative")
    recipe.check_gates("bert", "encoder")


@pytest.mark.parametrize("gates, named", [
    ({"max_kl": 0.5}, "max_kl is a gate for generative models"),
    ({"min_top1_agreement": 0.9, "min_generation_agreement": 0.8},
     "min_top1_agreement, min_generation_agreement are gates for generative models"),
])
def test_a_generative_gate_on_an_encoder_is_refused_at_plan_time(tmp_path, bert, gates, named):
    model, calib = bert
    result = _dry_run(tmp_path, model, calib, gates)
    assert result.exit_code == 2, result.output
    assert named in result.output and "this bert model is an encoder" in result.output
    assert "the gates that apply to it are min_cosine, max_norm_error, min_cosine_int8, min_cosine_fp16, " \
           "max_latency_miss, max_runtime_diff" in result.output
    assert not (tmp_path / "out").exists()


def test_generation_tokens_on_an_encoder_is_refused_at_plan_time(tmp_path, bert):
    """It was accepted and did nothing."""
    model, calib = bert
    result = _dry_run(tmp_path, model, calib, {"generation_tokens": 5})
    assert result.exit_code == 2, result.output
    assert ("validate: generation_tokens sets how many greedy tokens a generative model's validation compares, and "
            "this bert model is an encoder") in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_threads_above_the_cpus_are_warned_of(tmp_path, bert, monkeypatch):
    """64 threads on 2 CPUs timed the teacher at 116 ms against 1.2, and the compile said nothing."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    model, calib = bert
    result = _dry_run(tmp_path, model, calib, {"threads": 64}, export=["onnx", {"ort": {"threads": 2}}])
    assert result.exit_code == 0, result.output
    warnings = json.JSONDecoder().raw_decode(result.output, result.output.index("{"))[0]["warnings"]
    assert ("validate.threads = 64 is above the 2 CPU(s) this process may use: the timings, and what is chosen by "
            "them (fuse: auto's graph, a latency target's fit), come from threads waiting for a core; set it to 2 or "
            "fewer") in warnings, warnings
    result = _dry_run(tmp_path, model, calib, {"threads": 2})
    assert "CPU(s)" not in result.output


def test_each_familys_own_gates_and_the_shared_ones_plan(tmp_path, llava, bert):
    model, calib = llava
    shared = {"max_runtime_diff": 1e-3, "min_task_metric": 0.0}
    result = _dry_run(tmp_path, model, calib, {"max_kl": 1.0, "min_top1_agreement": 0.5, **shared},
                      {"chat_template": True}, export=["onnx_generative"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapter"] == "llava"
    # without its generative export the validation would have nothing to run (the encoders' exports are skipped)
    result = _dry_run(tmp_path, model, calib, {"max_kl": 1.0}, {"chat_template": True}, export=["onnx"])
    assert result.exit_code == 2, result.output
    assert "validating this llava model needs its generative export: add 'onnx_generative'" in result.output
    model, calib = bert
    result = _dry_run(tmp_path, model, calib, {"min_cosine": 0.8, "min_cosine_int8": 0.9, **shared},
                      export=["onnx", {"ort": {"int8": ["dynamic"]}}])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapter"] == "bert"


@pytest.mark.parametrize("export", [None, ["onnx"], ["onnx", {"ort": {"int8": []}}], ["onnx", {"openvino": {"int8": False}}]])
def test_an_int8_gate_without_an_int8_export_is_refused_at_plan_time(tmp_path, bert, export):
    model, calib = bert
    result = _dry_run(tmp_path, model, calib, {"min_cosine_int8": 0.95}, export=export)
    assert result.exit_code == 2, result.output
    assert "validate.min_cosine_int8 gates INT8 artifacts, and no export in this recipe writes one" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed: the engines are built")
@pytest.mark.parametrize("precision, gate", [("int8", "min_cosine_int8"), ("fp16", "min_cosine_fp16")])
def test_a_precision_gate_on_an_optional_engine_that_cannot_be_built_is_refused(tmp_path, bert, precision, gate):
    # the compile noted "engine not built", gated nothing and said PASSED
    model, calib = bert
    result = _dry_run(tmp_path, model, calib, {gate: 0.9},
                      export=["onnx", {"tensorrt": {"optional": True, "precision": [precision]}}])
    assert result.exit_code == 2, result.output
    assert f"validate.{gate} gates {precision.upper()} artifacts, and no export in this recipe writes one (the " \
           "optional tensorrt step builds no engine here: TensorRT is not installed)" in result.output
    if precision == "fp16":  # not the tensorrt step again, which the recipe already has
        assert "add {ort: {fp16: true}} to the export section" in result.output


def test_a_precision_gate_on_an_optional_engine_without_a_usable_gpu_is_refused(tmp_path, bert, monkeypatch):
    """TensorRT installed where CUDA cannot start: the step noted 'no engine was built', the FP16 gate judged
    nothing, and the report said passed."""
    from tests.test_tensorrt import NoGpu

    model, calib = bert
    monkeypatch.setitem(sys.modules, "tensorrt", NoGpu())
    result = _dry_run(tmp_path, model, calib, {"min_cosine_fp16": 0.99},
                      export=["onnx", {"tensorrt": {"optional": True, "precision": ["fp16"]}}])
    assert result.exit_code == 2, result.output
    assert "validate.min_cosine_fp16 gates FP16 artifacts, and no export in this recipe writes one (the optional " \
           "tensorrt step builds no engine here: TensorRT finds no usable NVIDIA GPU)" in " ".join(result.output.split())


def test_a_latency_miss_gate_without_a_latency_target_is_refused_at_plan_time(tmp_path, bert):
    # it was accepted and then gated nothing: the report certified a miss no one measured
    model, calib = bert
    result = _dry_run(tmp_path, model, calib, {"max_latency_miss": 0.1})
    assert result.exit_code == 2, result.output
    assert "validate.max_latency_miss gates how far the student misses a latency target, and no pass in this " \
           "recipe sets one" in result.output
    assert not (tmp_path / "out").exists()


def _generative_report(runtime: bool) -> dict:
    generation = {"answer_tokens": 40, "kl_mean": 0.0123, "kl_max": 0.5, "top1_agreement": 0.95, "held_out_samples": 6,
                  "generation": {"tokens": 8, "agreement": 0.5, "prefix_mean": 5.25}}
    if runtime:
        generation["runtime"] = {"greedy_identical": 1.0, "first_logits_max_abs_diff": 2.5e-6}
    return {"validation": {"towers": {}, "generation": generation,
                           "task_metric": {"name": "exact-match accuracy of the greedy answer", "value": 0.25,
                                           "teacher": 0.5},
                           "gates": [{"name": "held-out samples", "passed": True}]},
            "validated": True, "flops": {},
            "sparsity": {"sparsity": 0.5, "sparsity_per_tower": {"vision": 0.4, "language": 0.6, "projector": 0.3}},
            "parameters": {"teacher": 1000, "student": 1000}}


def test_a_generative_summary_prints_its_fidelity_and_no_empty_tower_table():
    lines = summary_table(_generative_report(runtime=True)).splitlines()
    assert lines == [
        "generative fidelity on 6 held-out samples (40 answer tokens): next-token KL 0.012 nats (max 0.500), "
        "top-1 agreement 0.950, greedy agreement on the first 8 tokens 0.500 (matching prefix 5.250 tokens)",
        "ONNX Runtime vs PyTorch student: greedy tokens identical 1.000, first-step logits max abs diff 2.5e-06",
        "sparsity of prunable weights: 50.0% (vision 40.0%, language 60.0%, projector 30.0%); parameters "
        "1,000 -> 1,000",
        "exact-match accuracy of the greedy answer: student 0.250, teacher 0.500",
        "gates: held-out samples ok"]
    assert not any(line.startswith("tower") for line in lines)
    # Without a generative export there is no runtime line; a NaN KL reads as such, not as a number.
    report = _generative_report(runtime=False)
    report["validation"]["generation"]["kl_mean"] = float("nan")
    lines = summary_table(report).splitlines()
    assert "next-token KL n/a (NaN/Inf) nats" in lines[0]
    assert not any(line.startswith("ONNX Runtime") for line in lines)


def test_an_unvalidated_summary_has_no_table_header():
    report = _generative_report(runtime=False)
    report["validation"], report["validated"] = {}, False
    assert summary_table(report).splitlines() == [
        "sparsity of prunable weights: 50.0% (vision 40.0%, language 60.0%, projector 30.0%); parameters "
        "1,000 -> 1,000"]


@pytest.mark.parametrize("schedule", ["optima", "round_robin"])
def test_a_one_module_schedule_without_hidden_terms_is_refused_at_plan_time(tmp_path, bert, schedule):
    # the dry run passed it; the real run refused it in the distillation, after the passes before it
    model, calib = bert
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"samples": 12, "eval_samples": 4, "batch_size": 4},
                                      "passes": [{"distill": {"hidden": 0, "schedule": schedule, "blocks_per_arm": 1,
                                                              "steps": 2, "batch_size": 4, "reward_samples": 4,
                                                              "dev_samples": 4}}],
                                      "validate": {"min_held_out": 4}}))
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "--calib", str(calib),
                                       "-o", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "with hidden: 0 only the last module of a tower has a loss, but modules ['text[0:1]'] do not end " \
           "their tower; set blocks_per_arm: null" in result.output
