"""The activation pass: every FFN's activation swapped, the config rewritten so the student reloads exactly,
and the exports computing the new function."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_TEXT, tiny_model
from pydantic import ValidationError
from torch import nn

import lmmc
from lmmc.adapters import TowerModule, block_linears, block_list, example_inputs, get_adapter, input_names, tower_config
from lmmc.artifact import Artifact
from lmmc.data import random_calibration
from lmmc.errors import LmmcError
from lmmc.export.onnx import export_tower
from lmmc.export.openvino import to_openvino
from lmmc.modelio import make_student, save_student
from lmmc.passes.activation import activation_sites
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig, parse_recipe
from lmmc.resume import WorkArea, describe_inputs
from lmmc.runtime import load


def modernbert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(**TINY_TEXT, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                        cls_token_id=2, sep_token_id=3)
    return get_adapter("modernbert").prepared(transformers.ModernBertModel(cfg)).eval()


def distilbert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=64)
    return get_adapter("distilbert").prepared(transformers.DistilBertModel(cfg)).eval()


def build(kind: str) -> nn.Module:
    return {"modernbert": modernbert, "distilbert": distilbert}.get(kind, lambda: tiny_model(kind))()


def swapped(kind: str, to: str = "relu", towers: list[str] | None = None, refit: float | None = None,
            calib=None) -> tuple[nn.Module, nn.Module, dict]:
    teacher = build(kind)
    adapter = get_adapter(teacher.config.model_type)
    art = Artifact(model_ref=kind, adapter=adapter, teacher=teacher, student=make_student(teacher), calib=calib)
    step = get_pass("activation")
    metrics = step(step.Config(to=to, towers=towers, refit=refit)).run(art)
    return teacher, art.student, metrics


def calibration(kind: str):
    model = build(kind)
    cfg = CalibrationConfig(random=True, samples=64, eval_samples=16, batch_size=16)
    return random_calibration(cfg, model, get_adapter(model.config.model_type))


def outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    adapter = get_adapter(model.config.model_type)
    with torch.no_grad():
        return {tower.name: TowerModule(model, tower)(*example_inputs(model, tower, batch=2, seq=9))[0]
                for tower in adapter.towers}


def reference_with(activation: type[nn.Module], model: nn.Module) -> nn.Module:
    """The model with every FFN activation module replaced by hand, the function the pass must give."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        for attr in ("intermediate_act_fn", "activation_fn", "act", "act_fn", "activation"):
            if isinstance(getattr(module, attr, None), nn.Module):
                setattr(module, attr, activation())
    return ref


@pytest.mark.parametrize("kind", ["bert", "vit", "clip", "siglip", "mpnet", "modernbert", "distilbert"])
def test_every_ffn_computes_relu_and_the_student_reloads_exactly(kind: str, tmp_path: Path, one_thread) -> None:
    teacher, student, metrics = swapped(kind)
    adapter = get_adapter(teacher.config.model_type)
    for tower in adapter.towers:
        assert metrics["activation"][tower.name]["to"] == "relu"
        assert metrics["activation"][tower.name]["modules"] == 2  # one per block of the tiny models
        cfg = tower_config(student, tower)
        assert "relu" in {getattr(cfg, k, None) for k in ("hidden_act", "hidden_activation", "activation")}
    expected, got, before = outputs(reference_with(nn.ReLU, teacher)), outputs(student), outputs(teacher)
    for name in expected:
        assert torch.equal(got[name], expected[name])
        assert (got[name] - before[name]).abs().max() > 1e-3  # the swap changed the function
    # The teacher is untouched: its modules and its config still build GELU.
    assert all(not isinstance(m, nn.ReLU) for m in teacher.modules())
    save_student(student, {}, tmp_path, {"teacher": kind})
    loaded = lmmc.load_student(tmp_path)
    for name, value in outputs(loaded).items():
        assert torch.equal(value, got[name])


def test_a_resumed_compile_gets_the_swapped_student_back(tmp_path: Path) -> None:
    """The work area's saved state rebuilds the student from its config: a resume after the swap goes on
    with ReLU, not with the teacher's GELU under the new weights."""
    _, student, _ = swapped("bert")
    area = WorkArea(tmp_path / "out")
    area.claim(describe_inputs("tiny", parse_recipe({"calibration": {"random": True}, "passes": [{"activation": {}}]})),
               resume=False)
    area.save(Artifact("tiny", get_adapter("bert"), tiny_model("bert"), student, workdir=area.output), 1, 1.0)
    back = Artifact("tiny", get_adapter("bert"), tiny_model("bert"), tiny_model("bert"))
    assert area.restore(back) == (1, 1.0)
    assert torch.equal(outputs(back.student)["text"], outputs(student)["text"])
    area.finish()


