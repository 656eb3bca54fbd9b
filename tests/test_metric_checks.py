"""Measurement code checked against hand computations: unit costs, cosine, ties, zero-shot, gates, bench's pick."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lmmc.export.validate import _best, _gate, cosine, neighbour_agreement, zero_shot_accuracy

from lmmc.adapters import block_list, get_adapter, head_dim
from lmmc.bench import best_pair
from lmmc.cost import group_cost, head_cost
from tests.conftest import tiny_llava

pytestmark = pytest.mark.usefixtures("one_thread")


# --- cost: one query head under grouped-query attention ----------------------------------------------------

def test_a_gqa_query_head_costs_half_its_group_by_hand() -> None:
    """tiny_llava's decoder: hidden 32, 4 query heads sharing 2 key/value heads (g = 2), head_dim 8, no biases.
    One query head is its q rows, o columns, half its group's k and v rows and its two attention products."""
    model = tiny_llava()
    tower = get_adapter("llava").tower("language")
    block, hd, tokens = block_list(model, tower)[1][0], head_dim(model, tower), 10
    assert hd == 8
    macs_per_token = 8 * 32 + 32 * 8 + (8 * 32 + 8 * 32) // 2 + 2 * tokens * 8  # q, o, half of k and v, QK^T and AV
    head = head_cost(block, tower, hd, tokens)
    assert (head.params, head.flops) == (8 * 32 + 32 * 8 + 8 * 32, 2 * macs_per_token * tokens)  # 768, 18560
    group = group_cost(block, tower, hd, tokens)
    assert (group.params, group.flops) == (2 * head.params, 2 * head.flops)


# --- validation: cosine, float-noise ties, zero-shot prompt ensembling, gates ------------------

def test_cosine_is_row_wise_against_torch() -> None:
    """Each row's cosine to the same row of the other matrix, whatever the columns' lengths: a student
    whose embeddings differ in scale per channel must not read as another cosine."""
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, -4.0]])
    b = np.array([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    expected = torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b)).numpy()
    assert np.allclose(cosine(a, b), expected) and np.allclose(cosine(a, b), [1.0, 1 / math.sqrt(2), -1 / math.sqrt(50)])


def test_candidates_within_float_noise_of_the_best_are_tied() -> None:
    """Similarities 1e-9 apart are one value rounded two ways: both candidates are best, and a student that
    names either of two such teacher neighbours agrees half (a share of a tie), not all or nothing."""
    assert _best(np.array([[0.5, 0.5 - 1e-9, 0.1]]), 1).tolist() == [[True, True, False]]
    assert _best(np.array([[0.5, 0.5 - 1e-3, 0.1]]), 1).tolist() == [[True, False, False]]
    # sample 0's teacher neighbours 1 and 2 lie under 1e-8 apart in cosine, 2 a hair nearer; under the
    # student 1 is clearly nearest, which agrees: 1 is one of the teacher's tied best
    teacher = np.array([[1.0, 0.0, 0.0], [1.0, 1e-4, 0.0], [1.0, 0.0, 0.9999e-4], [-1.0, 0.0, 0.0]])
    student = np.array([[1.0, 0.0, 0.0], [1.0, 1e-2, 0.0], [1.0, 0.0, 5e-1], [-1.0, 0.0, 0.0]])
    gap = cosine(teacher[[0]], teacher[[2]])[0] - cosine(teacher[[0]], teacher[[1]])[0]
    assert 0 < gap < 1e-6
    # the reference: each sample's share of its student best among its teacher best (ties within 1e-6)
    per_sample = []
    for i in range(4):
        t = [cosine(teacher[[i]], teacher[[j]])[0] if j != i else -np.inf for j in range(4)]
        s = [cosine(student[[i]], student[[j]])[0] if j != i else -np.inf for j in range(4)]
        t_best = {j for j in range(4) if t[j] >= max(t) - 1e-6}
        s_best = {j for j in range(4) if s[j] >= max(s) - 1e-6}
        per_sample.append(len(s_best & t_best) / len(s_best))
    assert per_sample[0] == 1.0
    assert neighbour_agreement(teacher, student) == pytest.approx(np.mean(per_sample))


def test_zero_shot_averages_unit_prompts_before_comparing() -> None:
    """CLIP's prompt ensembling averages normalised prompt embeddings: class 0's prompts at 0 and 90 degrees
    (one 10 times longer) make a class at 45 degrees, nearer an image at 60 degrees than class 1 at 20."""
    deg = np.deg2rad
    prompts = np.array([[10.0, 0.0], [0.0, 1.0], [math.cos(deg(20)), math.sin(deg(20))]])
    images = np.array([[math.cos(deg(60)), math.sin(deg(60))]])
    assert zero_shot_accuracy(images, prompts, [0, 0, 1], [0], 2) == 1.0
    assert zero_shot_accuracy(images, prompts, [0, 0, 1], [1], 2) == 0.0


@pytest.mark.parametrize("value, op, passed", [(0.5, "<=", True), (0.5, ">=", True), (0.5000001, "<=", False),
                                               (0.4999999, ">=", False), (float("nan"), "<=", False)])
