"""The command line: whole compiles of tiny models, and bad input -> one clear error, exit 2,
nothing left behind."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from lmmc.cli import main
from lmmc.export.validate import scaled_diff
from lmmc.report_html import GENERATOR
from lmmc.resume import hash_files
from tests.conftest import CORPUS, REPO, save_preprocessors, save_tiny, spelled, tiny_model

TINY_RECIPE = {
    "calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
    "passes": [{"wanda": {"sparsity": 0.5}}],
    "export": ["onnx"],
    "validate": {"max_runtime_diff": 1e-4, "latency_batch": 2, "repeats": 3, "threads": 1},
}


def write_recipe(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("kind", ["bert", "clip", "siglip"])
def test_compile_tiny_model_end_to_end(tmp_path, kind):
    model_dir = save_tiny(kind, tmp_path / "teacher")
    out = tmp_path / "out"
    result = run("compile", model_dir, "--recipe", write_recipe(tmp_path, TINY_RECIPE), "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    towers = report["validation"]["towers"]
    assert set(towers) == ({"text"} if kind == "bert" else {"text", "vision"})
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    for name, tower in towers.items():
        assert max(tower["runtime_max_abs_diff"].values()) <= 1e-4
        # the gate divides each output's difference by its scale where that exceeds 1
        assert gates[f"{name}: runtime max diff"]["value"] == pytest.approx(max(
            d / max(1.0, tower["runtime_output_scale"][k]) for k, d in tower["runtime_max_abs_diff"].items()))
        assert (out / "onnx" / f"{name}.onnx").is_file()
        assert tower["latency_ms"]["teacher"] > 0
    # timed at the model's 64 positions by default, not at 128 (which real CLIPs, with 77, cannot take)
    assert towers["text"]["latency_ms"]["input"]["input_ids"] == [2, 64]
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["passes"][0]["name"] == "wanda" and report["passes"][0]["config"]["sparsity"] == 0.5
    assert report["passed"] is True and report["validated"] is True
    assert not [w for w in report["warnings"] if "one and the same embedding" in w]  # random texts differ
    assert result.output.strip().endswith(f"wrote {out}/ ({', '.join(sorted(p.name + ('/' if p.is_dir() else '') for p in out.iterdir()))})")
    if kind != "bert":
        task = report["validation"]["task_metric"]
        assert task["kind"] == "retrieval_agreement" and set(task["parts"]) == {"image -> image", "text -> image",
                                                                                   "image -> text"}
        assert task["value"] == min(task["parts"].values()) and task["teacher"] == 1.0
        # SigLIP scores pairs one at a time: the 32 held-out pairs' match probabilities and, apart, the other
        # combinations of their images and captions; CLIP none
        probabilities = task.get("match_probability")
        assert (probabilities is None) if kind == "clip" else (
            probabilities["pairs"] == 32 and probabilities["unmatched"]["pairs"] == 32 * 31
            and 0 <= probabilities["mean_abs_diff"] <= 1)
    # the saved student holds exactly the pruned weights
    weights = load_file(out / "student" / "model.safetensors")
    for name, sp in report["sparsity"]["sparsity_per_layer"].items():
        assert float((weights[name] == 0).float().mean()) == pytest.approx(sp)
    assert not list(tmp_path.glob(".out*"))  # no work area left behind


def test_the_runtime_gate_is_relative_where_an_output_exceeds_1():
    diff = {"last_hidden_state": 5e-4, "pooled_embedding": 2e-7}
    # hidden states reaching 20: 2.5e-5 relative passes a 3e-4 gate that 5e-4 absolute would miss
    assert scaled_diff(diff, {"last_hidden_state": 20.0, "pooled_embedding": 0.4}) == pytest.approx(2.5e-5)
    # below 1 the difference stays absolute: small outputs do not loosen the gate
    assert scaled_diff(diff, {"last_hidden_state": 0.5, "pooled_embedding": 0.4}) == pytest.approx(5e-4)
    assert math.isnan(scaled_diff({**diff, "pooled_embedding": float("nan")}, {"last_hidden_state": 20.0,
                                                                              "pooled_embedding": 0.4}))


def test_missed_gate_exits_1_with_complete_output(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    # No latency timing: it would export the teacher too, and the gate missed here is the runtime diff.
    recipe = {**TINY_RECIPE, "validate": {**TINY_RECIPE["validate"], "max_runtime_diff": 1e-12, "latency": False}}
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)), "-o", str(out)])
    assert result.exit_code == 1
    assert "validation gate missed: text: runtime max diff" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    # The summary shows the figures behind the miss, as after a passed compile.
    cosine = report["validation"]["towers"]["text"]["cosine_mean"]
    assert re.search(rf"^text\s+{cosine:.4f}\s", result.stdout, re.M), result.stdout
    gate, = [g for g in report["validation"]["gates"] if not g["passed"]]
    assert f"gates: text: runtime max diff MISSED ({gate['value']:.4g}, needs {gate['op']} 1e-12)" in result.stdout


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    model_dir = save_tiny("siglip", tmp_path / "teacher")
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run("compile", model_dir, "-r", recipe, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["adapter"] == "siglip"
    assert [s["pass"] for s in plan["steps"]] == ["wanda", "onnx", "validate"]
    assert plan["samples"] == {"calibration": 8, "held_out": 32} and plan["validated"] is True
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_recipes_model_is_compiled_when_the_command_line_gives_none(tmp_path):
    save_tiny("bert", tmp_path / "recipes" / "teacher")
    recipe = write_recipe(tmp_path / "recipes", {**TINY_RECIPE, "model": "teacher"})  # beside the recipe
    result = run("compile", "-r", recipe, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(tmp_path / "recipes" / "teacher")
    other = save_tiny("siglip", tmp_path / "other")
    assert json.loads(run("compile", other, "-r", recipe, "-o", tmp_path / "out", "--dry-run").stdout)["adapter"] == \
        "siglip"  # the command line's MODEL first
    result = run("compile", "-r", write_recipe(tmp_path, TINY_RECIPE), "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 2 and "no MODEL to compile: give it on the command line" in result.output


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_is_said_to_be_computed_and_saved_in_float32(tmp_path, dtype):
    """The student's files would be twice the checkpoint's size per weight without a word."""
    model = save_tiny("bert", tmp_path / "teacher")
    half = transformers.AutoModel.from_pretrained(model).to(dtype)
    half.save_pretrained(model)
    assert json.loads((model / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    plan = json.loads(run("compile", model, "-r", write_recipe(tmp_path, QUICK), "-o", tmp_path / "o", "--dry-run").stdout)
    name = str(dtype).removeprefix("torch.")
    assert [w for w in plan["warnings"] if "float32" in w] == [
        f"'{model}' holds {name} weights: lmmc computes teacher and student in float32 and saves the student's "
        f"weights in float32, twice the checkpoint's bytes per weight (its ONNX and OpenVINO exports too, unless "
        f"the recipe quantises them)"]
    full = save_tiny("bert", tmp_path / "full")
    plan = json.loads(run("compile", full, "-r", write_recipe(tmp_path, QUICK), "-o", tmp_path / "o", "--dry-run").stdout)
    assert not [w for w in plan["warnings"] if "float32" in w]


def test_an_opset_whose_attention_ort_cannot_fuse_is_warned_of_in_the_plan(tmp_path):
    model = save_tiny("bert", tmp_path / "teacher")
    warned = []
    for opset, fuse in [(23, "on"), (22, "on"), (23, "off")]:
        recipe = {**QUICK, "export": [{"onnx": {"opset": opset}}, {"ort": {"fuse": fuse, "int8": ["dynamic"]}}]}
        path = write_recipe(tmp_path, recipe, f"r{opset}{fuse}.yaml")
        plan = json.loads(run("compile", model, "-r", path, "-o", tmp_path / "o", "--dry-run").stdout)
        warned.append([w for w in plan["warnings"] if "fuse no attention" in w])
    assert warned == [["onnx opset 23 exports attention as ONNX's own Attention operator, which ONNX Runtime's "
                       "fusions do not rewrite: the ort pass will fuse no attention; export with opset 20 to have it "
                       "fused"], [], []]


def test_an_empty_path_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    monkeypatch.chdir(tmp_path)
    for args, name in [(["compile", model_dir, "-r", "", "-o", "out"], "'--recipe' / '-r'"),
                       (["compile", model_dir, "-r", recipe, "-o", "out", "--calib", ""], "'--calib'"),
                       (["report", ""], "'OUT_DIR'"), (["bench", ""], "'OUT_DIR'")]:
        result = run(*args, "--dry-run") if args[0] == "compile" else run(*args)
        assert result.exit_code == 2, result.output
        assert f"Invalid value for {name}: is an empty path, which would read as the current directory" in \
            result.output, result.output
    result = run("compile", "", "-r", recipe, "-o", "out", "--dry-run")
    assert result.exit_code == 2 and "MODEL is an empty path" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "teacher"]


def test_a_tokenizer_with_code_of_its_own_runs_only_with_trust_remote_code(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoTokenizer": ["own_tokenizer.OwnTokenizer", None]}}))
    (model_dir / "own_tokenizer.py").write_text(
        f"from pathlib import Path\nfrom transformers import BertTokenizer\n"
        f"Path({str(tmp_path / 'ran')!r}).write_text('yes')\n"
        "class OwnTokenizer(BertTokenizer):\n    pass\n")
    args = ["compile", model_dir, "-r", write_recipe(tmp_path, TINY_RECIPE), "-o", tmp_path / "out", "--dry-run"]
    refused = run(*args)
    assert refused.exit_code == 2 and (f"'{model_dir}' ships the code of its own tokenizer (auto_map in "
                                       f"tokenizer_config.json), which runs only with --trust-remote-code") in refused.output
    assert not (tmp_path / "ran").exists()
    trusted = run(*args, "--trust-remote-code")
    assert trusted.exit_code == 0, trusted.output
    assert (tmp_path / "ran").read_text() == "yes"  # its own class read the tokenizer


def test_a_student_whose_tokenizer_has_code_of_its_own_is_read_by_the_runtime_and_bench_only_when_trusted(tmp_path):
    from lmmc import runtime
    from lmmc.errors import LmmcError

    model_dir = save_tiny("bert", tmp_path / "teacher")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoTokenizer": ["own_tokenizer.OwnTokenizer", None]}}))
    (model_dir / "own_tokenizer.py").write_text("from transformers import BertTokenizer\n\n"
                                                "class OwnTokenizer(BertTokenizer):\n    pass\n")
    out = tmp_path / "out"
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, TINY_RECIPE), "-o", out, "--trust-remote-code")
    assert result.exit_code == 0, result.output
    texts = ["the water is cold", "a man on the road"]
    with pytest.raises(LmmcError, match="tokenizer_config.json\\), which runs only with trust_remote_code=True"):
        runtime.open_dir(out).encode(texts)
    trusted = runtime.open_dir(out, trust_remote_code=True).encode(texts)
    # the same student read by the built-in tokenizer its class extends
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    (plain / "student" / "tokenizer_config.json").write_text(json.dumps(config))
    np.testing.assert_allclose(trusted, runtime.open_dir(plain).encode(texts), atol=1e-6)
    refused = run("bench", out, "--quick")
    assert refused.exit_code == 2 and "runs only with --trust-remote-code" in refused.output
    benched = run("bench", out, "--quick", "--trust-remote-code")
    assert benched.exit_code == 0, benched.output
    assert json.loads((out / "bench.json").read_text())["towers"]["text"]["rows"]


def test_a_known_model_with_code_of_its_own_is_compiled_as_the_built_in_and_says_so(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "custom.CustomBert"}}))
    (model_dir / "custom.py").write_text("raise SystemExit('the model\'s own code ran')\n")
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, TINY_RECIPE), "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    warning = (f"'{model_dir}' ships code of its own (auto_map in config.json), which lmmc does not run without "
               f"--trust-remote-code: it is compiled as transformers' built-in bert, which may compute something "
               f"else than that code, and the student's config no longer names it")
    assert json.loads(result.stdout)["warnings"][0] == warning
    assert f"warning: {warning}" in result.stderr
    # The student is the built-in class, and its config no longer names the teacher's code.
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, TINY_RECIPE), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "auto_map" in json.loads((model_dir / "config.json").read_text())
    assert "auto_map" not in json.loads((tmp_path / "out" / "student" / "config.json").read_text())
    student = transformers.AutoModel.from_pretrained(tmp_path / "out" / "student", trust_remote_code=True)
    assert type(student) is transformers.BertModel


def _bad_cases(tmp_path):
    good = save_tiny("bert", tmp_path / "teacher")
    nocfg = tmp_path / "noconfig"
    nocfg.mkdir()
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    vision = tmp_path / "clip-vision"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    naflex = tmp_path / "siglip2"
    naflex.mkdir()
    (naflex / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    real = {**TINY_RECIPE, "calibration": {"path": str(CORPUS)}}
    exists = tmp_path / "exists"
    exists.mkdir()
    return {
        "missing path": ([tmp_path / "nope", "-r", recipe], "does not exist"),
        "no config.json": ([nocfg, "-r", recipe], "has no config.json"),
        "unsupported model_type": ([gpt, "-r", recipe], "model_type 'gpt2' is not supported; supported model types: bert"),
        "one tower saved alone": ([vision, "-r", recipe], "model_type 'clip_vision_model' is one tower of a clip model "
                                                          "saved alone; lmmc compiles the whole clip checkpoint"),
        # the fixed-resolution SigLIP 2 checkpoints are model_type siglip
        "siglip2 naflex": ([naflex, "-r", recipe], "model_type 'siglip2' (SigLIP 2's NaFlex checkpoints, whose vision "
                                                   "tower reads images at their own aspect ratio; its fixed-resolution "
                                                   "checkpoints, e.g. google/siglip2-base-patch16-224, are model_type "
                                                   "'siglip', which lmmc compiles) is not supported"),
        "unknown pass": ([good, "-r", write_recipe(tmp_path, {**TINY_RECIPE, "passes": ["sparsify"]}, "a.yaml")], "unknown pass 'sparsify'"),
        "unknown key": ([good, "-r", write_recipe(tmp_path, {**TINY_RECIPE, "passes": [{"wanda": {"ratio": 0.5}}]}, "b.yaml")], "ratio: unknown key"),
        "sparsity outside [0, 1)": ([good, "-r", write_recipe(tmp_path, {**TINY_RECIPE, "passes": [{"wanda": {"sparsity": 1.5}}]}, "c.yaml")], "sparsity must be in [0, 1)"),
        "empty calibration file": ([good, "-r", write_recipe(tmp_path, real, "d.yaml"), "--calib", empty], "holds no samples"),
        "missing recipe": ([good, "-r", tmp_path / "none.yaml"], "recipe"),
        "output exists": ([good, "-r", recipe, "--out-exists"], "already exists; choose another --out or pass --force"),
    }, exists


@pytest.mark.parametrize("case", ["missing path", "no config.json", "unsupported model_type", "one tower saved alone",
                                  "siglip2 naflex",
                                  "unknown pass", "unknown key", "sparsity outside [0, 1)", "empty calibration file",
                                  "missing recipe", "output exists"])
def test_bad_input_one_clear_error_exit_2_nothing_written(tmp_path, case):
    cases, exists = _bad_cases(tmp_path)
    args, message = cases[case]
    out = tmp_path / "out"
    if "--out-exists" in args:
        args, out = args[:-1], exists
    result = CliRunner().invoke(main, ["compile", *map(str, args), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1
    assert out == exists or not out.exists()
    assert not list(tmp_path.glob(".out*"))  # no work area left behind


def test_force_replaces_existing_output(tmp_path):
    model_dir = save_tiny("vit", tmp_path / "teacher")
    out = tmp_path / "out"
    (out / "student").mkdir(parents=True)
    (out / "student" / "lmmc.json").write_text("{}")  # an earlier lmmc output, which --force may replace,
    listed = {"student": None, "student/lmmc.json": hash_files(out / "student" / "lmmc.json")}
    (out / ".lmmc-files.json").write_text(json.dumps(listed))  # with the list of its files
    old = f'<html><head><meta name="generator" content="{GENERATOR} 0.1">old'
    (out / "report.html").write_text(old)  # a page of that earlier output, replaced with the rest
    recipe = {**TINY_RECIPE, "validate": {**TINY_RECIPE["validate"], "latency": False}}
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, recipe), "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "report.html").read_text() != old
    assert (out / "onnx" / "vision.onnx").is_file()


def test_force_fills_an_empty_directory_and_keeps_it(tmp_path):
    model_dir = save_tiny("vit", tmp_path / "teacher")
    out = tmp_path / "out"
    out.mkdir(mode=0o750)
    made = out.stat()
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "validate": {**TINY_RECIPE["validate"], "latency": False}})
    result = run("compile", model_dir, "-r", recipe, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert (out.stat().st_ino, out.stat().st_mode) == (made.st_ino, made.st_mode)  # the user's directory, not a new one
    listed = json.loads((out / ".lmmc-files.json").read_text())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted([*listed, ".lmmc-files.json"])


def test_force_writes_into_a_mount_point_and_replaces_its_earlier_output(tmp_path):
    # A container's output volume: the directory cannot be removed or renamed onto, only filled.
    out = tmp_path / "volume"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(out)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the test needs root")
    try:
        model_dir = save_tiny("vit", tmp_path / "teacher")
        recipe = write_recipe(tmp_path, {**TINY_RECIPE, "validate": {**TINY_RECIPE["validate"], "latency": False}})
        for _ in range(2):   # into the empty volume, then over the earlier output there
            result = run("compile", model_dir, "-r", recipe, "-o", out, "--force")
            assert result.exit_code == 0, result.output
            assert os.path.ismount(out)
            listed = json.loads((out / ".lmmc-files.json").read_text())
            assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted([*listed, ".lmmc-files.json"])
        assert not list(tmp_path.glob(".volume*"))  # no work area left behind
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_random_calibration_refused_for_large_models(tmp_path):
    big = tiny_model("bert").__class__(tiny_model("bert").config.__class__(hidden_size=256, num_hidden_layers=8,
                                       num_attention_heads=4, intermediate_size=1024, vocab_size=99))
    big.save_pretrained(tmp_path / "big")
    save_preprocessors("bert", tmp_path / "big")
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "big"), "-r", str(write_recipe(tmp_path, TINY_RECIPE)),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "random calibration inputs are only for tiny test models" in result.output
    assert not (tmp_path / "out").exists()


def test_calib_option_supplies_data_the_recipe_lacks(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = write_recipe(tmp_path, {"passes": [{"wanda": {"sparsity": 0.5}}]})
    without = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(recipe), "-o", str(tmp_path / "o"), "--dry-run"])
    assert without.exit_code == 2 and "needs ['calib']" in without.output
    result = run("compile", model_dir, "-r", recipe, "-o", tmp_path / "o", "--dry-run", "--calib", CORPUS)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["calibration"] == str(CORPUS)


QUICK = {**TINY_RECIPE, "validate": {"latency": False, "threads": 1}}


def test_the_manifest_names_a_local_teacher_by_its_absolute_path(tmp_path, monkeypatch):
    """Typed relative to where the compile ran, the teacher's path would name another folder, or none, for
    whoever reads the manifest from elsewhere."""
    save_tiny("bert", tmp_path / "models" / "teacher")
    recipe = write_recipe(tmp_path, QUICK)
    monkeypatch.chdir(tmp_path / "models")
    assert run("compile", "./teacher", "-r", recipe, "-o", tmp_path / "out").exit_code == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["teacher"] == str(tmp_path / "models" / "teacher")


def test_validation_switched_off_is_never_reported_as_passed(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    out = tmp_path / "out"
    recipe = {"calibration": TINY_RECIPE["calibration"], "passes": TINY_RECIPE["passes"], "validate": False}
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["validated"] is False and report["passed"] is None and report["recipe"]["validate"] is False
    assert "not validated" in result.output
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    assert {"report.json", "student/"} <= set(listing) and "onnx/" not in listing  # no export was asked for
    assert result.output.strip().endswith(f"wrote {out}/ ({', '.join(listing)})")


def test_a_recipe_without_validate_is_validated_by_default(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {"calibration": TINY_RECIPE["calibration"], "passes": TINY_RECIPE["passes"]}
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, recipe), "-o", tmp_path / "o", "--dry-run")
    plan = json.loads(result.stdout)
    assert [s["pass"] for s in plan["steps"]] == ["wanda", "onnx", "validate"] and plan["validated"] is True


def test_the_plan_shows_the_allocated_sparsity_and_the_bench(tmp_path):
    """After an allocation, a pruner's own sparsity (its default) is not what it applies; the bench the
    recipe asks for runs too."""
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**TINY_RECIPE, "passes": [{"ecoflap": {"sparsity": 0.6, "samples": 8}}, {"wanda": {}}, {"magnitude": {}}],
              "bench": {"repeats": 3}}
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, recipe), "-o", tmp_path / "o", "--dry-run")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [s["config"].get("sparsity") for s in plan["steps"][:3]] == [0.6] + ["per matrix, from ecoflap"] * 2
    assert plan["bench"]["repeats"] == 3
    plain = json.loads(run("compile", model_dir, "-r", write_recipe(tmp_path, TINY_RECIPE), "-o", tmp_path / "o",
                           "--dry-run").stdout)
    assert plain["steps"][0]["config"]["sparsity"] == 0.5 and plain["bench"] is None


UNGATED = "validate sets no gate that compares the student with the teacher"


@pytest.mark.parametrize("validate, warned", [
    ({}, True), ({"max_runtime_diff": 1e-3}, True), ({"min_cosine": 0.9}, False), ({"min_task_metric_ratio": 0.8}, False)])
def test_a_validation_that_never_compares_student_and_teacher_is_warned(tmp_path, validate, warned):
    """Its "passed" would certify a broken student: the plan (and so the report) says so, naming the gates."""
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**TINY_RECIPE, "validate": validate}
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, recipe), "-o", tmp_path / "o", "--dry-run")
    assert result.exit_code == 0, result.output
    found = [w for w in json.loads(result.stdout)["warnings"] if w.startswith(UNGATED)]
    assert len(found) == int(warned)
    assert (f"warning: {UNGATED} (min_cosine, min_task_metric, min_task_metric_ratio)" in result.stderr) is warned


def test_non_finite_student_fails_every_gate_and_report_is_strict_json(tmp_path, monkeypatch):
    from lmmc.pipeline import get_pass

    wanda = get_pass("wanda")
    real_run = wanda.run

    def run_then_break(self, art):
        metrics = real_run(self, art)
        with torch.no_grad():  # finite weights (a NaN weight ends the compile first) whose outputs overflow to NaN
            art.student.encoder.layer[1].output.dense.weight[0, 0] = 3e38
        return metrics

    monkeypatch.setattr(wanda, "run", run_then_break)
    model_dir = save_tiny("bert", tmp_path / "teacher")
    out = tmp_path / "out"
    recipe = {**QUICK, "validate": {**QUICK["validate"], "min_cosine": 0.5, "min_task_metric": 0.1}}
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "non-finite (NaN/Inf)" in result.output

    def refuse(name):
        raise AssertionError(f"bare {name} in report.json")

    report = json.loads((out / "report.json").read_text(), parse_constant=refuse)
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    for name in ("text: runtime max diff", "text: cosine to teacher", "nearest-neighbour agreement"):
        assert gates[name]["value"] is None and gates[name]["passed"] is False
    assert report["validation"]["task_metric"]["value"] is None  # NaN embeddings do not agree 100 %
    assert report["passed"] is False


def test_validation_functions_fail_on_non_finite_values():
    import numpy as np

    from lmmc.export.validate import _gate, neighbour_agreement, top_k_agreement

    good = np.eye(4, 3)
    bad = good.copy()
    bad[2, 1] = np.nan
    assert neighbour_agreement(good, good) == 1.0
    assert np.isnan(neighbour_agreement(good, bad)) and np.isnan(top_k_agreement(good, good, bad, good, 1))
    for value in (float("nan"), float("inf"), -float("inf")):
        assert not _gate("g", value, 1.0, "<=")["passed"] and not _gate("g", value, 0.0, ">=")["passed"]
    assert _gate("g", 0.5, 1.0, "<=")["passed"] and _gate("g", 0.5, 0.1, ">=")["passed"]


def test_internal_error_exits_3_with_the_traceback_in_a_log(tmp_path, monkeypatch):
    from lmmc.pipeline import get_pass

    def boom(self, art):
        raise ZeroDivisionError("a bug inside a pass\nframe #0 of a native library")

    monkeypatch.setattr(get_pass("wanda"), "run", boom)
    model_dir = save_tiny("bert", tmp_path / "teacher")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, QUICK)), "-o", str(out)])
    assert result.exit_code == 3, result.output
    assert "internal error: ZeroDivisionError: a bug inside a pass. This is a bug in lmmc" in result.output
    assert "frame #0" not in result.output  # pages of native stack frames go to the log alone
    log = Path(re.search(r"the traceback is in (\S+);", result.output).group(1))
    assert log.is_file() and not log.is_relative_to(tmp_path)
    text = log.read_text()
    assert "Traceback" in text and "raise ZeroDivisionError" in text and "frame #0" in text
    log.unlink()


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. "
                                                               "DefaultCPUAllocator: can't allocate memory: you "
                                                               "tried to allocate 1099511627776 bytes.\nframe #0")])
def test_running_out_of_memory_is_bad_input_that_names_the_batch_sizes(tmp_path, monkeypatch, error):
    from lmmc.pipeline import get_pass

    def allocate(self, art):
        raise error

    monkeypatch.setattr(get_pass("wanda"), "run", allocate)
    model_dir = save_tiny("bert", tmp_path / "teacher")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, QUICK)), "-o", str(out)])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert "error: out of memory (" in result.output and "lower the recipe's batch sizes" in result.output
    assert "out of memory ()" not in result.output  # a bare MemoryError is named
    assert "internal error" not in result.output and "frame #0" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("then", [None, signal.SIGTERM])
def test_sigterm_stops_like_ctrl_c_with_exit_130(tmp_path, then):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**QUICK, "passes": [{"distill": {"steps": 100000, "batch_size": 4}}]}
    path = write_recipe(tmp_path, recipe)
    before = set(tmp_path.iterdir())
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lmmc"), "compile", str(model_dir), "-r", str(path), "-o",
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not (set(tmp_path.iterdir()) - before) and time.monotonic() < deadline:  # the work directory
        time.sleep(0.2)
    time.sleep(3)  # well into loading and distilling
    proc.send_signal(signal.SIGTERM)
    if then is not None:  # a supervisor's second signal while lmmc stops: it was killed by it (exit 143)
        time.sleep(0.3)
        proc.send_signal(then)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    if then is None:  # the distillation's progress bar is closed first, so the message is the last line
        assert err.splitlines()[-1] == "interrupted by SIGTERM; the output directory was not written", err[-500:]
    assert not (tmp_path / "out").exists()


def test_sample_counts_that_shrink_are_warned_and_planned(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    data = tmp_path / "data.txt"
    data.write_text("\n".join(f"the road number {spelled(i)}" for i in range(150)))
    recipe = {"calibration": {"path": "data.txt", "samples": 128, "eval_samples": 64}, "passes": ["wanda"],
              "validate": {"min_cosine": 0.5}}
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)),
                                       "-o", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["samples"] == {"calibration": 113, "held_out": 37}
    assert len(plan["warnings"]) == 2 and "gives 37 held-out samples, not the 64" in plan["warnings"][1]
    assert result.stderr.count("warning: ") == 2


def test_recipe_paths_resolve_against_the_recipe_and_calib_against_the_cwd(tmp_path, monkeypatch):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "data").mkdir()
    corpus = tmp_path / "data" / "corpus.txt"
    corpus.write_text("\n".join(f"the house number {spelled(i)}" for i in range(400)))
    recipe = write_recipe(tmp_path / "recipes", {"calibration": {"path": "../data/corpus.txt"}, "passes": ["wanda"]})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run("compile", model_dir, "-r", recipe, "-o", "o", "--dry-run")
    assert json.loads(result.stdout)["calibration"] == str(corpus)
    monkeypatch.chdir(tmp_path / "data")
    result = run("compile", model_dir, "-r", recipe, "-o", "o", "--dry-run", "--calib", "corpus.txt")
    assert json.loads(result.stdout)["calibration"] == str(corpus)
    # --calib replaced a calibration section that was no mapping, and its settings went unread
    bad = write_recipe(tmp_path / "recipes", {"calibration": "../data/corpus.txt", "passes": ["wanda"]}, "bad.yaml")
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(bad), "-o", "o", "--dry-run", "--calib",
                                       "corpus.txt"])
    assert result.exit_code == 2 and "'calibration' must be a mapping like {path: data.txt" in result.output
    # a recipe's model found from the current directory only: the same recipe failed from anywhere else
    monkeypatch.chdir(tmp_path)
    beside = write_recipe(tmp_path / "recipes", {"model": "teacher", "calibration": {"path": "../data/corpus.txt"},
                                                 "passes": ["wanda"]}, "model.yaml")
    result = CliRunner().invoke(main, ["compile", "-r", str(beside), "-o", "o", "--dry-run"])
    assert result.exit_code == 2 and "model 'teacher' is a path, and relative paths in a recipe are resolved " \
                                     f"against the recipe's directory {tmp_path / 'recipes'}" in result.output
    # MODEL on the command line replaces the recipe's, which is then neither read nor refused
    result = run("compile", model_dir, "-r", beside, "-o", "o", "--dry-run")
    assert json.loads(result.stdout)["model"] == str(model_dir)


@pytest.mark.parametrize("recipe", ["minilm-wanda50.yaml", "minilm-distill-wanda50.yaml"])
def test_shipped_recipes_plan_from_any_directory(minilm, tmp_path, monkeypatch, recipe):
    monkeypatch.chdir(tmp_path)
    result = run("compile", minilm, "-r", REPO / "samples" / "recipes" / recipe, "-o", "out", "--dry-run")
    plan = json.loads(result.stdout)
    assert plan["calibration"] == str(CORPUS) and plan["samples"]["held_out"] == 256


def test_nm_that_fits_only_some_matrices_is_warned_at_plan_time(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**QUICK, "passes": [{"magnitude": {"nm": "1:64"}}]}  # only fc2 (64 inputs) fits; 32-wide ones stay dense
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)),
                                       "-o", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "warning: 'magnitude' nm 1:64: 10 of 12 matrices have an input width not divisible by 64" in result.output


def test_an_nm_pruner_that_pruned_nothing_fails_the_report():
    from lmmc.adapters import get_adapter, prunable_linears
    from lmmc.artifact import Artifact, PassRecord
    from lmmc.compile import build_report
    from lmmc.recipe import parse_recipe

    teacher = tiny_model("bert")
    adapter = get_adapter("bert")
    every = [pl.param for pl in prunable_linears(teacher, adapter)]
    art = Artifact(model_ref="tiny", adapter=adapter, teacher=teacher, student=teacher,
                   validation={"gates": [], "passed": True})
    art.records.append(PassRecord("magnitude", {"nm": "3:7"}, 0.0, {"dense_nm": every}))
    report = build_report(art, parse_recipe(QUICK), {"calibration": "random"}, 0.0)
    assert report["failures"] == ["'magnitude' nm 3:7 fitted no matrix: the student stayed dense"]
    assert report["validated"] is True and report["passed"] is False
    assert report["warnings"] == ["'magnitude' nm 3:7: 12 matrices stayed dense, their input widths no multiple of 7 "
                                  "(encoder.layer.0.attention.self.query.weight, encoder.layer.0.attention.self.key."
                                  "weight, encoder.layer.0.attention.self.value.weight ...). A structured pass before "
                                  "it keeps FFN widths in multiples of 7 with antgmm: {ffn_multiple: 7}"]


def test_a_2_4_pass_after_another_pruner_says_it_went_past_half(tmp_path):
    """The 2:4 pass keeps an earlier pass's zeros: every matrix ends sparser than 2:4, which README says
    fixes every matrix at 50 %, and nothing said so."""
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**QUICK, "passes": [{"magnitude": {"sparsity": 0.5}}, {"wanda": {"nm": "2:4"}}], "export": [],
              "validate": False}
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sparsity"]["sparsity"] > 0.55
    assert f"'wanda' nm 2:4 kept the zeros an earlier pass made, so 12 matrices are sparser than 2:4; the prunable " \
           f"weights are {report['sparsity']['sparsity']:.1%} sparse. For 2:4 alone, drop the earlier pruning pass" \
           in report["warnings"], report["warnings"]


@pytest.mark.parametrize("second, warned", [({"magnitude": {"sparsity": 0.2}}, True),
                                             ({"magnitude": {"sparsity": 0.5}}, False)])
def test_a_pruning_pass_that_removes_nothing_says_so(tmp_path, second, warned):
    """A pass at or below an earlier pass's sparsity keeps that pass's zeros and adds none: it ran, and the
    report said nothing of it."""
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**QUICK, "passes": [{"magnitude": {"sparsity": 0.3}}, second], "export": [], "validate": False}
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    first, then = (p["metrics"]["sparsity"] for p in report["passes"])
    assert (then == first) == warned
    message = (f"'magnitude' removed no weight: an earlier pass's zeros already held every one it would remove; the "
               f"prunable weights are {then:.1%} sparse. Drop it, or give it a higher sparsity than the earlier pass")
    assert (message in report["warnings"]) == warned, report["warnings"]


@pytest.mark.parametrize("sparsity, message", [
    (0.0, "'magnitude' removed no weight; the prunable weights are 0.0% sparse. Drop it, or give it a higher sparsity"),
    # the tiny model's rows of 32 and 64 inputs lose 31 and 63 weights
    (0.99, "'magnitude' asked for sparsity 0.99 and reached 97.3%: each row of a matrix loses a whole number of "
           "weights, rounded down, which falls short on rows this narrow; sparsegpt meets the target per matrix"),
    (0.5, None)])
def test_a_pruning_pass_that_misses_its_sparsity_says_so(tmp_path, sparsity, message):
    """Sparsity 0 and a target the rows' widths round below were met without a word."""
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**QUICK, "passes": [{"magnitude": {"sparsity": sparsity}}], "export": [], "validate": False}
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    warnings = json.loads((tmp_path / "out" / "report.json").read_text())["warnings"]
    assert warnings == ([message] if message else []), warnings


