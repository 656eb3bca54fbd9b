"""Algorithms checked against hand computations and plain reference implementations (SparseGPT, OWL, pooling, ...)."""

from __future__ import annotations

import copy
import signal

import pytest
import torch
import transformers
from lmmc.passes.owl import outlier_ratios
from lmmc.passes.sparsegpt import sparsegpt_prune_

from lmmc.adapters import PrunableLinear, block_linears, block_list, get_adapter, head_dim, prunable_linears
from lmmc.allocation import keep_budget
from lmmc.artifact import Artifact
from lmmc.data import random_calibration, random_generative_calibration
from lmmc.errors import LmmcError
from lmmc.importance import activation_importance
from lmmc.modelio import make_student
from lmmc.pipeline import get_pass, load_passes, run_pass
from lmmc.pooling import pool
from lmmc.recipe import CalibrationConfig
from lmmc.sparsity import NM, row_mask
from lmmc.surgery import _feature_layer, keep_blocks_
from tests.conftest import TINY_TEXT, tiny_llava, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


# --- surgery: the record of teacher blocks and LLaVA's feature layer ------------------------------------

def test_two_depth_cuts_record_the_teacher_blocks_that_remain() -> None:
    """A second cut indexes the student's blocks, so the recorded teacher layers must be mapped through the
    first cut's record: 4 blocks, remove block 1, then the new block 1 (teacher block 2) -> [0, 3]."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**{**TINY_TEXT, "num_hidden_layers": 4})).eval()
    tower = get_adapter("bert").towers[0]
    original = list(block_list(model, tower)[1])
    keep_blocks_(model, tower, [0, 2, 3])
    assert model.config.lmmc_teacher_layers == [0, 2, 3]
    keep_blocks_(model, tower, [0, 2])
    assert model.config.lmmc_teacher_layers == [0, 3]
    assert model.config.num_hidden_layers == 2
    assert [id(b) for b in block_list(model, tower)[1]] == [id(original[0]), id(original[3])]


# A 4-block vision tower: hidden state s (0 .. 4) is the output of block s - 1, state 0 the embeddings.
# Expected values counted by hand: the read block's new position among the kept ones, as an index with
# the same sign as before (negative: counted back from len(keep) + 1 states).
@pytest.mark.parametrize("layer, keep, expected", [
    (-2, [0, 1, 2, 3], -2),        # nothing removed
    (-2, [0, 2, 3], -2),           # block 2 is now the 2nd of 3: state 2 of 3 -> -2
    (-2, [2, 3], -2),              # block 2 is now block 0: state 1 of 2 -> -2
    (-2, [1, 2], -1),              # block 2 is now the last block
    (-2, [0, 1, 2], -1),           # the block after the read one went: it is the last now
    (-2, [0, 1, 3], -2),           # the read block 2 went: read block 1's output, state 2 of 3
    (-1, [0, 1, 2], -1),           # the last block went: read the new last one
    (-1, [0, 3], -1),
    (2, [0, 1, 2, 3], 2),          # block 1's output stays state 2
    (2, [1, 2, 3], 1),             # block 0 went: block 1 is now block 0, state 1
    (2, [0, 1], 2),
    (2, [0, 2, 3], 1),             # the read block 1 went: block 0's output, state 1
    ([-2, -5], [0, 1, 2, 3], [-2, -5]),
    ([-2, -5], [0, 2], [-1, -3]),  # block 2 is the last of 2; the embeddings are state 0 of 3 -> -3
    ([-2, -5], [1, 2, 3], [-2, -4]),
    ([-2, -5], [0, 1, 3], [-2, -4]),
])
def test_feature_layer_after_a_depth_cut_matches_a_hand_count(layer, keep, expected) -> None:
    """LLaVA's vision_feature_layer after removing blocks must still name the hidden state the projector
    read: a state counts the kept blocks strictly before it, not the block that produces the next one."""
    assert _feature_layer(layer, keep, 4, "vision") == expected


# --- SparseGPT: after an earlier pruner, and against a plain reference -------------------------------------

def bert_artifact(samples: int = 8) -> Artifact:
    teacher = tiny_model("bert")
    adapter = get_adapter("bert")
    art = Artifact(model_ref="bert", adapter=adapter, teacher=teacher, student=make_student(teacher))
    art.calib = random_calibration(CalibrationConfig(samples=samples, eval_samples=4, batch_size=4), teacher, adapter)
    return art


def test_sparsegpt_after_magnitude_keeps_every_earlier_zero_at_zero() -> None:
    """SparseGPT's OBS update writes into weights an earlier pruner zeroed; the pass must zero them again,
    so every weight outside its recorded mask is exactly 0 and the mask keeps the earlier zeros. SparseGPT
    2:4 after magnitude 0.5: groups with fewer than 2 earlier zeros cut live weights, whose error reaches
    groups with 3 earlier zeros, where 2:4 cuts only 2 of them. (Unstructured SparseGPT at a lower
    sparsity cuts only earlier zeros, which carry no error, so it could not tell.)"""
    load_passes()
    art = bert_artifact()
    run_pass(get_pass("magnitude")(get_pass("magnitude").Config(sparsity=0.5)), art)
    earlier = {name: m.clone() for name, m in art.masks.items()}
    linears = prunable_linears(art.student, art.adapter)
    assert earlier and all(float((~earlier[p.param]).float().mean()) == 0.5 for p in linears)
    run_pass(get_pass("sparsegpt")(get_pass("sparsegpt").Config(nm="2:4")), art)
    for p in linears:
        mask, w = art.masks[p.param], p.module.weight.detach()
        assert not (mask & ~earlier[p.param]).any(), p.param  # an earlier zero never comes back into the mask
        assert (w[~mask] == 0).all(), p.param
        assert int((w == 0).sum()) >= w.numel() // 2


def reference_sparsegpt(w: torch.Tensor, x: torch.Tensor, sparsity: float, nm: NM | None, blocksize: int,
                        damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT as the paper's algorithm writes it, in float64 on W [out, in]: H = 2XᵀX/n + λI with
    λ = damp·mean(diag H); U = upper Cholesky factor of H⁻¹; column blocks; salience w²/U_jj² (lowest of
    the whole block, the running total kept at round(s·numel) as lmmc counts it, or the lowest N of every M
    columns of a row when the sweep reaches the group); err = w/U_jj spread along U's row; block errors
    carried to the later columns. Returns (pruned weight, keep-mask)."""
    W = w.double().clone()
    rows, cols = W.shape
    X = x.double()
    H = 2 * X.T @ X / len(X)
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    zeros = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        M1 = torch.zeros_like(W1, dtype=torch.bool)
        E1 = torch.zeros_like(W1)
        if nm is None:
            k = round(sparsity * rows * i2) - zeros
            order = torch.argsort((W1 ** 2 / d ** 2).flatten())
            M1.view(-1)[order[:k]] = True
            zeros += k
        for i in range(i2 - i1):
            if nm is not None and i % nm.m == 0:
                sal = W1[:, i:i + nm.m] ** 2 / d[i:i + nm.m] ** 2
                for r in range(rows):
                    for c in torch.argsort(sal[r])[:nm.n].tolist():
                        M1[r, i + c] = True
            err = torch.where(M1[:, i], W1[:, i], torch.zeros(rows, dtype=torch.float64)) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W1[M1] = 0.0
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = M1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W, ~pruned


