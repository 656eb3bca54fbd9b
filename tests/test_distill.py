"""The distill pass: layer maps and losses against hand computations, masks that hold, kill-and-resume
that ends where an uninterrupted run ends, both towers of a dual encoder, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import transformers
import yaml
from click.testing import CliRunner

from conftest import _WORDS, CORPUS, TINY_TEXT, compile_tiny_text, save_tiny, tiny_model, tiny_vocab
from lmmc.adapters import TowerModule, block_list, get_adapter
from lmmc.artifact import Artifact
from lmmc.data import encode_text, load_calibration, random_calibration, token_coverage, vocabulary_runs
from lmmc.distill_losses import (check_layer_map, closest_layer_map, contrastive_loss, fit_projection, hidden_loss,
                                 kl_logits, origin_layer_map, relation_loss, uniform_layer_map)
from lmmc.distiller import Trainer, collate, modality_key
from lmmc.errors import LmmcError
from lmmc.modelio import make_student
from lmmc.passes.distill import build_corpus
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import CalibrationConfig, parse_recipe
from lmmc.surgery import keep_blocks_

TESTS = Path(__file__).resolve().parent
Distill = get_pass("distill")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_art(kind: str, sparsity: float = 0.5, samples: int = 48, eval_samples: int = 16,
             teacher: torch.nn.Module | None = None) -> Artifact:
    """A tiny teacher, its student pruned by magnitude (which needs no calibration pass), random data."""
    teacher = teacher if teacher is not None else tiny_model(kind)
    adapter = get_adapter(teacher.config.model_type)
    calib = random_calibration(CalibrationConfig(random=True, samples=samples, eval_samples=eval_samples,
                                                 batch_size=8), teacher, adapter)
    art = Artifact(model_ref=kind, adapter=adapter, teacher=teacher, student=make_student(teacher), calib=calib)
    if sparsity:
        magnitude = get_pass("magnitude")
        run_pass(magnitude(magnitude.Config(sparsity=sparsity)), art)
    return art


def trainer(art: Artifact, cfg) -> Trainer:
    """The trainer the pass would run, on the pass's own corpus."""
    return Trainer(cfg, art, *build_corpus(cfg, art, sorted({modality_key(t) for t in art.adapter.towers})))


def distill(art: Artifact, **cfg) -> dict:
    base = dict(steps=10, batch_size=8, lr=1e-3, dev_samples=8, eval_every=5, progress=False)
    return Distill(Distill.Config(**{**base, **cfg})).run(art)


# --- layer maps and losses ------------------------------------------------------------------------------

def test_uniform_and_origin_layer_maps():
    assert uniform_layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert uniform_layer_map(3, 6) == [2, 4, 6]
    assert uniform_layer_map(4, 6) == [2, 3, 5, 6]
    assert uniform_layer_map(1, 12) == [12]
    # Depth pruning removed teacher blocks 2 and 5 (0-based): kept blocks keep their targets, the last
    # block learns the teacher's output.
    assert origin_layer_map([0, 1, 3, 4], 6) == [1, 2, 4, 6]
    with pytest.raises(LmmcError, match="teacher block 6"):
        origin_layer_map([0, 6], 6)


def test_explicit_layer_map_is_checked():
    assert check_layer_map([2, 2, 6], 3, 6, "text") == [2, 2, 6]
    with pytest.raises(LmmcError, match="student layer 2 to teacher layer 7.*layers 1..6"):
        check_layer_map([1, 7, 6], 3, 6, "text")
    with pytest.raises(LmmcError, match="2 entries, but the student has 3 layers"):
        check_layer_map([1, 6], 3, 6, "text")


def test_closest_layer_map_finds_the_rotated_copies():
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(300, 16, generator=gen) for _ in range(4)]
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    # Student layer 1 is teacher layer 3 rotated and scaled, layer 2 is teacher layer 1 plus noise, and
    # the last student layer always learns the teacher's last layer.
    student = [2.0 * teacher[2] @ rotation, teacher[0] + 0.1 * torch.randn(300, 16, generator=gen),
               torch.randn(300, 16, generator=gen)]
    assert closest_layer_map(student, teacher) == [3, 1, 4]


def test_hidden_loss_counts_real_tokens_only():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = hidden_loss(s, t, mask, scale=2.0)
    want = torch.stack([((s[0, :3] - t[0, :3]) ** 2).mean(), ((s[1] - t[1]) ** 2).mean()]) / 2.0
    torch.testing.assert_close(got, want)


