"""The command line: whole compiles of tiny models, and bad input -> one clear error, exit 2,
nothing left behind."""

import json

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from lmmc.cli import main
from tests.conftest import CORPUS, save_preprocessors, save_tiny, tiny_model

TINY_RECIPE = {
    "calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
    "passes": [{"wanda": {"sparsity": 0.5}}],
    "export": ["onnx"],
    "validate": {"max_runtime_diff": 1e-4, "latency_batch": 2, "latency_seq": 16, "repeats": 3, "threads": 1},
}


def write_recipe(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_compile_tiny_model_end_to_end(tmp_path, kind):
    model_dir = save_tiny(kind, tmp_path / "teacher")
    out = tmp_path / "out"
    result = run("compile", model_dir, "--recipe", write_recipe(tmp_path, TINY_RECIPE), "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    towers = report["validation"]["towers"]
    assert set(towers) == ({"text"} if kind == "bert" else {"text", "vision"})
    for name, tower in towers.items():
        assert max(tower["runtime_max_abs_diff"].values()) <= 1e-4
        assert (out / "onnx" / f"{name}.onnx").is_file()
        assert tower["latency_ms"]["teacher"] > 0
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["passes"][0]["name"] == "wanda" and report["passes"][0]["config"]["sparsity"] == 0.5
    assert report["passed"] is True
    if kind == "clip":
        assert report["validation"]["task_metric"]["name"].startswith("zero-shot")
    # the saved student holds exactly the pruned weights
    weights = load_file(out / "student" / "model.safetensors")
    for name, sp in report["sparsity"]["sparsity_per_layer"].items():
        assert float((weights[name] == 0).float().mean()) == pytest.approx(sp)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_missed_gate_exits_1_with_complete_output(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**TINY_RECIPE, "validate": {**TINY_RECIPE["validate"], "max_runtime_diff": 1e-12}}
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)), "-o", str(out)])
    assert result.exit_code == 1
    assert "validation gate missed: text: runtime max abs diff" in result.output
    assert json.loads((out / "report.json").read_text())["passed"] is False


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    model_dir = save_tiny("siglip", tmp_path / "teacher")
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run("compile", model_dir, "-r", recipe, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["adapter"] == "siglip"
    assert [s["pass"] for s in plan["steps"]] == ["wanda", "onnx", "validate"]
    assert plan["samples"] == {"calibration": 8, "held_out": 32} and plan["validated"] is True
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _bad_cases(tmp_path):
    good = save_tiny("bert", tmp_path / "teacher")
    nocfg = tmp_path / "noconfig"
    nocfg.mkdir()
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
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
        "unknown pass": ([good, "-r", write_recipe(tmp_path, {**TINY_RECIPE, "passes": ["sparsify"]}, "a.yaml")], "unknown pass 'sparsify'"),
        "unknown key": ([good, "-r", write_recipe(tmp_path, {**TINY_RECIPE, "passes": [{"wanda": {"ratio": 0.5}}]}, "b.yaml")], "ratio: unknown key"),
        "sparsity outside [0, 1)": ([good, "-r", write_recipe(tmp_path, {**TINY_RECIPE, "passes": [{"wanda": {"sparsity": 1.5}}]}, "c.yaml")], "sparsity must be in [0, 1)"),
        "empty calibration file": ([good, "-r", write_recipe(tmp_path, real, "d.yaml"), "--calib", empty], "holds no samples"),
        "missing recipe": ([good, "-r", tmp_path / "none.yaml"], "recipe"),
        "output exists": ([good, "-r", recipe, "--out-exists"], "already exists; choose another --out or pass --force"),
    }, exists


@pytest.mark.parametrize("case", ["missing path", "no config.json", "unsupported model_type", "unknown pass",
                                  "unknown key", "sparsity outside [0, 1)", "empty calibration file",
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
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_force_replaces_existing_output(tmp_path):
    model_dir = save_tiny("vit", tmp_path / "teacher")
    out = tmp_path / "out"
    (out / "student").mkdir(parents=True)
    (out / "student" / "lmmc.json").write_text("{}")  # an earlier lmmc output, which --force may replace
    (out / "stale.txt").write_text("old")
    recipe = {**TINY_RECIPE, "validate": {**TINY_RECIPE["validate"], "latency": False}}
    result = run("compile", model_dir, "-r", write_recipe(tmp_path, recipe), "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    assert (out / "onnx" / "vision.onnx").is_file()


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
    assert json.loads(result.output)["calibration"] == str(CORPUS)
