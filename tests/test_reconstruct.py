"""Least-squares reconstruction of a cut block's output projection (lmmc.reconstruct, antgmm's `reconstruct`)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from test_structured import calib_for, make_artifact, run_antgmm

from lmmc.adapters import TowerModule, block_linears, block_list, get_adapter, input_names
from lmmc.errors import LmmcError
from lmmc.reconstruct import compensate_, input_gram
from lmmc.recipe import parse_recipe
from lmmc.surgery import keep_channels_, keep_cols_

CPU = torch.device("cpu")


def test_columns_the_kept_ones_span_are_replaced_exactly() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    kept_x = torch.randn(300, 4)
    kept_x[:, 3] = 0.0  # a unit that never fires: without a ridge the regression is singular
    # the two removed inputs are affine in the kept ones: the refit must make the cut exact
    removed_x = kept_x @ torch.randn(4, 2) + torch.tensor([0.5, -1.0])
    x = torch.cat([kept_x[:, :2], removed_x[:, :1], kept_x[:, 2:], removed_x[:, 1:]], dim=1)  # removed: 2, 5
    z = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    gram = z.T @ z / len(z)
    with torch.no_grad():
        want = lin(x)
    kept = [0, 1, 3, 4]
    left = compensate_(lin, gram, kept, ridge=0.0)
    keep_cols_(lin, torch.tensor(kept))
    with torch.no_grad():
        got = lin(x[:, kept])
    assert left == pytest.approx(0.0, abs=1e-8)
    assert torch.allclose(got, want, atol=1e-4)


def fc2_io(model: torch.nn.Module, calib) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's fc2 inputs and outputs on the calibration tokens that are not padding."""
    tower = get_adapter(model.config.model_type).towers[0]
    lin = block_linears(block_list(model, tower)[1][0], tower)["fc2"][1]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = lin.register_forward_hook(lambda _m, a, out: seen.append((a[0], out)))
    try:
        with torch.no_grad():
            for batch in calib.calib_batches(tower.modality):
                TowerModule(model, tower)(*[batch[n] for n in input_names(tower)])
                mask = batch["attention_mask"].reshape(-1).bool()
                x, y = seen.pop()
                seen.append((x.reshape(-1, x.shape[-1])[mask], y.reshape(-1, y.shape[-1])[mask]))
    finally:
        handle.remove()
    return torch.cat([x for x, _ in seen]), torch.cat([y for _, y in seen])


def test_the_share_left_is_the_error_measured_on_the_calibration_tokens() -> None:
    model = tiny_model("bert")
    calib = calib_for(model, samples=32)
    tower = get_adapter("bert").towers[0]
    block = block_list(model, tower)[1][0]
    x, want = fc2_io(model, calib)
    kept = list(range(0, 64, 2))  # half of the FFN's 64 channels

    plain = copy.deepcopy(model)
    keep_channels_(block_list(plain, tower)[1][0], tower, kept)
    lin = block_linears(block_list(plain, tower)[1][0], tower)["fc2"][1]
    with torch.no_grad():
        plain_err = ((lin(x[:, kept]) - want) ** 2).sum(1).mean()

    gram = input_gram(model, tower, 0, "fc2", calib, CPU)
    z = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    assert torch.allclose(gram, z.T @ z / len(z), atol=1e-6)  # padding tokens left out
    left = compensate_(block_linears(block, tower)["fc2"][1], gram, kept, ridge=0.0)
    keep_channels_(block, tower, kept)
    lin = block_linears(block, tower)["fc2"][1]
    with torch.no_grad():
        err = ((lin(x[:, kept]) - want) ** 2).sum(1).mean()
    assert 0.0 < left < 1.0
    assert float(err / plain_err) == pytest.approx(left, rel=1e-3)


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_antgmm_with_reconstruction_keeps_more_of_the_teacher(kind: str) -> None:
    def calib_cosine(art) -> float:
        sims = []
        for tower in art.adapter.towers:
            for batch in art.calib.calib_batches(tower.modality):
                inputs = [batch[n] for n in input_names(tower)]
                with torch.no_grad():
                    t, s = TowerModule(art.teacher, tower)(*inputs)[1], TowerModule(art.student, tower)(*inputs)[1]
                sims.append(torch.nn.functional.cosine_similarity(t, s, dim=-1))
        return float(torch.cat(sims).mean())

    plain, rebuilt = make_artifact(kind, samples=32), make_artifact(kind, samples=32)
    run_antgmm(plain, keep=0.5, seq_len=16, shares={"ffn": 0.5, "heads": 0.5})
    metrics = run_antgmm(rebuilt, keep=0.5, seq_len=16, shares={"ffn": 0.5, "heads": 0.5}, reconstruct=0.01)
    lefts = [v for seg in metrics["segments"] for v in seg["reconstruction_left"].values()]
    assert len(lefts) >= sum(len(block_list(rebuilt.student, t)[1]) for t in rebuilt.adapter.towers)
    assert all(0.0 <= v < 1.0 for v in lefts)
    assert calib_cosine(rebuilt) > calib_cosine(plain)


@pytest.mark.parametrize("bad", [-0.1, "auto"])
def test_a_bad_ridge_is_one_clear_error(bad) -> None:
    with pytest.raises(LmmcError, match="reconstruct"):
        parse_recipe({"calibration": {"random": True}, "passes": [{"antgmm": {"reconstruct": bad}}]})