def test_relation_loss_is_the_mean_kl_of_each_relation_head_over_real_tokens():
    gen = torch.Generator().manual_seed(0)
    # the student's blocks are narrower than the teacher's (fewer attention heads): 4 channels against 8
    teacher = {r: torch.randn(2, 5, 8, generator=gen, dtype=torch.float64) for r in "qkv"}
    student = {r: torch.randn(2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True) for r in "qkv"}
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = relation_loss(student, teacher, 2, mask)

    def reference(b: int) -> torch.Tensor:
        n = int(mask[b].sum())
        terms = []
        for r in "qkv":
            for h in range(2):
                x = [x_[r][b, :n].detach() for x_ in (teacher, student)]
                x = [a[:, h * a.shape[1] // 2:(h + 1) * a.shape[1] // 2] for a in x]
                p, q = [torch.softmax(a @ a.T / math.sqrt(a.shape[1]), -1) for a in x]
                terms.append((p * (p / q).log()).sum(-1).mean())
        return torch.stack(terms).mean()

    torch.testing.assert_close(got.detach(), torch.stack([reference(0), reference(1)]).to(got.dtype))
    got.sum().backward()
    assert all(torch.isfinite(student[r].grad).all() and student[r].grad[0, 3:].abs().max() == 0 for r in "qkv")
    # what the padding holds changes nothing; equal relations cost nothing
    moved = {r: student[r].detach().clone() for r in "qkv"}
    for r in "qkv":
        moved[r][0, 3:] = 50 * torch.randn(2, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(relation_loss(moved, teacher, 2, mask), got.detach())
    assert relation_loss(teacher, teacher, 2, mask).abs().max() < 1e-12
    with pytest.raises(LmmcError, match="relation_heads = 3 does not divide"):
        relation_loss(student, teacher, 3, mask)


def test_contrastive_loss_is_the_teacher_row_softmax_kl_and_splits_over_shards():
    gen = torch.Generator().manual_seed(0)
    s_img, s_txt, t_img, t_txt = (torch.randn(6, 8, generator=gen) for _ in range(4))
    full = contrastive_loss(s_img, s_txt, t_img, t_txt, s_img, s_txt, t_img, t_txt, "kl", 10.0)
    cos = lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # noqa: E731
    p_t, p_s = (10.0 * cos(t_img, t_txt)).softmax(-1), (10.0 * cos(s_img, s_txt)).softmax(-1)
    i2t = (p_t * (p_t.log() - p_s.log())).sum(-1)
    q_t, q_s = (10.0 * cos(t_txt, t_img)).softmax(-1), (10.0 * cos(s_txt, s_img)).softmax(-1)
    t2i = (q_t * (q_t.log() - q_s.log())).sum(-1)
    torch.testing.assert_close(full, 0.5 * (i2t + t2i))
    # Two shards, each with its own rows against every column, give the same per-pair losses: what
    # makes the distributed objective equal to the single-process one.
    halves = [contrastive_loss(s_img[k], s_txt[k], t_img[k], t_txt[k], s_img, s_txt, t_img, t_txt, "kl", 10.0)
              for k in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(torch.cat(halves), full)
    assert float(kl_logits(t_img, t_img).abs().max()) < 1e-6
    assert float(contrastive_loss(t_img, t_txt, t_img, t_txt, t_img, t_txt, t_img, t_txt, "mse", 1.0).max()) == 0.0


def test_sigmoid_contrastive_loss_is_each_pairs_bernoulli_kl_and_sees_a_shifted_row():
    """SigLIP scores each pair on its own, σ(scale · cos + bias): a student whose every similarity sits lower
    by the same amount keeps the softmax of each row, so kl misses it, and loses every match probability."""
    gen = torch.Generator().manual_seed(0)
    s_img, s_txt, t_img, t_txt = (torch.randn(6, 8, generator=gen) for _ in range(4))
    scale, bias = 10.0, -4.0
    got = contrastive_loss(s_img, s_txt, t_img, t_txt, s_img, s_txt, t_img, t_txt, "sigmoid", scale, bias)
    cos = lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # noqa: E731

    def bernoulli_kl(t, s):
        p, q = torch.sigmoid(scale * t + bias), torch.sigmoid(scale * s + bias)
        return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1)
    want = 0.5 * (bernoulli_kl(cos(t_img, t_txt), cos(s_img, s_txt)) + bernoulli_kl(cos(t_txt, t_img), cos(s_txt, s_img)))
    torch.testing.assert_close(got, want)
    assert float(contrastive_loss(t_img, t_txt, t_img, t_txt, t_img, t_txt, t_img, t_txt, "sigmoid", scale,
                                  bias).abs().max()) < 1e-6
    # one row of the student's similarities lowered by 0.2 everywhere: the softmax is the same
    s, t = cos(t_img, t_txt), cos(t_img, t_txt)
    lowered = s - 0.2
    kl = kl_logits(scale * lowered, scale * t)
    assert float(kl.abs().max()) < 1e-5
    p, q = torch.sigmoid(scale * t + bias), torch.sigmoid(scale * lowered + bias)
    assert float((p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1).min()) > 0.1


def test_a_siglip_teacher_is_distilled_on_its_own_pairwise_objective_by_default():
    art = tiny_art("siglip", sparsity=0.0)
    assert trainer(art, Distill.Config(steps=1, progress=False)).objective.contrastive_kind == "sigmoid"
    assert trainer(art, Distill.Config(steps=1, progress=False, contrastive_loss="kl")).objective.contrastive_kind == "kl"
    assert trainer(tiny_art("clip", sparsity=0.0), Distill.Config(steps=1, progress=False)).objective.contrastive_kind == "kl"

    # Contrastive distillation alone, at a scale and bias where match probabilities spread: the pairwise
    # objective brings the held-out pairs' probabilities toward the teacher's, the row softmax away from them.
    drift = {}
    for kind in ("sigmoid", "kl"):
        teacher = tiny_model("siglip")
        with torch.no_grad():
            teacher.logit_scale.fill_(math.log(10.0))
            teacher.logit_bias.fill_(-2.0)
        art = tiny_art("siglip", teacher=teacher)

        def mean_drift() -> float:
            s, t = held_out_embeddings(art.student, art), held_out_embeddings(art.teacher, art)
            p = lambda e: torch.sigmoid(10.0 * e["vision"] @ e["text"].T - 2.0)  # noqa: E731
            return float((p(s) - p(t)).abs().mean())
        before = mean_drift()
        distill(art, steps=12, hidden=0.0, output=0.0, contrastive=1.0, schedule="round_robin", blocks_per_arm=None,
                contrastive_loss=kind)
        drift[kind] = mean_drift()
    assert drift["sigmoid"] < 0.95 * before < drift["kl"]


def test_fit_projection_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(400, 8, generator=gen)
    w = torch.randn(12, 8, generator=gen)
    torch.testing.assert_close(fit_projection(s, s @ w.T, ridge=1e-8), w, atol=1e-4, rtol=1e-4)


# --- training -------------------------------------------------------------------------------------------

def test_masks_hold_after_every_step_and_fidelity_improves():
    art = tiny_art("clip")
    before = {n: p.detach().clone() for n, p in art.student.named_parameters()}
    m = distill(art, steps=12, lr=3e-3, schedule="all", eval_every=0, teacher_cache_mb=0)
    params = dict(art.student.named_parameters())
    assert art.masks
    for name, mask in art.masks.items():
        assert torch.count_nonzero(params[name][~mask]) == 0, name
        # The kept weights did train; otherwise the zeros above would prove nothing.
        assert float((params[name][mask] - before[name][mask]).detach().abs().max()) > 1e-4, name
    assert m["masked_weights_nonzero"] == 0
    assert m["dev_after"]["score"] > m["dev_before"]["score"] + 0.02


def test_every_seed_the_config_takes_shuffles_the_same_way_twice():
    """A seed above about 1e13 overflowed the generator's seed once scaled per epoch: exit 3 mid-compile."""
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        art = tiny_art("clip")
        assert distill(art, steps=12, lr=3e-3, eval_every=0, teacher_cache_mb=0, seed=seed)["kept_step"] == 12
        return {n: p.detach().clone() for n, p in art.student.named_parameters()}

    big, again, small = weights(2**63 - 1), weights(2**63 - 1), weights(0)
    assert all(torch.equal(big[n], again[n]) for n in big)
    assert any(not torch.equal(big[n], small[n]) for n in big)


@pytest.mark.parametrize("second", ["wanda", "sparsegpt"])
def test_a_second_pruner_at_a_lower_sparsity_keeps_the_first_ones_zeros_through_distillation(second):
    """Wanda at 0.3 after magnitude at 0.5 replaced magnitude's masks with its own: distillation then grew the
    difference back and the student ended 28 % sparse, while the records said 50 %."""
    art = tiny_art("bert", sparsity=0.5)
    first = {name: mask.clone() for name, mask in art.masks.items()}
    pruner = get_pass(second)
    run_pass(pruner(pruner.Config(sparsity=0.3)), art)
    distill(art, steps=6, lr=3e-3, eval_every=0, teacher_cache_mb=0)
    params = dict(art.student.named_parameters())
    for name, mask in first.items():
        assert torch.count_nonzero(params[name][~mask]) == 0, name
        assert torch.equal(art.masks[name], mask), name  # 0.3 removes nothing that 0.5 kept, row by row
        assert float((~art.masks[name]).float().mean()) == pytest.approx(0.5), name


def test_cached_teacher_targets_equal_a_fresh_teacher_forward():
    art = tiny_art("clip")
    cached, fresh = (trainer(art, Distill.Config(batch_size=8, dev_samples=8, progress=False, teacher_cache_mb=mb))
                     for mb in (2048, 0))
    assert cached.cache is not None and fresh.cache is None
    local = cached.batch_indices(3)
    inputs = {t.modality: cached._collate([cached.train[i] for i in local], t) for t in art.adapter.towers}
    (a, a_pooled), (b, b_pooled) = (t.teacher_targets(inputs, None, local) for t in (cached, fresh))
    assert set(a) == set(b) == {"text", "vision"} and set(a_pooled) == set(b_pooled)
    for tower in a:
        mask = inputs["text"]["attention_mask"].bool() if tower == "text" else slice(None)
        for layer in b[tower]["hidden"]:
            torch.testing.assert_close(a[tower]["hidden"][layer][mask], b[tower]["hidden"][layer][mask])
        torch.testing.assert_close(a[tower]["pooled"], b[tower]["pooled"])
    cached.restore_flags()


def test_targets_past_the_memory_available_are_not_cached_and_the_run_says_why(monkeypatch):
    """Past what the machine has, the out-of-memory killer would end the compile with nothing said: the cache is
    left out, the run trains as a run without one does, and its warning says why."""
    runs = {}
    for name, mb, available in [("no room", 2048, 4096), ("no cache", 0, None), ("room", 2048, 2 ** 40)]:
        monkeypatch.setattr("lmmc.distiller.available_bytes", lambda: available)
        art = tiny_art("bert")
        runs[name] = (distill(art, steps=6, lr=3e-3, eval_every=0, teacher_cache_mb=mb), art.student.state_dict())
    metrics = runs["no room"][0]
    assert (metrics["teacher_cached"], runs["no cache"][0]["teacher_cached"], runs["room"][0]["teacher_cached"]) == \
        (False, False, True)
    assert metrics["teacher_cache_skipped"].startswith(
        "the teacher's targets were not cached: they would take about 0.0 GiB, more than three quarters of the 0.0 "
        "GiB this machine had available; every step runs the teacher instead")
    assert "teacher_cache_skipped" not in runs["no cache"][0] and "teacher_cache_skipped" not in runs["room"][0]
    for name, weights in runs["no room"][1].items():
        assert torch.equal(weights, runs["no cache"][1][name]), name


def test_cached_targets_sit_on_the_tokens_of_a_left_padded_batch(tmp_path):
    """A tokenizer that pads on the left puts a text's tokens at the end of its row. The cached targets were
    padded after the tokens, so each hidden-state term compared a token with another token's target. (MPNet, padded
    with its own pad id, reads a text alike under any padding, so its targets are cached.)"""
    art = tiny_art("mpnet")
    art.preprocessor = {"tokenizer": transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")),
                                                                 padding_side="left", pad_token="[UNK]")}
    t = trainer(art, Distill.Config(batch_size=8, dev_samples=8, progress=False, teacher_cache_mb=2048))
    assert t.cache is not None and t.left
    by_length = sorted(range(len(t.train)), key=t.lengths.__getitem__)
    local = by_length[:3] + by_length[-3:]
    inputs = {"text": t._collate([t.train[i] for i in local], art.adapter.towers[0])}
    mask = inputs["text"]["attention_mask"].bool()
    assert not mask[:, 0].all() and mask[:, -1].all()  # the short rows are padded, on the left
    targets, _ = t.teacher_targets(inputs, None, local)
    for layer, got in targets["text"]["hidden"].items():
        torch.testing.assert_close(got[mask], torch.cat([t.cache["text"][i]["hidden"][layer] for i in local]))
        assert not got[~mask].any()
    t.restore_flags()


@pytest.mark.parametrize("kind, pad, cached", [("bert", "[PAD]", False), ("mpnet", "[UNK]", True)])
def test_left_padding_caches_only_a_teacher_whose_tokens_do_not_move_with_the_padding(tmp_path, kind, pad, cached):
    """BERT numbers positions from the row's first slot, pads included, so a left-padded text's hidden states
    change with the padding its batch needs; targets cached at one padding would be another batch's. MPNet counts
    positions over the tokens that are not its pad id (1, the tiny vocabulary's [UNK]), so its targets hold at any
    padding and stay cached."""
    art = tiny_art(kind)
    tokenizer = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")), padding_side="left",
                                           pad_token=pad)
    art.preprocessor = {"tokenizer": tokenizer}
    t, fresh = (trainer(art, Distill.Config(batch_size=8, dev_samples=8, progress=False, teacher_cache_mb=mb))
                for mb in (2048, 0))
    assert t.left and (t.cache is not None) == cached and (t.cache_skipped is None) == cached
    by_length = sorted(range(len(t.train)), key=t.lengths.__getitem__)
    local = by_length[:4]  # the shortest, which the cache saw padded to the longest texts' length
    inputs = {"text": t._collate([t.train[i] for i in local], art.adapter.towers[0], multiple=1)}
    (got, _), (want, _) = (x.teacher_targets(inputs, None, local) for x in (t, fresh))
    mask = inputs["text"]["attention_mask"].bool()
    assert mask.shape[1] < max(t.lengths)
    for layer in want["text"]["hidden"]:
        torch.testing.assert_close(got["text"]["hidden"][layer][mask], want["text"]["hidden"][layer][mask])
    t.restore_flags()


def test_under_bf16_the_cache_holds_bf16_targets_that_a_step_reads_as_fp32_within_rounding():
    art = tiny_art("bert")
    cached, fresh = (trainer(art, Distill.Config(batch_size=8, dev_samples=8, progress=False, precision="bf16",
                                                 teacher_cache_mb=mb)) for mb in (2048, 0))
    entry = next(iter(cached.cache["text"].values()))
    assert {t.dtype for t in entry["hidden"].values()} == {torch.bfloat16} and entry["pooled"].dtype == torch.bfloat16
    local = cached.batch_indices(3)
    inputs = {"text": cached._collate([cached.train[i] for i in local], art.adapter.towers[0])}
    with torch.no_grad(), fresh._autocast():
        (a, _), (b, _) = (t.teacher_targets(inputs, None, local) for t in (cached, fresh))
    mask = inputs["text"]["attention_mask"].bool()
    for layer in b["text"]["hidden"]:
        got, want = a["text"]["hidden"][layer], b["text"]["hidden"][layer].float()
        assert got.dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: a relative rounding of at most 2^-8 per element.
        torch.testing.assert_close(got[mask], want[mask], rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(a["text"]["pooled"], b["text"]["pooled"].float(), rtol=2 ** -8, atol=1e-6)
    cached.restore_flags()


def test_under_bf16_on_the_cpu_attention_runs_fused_without_gradients_and_as_plain_products_with_them():
    t = trainer(tiny_art("bert"), Distill.Config(batch_size=8, dev_samples=8, progress=False, precision="bf16"))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 48, 32, generator=gen) for _ in range(3))
    mask = torch.ones(4, 1, 48, 48, dtype=torch.bool)
    mask[1, ..., 30:] = False

    def attend(backend=None):
        with sdpa_kernel(backend) if backend else nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    fused, plain = attend(SDPBackend.FLASH_ATTENTION), attend(SDPBackend.MATH)
    assert not torch.equal(fused, plain)
    with torch.no_grad(), t._autocast():
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), fused)
    with t._autocast():
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), plain)
    t.restore_flags()


