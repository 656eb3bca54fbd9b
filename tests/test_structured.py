"""Structured pruning: importance, cost model, global selection, surgery and the AntGMM schedule."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import CORPUS, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from lmmc.adapters import TowerModule, block_linears, block_list, example_inputs, get_adapter, head_dim
from lmmc.artifact import Artifact
from lmmc.cost import blocks_cost
from lmmc.data import load_calibration, random_calibration
from lmmc.errors import LmmcError
from lmmc.importance import activation_importance, gate_hook, taylor_importance
from lmmc.modelio import load_teacher, make_student
from lmmc.pipeline import PASSES, Pass, PassConfig, get_pass, load_passes
from lmmc.recipe import CalibrationConfig, parse_recipe
from lmmc.selection import Unit, select_units
from lmmc.student import read_structure
from lmmc.surgery import keep_blocks_, keep_channels_, keep_heads_

CPU = torch.device("cpu")


def calib_for(model: torch.nn.Module, samples: int = 16):
    cfg = CalibrationConfig(random=True, samples=samples, eval_samples=4, batch_size=8)
    return random_calibration(cfg, model, get_adapter(model.config.model_type))


def tower_outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for tower in get_adapter(model.config.model_type).towers:
            out.extend(TowerModule(model, tower)(*example_inputs(model, tower)))
    return out


def zero_head_(model: torch.nn.Module, block_index: int, head: int) -> None:
    """A constructed layer: one head whose q/k/v rows and output columns are all zero."""
    tower = get_adapter(model.config.model_type).towers[0]
    lin = block_linears(block_list(model, tower)[1][block_index], tower)
    hd = head_dim(model, tower)
    rows = slice(head * hd, (head + 1) * hd)
    with torch.no_grad():
        for role in ("q", "k", "v"):
            lin[role][1].weight[rows] = 0
            lin[role][1].bias[rows] = 0
        lin["o"][1].weight[:, rows] = 0


@pytest.mark.parametrize("method", ["taylor", "activation"])
def test_a_zeroed_head_ranks_last(method: str) -> None:
    teacher = tiny_model("bert")
    student = copy.deepcopy(teacher)
    zero_head_(student, block_index=1, head=2)
    calib = calib_for(student)
    adapter = get_adapter("bert")
    if method == "taylor":
        scores = taylor_importance(student, teacher, adapter, calib, CPU)
    else:
        scores = activation_importance(student, adapter, calib, CPU)
    heads = scores.heads[("text", 1)]
    assert heads[2] == 0
    assert heads.argmin() == 2 and (heads[[0, 1, 3]] > 0).all()
    assert (scores.heads[("text", 0)] > 0).all()  # the untouched layer has no zero score


def test_taylor_block_score_is_the_loss_change_of_removing_the_block() -> None:
    """|∂L/∂gate| must equal what a finite difference of the gated loss says."""
    from lmmc.importance import contrastive_distill_loss

    teacher = tiny_model("bert")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calib = calib_for(student, samples=8)
    adapter = get_adapter("bert")
    tower = adapter.towers[0]
    scores = taylor_importance(student, teacher, adapter, calib, CPU)
    batch = calib.calib_batches("text")[0]
    inputs = [batch["input_ids"], batch["attention_mask"]]
    with torch.no_grad():
        t_emb = TowerModule(teacher, tower)(*inputs)[1]

    def loss_at(gate_value: float) -> float:
        gate = torch.tensor(gate_value, dtype=torch.float64)
        handle = block_list(student, tower)[1][0].register_forward_hook(gate_hook(gate), with_kwargs=True)
        try:
            with torch.no_grad():
                return float(contrastive_distill_loss(TowerModule(student, tower)(*inputs)[1], t_emb, 0.1))
        finally:
            handle.remove()

    eps = 1e-3
    finite_diff = (loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
    assert scores.blocks[("text", 0)] == pytest.approx(abs(finite_diff), rel=2e-2)


def mask_units_(model: torch.nn.Module, tower, block_index: int, heads: list[int], channels: list[int]) -> None:
    """Zero the output-projection columns of the heads and the fc2 columns of the channels: the
    masked units contribute nothing, which is what removing them must reproduce."""
    lin = block_linears(block_list(model, tower)[1][block_index], tower)
    hd = head_dim(model, tower)
    with torch.no_grad():
        for h in heads:
            lin["o"][1].weight[:, h * hd:(h + 1) * hd] = 0
        lin["fc2"][1].weight[:, channels] = 0


def test_surgery_equals_masking_the_same_units(tiny_kind: str) -> None:
    masked = tiny_model(tiny_kind)
    cut = tiny_model(tiny_kind)
    adapter = get_adapter(masked.config.model_type)
    for t, tower in enumerate(adapter.towers):
        for i in range(2):
            drop_heads = [(i + t) % 4, (i + t + 1) % 4] if i == 0 else [3]
            drop_channels = list(range(i, 64, 3 + t))
            mask_units_(masked, tower, i, drop_heads, drop_channels)
            block = block_list(cut, tower)[1][i]
            keep_heads_(block, tower, head_dim(cut, tower), [h for h in range(4) if h not in drop_heads])
            keep_channels_(block, tower, [c for c in range(64) if c not in drop_channels])
        # Depth: a removed block must equal one whose residual update is gated to nothing.
        block_list(masked, tower)[1][0].register_forward_hook(gate_hook(torch.tensor(0.0)), with_kwargs=True)
        keep_blocks_(cut, tower, [1])
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in masked.parameters())
    for a, b in zip(tower_outputs(masked), tower_outputs(cut)):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5


def test_surgery_refuses_to_empty_a_layer() -> None:
    model = tiny_model("bert")
    tower = get_adapter("bert").towers[0]
    block = block_list(model, tower)[1][0]
    with pytest.raises(LmmcError, match="keep at least one"):
        keep_heads_(block, tower, 8, [])
    with pytest.raises(LmmcError, match="out of range"):
        keep_channels_(block, tower, [0, 64])


def test_cost_model_matches_torch_flop_counter() -> None:
    model = tiny_model("bert")
    tower = get_adapter("bert").towers[0]
    blocks = block_list(model, tower)[1]
    keep_heads_(blocks[0], tower, 8, [0, 2, 3])
    keep_channels_(blocks[1], tower, range(23))
    model.set_attn_implementation("eager")  # so the attention products are matmuls the counter sees
    ids = torch.randint(0, 99, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    counted = sum(sum(counter.get_flop_counts()[f"BertModel.encoder.layer.{i}"].values()) for i in range(2))
    cost = blocks_cost(model, get_adapter("bert"), {"text": 8}, {"text": 16})["text"]
    assert cost.flops * 2 == counted  # two sequences
    assert cost.params == sum(p.numel() for p in model.encoder.layer.parameters())


def test_selection_ranks_globally_and_keeps_the_floors() -> None:
    units = [Unit("a", i, s, 1.0) for i, s in enumerate([5.0, 0.1, 0.2, 0.3])]
    units += [Unit("b", i, s, 1.0) for i, s in enumerate([0.05, 0.01, 0.02, 9.0])]
    chosen = select_units(units, remove=5, floors={"a": 1, "b": 2})
    assert sorted((u.group, u.index) for u in chosen.removed) == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)]
    assert chosen.removed_cost == 5
    # Floors protect the best units of "b" (9.0 and 0.05), so at most 3 + 2 units can go.
    greedy = select_units(units, remove=100, floors={"a": 1, "b": 2})
    assert greedy.removable_cost == 5 and greedy.removed_cost == 5


def test_selection_weighs_importance_by_cost() -> None:
    units = [Unit("wide", 0, 1.0, 4.0), Unit("narrow", 0, 0.5, 1.0)]
    chosen = select_units(units, remove=4, floors={})
    assert [(u.group, u.index) for u in chosen.removed] == [("wide", 0)]  # 0.25 per cost beats 0.5


def make_artifact(kind: str, samples: int = 16) -> Artifact:
    teacher = tiny_model(kind)
    adapter = get_adapter(teacher.config.model_type)
    return Artifact(model_ref=kind, adapter=adapter, teacher=teacher, student=make_student(teacher),
                    calib=calib_for(teacher, samples))


def run_antgmm(art: Artifact, **config: Any) -> dict[str, Any]:
    cls = get_pass("antgmm")
    step = cls(cls.Config(**config))
    step.check(art.available())
    return step.run(art)


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_antgmm_meets_the_flop_budget_with_non_uniform_widths(kind: str) -> None:
    art = make_artifact(kind)
    metrics = run_antgmm(art, keep=0.5, seq_len=16)
    assert metrics["kept"] == pytest.approx(0.5, abs=0.03)  # whole units: within a channel or two
    head_dims = {t.name: 8 for t in art.adapter.towers}
    before = blocks_cost(art.teacher, art.adapter, head_dims, metrics["tokens"])
    after = blocks_cost(art.student, art.adapter, head_dims, metrics["tokens"])
    assert sum(c.flops for c in after.values()) / sum(c.flops for c in before.values()) == pytest.approx(metrics["kept"])
    structure = read_structure(art.student, art.adapter)
    widths = [w for t in structure.values() for w in t["ffn"]]
    assert len(set(widths)) > 1 and min(widths) >= 1
    assert all(h >= 1 for t in structure.values() for h in t["heads"])
    for a in tower_outputs(art.student):
        assert torch.isfinite(a).all()


def test_a_keep_per_tower_cuts_each_tower_to_its_own_fraction() -> None:
    art = make_artifact("clip")
    teacher = read_structure(art.teacher, art.adapter)
    metrics = run_antgmm(art, keep={"text": 1.0, "vision": 0.5}, seq_len=16)
    structure = read_structure(art.student, art.adapter)
    assert structure["text"] == teacher["text"]  # 1.0: the tower is left whole
    assert structure["vision"] != teacher["vision"]
    assert metrics["kept_per_tower"]["text"] == 1.0
    assert metrics["kept_per_tower"]["vision"] == pytest.approx(0.5, abs=0.03)
    assert list(metrics["plan"]) == ["vision"]
    both = make_artifact("clip")
    metrics = run_antgmm(both, keep={"text": 0.7, "vision": 0.4}, seq_len=16)
    assert metrics["kept_per_tower"]["text"] == pytest.approx(0.7, abs=0.03)
    assert metrics["kept_per_tower"]["vision"] == pytest.approx(0.4, abs=0.03)
    head_dims = {t.name: 8 for t in both.adapter.towers}
    after = blocks_cost(both.student, both.adapter, head_dims, metrics["tokens"])
    before = blocks_cost(both.teacher, both.adapter, head_dims, metrics["tokens"])
    for name, kept in metrics["kept_per_tower"].items():
        assert after[name].flops / before[name].flops == pytest.approx(kept)


def test_a_tower_kept_at_1_is_left_bit_for_bit_by_the_distillation_between_segments() -> None:
    """The distillation after each cut trained every tower: the text tower kept its structure, and its held-out
    cosine to the teacher fell to 0.74."""
    art = make_artifact("clip")
    run_antgmm(art, keep={"text": 1.0, "vision": 0.5}, seq_len=16, segments=2, distill_steps_per_segment=3,
               distill={"lr": 1e-2, "batch_size": 8, "dev_samples": 4, "eval_every": 0, "keep_best": False,
                        "progress": False, "teacher_cache_mb": 0})
    student, teacher = art.student.state_dict(), art.teacher.state_dict()
    text = [n for n in teacher if n.startswith(("text_model.", "text_projection."))]
    assert text and all(torch.equal(student[n], teacher[n]) for n in text)
    assert any(not torch.equal(student[n], teacher[n]) for n in student if n.startswith("vision_model.encoder.")
               and student[n].shape == teacher[n].shape)


def test_one_budget_that_empties_a_tower_says_so() -> None:
    """Ranked across towers, a tower whose units all score low can be cut far below the model's share (a CLIP
    text tower kept 12 % against 50 %); the pass warns and names the per-tower keep that bounds it. A balanced
    cut, or a model of one tower, is not warned of."""
    from lmmc.passes.antgmm import _lopsided

    assert _lopsided({"text": 0.124, "vision": 0.579}, 0.5, "flops") == [
        "one budget ranked across towers kept 12% of the text tower's blocks' flops against 50% of the model's: "
        "its heads and channels scored lowest beside the other tower's; if it must keep more, give antgmm a keep "
        "per tower, e.g. keep: {text: 0.5, vision: 0.5}"]
    assert _lopsided({"text": 0.3, "vision": 0.6}, 0.5, "flops") == [] == _lopsided({"text": 0.1}, 0.5, "flops")
    balanced = run_antgmm(make_artifact("clip"), keep=0.6, seq_len=16)
    assert min(balanced["kept_per_tower"].values()) >= 0.5 * balanced["kept"] and "warnings" not in balanced


def test_a_tower_cut_to_one_head_in_every_block_is_said() -> None:
    """One head per block is where the shapes SigLIP's students lost the most at a quarter of the FLOPs; a tower
    with a block of two heads left, or a floor of two, is not warned of."""
    metrics = run_antgmm(make_artifact("clip"), keep=0.3, seq_len=16)
    assert {t: s["heads"] for t, s in metrics["structure"].items()} == {"text": [2, 1], "vision": [1, 1]}
    assert metrics["warnings"] == [
        "every block of the vision tower is down to one attention head (from up to 4): its tokens mix through one "
        "attention map per block, where cut students lost the most accuracy; if it suffers, give min_heads: 2, or "
        "this tower a larger keep of its own"]
    floored = run_antgmm(make_artifact("clip"), keep=0.3, seq_len=16, min_heads=2)
    assert min(h for s in floored["structure"].values() for h in s["heads"]) == 2 and "warnings" not in floored


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_shares_auto_under_keep_ranks_every_unit_in_one_list_and_meets_the_budget(kind: str) -> None:
    """With keep, `shares: auto` ranks heads, channels and blocks by loss change per FLOP, as under a target: a dead
    head (its loss change 0) goes before any other unit, and the blocks' FLOPs end at or just under the keep."""
    teacher = tiny_model(kind)
    zero_head_(teacher, block_index=1, head=2)
    art = Artifact(model_ref=kind, adapter=get_adapter(teacher.config.model_type), teacher=teacher,
                   student=make_student(teacher), calib=calib_for(teacher))
    metrics = run_antgmm(art, keep=0.95, seq_len=16, shares="auto", min_layers=2)  # no whole block, at these sizes
    assert 0.9 <= metrics["kept"] <= 0.95 and [s["stage"] for s in metrics["segments"]] == ["joint"]
    first = art.adapter.towers[0]
    assert read_structure(art.student, art.adapter)[first.name]["heads"][1] < 4
    o = block_linears(block_list(art.student, first)[1][1], first)["o"][1].weight
    hd = head_dim(art.student, first)
    assert all(o[:, h * hd:(h + 1) * hd].abs().sum() > 0 for h in range(o.shape[1] // hd))  # the dead head went
    head_dims = {t.name: hd for t in art.adapter.towers}
    before = blocks_cost(art.teacher, art.adapter, head_dims, metrics["tokens"])
    after = blocks_cost(art.student, art.adapter, head_dims, metrics["tokens"])
    assert sum(c.flops for c in after.values()) / sum(c.flops for c in before.values()) == pytest.approx(metrics["kept"])


def test_shares_auto_under_a_keep_below_the_floors_fails_before_any_cut() -> None:
    art = make_artifact("clip")
    with pytest.raises(LmmcError, match="keep=0.05 of the blocks' flops is below what the floors allow"):
        run_antgmm(art, keep=0.05, seq_len=16, shares="auto", min_heads=2, min_ffn=16)
    assert read_structure(art.student, art.adapter) == read_structure(art.teacher, art.adapter)


def test_a_keep_per_tower_below_its_floors_fails_before_any_cut() -> None:
    art = make_artifact("clip")
    with pytest.raises(LmmcError, match="keep=0.05 of the blocks' flops of the vision tower"):
        run_antgmm(art, keep={"text": 0.6, "vision": 0.05}, min_heads=2, min_ffn=16, seq_len=16)
    assert read_structure(art.student, art.adapter) == read_structure(art.teacher, art.adapter)


def test_ffn_multiple_rounds_each_cut_block_to_the_nearest_multiple_keeping_the_best_channels() -> None:
    plain, aligned = make_artifact("bert"), make_artifact("bert")
    config = dict(keep=0.7, seq_len=16, shares={"ffn": 1.0}, importance="activation")
    run_antgmm(plain, **config)
    metrics = run_antgmm(aligned, **config, ffn_multiple=8)
    scores = activation_importance(plain.teacher, plain.adapter, plain.calib, torch.device("cpu")).channels
    before = read_structure(plain.student, plain.adapter)["text"]["ffn"]
    after = read_structure(aligned.student, aligned.adapter)["text"]["ffn"]
    assert before != after and all(w % 8 == 0 for w in after)
    assert after == [max(8, round(w / 8) * 8) for w in before]
    assert metrics["kept"] == pytest.approx(0.7, abs=0.05)
    fc1 = [block_linears(b, plain.adapter.towers[0])["fc1"][1] for b in block_list(aligned.student, aligned.adapter.towers[0])[1]]
    teacher_fc1 = [block_linears(b, plain.adapter.towers[0])["fc1"][1] for b in block_list(plain.teacher, plain.adapter.towers[0])[1]]
    for i, (lin, ref) in enumerate(zip(fc1, teacher_fc1)):
        best = sorted(torch.topk(scores[("text", i)], lin.out_features).indices.tolist())
        assert torch.equal(lin.weight, ref.weight[best])  # the best-scored channels, in their order


def test_a_whole_block_removed_past_the_budget_is_said() -> None:
    metrics = run_antgmm(make_artifact("bert"), keep=0.7, seq_len=16, shares={"depth": 1.0}, importance="activation")
    assert metrics["kept"] == 0.5  # one of the tiny BERT's two blocks
    assert metrics["warnings"] == ["the student kept less of the blocks' flops than asked (all towers: 0.500 against "
                                   "keep 0.7): whole units removed more than the budget; give the smaller units (ffn, "
                                   "heads) the shares, or a larger keep"]


def test_a_seq_len_a_fixed_length_model_does_not_read_is_said() -> None:
    metrics = run_antgmm(make_artifact("siglip"), keep=0.7, seq_len=12, shares={"ffn": 1.0}, importance="activation")
    assert metrics["tokens"]["text"] == 64
    assert metrics["warnings"] == ["seq_len 12 is not used: the model reads every text at its fixed length of 64 "
                                   "tokens, so the FLOPs are counted at 64"]


def test_a_floor_above_what_the_model_has_is_said() -> None:
    art = make_artifact("bert")
    most = max(read_structure(art.student, art.adapter)["text"]["heads"])
    metrics = run_antgmm(art, keep=0.7, seq_len=16, shares={"ffn": 1.0}, importance="activation", min_heads=99,
                         min_layers=3)
    assert metrics["warnings"] == [f"min_heads 99 is above what any block or tower has ({most}), so it keeps "
                                   f"them all", "min_layers 3 is above what any block or tower has (2), so it keeps "
                                   "them all"]


def test_an_ffn_multiple_as_wide_as_the_block_leaves_the_stage_nothing_and_says_so() -> None:
    # the tiny BERT's FFN is 64 wide: a multiple of 64 keeps it whole, so a cut by FFN alone cannot be met
    config = dict(keep=0.7, seq_len=16, shares={"ffn": 1.0}, importance="activation", ffn_multiple=64)
    with pytest.raises(LmmcError, match=r"keep=0.7 of the blocks' flops is below what the floors allow \(about 1.000 "
                                        r"with .*min_ffn=1, ffn_multiple=64"):
        run_antgmm(make_artifact("bert"), **config)
    # a multiple of 32 is possible, but rounds a light cut (a few channels per block) back to the whole width
    art = make_artifact("bert")
    metrics = run_antgmm(art, **{**config, "keep": 0.95, "ffn_multiple": 32})
    assert read_structure(art.student, art.adapter)["text"]["ffn"] == [64, 64]
    assert [s["removed"] for s in metrics["segments"]] == [0]  # what was cut, after the rounding
    assert metrics["warnings"] == ["the student kept more of the blocks' flops than asked (all towers: 1.000 against "
                                   "keep 0.95): whole units and FFN widths in multiples of 32 could not meet it; give "
                                   "other stages a share, or a smaller ffn_multiple"]


def test_depth_stage_removes_whole_blocks_and_updates_the_config() -> None:
    art = make_artifact("vit")
    metrics = run_antgmm(art, keep=0.5, shares={"depth": 1.0}, importance="activation")
    assert art.student.config.num_hidden_layers == 1
    assert len(block_list(art.student, art.adapter.towers[0])[1]) == 1
    removed = metrics["segments"][0]["removed_layers"]["vision"]
    assert art.student.config.lmmc_teacher_layers == [i for i in range(2) if i not in removed]
    assert metrics["kept"] == pytest.approx(0.5)


def test_floors_bound_the_budget_with_a_clear_error() -> None:
    art = make_artifact("bert")
    with pytest.raises(LmmcError, match="floors"):
        run_antgmm(art, keep=0.05, min_heads=2, min_ffn=16)
    assert sum(p.numel() for p in art.student.parameters()) == sum(p.numel() for p in art.teacher.parameters())


def test_units_below_the_floor_are_never_removed() -> None:
    art = make_artifact("bert")
    metrics = run_antgmm(art, keep=0.35, min_heads=2, min_ffn=8, importance="activation", seq_len=16)
    structure = read_structure(art.student, art.adapter)["text"]
    assert min(structure["heads"]) >= 2 and min(structure["ffn"]) >= 8
    assert metrics["kept"] == pytest.approx(0.35, abs=0.02)


@pytest.mark.parametrize("bad, message", [
    ({"keep": 0}, "keep"),
    ({"keep": {"text": 0.5, "vision": 1.5}}, "keep"),
    ({"shares": {"ffn": 0.7, "heads": 0.7}}, "sum to 1"),
    ({"shares": {"width": 1.0}}, "shares"),
    ({"distill_steps_per_segment": 10}, "distill"),
])
def test_bad_config_is_one_clear_error(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(LmmcError, match=message):
        parse_recipe({"calibration": {"random": True}, "passes": [{"antgmm": bad}]})


def test_structured_pruning_refuses_to_follow_unstructured_masks() -> None:
    art = make_artifact("bert")
    art.masks = {"encoder.layer.0.attention.self.query.weight": torch.ones(32, 32, dtype=torch.bool)}
    with pytest.raises(LmmcError, match="before magnitude/wanda"):
        run_antgmm(art, keep=0.5)


class RecordingDistill(Pass):
    """Stands in for the distill pass: records each call, and whether the faded block still acts."""

    name = "distill"
    calls: list[dict[str, Any]] = []

    class Config(PassConfig):
        steps: int = 0
        lr: float = 1e-4
        skip_hidden: dict[str, list[int]] = {}

    def run(self, art: Artifact) -> dict[str, Any]:
        tower = art.adapter.towers[0]
        blocks = block_list(art.student, tower)[1]
        ids = torch.randint(0, 99, (2, 8))
        with torch.no_grad():
            x = art.student.embeddings(input_ids=ids)
            y = blocks[0](x)
        RecordingDistill.calls.append({"steps": self.config.steps, "layers": len(blocks),
                                       "block0_change": float((y - x).abs().max()),
                                       "skip_hidden": self.config.skip_hidden})
        return {"loss": 0.0}


def test_schedule_distils_between_segments_and_fades_blocks_out(monkeypatch: pytest.MonkeyPatch) -> None:
    load_passes()  # first, so a real distill pass cannot register over the stand-in later
    monkeypatch.setitem(PASSES, "distill", RecordingDistill)
    RecordingDistill.calls = []
    art = make_artifact("bert")
    with torch.no_grad():  # make block 0 the least important by far, so depth removes it
        for role in ("o", "fc2"):
            block_linears(block_list(art.student, art.adapter.towers[0])[1][0], art.adapter.towers[0])[role][1].weight.mul_(1e-3)
    metrics = run_antgmm(art, keep=0.3, shares={"depth": 0.5, "ffn": 0.25, "heads": 0.25}, segments=2,
                         importance="activation", distill={"lr": 1e-4}, distill_steps_per_segment=8)
    calls = RecordingDistill.calls
    stages = [(s["stage"], s["segment"]) for s in metrics["segments"]]
    assert stages == [("depth", 1), ("depth", 2), ("ffn", 1), ("ffn", 2), ("heads", 1), ("heads", 2)]
    fades = [c for c in calls if c["layers"] == 2]
    # Block 0 goes in the one depth segment that removes a block: four fade steps of 2 steps each,
    # during which its residual update shrinks to exactly nothing.
    assert [c["steps"] for c in fades] == [2, 2, 2, 2]
    changes = [c["block0_change"] for c in fades]
    assert changes == sorted(changes, reverse=True) and changes[-1] == 0.0
    # While it fades, block 0 has no hidden-state term (it would pull the embeddings toward teacher layer 1).
    assert [c["skip_hidden"] for c in fades] == [{"text": [0]}] * 4
    assert all(c["skip_hidden"] == {} for c in calls[len(fades):])
    # Every width segment removed something and was followed by one distillation of the full length.
    assert all(s["removed"] > 0 for s in metrics["segments"][2:])
    assert [c["steps"] for c in calls[len(fades):]] == [8, 8, 8, 8]
    assert art.student.config.lmmc_teacher_layers == [1]


def test_with_fewer_steps_than_fade_levels_the_block_gone_at_last_is_distilled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three steps went to the levels 0.25, 0.5 and 0.75: the student was never distilled with the block gone."""
    load_passes()
    monkeypatch.setitem(PASSES, "distill", RecordingDistill)
    RecordingDistill.calls = []
    art = make_artifact("bert")
    with torch.no_grad():
        for role in ("o", "fc2"):
            block_linears(block_list(art.student, art.adapter.towers[0])[1][0], art.adapter.towers[0])[role][1].weight.mul_(1e-3)
    run_antgmm(art, keep=0.5, shares={"depth": 1.0}, importance="activation", distill={"lr": 1e-4},
               distill_steps_per_segment=3)
    fades = [c for c in RecordingDistill.calls if c["layers"] == 2]
    assert [c["steps"] for c in fades] == [1, 1, 1] and fades[-1]["block0_change"] == 0.0


def test_minilm_at_half_the_flops_keeps_the_embedding_close_and_reloads(minilm, tmp_path) -> None:
    import numpy as np

    import lmmc
    from lmmc.export.validate import cosine, torch_outputs
    from lmmc.modelio import save_student

    teacher, adapter, pre = load_teacher(str(minilm))
    cfg = CalibrationConfig(samples=64, eval_samples=64, batch_size=16, max_length=64)
    calib = load_calibration(cfg, str(CORPUS), {"text"}, pre)
    art = Artifact(model_ref=str(minilm), adapter=adapter, teacher=teacher, student=make_student(teacher),
                   preprocessor=pre, calib=calib)
    metrics = run_antgmm(art, keep=0.5)
    assert metrics["kept"] == pytest.approx(0.5, abs=0.005)
    tower = adapter.towers[0]
    t_emb = np.concatenate([o[1] for o in torch_outputs(teacher, tower, calib.eval_batches("text"))])
    s_emb = np.concatenate([o[1] for o in torch_outputs(art.student, tower, calib.eval_batches("text"))])
    # Measured 0.63 on 256 held-out sentences with 128 calibration sentences; no fine-tuning.
    assert cosine(t_emb, s_emb).mean() > 0.5
    save_student(art.student, pre, tmp_path, {})
    reloaded = lmmc.load_student(tmp_path)
    again = np.concatenate([o[1] for o in torch_outputs(reloaded, tower, calib.eval_batches("text"))])
    assert np.array_equal(s_emb, again)