def test_one_tower_only_leaves_the_other_as_it_was() -> None:
    teacher, student, metrics = swapped("clip", towers=["vision"])
    assert set(metrics["activation"]) == {"vision"}
    assert student.config.text_config.hidden_act == teacher.config.text_config.hidden_act != "relu"
    assert student.config.vision_config.hidden_act == "relu"
    before, after = outputs(teacher), outputs(student)
    assert torch.equal(before["text"], after["text"])
    assert (before["vision"] - after["vision"]).abs().max() > 1e-3


def test_exports_compute_the_swapped_function(tmp_path: Path, one_thread) -> None:
    _, student, _ = swapped("bert")
    tower = get_adapter("bert").tower("text")
    path = tmp_path / "text.onnx"
    export_tower(student, tower, path)
    ir = to_openvino(path, tmp_path / "text.xml")
    inputs = example_inputs(student, tower, batch=3, seq=11)
    inputs[1][1, 6:] = 0
    with torch.no_grad():
        ref = TowerModule(student, tower)(*inputs)[1].numpy()
    feed = {n: t.numpy() for n, t in zip(input_names(tower), inputs)}
    for artifact in (path, ir):
        got = load(artifact).run(feed)["pooled_embedding"]
        np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_refit_brings_the_ffn_back_near_the_old_function(kind: str, one_thread) -> None:
    """The refitted second matrix reads from ReLU what it read from GELU: on held-out inputs the tower's
    output moves far less from the teacher's than after the bare swap."""
    calib = calibration(kind)
    teacher, bare, _ = swapped(kind, calib=calib)
    _, fitted, metrics = swapped(kind, refit=0.001, calib=calib)
    adapter = get_adapter(teacher.config.model_type)
    for tower in adapter.towers:
        left = metrics["activation"][tower.name]["refit_left"]
        assert len(left) == 2 and all(0.0 <= v < 0.5 for v in left)
        names = input_names(tower)
        with torch.no_grad():
            for batch in calib.eval_batches(tower.modality):
                inputs = [batch[n] for n in names]
                ref, out_bare, out_fit = (TowerModule(m, tower)(*inputs)[0] for m in (teacher, bare, fitted))
                err_bare, err_fit = (out_bare - ref).pow(2).mean(), (out_fit - ref).pow(2).mean()
                assert err_fit < 0.25 * err_bare
    # Only the second FFN matrices change, and every FFN still computes ReLU.
    changed = {k for k, v in fitted.state_dict().items() if not torch.equal(v, bare.state_dict()[k])}
    fc2 = {f"{path}.{i}.{block_linears(block, tower)['fc2'][0]}.{w}" for tower in adapter.towers
           for path, blocks in [block_list(fitted, tower)] for i, block in enumerate(blocks)
           for w in ("weight", "bias")}
    assert changed and changed <= fc2
    for tower in adapter.towers:
        for block in block_list(fitted, tower)[1]:
            assert all(isinstance(getattr(module, attr), nn.ReLU) for module, attr in activation_sites(block))


def test_refit_is_refused_for_gated_ffns_and_without_calibration() -> None:
    with pytest.raises(LmmcError, match="FFNs without a gate"):
        swapped("modernbert", refit=0.01, calib=calibration("modernbert"))
    # before anything loads, from the config alone (a dry run)
    with pytest.raises(LmmcError, match="FFNs without a gate"):
        get_pass("activation").Config(refit=0.01).check_model(get_adapter("modernbert"), modernbert().config)
    step = get_pass("activation")
    with pytest.raises(LmmcError, match="refit needs calibration data"):
        step(step.Config(refit=0.01)).check({"student", "teacher"})


def test_bad_config_names_what_is_wrong() -> None:
    step = get_pass("activation")
    with pytest.raises(ValidationError, match="unknown activation 'rleu'"):
        step.Config(to="rleu")
    with pytest.raises(LmmcError, match=r"no tower \['audio'\]"):
        swapped("bert", towers=["audio"])