def test_padding_to_a_multiple_of_16_tokens_leaves_every_sample_loss_unchanged():
    art = tiny_art("bert")
    t = trainer(art, Distill.Config(batch_size=8, dev_samples=8, progress=False, teacher_cache_mb=0))
    samples = [{"text": {k: v[:n] for k, v in s["text"].items()}}
               for s, n in zip(t.train[:6], (5, 7, 9, 11, 12, 6))]
    losses = []
    for multiple in (1, 16):
        inputs = {"text": {k: v.to(t.device) for k, v in collate(samples, "text", t.pad["text"], multiple).items()}}
        assert inputs["text"]["input_ids"].shape[1] == (12 if multiple == 1 else 16)
        with torch.no_grad():
            targets, pooled = t.teacher_targets(inputs, None, [])
            losses.append(t.objective.per_sample_loss(inputs, targets, None, pooled, sharded=False))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    t.restore_flags()


def test_bf16_on_the_cpu_pads_batches_to_16_tokens_and_learns_as_fp32_does():
    runs = {}
    for precision in ("fp32", "bf16"):
        art = tiny_art("clip")
        t = trainer(art, Distill.Config(batch_size=8, dev_samples=8, progress=False, precision=precision))
        assert t.pad_multiple == (16 if precision == "bf16" else 1)
        t.restore_flags()
        runs[precision] = distill(art, steps=12, lr=3e-3, schedule="all", eval_every=0, precision=precision)
    fp32, bf16 = (runs[p]["dev_after"]["score"] for p in ("fp32", "bf16"))
    assert bf16 > runs["bf16"]["dev_before"]["score"] + 0.02
    assert abs(bf16 - fp32) < 0.01


def test_clip_arms_cover_both_towers_and_contrastive_distillation_lowers_the_similarity_loss(monkeypatch):
    from lmmc.optima import SlidingWindowThompson

    seen: list[tuple[int, float]] = []
    update = SlidingWindowThompson.update
    monkeypatch.setattr(SlidingWindowThompson, "update",
                        lambda self, arm, reward: (seen.append((arm, reward)), update(self, arm, reward))[1])
    art = tiny_art("clip")
    m = distill(art, steps=12, schedule="optima", blocks_per_arm=1)
    assert m["arms"] == ["text[0:1]", "text[1:2]", "vision[0:1]", "vision[1:2]"]
    assert all(n > 0 for n in m["arm_picks"].values()) and sum(m["arm_picks"].values()) == 12
    # the report gives each arm's mean reward, as the bandit received them
    assert len(seen) == 12 and any(r != 0 for _, r in seen)
    for i, name in enumerate(m["arms"]):
        mine = [r for a, r in seen if a == i]
        assert m["arm_reward_mean"][name] == pytest.approx(sum(mine) / len(mine), rel=1e-12)

    # Contrastive distillation alone, on held-out pairs the pass never saw.
    art = tiny_art("clip")
    teacher = held_out_embeddings(art.teacher, art)
    before = similarity_loss(held_out_embeddings(art.student, art), teacher)
    distill(art, steps=12, hidden=0.0, output=0.0, contrastive=1.0, schedule="round_robin", blocks_per_arm=None)
    after = similarity_loss(held_out_embeddings(art.student, art), teacher)
    assert after < 0.7 * before


def test_one_tower_of_a_dual_encoder_is_distilled_and_the_other_left_bit_for_bit():
    art = tiny_art("clip")
    text_tower = {n: p.detach().clone() for n, p in art.student.named_parameters() if n.startswith("text_")}
    vision_tower = {n: p.detach().clone() for n, p in art.student.named_parameters() if n.startswith("vision_")}
    m = distill(art, steps=12, towers=["vision"], blocks_per_arm=1, schedule="round_robin")
    assert m["towers"] == ["vision"] and m["arms"] == ["vision[0:1]", "vision[1:2]"]
    assert set(m["dev_after"]["cosine"]) == {"vision"} and "similarity_loss" not in m["dev_after"]
    assert m["dev_after"]["score"] > m["dev_before"]["score"]
    params = dict(art.student.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in text_tower.items())
    assert sum(not torch.equal(params[n], p) for n, p in vision_tower.items()) > len(vision_tower) // 2
    for name, mask in art.masks.items():
        assert params[name][~mask.bool()].count_nonzero() == 0