@pytest.mark.parametrize("nm", [None, NM(2, 4)])
def test_sparsegpt_equals_a_plain_reference(nm) -> None:
    """The column sweep (mask by w²/U_jj², OBS update, block error carry) gives the reference's mask
    exactly and its weights within 1e-5, unstructured and 2:4, over two column blocks."""
    g = torch.Generator().manual_seed(0)
    d = 32
    x = (torch.randn(64, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))
         * (0.2 + 3 * torch.rand(d, generator=g)))  # correlated inputs of uneven scale
    w = torch.randn(16, d, generator=g)
    want_w, want_mask = reference_sparsegpt(w, x, 0.5, nm, blocksize=16)
    got_w = w.clone()
    got_mask = sparsegpt_prune_(got_w, x.T @ x, len(x), 0.5, nm, blocksize=16)
    assert torch.equal(got_mask, want_mask)
    assert float((got_w.double() - want_w).abs().max()) < 1e-5


# --- OWL's outlier ratios -------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold, group, a, b", [(1.0, 3 / 8, 1 / 6, 1.0), (0.8, 7 / 8, 5 / 6, 1.0)])
def test_owl_outlier_ratios_match_a_hand_count(threshold, group, a, b) -> None:
    """OWL counts Wanda scores |W_ij|·‖X_j‖ (the square root of Σx²) above threshold × the group's mean.
    A: W = [[1, 1, 1], [2, 1, 0.5]], Σx² = [1, 4, 16] -> scores [[1, 2, 4], [2, 2, 2]];
    B: W = [[3, 1]], Σx² = [1, 9] -> [3, 3]. Mean 19/8 = 2.375 (cut 2.375 at 1.0, 1.9 at 0.8)."""
    def linear(weight: list[list[float]]) -> torch.nn.Linear:
        lin = torch.nn.Linear(len(weight[0]), len(weight), bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(weight))
        return lin

    pa = PrunableLinear("text", 0, "q", "a.weight", linear([[1, 1, 1], [2, 1, 0.5]]))
    pb = PrunableLinear("text", 0, "k", "b.weight", linear([[3, 1]]))
    sq = {"text.0.q": torch.tensor([1.0, 4.0, 16.0]), "text.0.k": torch.tensor([1.0, 9.0])}
    per_group, per_matrix = outlier_ratios({"text.0": [pa, pb]}, sq, threshold)
    assert per_group == {"text.0": pytest.approx(group)}
    assert per_matrix == {"a.weight": pytest.approx(a), "b.weight": pytest.approx(b)}


