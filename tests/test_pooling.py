"""A sentence-transformers teacher is pooled as its modules.json says (CLS, max, mean, last token, ...):
lmmc's embeddings match sentence-transformers' own, the student carries the pooling into its saved
directory and its ONNX graph, and a module lmmc cannot carry is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentence_transformers as st
import torch
import yaml
from click.testing import CliRunner

from lmmc.adapters import TowerModule
from lmmc.cli import main
from lmmc.errors import LmmcError
from lmmc.modelio import load_teacher
from lmmc.pooling import read_modules
from lmmc.runtime import open_dir
from tests.conftest import save_tiny

TEXTS = ["the water is cold", "a man was on the road and the house of the man", "python", "data of a function"]
_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
         "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
         "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


def write_modules(path: Path, modes: list[str], extra: list[dict] | None = None) -> Path:
    """Turn a saved BERT directory into a sentence-transformers one pooling with `modes`."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               *(extra or [])]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, **{key: mode in modes for mode, key in _KEYS.items()}}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    return path


def lmmc_embeddings(model, adapter, preprocessor) -> torch.Tensor:
    enc = preprocessor["tokenizer"](TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return adapter.towers[0].embed(model, {"input_ids": enc["input_ids"],
                                              "attention_mask": enc["attention_mask"]})[1]


@pytest.mark.parametrize("modes", [["cls"], ["max"], ["mean"], ["mean_sqrt_len"], ["weightedmean"],
                                   ["lasttoken"], ["cls", "mean"]])
def test_the_teacher_pools_as_sentence_transformers_does(tmp_path, modes):
    path = write_modules(save_tiny("bert", tmp_path / "m"), modes)
    model, adapter, preprocessor = load_teacher(str(path))
    ours = lmmc_embeddings(model, adapter, preprocessor)
    theirs = st.SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert model.config.sentence_pooling == modes
    assert ours.shape == theirs.shape == (len(TEXTS), 32 * len(modes))
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_without_modules_json_a_bert_is_mean_pooled(tmp_path):
    path = save_tiny("bert", tmp_path / "m")
    model, adapter, preprocessor = load_teacher(str(path))
    enc = preprocessor["tokenizer"](TEXTS, padding=True, return_tensors="pt")
    hidden = model(**enc).last_hidden_state.detach()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    assert getattr(model.config, "sentence_pooling", None) is None
    assert torch.allclose(lmmc_embeddings(model, adapter, preprocessor), (hidden * mask).sum(1) / mask.sum(1),
                          atol=1e-6)


def test_a_compiled_cls_student_deploys_the_cls_embedding_and_loads_in_sentence_transformers(tmp_path):
    teacher = write_modules(save_tiny("bert", tmp_path / "teacher"), ["cls"],
                            [{"idx": 2, "name": "2", "path": "2_Normalize",
                              "type": "sentence_transformers.models.Normalize"}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "calibration": {"random": True, "samples": 16, "eval_samples": 32, "batch_size": 8, "max_length": 32},
        "passes": [{"magnitude": {"sparsity": 0.3}}],
        "export": ["onnx"], "validate": {"latency": False, "max_runtime_diff": 1e-4}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["text"]["pooling"] == ["cls"]
    student = out / "student"
    assert json.loads((student / "config.json").read_text())["sentence_pooling"] == ["cls"]
    assert (student / "1_Pooling" / "config.json").read_text() == (teacher / "1_Pooling" / "config.json").read_text()
    assert (student / "2_Normalize").is_dir()
    assert manifest["towers"]["text"]["normalized"] is True
    # The same student through sentence-transformers (CLS, normalised) and through the ONNX artifact.
    theirs = st.SentenceTransformer(str(student), device="cpu").encode(TEXTS)
    ours = open_dir(out).encode(TEXTS)
    assert np.abs(ours - theirs).max() < 1e-4
    # ...and not the mean, which the sparse student's CLS embedding is far from.
    model, adapter, pre = load_teacher(str(student))
    model.config.sentence_pooling = ["mean"]
    mean = torch.nn.functional.normalize(lmmc_embeddings(model, adapter, pre), dim=-1).numpy()
    assert np.abs(ours - mean).max() > 0.05


def test_a_dot_product_model_deploys_its_embedding_unnormalised(tmp_path):
    """Without a Normalize module sentence-transformers returns the pooled embedding as it is, and a
    dot-product model ranks by its norm: every artifact gives that embedding, not a unit vector."""
    teacher = write_modules(save_tiny("bert", tmp_path / "teacher"), ["mean"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "calibration": {"random": True, "samples": 16, "eval_samples": 32, "batch_size": 8, "max_length": 32},
        "passes": [{"magnitude": {"sparsity": 0.3}}],
        "export": ["onnx", {"openvino": {"int8": False}}],
        "validate": {"latency": False, "max_runtime_diff": 1e-4, "max_norm_error": 10.0}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["towers"]["text"]["normalized"] is False
    student = out / "student"
    assert json.loads((student / "config.json").read_text())["sentence_normalize"] is False
    theirs = st.SentenceTransformer(str(student), device="cpu").encode(TEXTS)
    norms = np.linalg.norm(theirs, axis=1)
    assert np.abs(norms - 1).min() > 0.1, norms
    for backend in ("onnxruntime", "openvino"):
        ours = open_dir(out, backend=backend).encode(TEXTS)
        assert np.abs(ours - theirs).max() < 1e-4 * norms.max(), backend
    # Validation reports how the student's norms follow the teacher's, which cosine cannot see.
    report = json.loads((out / "report.json").read_text())
    ratio = report["validation"]["towers"]["text"]["norm_ratio"]
    model, adapter, pre = load_teacher(str(teacher))
    enc = pre["tokenizer"](TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        t_norm = TowerModule(model, adapter.towers[0], deployed=True)(enc["input_ids"], enc["attention_mask"])[1].norm(dim=-1)
    assert ratio["min"] <= ratio["mean"] <= ratio["max"]
    assert 0.2 < ratio["mean"] < 5 and abs(ratio["mean"] - 1) > 1e-4
    assert not np.allclose(norms, t_norm.numpy(), atol=1e-4)  # the magnitude pruning moved the norms
    gate = next(g for g in report["validation"]["gates"] if g["name"] == "text: norm to teacher's, max error")
    assert gate["value"] == pytest.approx(max(1 - ratio["min"], ratio["max"] - 1)) and gate["passed"]
    # Each deployed artifact is held to the same gate: its norms are what users rank by.
    (ir,) = [e for e in report["validation"]["exports"] if e["backend"] == "openvino"]
    assert ir["norm_ratio"] == pytest.approx(ratio, abs=1e-4)
    ir_gate = next(g for g in report["validation"]["gates"]
                   if g["name"] == f"text: openvino fp32 {ir['variant']}: norm to teacher's, max error")
    assert ir_gate["value"] == pytest.approx(max(1 - ir["norm_ratio"]["min"], ir["norm_ratio"]["max"] - 1))

    # The same gate below the error it measured fails the compile; cosine alone would have passed it.
    strict = yaml.safe_load(recipe.read_text())
    strict["validate"].update(max_norm_error=gate["value"] / 2, min_cosine=0.5)
    recipe.write_text(yaml.safe_dump(strict))
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(recipe), "-o", str(tmp_path / "strict")])
    assert result.exit_code == 1 and "gate missed: text: norm to teacher's, max error" in result.output, result.output
    assert "text: cosine to teacher" not in result.output.split("gate missed")[1]


def test_a_norm_gate_on_a_normalised_embedding_is_refused(tmp_path):
    teacher = write_modules(save_tiny("bert", tmp_path / "teacher"), ["mean"],
                            [{"idx": 2, "name": "2", "path": "2_Normalize",
                              "type": "sentence_transformers.models.Normalize"}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True}, "passes": [{"magnitude": {"sparsity": 0.3}}],
                                      "validate": {"max_norm_error": 0.1}}))
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "remove max_norm_error" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_student_pooled_the_teachers_way_is_what_validation_measures(tmp_path):
    path = write_modules(save_tiny("bert", tmp_path / "m"), ["cls"])
    model, adapter, preprocessor = load_teacher(str(path))
    enc = preprocessor["tokenizer"](TEXTS, padding=True, return_tensors="pt")
    runner = TowerModule(model, adapter.towers[0])
    with torch.no_grad():
        pooled = runner(enc["input_ids"], enc["attention_mask"])[1]
        cls = torch.nn.functional.normalize(model(**enc).last_hidden_state[:, 0], dim=-1)
    assert torch.allclose(pooled, cls, atol=1e-6)


@pytest.mark.parametrize("module, words", [
    ({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}, "Dense"),
    ({"idx": 2, "name": "2", "path": "2_X", "type": "mypackage.Whitening"}, "Whitening"),
])
def test_a_module_lmmc_cannot_carry_is_refused_before_loading(tmp_path, module, words):
    path = write_modules(save_tiny("bert", tmp_path / "m"), ["mean"], [module])
    with pytest.raises(LmmcError, match=words):
        read_modules(str(path))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True}, "passes": [{"magnitude": {"sparsity": 0.3}}],
                                      "export": ["onnx"]}))
    result = CliRunner().invoke(main, ["compile", str(path), "-r", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert words in result.output and "Transformer, Pooling and Normalize" in result.output
    assert not (tmp_path / "out").exists()


def test_a_pooling_without_its_config_or_with_none_set_is_refused(tmp_path):
    path = write_modules(save_tiny("bert", tmp_path / "m"), [])
    with pytest.raises(LmmcError, match="no pooling mode"):
        read_modules(str(path))
    (path / "1_Pooling" / "config.json").unlink()
    with pytest.raises(LmmcError, match="1_Pooling/config.json"):
        read_modules(str(path))