def test_compile_cuts_and_distils_the_vision_tower_alone_on_an_image_folder(tmp_path):
    """An image index's case: only the vision tower is cut and distilled, on images without captions."""
    import numpy as np
    from PIL import Image

    from lmmc.cli import main
    from lmmc.student import load_student

    model = save_tiny("clip", tmp_path / "tiny-clip")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    recipe = {"calibration": {"random": True, "samples": 16, "eval_samples": 32, "batch_size": 8},
              "passes": [{"antgmm": {"keep": {"text": 1.0, "vision": 0.5}, "seq_len": 8}},
                         {"distill": {"towers": ["vision"], "corpus": str(images), "steps": 6, "batch_size": 8,
                                      "dev_samples": 8, "eval_every": 3, "progress": False}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    metrics = next(p["metrics"] for p in report["passes"] if p["name"] == "distill")
    assert metrics["towers"] == ["vision"] and (metrics["train_samples"], metrics["dev_samples"]) == (32, 8)
    student, teacher = load_student(out / "student"), transformers.CLIPModel.from_pretrained(model)
    t_params = dict(teacher.named_parameters())
    same = {n: torch.equal(p, t_params[n]) for n, p in student.named_parameters() if p.shape == t_params[n].shape}
    assert all(v for n, v in same.items() if n.startswith(("text_model.", "text_projection")))
    vision = [v for n, v in same.items() if n.startswith("vision_model.encoder.")]
    assert sum(not v for v in vision) > len(vision) // 2  # trained (its key biases stay: see distiller)


def test_towers_must_be_the_models():
    with pytest.raises(LmmcError, match=r"towers names \['audio'\].*towers \['text', 'vision'\]"):
        distill(tiny_art("clip", sparsity=0.0), towers=["audio", "vision"])


def test_a_dual_encoders_dev_images_are_not_trained_on_under_another_caption():
    art = tiny_art("clip", sparsity=0.0, samples=64)
    for batch in art.calib.calib["image"]:  # every image twice, under two captions
        batch["pixel_values"][1::2] = batch["pixel_values"][0::2]
    train, dev = build_corpus(Distill.Config(dev_samples=8, progress=False), art, ["image", "text"])
    pixels = lambda samples: [s["image"]["pixel_values"].numpy().tobytes() for s in samples]  # noqa: E731
    assert len(dev) == len(set(pixels(dev))) == 8 and not set(pixels(dev)) & set(pixels(train))
    assert len(train) == 64 - 2 * 8  # a dev image's other caption is neither dev nor trained on


def test_a_dual_encoders_reward_images_are_not_trained_on_under_another_caption():
    art = tiny_art("clip", sparsity=0.0, samples=64)
    for batch in art.calib.calib["image"]:  # every image twice, under two captions
        batch["pixel_values"][1::2] = batch["pixel_values"][0::2]
    cfg = Distill.Config(dev_samples=8, schedule="optima", blocks_per_arm=1, reward_samples=6, progress=False)
    train, dev = build_corpus(cfg, art, ["image", "text"])
    t = Trainer(cfg, art, train, dev)
    pixels = lambda samples: {s["image"]["pixel_values"].numpy().tobytes() for s in samples}  # noqa: E731
    aside = pixels(t.reward_set)
    assert len(t.reward_set) == 6 and not aside & pixels(t.train)
    twins = sum(pixels([s]) <= aside for s in train[6:])  # the reward images' other captions
    assert twins > 0 and len(t.train) == len(train) - 6 - twins
    t.restore_flags()


def test_token_coverage_counts_the_texts_trained_on_not_the_bandits_reward_samples(tmp_path):
    art = tiny_art("bert", sparsity=0.0)
    art.preprocessor = {"tokenizer": transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))}
    m = distill(art, steps=2, schedule="optima", blocks_per_arm=1, reward_samples=12)
    t = trainer(art, Distill.Config(dev_samples=8, schedule="optima", blocks_per_arm=1, reward_samples=12,
                                    progress=False))
    trained = token_coverage(art.preprocessor["tokenizer"], [s["text"]["input_ids"] for s in t.train])
    assert m["token_coverage"] == round(trained, 4)
    t.restore_flags()


def test_optima_reward_is_the_drop_of_the_whole_loss_on_samples_it_never_trains_on():
    art = tiny_art("bert", sparsity=0.0)
    with torch.no_grad():  # something to distil: a perturbed student
        for p in art.student.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = Distill.Config(batch_size=8, dev_samples=8, steps=4, lr=3e-3, schedule="optima", blocks_per_arm=1,
                         reward_samples=6, progress=False)
    t = trainer(art, cfg)
    assert len(t.reward_set) == 6 and not {id(s) for s in t.reward_set} & {id(s) for s in t.train}

    def whole_loss() -> float:
        inputs, targets, pooled = t.reward_batch
        with torch.no_grad():  # every module's terms and the output term, on the reward samples
            return float(t.objective.per_sample_loss(inputs, targets, None, pooled, sharded=False).mean())

    rewards = []
    for _ in range(4):
        before = whole_loss()
        t.train_step()
        t.step += 1
        rewards.append((before - whole_loss()) / before)
    assert [r for _, r in t.schedule.history] == pytest.approx(rewards, rel=1e-5)
    # The first two steps open each arm once; a module step lowers the whole loss.
    assert [a for a, _ in t.schedule.history][:2] == [0, 1] and rewards[0] > 0
    t.restore_flags()


def test_arms_can_span_both_towers_of_a_dual_encoder():
    art = tiny_art("clip")
    before = {n: p.detach().clone() for n, p in art.student.named_parameters()}
    m = distill(art, steps=1, schedule="round_robin", blocks_per_arm=1, arm_span="towers", keep_best=False)
    assert m["arms"] == ["text[0:1]+vision[0:1]", "text[1:2]+vision[1:2]"]
    moved = {n for n, p in art.student.named_parameters() if not torch.equal(p, before[n])}
    # One step on the first arm trains the first block of both towers, and nothing after them.
    assert any(n.startswith("text_model.encoder.layers.0.") for n in moved)
    assert any(n.startswith("vision_model.encoder.layers.0.") for n in moved)
    assert not any(".layers.1." in n or "projection" in n for n in moved)


def held_out_embeddings(model: torch.nn.Module, art: Artifact) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for tower in art.adapter.towers:
            module = TowerModule(model, tower)
            out[tower.name] = torch.cat([module(*[b[n] for n in module.names])[1]
                                         for b in art.calib.eval_batches(tower.modality)])
    return out


def similarity_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> float:
    s_i, s_t, t_i, t_t = student["vision"], student["text"], teacher["vision"], teacher["text"]
    return float(contrastive_loss(s_i, s_t, t_i, t_t, s_i, s_t, t_i, t_t, "kl", 100.0).mean())


def test_depth_pruned_student_learns_the_layers_its_blocks_came_from():
    teacher = transformers.BertModel(transformers.BertConfig(**{**TINY_TEXT, "num_hidden_layers": 4})).eval()
    art = tiny_art("bert", sparsity=0.0, teacher=teacher)
    tower = art.adapter.towers[0]
    keep_blocks_(art.student, tower, [0, 2, 3])
    m = distill(art, steps=6)
    assert m["layer_map"] == {"text": [1, 3, 4]}
    assert distill(tiny_art("bert", sparsity=0.0, teacher=teacher), steps=1, layer_map="uniform")["layer_map"] == \
        {"text": [1, 2, 3, 4]}


def block_distance(art: Artifact, block: int) -> float:
    """Mean over the held-out texts of the student block's output against the teacher layer it learns
    (hidden-state MSE over real tokens, relative to the teacher layer's mean square)."""
    total = []
    for batch in art.calib.eval_batches("text"):
        t = art.teacher(**batch, output_hidden_states=True).hidden_states[block + 1]
        s = art.student(**batch, output_hidden_states=True).hidden_states[block + 1]
        total.append(hidden_loss(s, t, batch["attention_mask"], float(t.pow(2).mean())))
    return float(torch.cat(total).mean())


@torch.no_grad()
def test_a_faded_block_does_not_pull_the_block_before_it_toward_its_teacher_layer():
    """At the end of AntGMM's fade, block 1's residual update is gone: its output is block 0's. Its
    hidden-state term would then pull block 0 toward teacher layer 2; with the term left out, block 0
    keeps its own target, teacher layer 1 (the output term is off to show the hidden terms alone)."""
    from lmmc.importance import gate_hook

    distances = {}
    for skip in ({}, {"text": [1]}):
        teacher = tiny_model("bert")
        with torch.no_grad():  # a teacher whose second layer differs clearly from its first
            block_list(teacher, get_adapter("bert").towers[0])[1][1].output.dense.weight.mul_(8.0)
        art = tiny_art("bert", sparsity=0.0, teacher=teacher)
        handle = block_list(art.student, art.adapter.towers[0])[1][1].register_forward_hook(
            gate_hook(torch.zeros(())), with_kwargs=True)
        try:
            with torch.enable_grad():
                m = distill(art, steps=20, lr=3e-3, eval_every=0, output=0.0, skip_hidden=skip)
            distances[bool(skip)] = block_distance(art, 0)
        finally:
            handle.remove()
        assert m["skip_hidden"] == skip
    # The student starts as the teacher: block 0 is on its target, and only the faded block's term moves it
    # (beyond rounding noise, which Adam turns into small steps).
    assert distances[True] < 0.01 * distances[False], distances
    for bad in ({"text": [2]}, {"vision": [0]}):
        with pytest.raises(LmmcError, match="skip_hidden"):
            distill(tiny_art("bert", sparsity=0.0), skip_hidden=bad)


def test_narrower_student_is_distilled_through_fitted_projections():
    teacher = tiny_model("bert")
    art = tiny_art("bert", sparsity=0.0, teacher=teacher)
    torch.manual_seed(1)
    art.student = transformers.BertModel(transformers.BertConfig(**{**TINY_TEXT, "hidden_size": 24,
                                                                   "intermediate_size": 48})).eval()
    m = distill(art, steps=20, lr=3e-3, schedule="all")
    assert m["projections"] == ["text_0", "text_1", "text_pooled"]
    assert m["dev_after"]["score"] > m["dev_before"]["score"]


def test_text_corpus_excludes_held_out_sentences(minilm, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    teacher = transformers.BertModel(transformers.BertConfig(**{**TINY_TEXT, "vocab_size": tokenizer.vocab_size})).eval()
    adapter = get_adapter("bert")
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()][:60]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines + lines[:10]))  # duplicates count once
    calib = load_calibration(CalibrationConfig(samples=20, eval_samples=12, batch_size=8), str(corpus), {"text"},
                             {"tokenizer": tokenizer})
    art = Artifact("tiny", adapter, teacher, make_student(teacher), preprocessor={"tokenizer": tokenizer},
                   calib=calib)
    m = distill(art, steps=2, corpus=str(corpus), dev_samples=8)
    assert (m["train_samples"], m["dev_samples"]) == (60 - 12 - 8, 8)
    # The same sentences in two files, one repeated across them, read as one corpus; either file alone has fewer.
    (tmp_path / "a.txt").write_text("\n".join(lines[:30]))
    (tmp_path / "b.txt").write_text("\n".join(lines[25:]))
    m = distill(art, steps=2, corpus=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], dev_samples=8)
    assert (m["train_samples"], m["dev_samples"]) == (60 - 12 - 8, 8)
    cfg = Distill.Config(corpus=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], dev_samples=8)
    both = build_corpus(cfg, art, ["text"])
    one = build_corpus(cfg.model_copy(update={"corpus": str(tmp_path / "a.txt")}), art, ["text"])
    assert len(one[0]) + len(one[1]) < len(both[0]) + len(both[1]) == 60 - 12


