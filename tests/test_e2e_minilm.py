"""End-to-end on the real MiniLM teacher: the demo compile, and Wanda against magnitude."""

import json

import numpy as np
import pytest

from lmmc.artifact import Artifact
from lmmc.compile import compile_model
from lmmc.data import load_calibration
from lmmc.export.validate import cosine, torch_outputs
from lmmc.modelio import load_teacher, make_student
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import load_recipe
from tests.conftest import CORPUS, REPO

pytestmark = pytest.mark.e2e
DEMO = REPO / "samples" / "recipes" / "minilm-wanda50.yaml"


def test_demo_compile_meets_the_gates(minilm, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe names its corpus relative to the repository
    out = tmp_path / "out"
    report = compile_model(str(minilm), load_recipe(DEMO), out)
    text = report["validation"]["towers"]["text"]
    assert text["runtime_max_abs_diff"]["last_hidden_state"] <= 1e-4
    assert 0.8 <= text["cosine_mean"] < 1.0
    assert text["held_out_samples"] == 256
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert json.loads((out / "report.json").read_text())["passed"] is True
    assert (out / "student" / "model.safetensors").is_file() and (out / "student" / "tokenizer.json").is_file()
    assert (out / "onnx" / "text.onnx").is_file() and (out / "onnx" / "text.names.json").is_file()


def held_out_cosine(minilm, pass_name: str, sparsity: float) -> float:
    teacher, adapter, pre = load_teacher(str(minilm))
    recipe = load_recipe(DEMO)
    art = Artifact(model_ref=str(minilm), adapter=adapter, teacher=teacher, student=make_student(teacher),
                   preprocessor=pre)
    art.calib = load_calibration(recipe.calibration, str(CORPUS), {"text"}, pre)
    cls = get_pass(pass_name)
    run_pass(cls(cls.Config(sparsity=sparsity)), art)
    tower = adapter.towers[0]
    batches = art.calib.eval_batches("text")
    t = np.concatenate([o[1] for o in torch_outputs(teacher, tower, batches)])
    s = np.concatenate([o[1] for o in torch_outputs(art.student, tower, batches)])
    return float(cosine(t, s).mean())


def test_wanda_beats_magnitude_at_the_same_sparsity(minilm):
    wanda = held_out_cosine(minilm, "wanda", 0.5)
    magnitude = held_out_cosine(minilm, "magnitude", 0.5)
    assert wanda > magnitude + 0.02, (wanda, magnitude)