# --- pooling under left padding -------------------------------------------------------------------------

def test_lasttoken_and_weightedmean_pooling_under_left_padding() -> None:
    """With left padding the last real token is the last position, not count - 1, and weighted-mean
    weights count 1, 2, ... from the first real token (as sentence-transformers does)."""
    hidden = torch.arange(3 * 5 * 2, dtype=torch.float32).reshape(3, 5, 2) ** 1.5
    mask = torch.tensor([[0, 0, 1, 1, 1],   # left padded
                         [1, 1, 1, 0, 0],   # right padded
                         [0, 1, 1, 1, 1]])  # left padded
    h = hidden
    last = torch.stack([h[0, 4], h[1, 2], h[2, 4]])
    weighted = torch.stack([(1 * h[0, 2] + 2 * h[0, 3] + 3 * h[0, 4]) / 6,
                            (1 * h[1, 0] + 2 * h[1, 1] + 3 * h[1, 2]) / 6,
                            (1 * h[2, 1] + 2 * h[2, 2] + 3 * h[2, 3] + 4 * h[2, 4]) / 10])
    torch.testing.assert_close(pool(hidden, mask, ("lasttoken",)), last, rtol=1e-6, atol=0)
    torch.testing.assert_close(pool(hidden, mask, ("weightedmean",)), weighted, rtol=1e-6, atol=0)


# --- AntGMM: the head floor under grouped-query attention --------------------------------------------------

def llava_artifact() -> Artifact:
    load_passes()
    model = tiny_llava()
    adapter = get_adapter("llava")
    calib = random_generative_calibration(CalibrationConfig(random=True, samples=8, eval_samples=2, batch_size=4),
                                          model, adapter)
    return Artifact(model_ref="tiny", adapter=adapter, teacher=copy.deepcopy(model), student=model, calib=calib)


def test_antgmm_keeps_min_heads_query_heads_in_every_gqa_block() -> None:
    """The decoder's head units are GQA groups of 2 query heads, so min_heads=3 must keep 2 whole groups
    (rounded up), not 1; a tight heads-only budget then cuts only the vision tower (groups of 1)."""
    art = llava_artifact()
    model, adapter = art.student, art.adapter
    antgmm = get_pass("antgmm")
    metrics = antgmm(antgmm.Config(keep=0.96, importance="activation", min_heads=3, shares={"heads": 1.0})).run(art)
    structure = metrics["structure"]
    assert structure["language"]["heads"] == [4, 4] and structure["language"]["kv_heads"] == [2, 2]
    assert structure["vision"]["heads"] == [3, 3]  # the budget did cut where the floor allows
    for tower in adapter.towers:
        for block in block_list(model, tower)[1]:
            assert block_linears(block, tower)["q"][1].out_features // head_dim(model, tower) >= 3


# --- row masks with a spread remainder, and activation importance --------------------------------------------

def test_row_mask_spread_gives_the_remainder_to_the_smallest_next_score() -> None:
    """round(0.3 · 15) = 4 zeros on 3 rows: each row's lowest, then one more in the row whose next-lowest
    score is smallest (row 1's 2.0, not row 2's 6.0)."""
    score = torch.tensor([[5.0, 1.0, 9.0, 7.0, 3.0],    # lowest 1 (col 1), next 3
                          [2.0, 8.0, 6.0, 0.5, 4.0],    # lowest 0.5 (col 3), next 2 (col 0)
                          [9.0, 8.0, 7.0, 6.0, 5.5]])   # lowest 5.5 (col 4), next 6
    want = torch.ones(3, 5, dtype=torch.bool)
    for r, c in [(0, 1), (1, 3), (1, 0), (2, 4)]:
        want[r, c] = False
    assert torch.equal(row_mask(score, 0.3, spread=True), want)


def reference_head_scores(model: torch.nn.Module, art: Artifact, block_index: int) -> torch.Tensor:
    """Head h of one block: Σ over its o-projection columns j of ‖X_j‖·Σ_i|W_o[i, j]| over the real calibration
    tokens of a plain forward, divided by the mean over the block's heads."""
    tower = art.adapter.towers[0]
    o = block_linears(block_list(model, tower)[1][block_index], tower)["o"][1]
    rows: list[torch.Tensor] = []
    handle = o.register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    try:
        with torch.no_grad():
            for batch in art.calib.calib_batches("text"):
                tower.embed(model, batch)
                rows[-1] = rows[-1][batch["attention_mask"].bool()]
    finally:
        handle.remove()
    x = torch.cat(rows)
    per_column = o.weight.detach().abs().sum(0) * x.pow(2).sum(0).sqrt()
    heads = per_column.reshape(-1, head_dim(model, tower)).sum(1)
    return heads / heads.mean()