@pytest.mark.parametrize("pad_to", [None, 40])
def test_a_packed_text_corpus_reads_as_the_samples_it_was_given(minilm, pad_to):
    """The packed corpus gives back each sample as splitting the batches gives it: the same tokens, mask
    and dtypes, padding (the tokenizer's zeros in its mask at a fixed length) trimmed alike."""
    from lmmc.passes.distill import _split_samples, _TextCorpus

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()][:50]
    batches = encode_text(tokenizer, lines, 16, 32, pad_to)
    packed = _TextCorpus()
    packed.extend(batches[:2])
    packed.extend(batches[2:])
    expected = _split_samples({"text": batches}, ["text"])
    assert len(packed) == len(expected) == 50
    for got, want in zip(packed, expected):
        assert got["text"].keys() == want["text"].keys()
        for name, tensor in want["text"].items():
            assert got["text"][name].dtype == tensor.dtype and torch.equal(got["text"][name], tensor)
    assert {len(s["text"]["input_ids"]) for s in packed} == {len(s["text"]["input_ids"]) for s in expected} != {40}


_CORPUS_MEMORY = """
import resource, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import transformers
from conftest import TINY_TEXT
from lmmc.adapters import get_adapter
from lmmc.artifact import Artifact
from lmmc.modelio import make_student
from lmmc.passes.distill import build_corpus
from lmmc.pipeline import get_pass
tokenizer = transformers.AutoTokenizer.from_pretrained({minilm!r})
teacher = transformers.BertModel(transformers.BertConfig(**{{**TINY_TEXT, "vocab_size": tokenizer.vocab_size}})).eval()
art = Artifact("tiny", get_adapter("bert"), teacher, make_student(teacher), preprocessor={{"tokenizer": tokenizer}})
tokenizer(["warm the tokenizer up"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train, dev = build_corpus(get_pass("distill").Config(corpus={corpus!r}, samples=50), art, ["text"])
print(len(train), len(dev), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_large_text_corpus_costs_little_memory_when_samples_keeps_few(minilm, tmp_path):
    """Every sentence of a corpus became tensors of its own before `samples` kept 50 of them: 414 MB more
    memory for this 10 MB corpus (802 MB for 20 MB). Packed, it takes 138 MB."""
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]
    corpus, size, out = tmp_path / "corpus.txt", 0, []
    while size < 10 * 2**20:
        out.append(f"{lines[len(out) % len(lines)]} {len(out)}")
        size += len(out[-1]) + 1
    corpus.write_text("\n".join(out))
    run = subprocess.run([sys.executable, "-c", _CORPUS_MEMORY.format(tests=str(TESTS), minilm=str(minilm),
                                                                      corpus=str(corpus))],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    train, dev, grown_mb = map(int, run.stdout.split())
    assert (train, dev) == (50, 64)
    assert grown_mb < 250, grown_mb


def test_held_out_sentences_stay_out_in_other_case_under_a_cased_tokenizer(minilm, tmp_path):
    """The split holds texts out case and spacing aside; so does the corpus, though a cased tokenizer gives
    "The section" other tokens than "the section"."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm), do_lower_case=False)
    assert tokenizer("The")["input_ids"] != tokenizer("the")["input_ids"]
    teacher = transformers.BertModel(transformers.BertConfig(**{**TINY_TEXT, "vocab_size": tokenizer.vocab_size})).eval()
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()][:60]
    (tmp_path / "calib.txt").write_text("\n".join(lines))
    calib = load_calibration(CalibrationConfig(samples=20, eval_samples=12, batch_size=8), str(tmp_path / "calib.txt"),
                             {"text"}, {"tokenizer": tokenizer})
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([line[0].swapcase() + " ".join(line[1:].split()) + "  " for line in lines]))
    art = Artifact("tiny", get_adapter("bert"), teacher, make_student(teacher), preprocessor={"tokenizer": tokenizer},
                   calib=calib)
    train, dev = build_corpus(Distill.Config(corpus=str(corpus), dev_samples=8), art, ["text"])
    assert len(calib.held_out_texts) == 12 and len(train) + len(dev) == 60 - 12



def test_an_image_under_several_captions_is_decoded_once_and_its_pixels_shared(tmp_path):
    """Each record's image was decoded into pixels of its own: a corpus with five captions an image held
    five copies of every image's pixels."""
    import numpy as np
    from PIL import Image

    from conftest import spelled
    from lmmc.data import encode_images
    from lmmc.passes.distill import encode_corpus

    rng = np.random.default_rng(0)
    model = save_tiny("clip", tmp_path / "clip")
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines += [{"image": f"{i}.png", "text": f"picture {spelled(i)} seen the {spelled(k)} time"} for k in range(3)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    processor = transformers.CLIPImageProcessor.from_pretrained(str(model))
    teacher = tiny_model("clip")
    art = Artifact("tiny", get_adapter("clip"), teacher, make_student(teacher), preprocessor={
        "tokenizer": transformers.AutoTokenizer.from_pretrained(str(model)), "image_processor": processor})
    samples = encode_corpus(art, [tmp_path / "corpus.jsonl"], ["image", "text"], 16)
    assert len(samples) == 12
    pixels = [s["image"]["pixel_values"] for s in samples]
    assert len({p.data_ptr() for p in pixels}) == 4
    for line, p in zip(lines, pixels):
        assert torch.equal(p, encode_images(processor, [str(tmp_path / line["image"])], 1)[0]["pixel_values"][0])


_IMAGE_CORPUS_MEMORY = """
import resource, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import transformers
from conftest import tiny_model
from lmmc.adapters import get_adapter
from lmmc.artifact import Artifact
from lmmc.modelio import make_student
from lmmc.passes.distill import build_corpus
from lmmc.pipeline import get_pass
teacher = tiny_model("clip")
processor = transformers.CLIPImageProcessor(size={{"shortest_edge": 224}}, crop_size=224)
art = Artifact("tiny", get_adapter("clip"), teacher, make_student(teacher), preprocessor={{"image_processor": processor}})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train, dev = build_corpus(get_pass("distill").Config(corpus={corpus!r}, samples=8, dev_samples=8), art, ["image"])
print(len(train), len(dev), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_large_image_corpus_costs_little_memory_when_samples_keeps_few(tmp_path):
    """Every image of a corpus was decoded into pixels (600 KB each at 224 x 224) before `samples` kept a few:
    800 images took 532 MB more memory. Now pixels are made for the samples kept: 128 MB, as for 400 images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(800):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    run = subprocess.run([sys.executable, "-c", _IMAGE_CORPUS_MEMORY.format(tests=str(TESTS),
                                                                            corpus=str(tmp_path / "images"))],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    train, dev, grown_mb = map(int, run.stdout.split())
    assert (train, dev) == (8, 8)
    assert grown_mb < 250, grown_mb


def test_a_dual_encoders_held_out_captions_stay_out_of_a_corpus_under_other_images(tmp_path):
    """Held-out pairs were kept out by their image only: a held-out caption paired with another picture in
    the distillation corpus trained the text tower on the very captions validation then scored it on."""
    import numpy as np
    from PIL import Image

    from conftest import spelled
    from lmmc.data import text_key

    rng = np.random.default_rng(0)
    model = save_tiny("clip", tmp_path / "clip")
    lines = []
    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": f"the picture {spelled(i)} on a road"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    teacher = tiny_model("clip")
    preprocessor = {"tokenizer": transformers.AutoTokenizer.from_pretrained(str(model)),
                    "image_processor": transformers.CLIPImageProcessor.from_pretrained(str(model))}
    calib = load_calibration(CalibrationConfig(samples=40, eval_samples=12, batch_size=8),
                             str(tmp_path / "pairs.jsonl"), {"text", "image"}, preprocessor)
    held = calib.held_out_texts  # the 12 held-out pairs' captions, as text_key reads them
    assert len(held) == 12 and held <= {text_key(line["text"]) for line in lines}
    for i, line in enumerate(lines):  # each caption again, in capitals, under a new picture
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"new{i}.png")
    corpus = [*lines, *({"image": f"new{i}.png", "text": line["text"].upper()} for i, line in enumerate(lines))]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(line) for line in corpus))
    art = Artifact("tiny", get_adapter("clip"), teacher, make_student(teacher), preprocessor=preprocessor,
                   calib=calib)
    train, dev = build_corpus(Distill.Config(corpus=str(tmp_path / "corpus.jsonl"), dev_samples=8), art,
                              ["image", "text"])
    tokenizer = preprocessor["tokenizer"]
    trained = {tokenizer.decode(s["text"]["input_ids"], skip_special_tokens=True) for s in [*train, *dev]}
    assert not {text_key(t) for t in trained} & held
    assert len(train) + len(dev) == 2 * (60 - 12)  # the other captions, under both pictures