def test_a_failure_fails_the_compile_with_validation_off_too(tmp_path):
    # An N:M pattern that fits no matrix of the cut student leaves it dense: exit 1, not a silent success.
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**TINY_RECIPE, "passes": [{"antgmm": {"keep": 0.5}}, {"wanda": {"nm": "3:13"}}], "validate": False,
              "export": []}
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "'wanda' nm 3:13 fitted no matrix: the student stayed dense" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["validated"] is False and report["passed"] is None


def test_lmmc_passes_documents_every_key_a_recipe_takes():
    """The unknown-key error sends users to `lmmc passes`; it listed no calibration or bench key, nor the
    keys of a mapping a key takes (int8's mixed, a target's deploy)."""
    from lmmc.bench import BenchConfig
    from lmmc.pipeline import load_passes
    from lmmc.recipe import CalibrationConfig

    result = CliRunner().invoke(main, ["passes"])
    assert result.exit_code == 0, result.output
    sections, nested, current = {}, {}, None
    for line in result.output.splitlines():
        if not line.startswith(" "):
            current = line.split()[0]
            sections[current], nested[current] = {}, {}
        else:
            head, _, desc = line.strip().partition("  ")  # "key = default  description", or "key  description"
            key, _, default = head.partition(" = ")
            (sections if line[4] != " " else nested)[current][key] = f"{default}  {desc}" if desc else default
    configs = {name: cls.Config for name, cls in load_passes().items()}
    configs.update(calibration=CalibrationConfig, bench=BenchConfig)
    assert set(sections) == set(configs)
    for name, config in configs.items():
        assert list(sections[name]) == list(config.model_fields), name
        undescribed = [k for k, rest in {**sections[name], **nested[name]}.items() if "  " not in rest]
        assert undescribed == [], (name, undescribed)
    # bounds a value must keep, after the description
    opset = sections["onnx"]["opset"]
    assert opset.startswith("20  ONNX opset") and opset.endswith("(>= 18, <= 23)")
    assert sections["ort"]["repeats"].endswith("medians compared (> 2)")
    assert nested["openvino"]["int8.mixed.max_rounds"].startswith("3  ")
    assert nested["ort"]["int8.static.mixed.search_batches"].startswith("4  ")
    assert nested["antgmm"]["deploy.runtime"].startswith("'openvino'  ")
    assert list(nested["tensorrt"]) == ["batch.min", "batch.opt", "batch.max", "seq.min", "seq.opt", "seq.max"]
    # a docstring's first sentence, wrapped over two lines, is printed whole
    wanda = next(line for line in result.output.splitlines() if line.startswith("wanda "))
    assert wanda.endswith("No weight update. Block-sequential.")