def test_activation_importance_is_relative_to_each_layer() -> None:
    """Scaling the last block's value projection by 10 scales its heads' activations by 10; the head scores,
    relative to their layer's mean, stay as the hand reference gives them and the global ranking stays."""
    art = bert_artifact()
    scaled = copy.deepcopy(art.student)
    v = block_linears(block_list(scaled, art.adapter.towers[0])[1][1], art.adapter.towers[0])["v"][1]
    with torch.no_grad():
        v.weight.mul_(10)
        v.bias.mul_(10)
    plain = activation_importance(art.student, art.adapter, art.calib, CPU)
    louder = activation_importance(scaled, art.adapter, art.calib, CPU)
    for i in (0, 1):
        torch.testing.assert_close(plain.heads[("text", i)], reference_head_scores(art.student, art, i),
                                   rtol=1e-4, atol=0)
    torch.testing.assert_close(louder.heads[("text", 1)], reference_head_scores(scaled, art, 1), rtol=1e-4, atol=0)
    torch.testing.assert_close(louder.heads[("text", 1)], plain.heads[("text", 1)], rtol=1e-4, atol=0)

    def ranking(scores) -> list[tuple[int, int]]:
        units = [(float(s), i, h) for i in (0, 1) for h, s in enumerate(scores.heads[("text", i)])]
        return [(i, h) for _, i, h in sorted(units)]

    assert ranking(louder) == ranking(plain)


# --- ECoFLaP's keep budget ------------------------------------------------------------------------------

@pytest.mark.parametrize("scores, sizes, expected", [
    # K = 52. Equal scores: 26 each, the 4-weight group takes 4 and is full; the rest (22) goes to the other.
    ([1.0, 1.0], [4, 100], [4, 48]),
    # All the score in the tiny group: it fills (4) and leaves; the other has score 0 and gets the rest
    # by its room. A full group left in the hand-out would take the whole remainder and give nothing.
    ([1.0, 0.0], [4, 100], [4, 48]),
    # K = 101. Round 1: shares 25.25, 50.5, 25.25 round up to 26, 51, 26; the 2-weight group takes 2 and is
    # full: [2, 51, 26]. Round 2: R = 22 by 2:1 between the others, 14.67 and 7.33 round up to 15 and 8, one
    # over; the group rounded up the most (the third) gives one back: [2, 66, 33].
    ([1.0, 2.0, 1.0], [2, 100, 100], [2, 66, 33]),
])
def test_keep_budget_drops_full_groups_and_ends(scores, sizes, expected) -> None:
    """A group at its size leaves the hand-out, so the loop ends with Σk = K (checked under a 5 s alarm)."""
    def too_long(*_):
        raise TimeoutError("keep_budget did not end")

    before = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(5)
    try:
        keep = keep_budget(scores, sizes, 0.5, 1.0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    assert keep == expected
    assert sum(keep) == round(0.5 * sum(sizes))


def test_a_cut_the_gqa_head_floor_cannot_reach_is_refused_before_scoring() -> None:
    """The up-front check counted min_heads query heads one at a time, while grouped-query attention keeps
    whole groups: on the tiny LLaVA (groups of 2 in the decoder) min_heads=3 keeps 4, and keep=0.88 passed
    the check ("about 0.879") to end at 0.955 with a warning."""
    art = llava_artifact()
    antgmm = get_pass("antgmm")
    with pytest.raises(LmmcError, match=r"keep=0.88 of the blocks' flops is below what the floors allow \(about "
                                        r"0\.9[0-9]+ with min_layers=1, min_heads=3 in whole query-head groups, "):
        antgmm(antgmm.Config(keep=0.88, importance="activation", min_heads=3, shares={"heads": 1.0})).run(art)


@pytest.mark.parametrize("heads, min_heads, group, floor", [(8, 3, 1, 3), (8, 3, 2, 4), (8, 3, 4, 4), (8, 5, 4, 8),
                                                            (2, 3, 2, 2), (12, 1, 3, 3)])
def test_the_head_floor_is_min_heads_in_whole_groups(heads, min_heads, group, floor) -> None:
    """What the up-front checks of a FLOPs budget and of a latency target take as the fewest heads a block
    can keep."""
    from lmmc.latency_budget import head_floor

    assert head_floor(heads, min_heads, group) == floor