@pytest.mark.parametrize("calib_length, corpus_length", [(12, None), (None, 12)])
def test_held_out_sentences_stay_out_when_one_side_is_cut_shorter(minilm, tmp_path, calib_length, corpus_length):
    """A held-out text cut to 12 tokens is the start of the same corpus text cut to 128, and the other way
    round: neither may be trained on."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    teacher = transformers.BertModel(transformers.BertConfig(**{**TINY_TEXT, "vocab_size": tokenizer.vocab_size})).eval()
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()][:60]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines))
    calib = load_calibration(CalibrationConfig(samples=20, eval_samples=12, batch_size=8, max_length=calib_length),
                             str(corpus), {"text"}, {"tokenizer": tokenizer})
    art = Artifact("tiny", get_adapter("bert"), teacher, make_student(teacher), preprocessor={"tokenizer": tokenizer},
                   calib=calib)
    cfg = Distill.Config(corpus=str(corpus), dev_samples=8, **({"max_length": corpus_length} if corpus_length else {}))
    train, dev = build_corpus(cfg, art, ["text"])

    def texts(rows):
        return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]

    held = texts(row[mask.bool()] for batch in calib.eval["text"]
                 for row, mask in zip(batch["input_ids"], batch["attention_mask"]))
    trained = texts(s["text"]["input_ids"] for s in train + dev)
    assert len(held) >= 11  # two texts cut to 12 tokens may be one
    assert [t for t in trained if any(t.startswith(h) or h.startswith(t) for h in held)] == []
    assert len(trained) >= 60 - 12 - 2  # a distinct line that starts as a held-out one may go too

# --- checkpoints and resume ---------------------------------------------------------------------------

RESUME_CFG = dict(steps=9, batch_size=8, lr=3e-3, dev_samples=8, eval_every=3, schedule="optima",
                  blocks_per_arm=1, window=4, checkpoint_every=3, progress=False)

_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from lmmc.train import Checkpoints
from test_distill import Distill, RESUME_CFG, tiny_art

save = Checkpoints.save
def save_then_die(self, name, files, state):
    path = save(self, name, files, state)
    if name == "step-000006":
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no finally: a real crash
    return path
Checkpoints.save = save_then_die
Distill(Distill.Config(**RESUME_CFG, checkpoint_dir=sys.argv[1])).run(tiny_art("bert"))
"""


def test_kill_and_resume_ends_with_the_uninterrupted_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN.format(tests=str(TESTS)), str(ckpt)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir, = ckpt.iterdir()
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["step-000003", "step-000006"]

    resumed_art = tiny_art("bert")
    resumed = Distill(Distill.Config(**RESUME_CFG, checkpoint_dir=str(ckpt), resume=True)).run(resumed_art)
    assert resumed["resumed_from"] == 6
    # The pass's seconds go on from what the killed process had run, not from zero.
    from lmmc.train import Checkpoints
    before = Checkpoints.load(run_dir / "step-000006")[1]["pass_seconds"]
    assert before > 0 and resumed["seconds_before_resume"] == round(before, 2)
    assert resumed["curve"][-1]["seconds"] > before
    plain_art = tiny_art("bert")
    plain = distill(plain_art, **{**RESUME_CFG, "checkpoint_every": 0})
    assert resumed["arm_picks"] == plain["arm_picks"] and resumed["arm_reward_mean"] == plain["arm_reward_mean"]
    assert [c["score"] for c in resumed["curve"]] == [c["score"] for c in plain["curve"]]
    for (name, a), b in zip(resumed_art.student.state_dict().items(), plain_art.student.state_dict().values()):
        assert torch.equal(a, b), name
    assert (run_dir / "final" / "weights.safetensors").is_file()

    # Resuming a finished run loads its final weights and trains no further.
    again_art = tiny_art("bert")
    again = Distill(Distill.Config(**RESUME_CFG, checkpoint_dir=str(ckpt), resume=True)).run(again_art)
    assert again["resumed_from"] == "final"
    assert again["seconds_before_resume"] == round(Checkpoints.load(run_dir / "final")[1]["pass_seconds"], 2)
    assert all(torch.equal(a, b) for a, b in zip(again_art.student.state_dict().values(),
                                                 plain_art.student.state_dict().values()))


def test_learning_rate_warms_up_then_follows_a_cosine():
    from lmmc.train import lr_multiplier

    got = [lr_multiplier(s, 100, 10, 0.1) for s in (0, 9, 10, 55, 100)]
    assert got == pytest.approx([0.1, 1.0, 1.0, 0.1 + 0.9 * 0.5, 0.1])


@pytest.mark.timed
def test_a_run_on_a_clock_warms_up_then_follows_the_cosine_over_its_fraction_done():
    from lmmc.train import progress_multiplier

    got = [progress_multiplier(p, 0.1, 0.1) for p in (0.0, 0.05, 0.1, 0.55, 1.0, 1.2)]
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1])


@pytest.mark.timed
def test_minutes_end_training_on_the_clock_with_the_learning_rate_at_the_end_of_its_schedule():
    from lmmc.train import progress_multiplier

    art = tiny_art("bert")
    cfg = Distill.Config(steps=10 ** 6, minutes=0.05, batch_size=8, lr=1e-3, final_lr_ratio=0.1, dev_samples=8,
                         eval_every=0, teacher_cache_mb=0, progress=False)
    t = trainer(art, cfg)
    started, step = [], t.train_step

    def timed_step() -> float:
        started.append(t.elapsed)  # the clock reading the step sets its learning rate by
        return step()

    t.train_step = timed_step
    m = t.fit()
    assert m["stopped_by"] == "minutes" and 5 < m["steps"] < 10 ** 6
    # The budget covers the set-up too, so the loop had less than the whole 3 s.
    assert t.horizon < 3.0 <= t.horizon + (t.loop_start - t.started) + 1e-6
    assert t.horizon <= t.elapsed < t.horizon + 2.0
    # The last step's rate is the cosine's at the time it began, not at its step count (a millionth of the ceiling,
    # still warming up); on an idle machine that is near the end, 10 % of the peak.
    assert started[-1] < t.horizon
    want = cfg.lr * progress_multiplier(started[-1] / t.horizon, cfg.warmup, cfg.final_lr_ratio)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-6)
    assert t.optimizer.param_groups[0]["lr"] >= 1e-4
    # steps stay the ceiling when they come first.
    m = distill(tiny_art("bert"), steps=6, minutes=5, eval_every=0)
    assert (m["steps"], m["stopped_by"]) == (6, "steps")


@pytest.mark.timed
def test_a_compile_on_the_clock_checkpoints_every_tenth_of_its_minutes(tmp_path):
    # 100,000 steps are a ceiling the 3 s never reach: checkpoints by steps alone (every 10,000) never came
    art = tiny_art("bert")
    art.scratch = tmp_path
    m = distill(art, steps=10 ** 5, minutes=0.05, eval_every=0, teacher_cache_mb=0)
    assert m["stopped_by"] == "minutes"
    run, = tmp_path.iterdir()
    kept = sorted(int(p.name.split("-")[1]) for p in run.glob("step-*"))
    assert len(kept) == 2 and 0 < kept[0] < kept[1] < m["steps"]   # the newest two of about nine
    older, newer = (json.loads((run / f"step-{k:06d}" / "state.json").read_text())["loop_seconds"] for k in kept)
    assert newer - older >= 0.3 and newer >= 0.6   # a tenth of 3 s apart, the second save at the earliest


@pytest.mark.timed
def test_a_compile_spends_at_most_a_tenth_of_its_time_writing_checkpoints(tmp_path, monkeypatch):
    # A slow disk: every save takes 0.5 s, against steps of a few milliseconds.
    from lmmc.train import Checkpoints
    saved, save = [], Checkpoints.save

    def slow_save(self, name, files, state):
        saved.append(name)
        time.sleep(0.5)
        return save(self, name, files, state)

    monkeypatch.setattr(Checkpoints, "save", slow_save)
    for run, cfg, want in (("default", {}, ["step-000002", "final"]),
                           # a recipe that says how often is obeyed
                           ("asked", {"checkpoint_every": 3}, [f"step-{k:06d}" for k in (3, 6, 9, 12, 15, 18)] + ["final"])):
        saved.clear()
        art = tiny_art("bert")
        art.scratch = tmp_path / run
        m = distill(art, steps=20, eval_every=0, **cfg)   # the compile's default: every second step
        assert m["steps"] == 20 and m["train_seconds"] < 4.5   # the one save's 0.5 s would allow the next after 5 s
        assert saved == want, run


@pytest.mark.timed
def test_minutes_need_a_ceiling_of_steps_and_a_budget_the_set_up_does_not_spend():
    with pytest.raises(ValueError, match="minutes needs steps too"):
        Distill.Config(minutes=10)
    with pytest.raises(LmmcError, match="minutes were spent before the first step"):
        distill(tiny_art("bert"), steps=100, minutes=1e-7)


def test_only_the_newest_step_checkpoints_are_kept(tmp_path):
    m = distill(tiny_art("bert"), steps=8, checkpoint_dir=str(tmp_path), checkpoint_every=2, keep_last=2)
    run_dir, = tmp_path.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "final", "step-000004", "step-000006"]
    assert m["checkpoint"] == str(run_dir / "final")