def test_a_closed_output_pipe_is_an_interruption_not_an_internal_error():
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lmmc"), "passes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # like `lmmc passes | head -0`
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "internal error" not in err and "Traceback" not in err


def test_a_library_that_exits_on_a_closed_pipe_is_an_interruption_not_a_missed_gate():
    """NNCF's progress display (rich) meets a closed pipe by exiting 1, lmmc's code for a missed gate: a compile
    piped into `head -1` ended as if validation had failed."""
    script = ("import rich.console\nfrom lmmc.cli import main\n"
              "main.command('closed')(lambda: rich.console.Console().on_broken_pipe())\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", script, "closed"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr


def test_progress_bars_in_a_log_draw_a_frame_every_30_seconds():
    """Off a terminal tqdm wrote a frame ten times a second: a 15-minute distillation put thousands in a log."""
    script = ("import time\nfrom lmmc.cli import main\n"  # tqdm imported by the command, as the passes import it
              "main.command('loop')(lambda: [time.sleep(0.01) for _ in __import__('tqdm').tqdm(range(200))])\n"
              "main()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    proc = subprocess.run([sys.executable, "-c", script, "loop"], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    frames = proc.stderr.count(b"\r")  # bytes: text mode reads a carriage return as a new line
    assert frames <= 3 and b"200/200" in proc.stderr, proc.stderr


def test_an_error_raised_under_an_open_progress_bar_starts_its_own_line():
    """In a log the message was glued to the bar's last frame, so `grep '^error'` found nothing."""
    script = ("from lmmc.cli import main\nfrom lmmc.errors import LmmcError\n"
              "def fail():\n    bar = __import__('tqdm').tqdm(total=5, desc='calibrating')\n    bar.update(2)\n"
              "    raise LmmcError('the data is bad')\n"
              "main.command('fail')(fail)\nmain()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    proc = subprocess.run([sys.executable, "-c", script, "fail"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "calibrating" in proc.stderr and "\nerror: the data is bad\n" in proc.stderr, repr(proc.stderr)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_a_commands_help_reads_under_an_ascii_locale(flag):
    """--help was let through the locale check and -h, listed beside it, was refused with exit 2."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    proc = subprocess.run([str(Path(sys.executable).parent / "lmmc"), "compile", flag], env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: lmmc compile"), proc.stderr


@pytest.mark.parametrize("where", ["an ASCII locale", "a removed directory"])
def test_a_process_without_utf8_text_or_a_current_directory_is_told_what_to_fix(tmp_path, where):
    """Under LC_ALL=C without UTF-8 mode NNCF's progress output crashed every OpenVINO INT8 export (exit 3), and
    non-ASCII names were read as mojibake; in a removed directory torch failed to import with a native error."""
    env, cwd = {**os.environ}, tmp_path / "here"
    cwd.mkdir()
    if where == "an ASCII locale":
        env.update(LC_ALL="C", PYTHONUTF8="0")
        message = "(its locale), and lmmc's recipes, data, file names and outputs are UTF-8; run it in Python's UTF-8 mode"
    else:
        message = "the current directory no longer exists"
    lmmc = f"{Path(sys.executable).parent / 'lmmc'} passes"
    command = lmmc if where == "an ASCII locale" else f"rmdir '{cwd}' && exec {lmmc}"  # the shell stays in it
    proc = subprocess.run(["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8",
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    assert proc.stdout == ""


def test_summary_table_without_latency_prints_dashes_not_nan():
    from lmmc.cli import summary_table

    tower = {"cosine_mean": 0.91234, "cosine_min": 0.5, "runtime_max_abs_diff": {"onnx": 2e-6},
             "runtime_output_scale": {"onnx": 4.0}}
    report = {"validation": {"towers": {"text": tower}, "gates": []}, "sparsity": {"sparsity": 0.5},
              "parameters": {"teacher": 10, "student": 10}, "validated": True}
    row = summary_table(report).splitlines()[1].split()
    # the difference as max_runtime_diff gates it, scaled by the output's size: the absolute one sat beside
    # "runtime max diff ok" above the gate's threshold
    assert row == ["text", "0.9123", "0.5000", "5.0e-07", "-", "-", "-"]
    tower["latency_ms"] = {"teacher": 20.0, "student": 10.0, "speedup": 2.0, "threads": 2}
    assert summary_table(report).splitlines()[1].split()[4:] == ["20.0", "10.0", "2.00x"]


def test_summary_says_what_its_speedup_times_and_gives_a_latency_targets_own():
    """Under a target of 1.5x on OpenVINO INT8 the table printed the fp32 ONNX speed-up (1.85x) and nothing
    else, while the target's gate had measured 1.40x against the teacher's fastest deployment."""
    from lmmc.cli import summary_table

    tower = {"cosine_mean": 0.9, "cosine_min": 0.5, "runtime_max_abs_diff": {"onnx": 2e-6},
             "runtime_output_scale": {"onnx": 1.0}, "latency_ms": {"teacher": 0.6, "student": 0.3, "speedup": 1.85, "threads": 1}}
    target = {"deploy": "openvino-int8-cpu-threads1-batch8-seq32", "target_ms": 0.591, "measured_ms": 0.634,
              "speedup_target": 1.5, "speedup_measured": 1.398, "teacher_ms": 0.886}
    report = {"validation": {"towers": {"text": tower}, "latency_target": target, "gates": []},
              "sparsity": {"sparsity": 0.5}, "parameters": {"teacher": 10, "student": 10}, "validated": True}
    lines = summary_table(report).splitlines()
    assert lines[2] == "(ms: teacher and student as fp32 ONNX in ONNX Runtime, 1 thread)"
    assert lines[3] == ("latency target on openvino-int8-cpu-threads1-batch8-seq32: student 0.634 ms against a "
                        "target of 0.591 ms; speed-up 1.40x measured, 1.50x asked (the teacher's fastest "
                        "deployment there 0.886 ms)")


@pytest.mark.parametrize("where", ["--out", "--calib", "MODEL"])
def test_a_path_that_is_not_utf8_is_one_error_before_anything_is_written(tmp_path, monkeypatch, where):
    """The dry run passed it; the run then failed writing ONNX (or the report) with a traceback, exit 1, and
    the crash log itself failed to write."""
    monkeypatch.chdir(tmp_path)
    bad = os.fsdecode(b"n\xffme")
    model = save_tiny("bert", tmp_path / "teacher")
    if where == "MODEL":  # saved where tokenizers can write, then named so
        model = model.rename(tmp_path / bad)
    (tmp_path / "calib.txt").write_text("\n".join(f"the house number {spelled(i)}" for i in range(400)))
    if where == "--calib":
        shutil.copy(tmp_path / "calib.txt", tmp_path / bad)
    recipe = write_recipe(tmp_path, {"calibration": {"path": "calib.txt"}, "passes": [{"magnitude": {"sparsity": 0.5}}],
                                     "validate": False})
    args = ["compile", str(model), "-r", str(recipe), "-o", bad if where == "--out" else "out"]
    args += ["--calib", bad] if where == "--calib" else []
    before = sorted(os.listdir(tmp_path))
    for dry in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, args + dry)
        assert result.exit_code == 2, result.output
        assert "holds the byte 0xff, which is not UTF-8 text" in result.output, result.output
        assert sorted(os.listdir(tmp_path)) == before


def test_a_file_too_large_for_its_disk_is_the_users_to_fix_not_a_bug(tmp_path, monkeypatch):
    """`ulimit -f`, or a file over FAT32's 4 GiB, fails a write with EFBIG: said as such, exit 2, not an
    internal error (exit 3) with a crash log."""
    import errno

    import lmmc.bench
    import lmmc.report_html

    def too_large(*args, **kwargs):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(tmp_path / "big.onnx"))
    monkeypatch.setattr(lmmc.report_html, "write_report_html", too_large)
    monkeypatch.setattr(lmmc.bench, "bench", too_large)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert (f"error: cannot write '{tmp_path / 'report.html'}': the file is too large for the disk or the file-size "
            f"limit ('ulimit -f')") in " ".join(result.output.split())
    result = CliRunner().invoke(main, ["bench", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert (f"error: writing '{tmp_path / 'big.onnx'}' failed (File too large); use a disk that takes files this "
            f"large, or raise the file-size limit ('ulimit -f'), then run the command again"
            ) in " ".join(result.output.split())
    assert "internal error" not in result.output

    def full(*args, **kwargs):  # a native library's write (bench's teacher export in TMPDIR) names no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(lmmc.bench, "bench", full)
    result = CliRunner().invoke(main, ["bench", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert (f"error: writing a file (no name given: likely in the temporary folder {tempfile.gettempdir()}, which "
            f"TMPDIR moves) failed (No space left on device); free some space") in " ".join(result.output.split())


def _stuck_in_c() -> None:
    """Block for ever where no Python signal handler can run: relocking a plain pthread mutex."""
    import ctypes

    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed: a default (non-recursive) mutex
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)


@pytest.mark.parametrize("while_", ["a command runs", "signals are held"])
def test_a_child_forked_while_sigterm_is_handled_dies_on_terminate(while_):
    """OpenVINO's telemetry forks a child per event; one forked while a resolver lock was held blocked in C
    for ever, ignored terminate() through the command's inherited handler, and the finished compile waited.
    Signals are held while OpenVINO converts a model, with a handler of their own."""
    import multiprocessing

    from lmmc import process_state

    previous = signal.signal(signal.SIGTERM, process_state.interrupt if while_ == "a command runs" else lambda *a: None)
    try:
        child = multiprocessing.get_context("fork").Process(target=_stuck_in_c, daemon=True)
        child.start()
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        time.sleep(0.5)
        child.terminate()
        child.join(10)
        assert child.exitcode == -signal.SIGTERM
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def test_the_lmmc_command_ignores_sigterm_once_its_command_has_ended():
    """A SIGTERM in the slow interpreter exit after a command's last line killed the process: 143, not 0."""
    script = ("import atexit, signal, sys\n"
              "from lmmc.cli import run\n"
              "atexit.register(lambda: print('SIGTERM at exit:', int(signal.getsignal(signal.SIGTERM))))\n"
              "sys.argv = ['lmmc', 'passes']\n"
              "run()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"SIGTERM at exit: {int(signal.SIG_IGN)}"


def test_a_crash_log_that_no_folder_takes_is_printed(monkeypatch, capsys):
    """The crash handler failed as the crash had (no temporary folder): a second traceback, exit 1."""
    import tempfile

    from lmmc import cli

    def nowhere():
        raise FileNotFoundError(2, "No usable temporary directory found")

    monkeypatch.setattr(tempfile, "gettempdir", nowhere)
    try:
        raise ValueError("the first crash")
    except ValueError:
        assert cli._crash_log() is None
    assert "ValueError: the first crash" in capsys.readouterr().err