def test_a_value_at_its_threshold_passes_the_gate(value: float, op: str, passed: bool) -> None:
    """Gates are inclusive: k = 1 among 2 candidates agrees by chance exactly 0.5 = MAX_AGREEMENT_CHANCE, and a
    held-out count equal to min_held_out is enough."""
    assert _gate("g", value, 0.5, op)["passed"] is passed


# --- bench: the best pair -----------------------------------------------------------------------------------

def _row(model: str, artifact: str, p50: float, cos: float) -> dict:
    return {"model": model, "artifact": artifact, "latency_ms": {"p50": p50}, "cosine_to_teacher": {"held-out": cos}}


def test_a_student_exactly_at_min_cosine_competes() -> None:
    """min_cosine is a floor the student may meet: a student at exactly 0.9 is the best one at 10 ms against
    the 40 ms teacher (ratio 0.25), not the slower one above the floor."""
    rows = [_row("teacher", "onnxruntime fp32", 40.0, 1.0), _row("student", "fast", 10.0, 0.9),
            _row("student", "slow", 30.0, 0.95)]
    best = best_pair(rows, min_cosine=0.9)
    assert (best["student"], best["latency_ratio"], best["student_meets_min_cosine"]) == ("fast", 0.25, True)


# --- latency model: the fit weighs relative error -----------------------------------------------------------

def test_the_latency_fit_minimises_relative_not_absolute_error() -> None:
    """With measurements no line fits exactly, the coefficients minimise the squared error relative to each
    measurement (scipy's NNLS on rows divided by their ms), so a one-block structure's few ms count as much as
    the teacher's; an absolute fit would let the teacher's row dominate."""
    from scipy.optimize import nnls

    from lmmc.latency_model import _features, fit_tower

    rows = [([4, 4], [64, 64], 20.0), ([4], [64], 6.0), ([1, 1], [64, 64], 14.0), ([4, 4], [11, 11], 9.0),
            ([2, 3], [30, 50], 12.5), ([3], [20], 3.1)]
    a = np.array([_features(h, c) for h, c, _ in rows])
    y = np.array([ms for *_, ms in rows])
    relative = nnls(a / y[:, None], np.ones(len(rows)))[0]
    absolute = nnls(a, y)[0]
    assert not np.allclose(relative, absolute, rtol=1e-3)
    assert np.allclose(fit_tower(rows), relative, rtol=1e-6, atol=1e-9)


def test_the_latency_fit_recovers_per_channel_costs_of_uneven_blocks() -> None:
    """ms = fixed + blocks·block + Σheads·head + Σchannels·channel, computed by hand from known coefficients over
    blocks of uneven FFN widths, is fitted back exactly, and the model predicts what was measured."""
    from lmmc.latency_model import LatencyModel, Target, TowerLatency, fit_tower

    fixed, block, head, channel = 1.5, 0.75, 0.25, 0.01
    shapes = [([4, 4], [64, 64]), ([4], [64]), ([1, 1], [64, 64]), ([4, 4], [11, 11]), ([2, 3], [30, 50]),
              ([3, 1, 2], [5, 60, 20])]
    rows = [(h, c, fixed + block * len(h) + head * sum(h) + channel * sum(c)) for h, c in shapes]
    assert rows[4][2] == pytest.approx(1.5 + 1.5 + 1.25 + 0.8)
    coef = fit_tower(rows)
    assert np.allclose(coef, (fixed, block, head, channel), rtol=1e-6)
    model = LatencyModel(Target(), {"text": TowerLatency(*coef, hidden=32)})
    assert model.structure_ms("text", [2, 3], [30, 50]) == pytest.approx(5.05)


# --- generation: per-sample KL over the answer tokens only --------------------------------------------------

class _Logits(torch.nn.Module):
    """A stand-in decoder: each position's logits are a fixed row per input token id."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask, pixel_values):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_per_sample_kl_is_the_mean_over_its_answer_tokens_not_its_length() -> None:
    """A sample of 5 positions with 2 answer tokens (and padding after them): its KL is the mean over those 2
    predictions, not their sum over the 4 shifted positions; the overall mean is over every answer token."""
    from lmmc.generation import teacher_forced

    torch.manual_seed(0)
    t_table, s_table = torch.randn(6, 4), torch.randn(6, 4)
    ids = torch.tensor([[1, 2, 3, 4, 0]])
    labels = torch.tensor([[-100, -100, 3, 4, -100]])  # logits at positions 1 and 2 predict the answer
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0]]), "pixel_values": torch.zeros(1),
             "labels": labels}

    def kl(p: torch.Tensor, q: torch.Tensor) -> float:
        p, q = p.double().softmax(-1), q.double().softmax(-1)
        return float((p * (p / q).log()).sum())

    by_hand = [kl(t_table[i], s_table[i]) for i in (2, 3)]
    out = teacher_forced(_Logits(t_table), _Logits(s_table), [batch])
    assert out["answer_tokens"] == 2
    assert out["kl_mean"] == pytest.approx(sum(by_hand) / 2)
    assert out["kl_per_sample"] == [pytest.approx(sum(by_hand) / 2, abs=1e-6)]