def test_a_dead_save_is_cleared_and_the_checkpoint_it_moved_aside_put_back(tmp_path):
    from lmmc.train import Checkpoints
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    run_dir = tmp_path / "run"
    for name in (f".step-000004.old-{dead}", f".step-000006.tmp-{dead}", f".final.tmp-{os.getpid()}"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "state.json").write_text("{}")
    ckpt = Checkpoints(tmp_path, "run", keep_last=2)
    assert sorted(p.name for p in run_dir.iterdir()) == [f".final.tmp-{os.getpid()}", "step-000004"]
    assert ckpt.latest() == run_dir / "step-000004"


def test_a_run_into_checkpoints_another_live_run_holds_is_refused_and_touches_none(tmp_path):
    # two compiles given one checkpoint_dir: the second renamed over the first's saves and pruned its steps
    from lmmc.train import Checkpoints
    distill(tiny_art("bert"), steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    run_dir, = tmp_path.iterdir()
    before = {p.name: (p / "state.json").read_bytes() for p in run_dir.iterdir() if p.is_dir()}
    with Checkpoints(tmp_path, run_dir.name, keep_last=2).held():
        with pytest.raises(LmmcError, match="another distillation with the same settings .* is writing its "
                                            "checkpoints to .* give this run a checkpoint_dir of its own"):
            distill(tiny_art("bert"), steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
        assert {p.name: (p / "state.json").read_bytes() for p in run_dir.iterdir() if p.is_dir()} == before
    m = distill(tiny_art("bert"), steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2, resume=True)
    assert m["resumed_from"] == "final"


def test_checkpoints_on_a_filesystem_without_locks_train_unlocked(tmp_path, monkeypatch):
    # NFS emulates flock with fcntl locks and may refuse one (EBADF, ENOLCK): the run goes on as before the lock
    import errno
    import fcntl

    def refused(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refused)
    m = distill(tiny_art("bert"), steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    run_dir, = tmp_path.iterdir()
    assert m["checkpoint"] == str(run_dir / "final") and (run_dir / "step-000002" / "state.json").is_file()


def test_checkpoints_of_another_run_are_not_resumed(tmp_path):
    distill(tiny_art("bert"), steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    m = distill(tiny_art("bert"), steps=4, lr=5e-4, checkpoint_dir=str(tmp_path), resume=True)
    assert m["resumed_from"] is None
    assert len(list(tmp_path.iterdir())) == 2


def test_checkpoints_of_other_training_samples_are_not_resumed(tmp_path):
    """The fingerprint held the corpus's path, not its texts: a run resumed on a corpus file rewritten in
    place trained its last steps on other data and reported an exact resume."""
    cfg = dict(steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    distill(tiny_art("bert"), **cfg)
    assert distill(tiny_art("bert"), **cfg, resume=True)["resumed_from"] == "final"  # the same samples: resumed
    # the same config and student, other samples to train on (here fewer calibration samples)
    assert distill(tiny_art("bert", samples=40), **cfg, resume=True)["resumed_from"] is None


def test_a_damaged_checkpoint_is_one_error_naming_it(tmp_path):
    distill(tiny_art("bert"), steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    run, = tmp_path.iterdir()
    weights = run / "final" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])   # a disk that filled while it was written
    with pytest.raises(LmmcError, match=f"checkpoint '{run / 'final'}' is damaged \\(SafetensorError"):
        distill(tiny_art("bert"), steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2, resume=True)
    shutil.rmtree(run / "final")
    (run / "step-000002" / "optimizer.safetensors").unlink()
    with pytest.raises(LmmcError, match="step-000002' is damaged \\(KeyError: 'optimizer'\\); delete that folder"):
        distill(tiny_art("bert"), steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2, resume=True)


# --- bad input ------------------------------------------------------------------------------------------

def test_corpus_without_usable_samples(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    with pytest.raises(LmmcError, match="no usable samples for this model.*text samples"):
        distill(tiny_art("bert"), corpus=str(images))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LmmcError, match="holds no samples"):
        distill(tiny_art("bert"), corpus=str(empty))


def test_student_with_other_towers_than_the_teacher(tmp_path):
    art = tiny_art("clip", sparsity=0.0)
    art.student = tiny_model("bert")
    with pytest.raises(LmmcError, match=r"student \(bert.*does not match the teacher \(clip"):
        distill(art, checkpoint_dir=str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def test_layer_map_out_of_range_fails_the_cli_with_exit_2_and_no_final_checkpoint(tmp_path):
    from lmmc.cli import main

    model = tmp_path / "tiny-bert"
    save_tiny("bert", model)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    recipe = {"calibration": {"random": True, "samples": 24, "eval_samples": 32},
              "passes": [{"magnitude": {"sparsity": 0.5}},
                         {"distill": {"steps": 4, "batch_size": 4, "layer_map": [1, 5], "checkpoint_dir": str(ckpt),
                                      "checkpoint_every": 1, "progress": False}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(path), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "maps student layer 2 to teacher layer 5" in result.output
    assert not out.exists()
    assert not list(ckpt.rglob("final")) and not list(ckpt.rglob("*.safetensors"))

    # Mistakes visible without the model fail while the recipe is parsed, before anything loads.
    recipe["passes"][1]["distill"]["layer_map"] = [0, 1]
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(path), "-o", str(out)])
    assert result.exit_code == 2 and "layer_map" in result.output


@pytest.mark.parametrize("bad, match", [
    ({"batch_size": 6, "grad_accum": 4}, "multiple of grad_accum"),
    ({"resume": True}, "resume needs checkpoint_dir"),
    ({"corpus": "/nonexistent/corpus.txt"}, "does not exist"),
    ({"schedule": "random"}, "schedule"),
])
def test_config_errors_name_the_fix(bad, match):
    with pytest.raises(LmmcError, match=match):
        parse_recipe({"calibration": {"random": True}, "passes": [{"distill": bad}]})


def test_all_zero_loss_weights_are_refused():
    with pytest.raises(LmmcError, match="all loss weights are 0"):
        distill(tiny_art("bert", sparsity=0.0), hidden=0.0, output=0.0)


def _qkv(model: torch.nn.Module) -> tuple[torch.nn.Linear, ...]:
    attention = model.encoder.layer[-1].attention.self
    return attention.query, attention.key, attention.value


def _relation_term(tr: Trainer, indices: list[int]) -> float:
    """The mean relation loss of the student's last block against the teacher's on these samples, from
    projections caught by hooks on the models' own query, key and value linears."""
    inputs = tr._collate([tr.train[i] for i in indices], tr.towers[0])
    caught: dict[str, dict[str, torch.Tensor]] = {"s": {}, "t": {}}
    handles = []
    for side, model in (("s", tr.student), ("t", tr.teacher)):
        for r, lin in zip("qkv", _qkv(model)):
            handles.append(lin.register_forward_hook(lambda _m, _a, out, side=side, r=r: caught[side].update({r: out})))
    with torch.no_grad():
        tr.student(**inputs), tr.teacher(**inputs)
    for h in handles:
        h.remove()
    return float(relation_loss(caught["s"], caught["t"], tr.cfg.relation_heads, inputs["attention_mask"]).mean())


def test_relation_targets_come_from_the_teachers_last_block_cached_or_not():
    art = tiny_art("bert")
    base = dict(steps=10, batch_size=8, dev_samples=8, progress=False, precision="fp32", relations=2.0)
    cached = trainer(art, Distill.Config(**base, teacher_cache_mb=64))
    cached.cache = cached._cache_teacher()
    plain, without = (trainer(art, Distill.Config(**{**base, **change}))
                      for change in ({"teacher_cache_mb": 0}, {"teacher_cache_mb": 0, "relations": 0.0}))
    assert cached.cache is not None and plain.cache is None
    indices = cached.batch_indices(0)
    losses = []
    for tr in (cached, plain, without):
        inputs = {"text": tr._collate([tr.train[i] for i in indices], tr.towers[0])}
        targets, pooled = tr.teacher_targets(inputs, None, indices)
        assert ("qkv" in targets["text"]) == (tr is not without)
        with torch.no_grad():
            losses.append(tr.objective.per_sample_loss(inputs, targets, None, pooled).mean())
    torch.testing.assert_close(losses[0], losses[1])
    # the term the weight adds is the relation loss of the two models' own last blocks
    torch.testing.assert_close(float(losses[1] - losses[2]), 2.0 * _relation_term(plain, indices), rtol=1e-5, atol=1e-7)


def test_distilling_on_relations_alone_brings_the_last_blocks_relations_to_the_teachers():
    teacher = tiny_model("bert")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # relations far from uniform, which a tiny random model's are not
        for lin in _qkv(teacher):
            lin.weight.mul_(30)
    art = tiny_art("bert", sparsity=0.0, teacher=teacher)
    with torch.no_grad():  # and a student whose relations are not the teacher's
        for lin in _qkv(art.student):
            lin.weight.add_(torch.randn(lin.weight.shape, generator=gen) * lin.weight.std())
    cfg = dict(hidden=0.0, output=0.0, relations=1.0, steps=40, lr=3e-3, eval_every=0, keep_best=False)
    before = _relation_term(trainer(art, Distill.Config(**cfg, progress=False, batch_size=8, dev_samples=8)), list(range(16)))
    distill(art, **cfg)
    after = _relation_term(trainer(art, Distill.Config(**cfg, progress=False, batch_size=8, dev_samples=8)), list(range(16)))
    assert after < 0.5 * before, (before, after)


def test_relations_are_refused_for_generative_models_and_heads_that_do_not_split_the_head_width():
    with pytest.raises(LmmcError, match="relations compares an encoder's last blocks"):
        Distill.Config(relations=1.0).check_model(get_adapter("llava"))
    bert = tiny_model("bert")
    with pytest.raises(LmmcError, match=r"relation_heads = 3 does not divide the text tower's attention head width \(8\)"):
        Distill.Config(relations=1.0, relation_heads=3).check_model(get_adapter("bert"), bert.config)
    Distill.Config(relations=1.0, relation_heads=4).check_model(get_adapter("bert"), bert.config)


# --- vocabulary runs ------------------------------------------------------------------------------------

def test_vocabulary_runs_cover_the_ordinary_tokens_and_are_added_to_training_alone(tmp_path):
    tokenizer = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))
    runs = vocabulary_runs(tokenizer, 400, seed=0)
    assert runs == vocabulary_runs(tokenizer, 400, seed=0) and runs != vocabulary_runs(tokenizer, 400, seed=1)
    rows = tokenizer(runs, add_special_tokens=False)["input_ids"]
    drawn = {i for row in rows for i in row}
    special = set(tokenizer.all_special_ids)
    # A run that starts with a continuation piece decodes to '##…', whose '#' this tiny vocabulary lacks.
    assert drawn & special <= {tokenizer.unk_token_id}
    assert len(drawn) >= 0.9 * (len(tokenizer) - len(special))   # 400 runs of 4+ draws reach nearly all 94
    assert min(map(len, rows)) >= 1 and max(map(len, rows)) <= 48

    art = tiny_art("bert", sparsity=0)
    art.preprocessor = {"tokenizer": tokenizer}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(_WORDS[(i * k) % len(_WORDS)] for k in range(1, 7)) + f" {i}"
                               for i in range(60)) + "\n")
    cfg = Distill.Config(corpus=str(corpus), dev_samples=8)
    train, dev = build_corpus(cfg, art, ["text"])
    more, dev_more = build_corpus(cfg.model_copy(update={"vocabulary": 0.5}), art, ["text"])
    ids = lambda samples: [s["text"]["input_ids"].tolist() for s in samples]  # noqa: E731
    assert ids(dev_more) == ids(dev) and ids(more[:len(train)]) == ids(train)
    added = ids(more[len(train):])
    assert len(added) == round(0.5 * len(train))
    assert all(row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in added)
    assert {i for row in added for i in row[1:-1]} & special <= {tokenizer.unk_token_id}
    assert sum(row not in ids(train) for row in added) == len(added)


def narrow_corpus(path: Path) -> Path:
    """20 distinct lines, each all of the first ten corpus words: 10 of the tiny vocabulary's 92 ordinary tokens
    (98 ids, as 'a' is both a word and a letter, less 5 special tokens and the id the duplicate leaves empty)."""
    words = _WORDS[:10]
    lines = [" ".join(words[(i + k) % 10] for k in range(10)) for i in range(10)]
    path.write_text("\n".join(lines + [" ".join(reversed(line.split())) for line in lines]) + "\n")
    return path


def test_token_coverage_counts_each_ordinary_token_once(tmp_path):
    tokenizer = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))
    water, cold = tokenizer.convert_tokens_to_ids(["water", "cold"])
    rows = [torch.tensor([tokenizer.cls_token_id, water, water, tokenizer.sep_token_id]), torch.tensor([cold, 0])]
    assert token_coverage(tokenizer, rows) == 2 / 92   # [CLS], [SEP] and [PAD] (id 0) are not ordinary tokens
    assert token_coverage(tokenizer, []) == 0.0


