"""AntGMM's hidden-size stage: residual-stream surgery, its cost, channel importance, the least-squares
map back to the teacher's width, reload, ONNX and OpenVINO export."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lmmc
from lmmc.adapters import TowerModule, block_linears, block_list, example_inputs, get_adapter, input_names
from lmmc.artifact import Artifact
from lmmc.cost import blocks_cost, hidden_channel_cost
from lmmc.data import random_calibration
from lmmc.errors import LmmcError
from lmmc.export.onnx import export_tower
from lmmc.export.openvino import to_openvino
from lmmc.hidden import activation_hidden, fit_restore_, taylor_hidden
from lmmc.modelio import make_student, save_student
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig
from lmmc.runtime import load
from lmmc.student import read_structure
from lmmc.surgery import WidthRestore, find_restore, keep_blocks_, keep_heads_, keep_hidden_

CPU = torch.device("cpu")
DROP = [1, 5, 6, 13, 20, 21, 30]  # of 32 hidden channels
KEEP = [c for c in range(32) if c not in DROP]


def calib_for(model: nn.Module, samples: int = 16):
    cfg = CalibrationConfig(random=True, samples=samples, eval_samples=4, batch_size=8)
    return random_calibration(cfg, model, get_adapter(model.config.model_type))


def subset_norm_hook(keep: list[int]):
    """Forward hook making a full-width LayerNorm normalise over the kept channels only, zeros elsewhere:
    what a LayerNorm narrowed to those channels computes, laid out at the full width."""
    idx = torch.tensor(keep)

    def hook(mod: nn.LayerNorm, args, _out):
        x = args[0]
        y = torch.zeros_like(x)
        y[..., idx] = F.layer_norm(x[..., idx], (len(idx),), mod.weight[idx], mod.bias[idx], mod.eps)
        return y

    return hook


def text_model(kind: str) -> nn.Module:
    if kind in ("bert", "mpnet"):
        return tiny_model(kind)
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=64)
    return transformers.DistilBertModel(config).eval()


@pytest.mark.parametrize("kind", ["bert", "distilbert", "mpnet"])
def test_surgery_equals_the_full_model_with_subset_layernorms(kind: str, tmp_path: Path, one_thread) -> None:
    """The narrowed model computes exactly what the full one does when every LayerNorm over the stream
    normalises over the kept channels and zeroes the rest: removed channels stay zero in the residual
    stream, so every reader's dropped columns see only zeros."""
    reference, cut = text_model(kind), text_model(kind)
    tower = get_adapter(kind).towers[0]
    for mod in reference.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.register_forward_hook(subset_norm_hook(KEEP))
    keep_hidden_(cut, tower, KEEP)
    inputs = example_inputs(cut, tower, batch=3, seq=11)
    inputs[1][1, 6:] = 0
    with torch.no_grad():
        want = TowerModule(reference, tower)(*inputs)
        got = TowerModule(cut, tower)(*inputs)
    for a, b in zip(want, got):
        assert a.shape == b.shape and b.shape[-1] == 32  # the map back restores the teacher's width
        assert (a - b).abs().max() <= 1e-5
    save_student(cut, {}, tmp_path, {})
    with torch.no_grad():
        again = TowerModule(lmmc.load_student(tmp_path), tower)(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    assert cut.embeddings.word_embeddings.weight.shape == (99, 25)
    assert cut.embeddings.position_embeddings.weight.shape[1] == 25
    for block in block_list(cut, tower)[1]:
        lin = {r: m for r, (_, m) in block_linears(block, tower).items()}
        assert [lin[r].in_features for r in ("q", "k", "v", "fc1")] == [25] * 4
        assert [lin[r].out_features for r in ("o", "fc2")] == [25] * 2
    restore = find_restore(cut, tower)
    assert isinstance(restore, WidthRestore) and restore.norm.weight.shape == (25,)
    assert (restore.proj.in_features, restore.proj.out_features) == (25, 32)
    if kind == "bert":
        assert cut.pooler.dense.in_features == 32  # the pooler reads the restored width


def test_a_second_cut_narrows_the_map_back_and_counts_every_channel_cost() -> None:
    model = tiny_model("bert")
    tower = get_adapter("bert").towers[0]
    keep_hidden_(model, tower, KEEP)
    blocks = block_list(model, tower)[1]
    before = blocks_cost(model, get_adapter("bert"), {"text": 8}, {"text": 16})["text"]
    unit = hidden_channel_cost(blocks, tower, 16, teacher_width=32)
    keep_hidden_(model, tower, range(24))
    after = blocks_cost(model, get_adapter("bert"), {"text": 8}, {"text": 16})["text"]
    assert find_restore(model, tower).proj.in_features == 24
    assert before.params - after.params == unit.params
    assert before.flops - after.flops == unit.flops


def test_cost_model_counts_the_map_back_as_torch_flop_counter_does() -> None:
    model = tiny_model("bert")
    tower = get_adapter("bert").towers[0]
    keep_hidden_(model, tower, KEEP)
    keep_heads_(block_list(model, tower)[1][1], tower, 8, [0, 3])
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 99, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    counted = sum(sum(counter.get_flop_counts()[f"BertModel.encoder.layer.{i}"].values()) for i in range(2))
    cost = blocks_cost(model, get_adapter("bert"), {"text": 8}, {"text": 16})["text"]
    assert cost.flops * 2 == counted
    assert cost.params == sum(p.numel() for p in model.encoder.layer.parameters())


@pytest.mark.parametrize("method", ["taylor", "activation"])
def test_a_channel_no_block_reads_scores_zero_and_ranks_last(method: str, one_thread) -> None:
    teacher = tiny_model("bert")
    student = copy.deepcopy(teacher)
    tower = get_adapter("bert").towers[0]
    with torch.no_grad():
        for block in student.encoder.layer:
            for role in ("q", "k", "v", "fc1"):
                block_linears(block, tower)[role][1].weight[:, 7] = 0
    calib = calib_for(student)
    if method == "taylor":
        score = taylor_hidden(student, teacher, tower, calib, CPU, temperature=0.1)
    else:
        score = activation_hidden(student, tower, calib, CPU)
    assert score[7] == 0 and score.argmin() == 7
    assert (score[torch.arange(32) != 7] > 0).all()


def test_least_squares_map_back_beats_the_kept_channels_alone(one_thread) -> None:
    teacher = tiny_model("bert")
    student = make_student(teacher)
    tower = get_adapter("bert").towers[0]
    calib = calib_for(teacher, samples=32)
    keep_hidden_(student, tower, KEEP)

    def error() -> float:
        total = 0.0
        with torch.no_grad():
            for batch in calib.calib_batches("text"):
                inputs = {n: batch[n] for n in input_names(tower)}
                s, t = tower.embed(student, inputs)[0], tower.embed(teacher, inputs)[0]
                total += float((s - t)[inputs["attention_mask"].bool()].pow(2).sum())
        return total

    identity = error()
    fit = fit_restore_(student, teacher, tower, calib, CPU)
    assert error() < 0.8 * identity
    assert 0 <= fit["relative_residual"] < 1


def run_antgmm(art: Artifact, **config: Any) -> dict[str, Any]:
    cls = get_pass("antgmm")
    step = cls(cls.Config(**config))
    step.check(art.available())
    return step.run(art)


def hidden_student(keep: float = 0.5) -> tuple[Artifact, dict[str, Any]]:
    teacher = tiny_model("bert")
    art = Artifact(model_ref="bert", adapter=get_adapter("bert"), teacher=teacher, student=make_student(teacher),
                   calib=calib_for(teacher))
    metrics = run_antgmm(art, keep=keep, seq_len=16, shares={"ffn": 0.3, "heads": 0.3, "hidden": 0.4})
    return art, metrics


def test_antgmm_hidden_stage_meets_the_budget_and_records_the_shift(one_thread) -> None:
    art, metrics = hidden_student()
    assert metrics["kept"] == pytest.approx(0.5, abs=0.03)
    head_dims = {"text": 8}
    before = blocks_cost(art.teacher, art.adapter, head_dims, metrics["tokens"])["text"]
    after = blocks_cost(art.student, art.adapter, head_dims, metrics["tokens"])["text"]
    assert after.flops / before.flops == pytest.approx(metrics["kept"])
    width = metrics["structure"]["text"]["hidden"]
    assert 1 <= width < 32
    (segment,) = [s for s in metrics["segments"] if s["stage"] == "hidden"]
    shift = segment["towers"]["text"]
    assert shift["hidden"] == width and 32 - width == segment["removed"]
    for key in ("calib_cosine_before", "calib_cosine_cut", "calib_cosine_fitted"):
        assert -1 <= shift[key] <= 1
    out = TowerModule(art.student, art.adapter.towers[0])(*example_inputs(art.student, art.adapter.towers[0]))
    assert out[1].shape == (2, 32) and torch.isfinite(out[1]).all()


def test_hidden_student_reloads_bit_equal_and_exports_to_onnx_and_openvino(tmp_path: Path, one_thread) -> None:
    art, _ = hidden_student()
    model, tower = art.student, art.adapter.towers[0]
    save_student(model, {}, tmp_path / "student", {})
    reloaded = lmmc.load_student(tmp_path / "student")
    assert read_structure(reloaded, art.adapter) == read_structure(model, art.adapter)
    inputs = example_inputs(model, tower, batch=3, seq=11)
    inputs[1][2, 4:] = 0
    with torch.no_grad():
        ref = TowerModule(model, tower)(*inputs)
        again = TowerModule(reloaded, tower)(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(ref, again))
    onnx_path = tmp_path / "text.onnx"
    export_tower(reloaded, tower, onnx_path)
    ir = to_openvino(onnx_path, tmp_path / "text.xml")
    feed = {n: t.numpy() for n, t in zip(input_names(tower), inputs)}
    for path in (onnx_path, ir):
        got = load(path, threads=1).run(feed)
        assert np.abs(got["last_hidden_state"] - ref[0].numpy()).max() <= 1e-4
        assert np.abs(got["pooled_embedding"] - ref[1].numpy()).max() <= 1e-4


def test_hidden_share_on_a_family_without_it_is_one_clear_error() -> None:
    teacher = tiny_model("clip")
    art = Artifact(model_ref="clip", adapter=get_adapter("clip"), teacher=teacher, student=make_student(teacher),
                   calib=calib_for(teacher))
    before = {k: v.clone() for k, v in art.student.state_dict().items()}
    with pytest.raises(LmmcError, match="BERT-family text encoders only.*drop 'hidden'"):
        run_antgmm(art, keep=0.5, seq_len=16, shares={"ffn": 0.5, "hidden": 0.5})
    assert all(torch.equal(before[k], v) for k, v in art.student.state_dict().items())


def test_removing_the_block_that_holds_the_map_back_is_refused() -> None:
    model = tiny_model("bert")
    tower = get_adapter("bert").towers[0]
    keep_hidden_(model, tower, KEEP)
    with pytest.raises(LmmcError, match="remove blocks before hidden channels"):
        keep_blocks_(model, tower, [0])
    keep_blocks_(model, tower, [1])  # the last block stays: allowed
    assert find_restore(model, tower) is not None
