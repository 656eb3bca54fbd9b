"""SparseGPT: lower reconstruction error than Wanda at the same density, exact mask counts, the
inverse-Hessian factor, block-sequential inputs and per-matrix targets from an allocation."""

import pytest
import torch
from lmmc.passes.sparsegpt import inverse_hessian_factor, sparsegpt_prune_

from lmmc.adapters import get_adapter, prunable_linears
from lmmc.artifact import Artifact
from lmmc.data import random_calibration
from lmmc.errors import LmmcError
from lmmc.modelio import make_student
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import CalibrationConfig, parse_recipe
from lmmc.sparsity import NM, nm_mask, row_mask
from tests.conftest import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def layer_problem(seed: int = 0, out: int = 48, d: int = 96, tokens: int = 768):
    """A linear layer with correlated inputs of uneven scale, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    x = torch.randn(tokens, d, generator=g) @ mix * (0.2 + 3 * torch.rand(d, generator=g))
    w = torch.randn(out, d, generator=g)
    return w, x


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_hat.T).norm())


@pytest.mark.parametrize("nm", [None, NM(2, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_reconstructs_better_than_wanda_at_the_same_density(nm, seed):
    w, x = layer_problem(seed)
    pruned = w.clone()
    mask = sparsegpt_prune_(pruned, x.T @ x, len(x), 0.5, nm, blocksize=32)
    wanda_score = w.abs() * x.pow(2).sum(0).sqrt()
    wanda_mask = nm_mask(wanda_score, nm) if nm else row_mask(wanda_score, 0.5)
    assert int((~mask).sum()) == int((~wanda_mask).sum()) == w.numel() // 2
    assert torch.equal(pruned == 0, ~mask)
    err_sparsegpt = reconstruction_error(w, pruned, x)
    err_wanda = reconstruction_error(w, w * wanda_mask, x)
    err_same_mask_no_update = reconstruction_error(w, w * mask, x)
    assert err_sparsegpt < 0.95 * err_wanda
    assert err_sparsegpt < 0.95 * err_same_mask_no_update  # the OBS update, not only the mask, helps
    if nm:
        assert torch.equal((~mask).reshape(w.shape[0], -1, 4).sum(-1), torch.full((w.shape[0], w.shape[1] // 4), 2))


def test_unstructured_count_is_exact_across_column_blocks():
    w, x = layer_problem(2, out=10, d=50)
    mask = sparsegpt_prune_(w, x.T @ x, len(x), 0.37, blocksize=16)  # 4 blocks, the last one short
    assert int((~mask).sum()) == round(0.37 * 500)
    assert int((w == 0).sum()) == round(0.37 * 500)


def test_inverse_hessian_factor_and_silent_inputs():
    w, x = layer_problem(3, out=8, d=12)
    x[:, 5] = 0.0  # an input that never fires
    xtx = x.T @ x
    u, dead = inverse_hessian_factor(xtx, len(x), 0.01)
    assert dead.tolist() == [i == 5 for i in range(12)]
    h = 2 * xtx.double() / len(x)
    h[5, 5] = 1.0
    h += 0.01 * h.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(u.T @ u, torch.linalg.inv(h), atol=1e-9)  # U upper with UᵀU = H⁻¹
    assert torch.equal(u, u.triu())
    sparsegpt_prune_(w, xtx, len(x), 0.25)
    assert torch.isfinite(w).all() and (w[:, 5] == 0).all()


def make_artifact(kind: str) -> Artifact:
    teacher = tiny_model(kind)
    adapter = get_adapter(teacher.config.model_type)
    art = Artifact(model_ref=kind, adapter=adapter, teacher=teacher, student=make_student(teacher))
    art.calib = random_calibration(CalibrationConfig(samples=8, eval_samples=4, batch_size=4), teacher, adapter)
    return art


def linear_inputs(art: Artifact, module: torch.nn.Linear) -> torch.Tensor:
    """The real-token rows `module` sees over the calibration batches, through the current student."""
    rows = []
    handle = module.register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    try:
        with torch.no_grad():
            for batch in art.calib.calib_batches("text"):
                art.adapter.towers[0].embed(art.student, batch)
                rows[-1] = rows[-1][batch["attention_mask"].bool()]
    finally:
        handle.remove()
    return torch.cat(rows)


def test_pass_is_block_sequential_and_equals_the_function_on_recomputed_inputs():
    """Block 1's Hessians come from inputs that went through the already pruned block 0 (and through
    block 1 itself still dense: a block's matrices are pruned once all its inputs are collected)."""
    art = make_artifact("bert")
    linears = prunable_linears(art.student, art.adapter)
    original = {p.param: p.module.weight.detach().clone() for p in linears}
    run_pass(get_pass("sparsegpt")(get_pass("sparsegpt").Config(sparsity=0.5)), art)
    pruned = {p.param: p.module.weight.detach().clone() for p in linears}
    fc1 = next(p for p in linears if p.block == 1 and p.role == "fc1")

    def expected_fc1() -> torch.Tensor:
        x = linear_inputs(art, fc1.module)
        w = original[fc1.param].clone()
        sparsegpt_prune_(w, x.T @ x, len(x), 0.5)
        return w

    with torch.no_grad():
        for p in linears:
            if p.block == 1:
                p.module.weight.copy_(original[p.param])
        sequential = float((pruned[fc1.param] - expected_fc1()).abs().max())
        for p in linears:  # with block 0 dense the inputs differ, and so does the result
            p.module.weight.copy_(original[p.param])
        from_dense = float((pruned[fc1.param] - expected_fc1()).abs().max())
    assert sequential < 1e-6 and from_dense > 100 * max(sequential, 1e-8)


def test_pass_follows_per_matrix_targets_of_an_allocation():
    art = make_artifact("clip")
    run_pass(get_pass("ecoflap")(get_pass("ecoflap").Config(sparsity=0.6, samples=8, batch_size=4)), art)
    metrics = run_pass(get_pass("sparsegpt")(get_pass("sparsegpt").Config()), art).metrics
    for pl in prunable_linears(art.student, art.adapter):
        assert int((pl.module.weight == 0).sum()) == round(art.allocation[pl.param] * pl.module.weight.numel())
    assert metrics["sparsity"] == pytest.approx(0.6, abs=0.005)
    assert set(metrics["sparsity_per_tower"]) == {"text", "vision"}


@pytest.mark.parametrize("params, match", [
    ({"nm": "2:4", "blocksize": 30}, "multiple of M"),
    ({"damp": 0}, "damp"),
    ({"nm": "4:4"}, "0 < N < M"),
])
def test_bad_config_is_one_clear_error(params, match):
    with pytest.raises(LmmcError, match=match):
        parse_recipe({"calibration": {"random": True}, "passes": [{"sparsegpt": params}]})


def test_damping_is_bounded_and_the_failure_names_a_fix_that_is_left():
    # damp 1e300 overflowed, and the message then asked to raise it "(e.g. 0.1)"
    with pytest.raises(LmmcError, match="damp: Input should be less than or equal to 10"):
        parse_recipe({"calibration": {"random": True}, "passes": [{"sparsegpt": {"damp": 1e300}}]})
    indefinite = -torch.eye(4)  # no damping makes it positive definite
    with pytest.raises(LmmcError, match=r"after damping 0.01; raise 'damp' \(at most 10\) or give more calibration"):
        inverse_hessian_factor(indefinite, 8, 0.01)
    with pytest.raises(LmmcError, match="after damping 10; give more calibration samples"):
        inverse_hessian_factor(indefinite, 8, 10)