def test_a_narrow_corpus_is_warned_of_unless_vocabulary_runs_widen_it(tmp_path):
    corpus = narrow_corpus(tmp_path / "narrow.txt")
    tokenizer = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))

    def run(vocabulary: float) -> dict:
        art = tiny_art("bert", sparsity=0)
        art.preprocessor = {"tokenizer": tokenizer}
        # keep_best off: the unpruned student starts at the teacher, and two steps cannot beat that
        return distill(art, corpus=str(corpus), steps=2, eval_every=0, vocabulary=vocabulary, dev_samples=4,
                       keep_best=False)

    narrow, widened = run(0.0), run(0.5)
    assert narrow["token_coverage"] == round(10 / 92, 4)
    assert narrow["warnings"] == [
        "the training text holds 11% of the tokenizer's ordinary tokens, so the student learns the teacher on that "
        "text's domain alone and follows it less elsewhere; vocabulary: 0.25 adds runs of tokens from the whole "
        "vocabulary (or distil on broader text)"]
    assert widened["token_coverage"] > 0.3 and "warnings" not in widened


def test_dev_samples_capped_by_a_small_corpus_are_warned_of(tmp_path):
    corpus = narrow_corpus(tmp_path / "narrow.txt")   # 22 distinct lines: a quarter is 5
    art = tiny_art("bert", sparsity=0)
    art.preprocessor = {"tokenizer": transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))}
    metrics = distill(art, corpus=str(corpus), steps=2, eval_every=0, dev_samples=8, vocabulary=0.5, keep_best=False)
    assert metrics["dev_samples"] == 5 and metrics["warnings"] == [
        "the corpus gives 5 dev samples, not the 8 of dev_samples (they are capped at a quarter of the distinct "
        "samples), so the best checkpoint is picked on fewer; give a larger corpus"]
    # trained on the calibration samples, the fix is more of them; with no step trained nothing is picked
    metrics = distill(tiny_art("bert", sparsity=0), steps=2, eval_every=0, dev_samples=64, keep_best=False)
    assert metrics["warnings"][0].startswith("the calibration samples (distill has no corpus) give ")
    assert metrics["warnings"][0].endswith("; raise calibration.samples or give a corpus")
    assert "warnings" not in distill(tiny_art("bert", sparsity=0), steps=0, dev_samples=64)


def test_the_compile_report_carries_the_passes_warnings(tmp_path):
    teacher = save_tiny("bert", tmp_path / "teacher")
    corpus = narrow_corpus(tmp_path / "narrow.txt")
    out = compile_tiny_text(teacher, tmp_path / "out", [{"distill": {"corpus": str(corpus), "steps": 2, "eval_every": 0,
                                                                     "dev_samples": 4, "max_length": 12,
                                                                     "keep_best": False}}])
    report = json.loads((out / "report.json").read_text())
    assert [w for w in report["warnings"] if w.startswith("distill:")] == [
        "distill: " + report["passes"][0]["metrics"]["warnings"][0]]
    # a distillation between antgmm's segments warns alike, once however many segments ran
    out = compile_tiny_text(teacher, tmp_path / "out2", [{"antgmm": {
        "keep": 0.6, "distill_steps_per_segment": 2,
        "distill": {"corpus": str(corpus), "eval_every": 0, "dev_samples": 4, "max_length": 12, "keep_best": False}}}])
    report = json.loads((out / "report.json").read_text())
    nested = report["passes"][0]["metrics"]["segments"][0]["distill"]["warnings"]
    assert [w for w in report["warnings"] if w.startswith("antgmm:")] == ["antgmm: " + w for w in nested]


def test_training_that_diverges_to_nan_keeps_the_best_student_and_says_so():
    """A NaN dev score compared false with the best one, so keep_best kept the NaN student, and the compile
    then failed on its weights though the student before training was there to keep."""
    art = tiny_art("bert", sparsity=0.5)
    before = {n: p.detach().clone() for n, p in art.student.named_parameters()}
    metrics = distill(art, steps=4, lr=1e38, eval_every=2)
    assert math.isnan(metrics["curve"][-1]["score"]) and metrics["diverged_at"] == 2
    assert metrics["kept_step"] == 0 and metrics["dev_after"] == metrics["dev_before"]
    assert all(torch.equal(p, before[n]) for n, p in art.student.named_parameters())
    assert metrics["warnings"][0] == ("training diverged: the loss was NaN or infinite from step 2 on (step 0 was "
                                      "kept); lower lr or max_grad_norm")


def test_vocabulary_is_refused_for_pairs_and_allowed_for_a_text_tower_alone():
    clip = get_adapter("clip")
    with pytest.raises(LmmcError, match="towers: \\[text\\]"):
        Distill.Config(vocabulary=0.2).check_model(clip)
    Distill.Config(vocabulary=0.2, towers=["text"]).check_model(clip)


def test_training_that_keep_best_throws_away_is_warned_of():
    metrics = distill(tiny_art("bert", sparsity=0.5), steps=4, lr=50.0, eval_every=2)
    assert metrics["kept_step"] == 0 and metrics["dev_after"] == metrics["dev_before"]
    # at this lr some CPUs end in NaN scores, which compare false with anything
    assert not any(c["score"] >= metrics["dev_before"]["score"] for c in metrics["curve"])
    assert metrics["warnings"][-1] == (
        "no evaluation after training scored better on the dev samples than the student before it, so keep_best "
        "kept the student as it was and the 4 steps are lost; lower lr, or train longer")
