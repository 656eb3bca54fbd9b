"""Distilling generative image-text students (LLaVA, Idefics3): the token-level KL against a hand
computation, held-out KL that drops, masks that hold, structured students that reload exactly, OPTIMA arms
over vision, projector and decoder that each move only their own parameters, and the CLI end to end."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import conftest
from lmmc.adapters import block_list, get_adapter
from lmmc.artifact import Artifact
from lmmc.data import random_generative_calibration
from lmmc.distill_losses import answer_kl
from lmmc.distiller import Trainer, modality_key
from lmmc.errors import LmmcError
from lmmc.generation import teacher_forced
from lmmc.modelio import make_student
from lmmc.passes.distill import build_corpus
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import CalibrationConfig
from lmmc.student import load_student, read_structure, save

Distill = get_pass("distill")

pytestmark = pytest.mark.usefixtures("one_thread")


def generative_art(model: torch.nn.Module, samples: int = 48, eval_samples: int = 8) -> Artifact:
    adapter = get_adapter(model.config.model_type)
    calib = random_generative_calibration(CalibrationConfig(random=True, samples=samples, eval_samples=eval_samples,
                                                            batch_size=8, seed=1), model, adapter)
    return Artifact(model_ref="tiny", adapter=adapter, teacher=model, student=make_student(model), calib=calib)


def pruned(model: torch.nn.Module, sparsity: float = 0.5) -> Artifact:
    art = generative_art(model)
    magnitude = get_pass("magnitude")
    run_pass(magnitude(magnitude.Config(sparsity=sparsity)), art)
    return art


def config(**cfg) -> object:
    base = dict(steps=10, batch_size=8, lr=2e-3, dev_samples=8, eval_every=0, progress=False)
    return Distill.Config(**{**base, **cfg})


def held_out_kl(art: Artifact) -> float:
    return teacher_forced(art.teacher, art.student, art.calib.eval_batches("text"))["kl_mean"]


def test_answer_kl_equals_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 5, generator=gen), torch.randn(2, 4, 5, generator=gen)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    temperature = 2.0
    expected = []
    for b in range(2):
        terms = []
        for t in range(3):  # logits at t predict the token at t + 1
            if labels[b, t + 1] == -100:
                continue
            p = [math.exp(v / temperature) for v in teacher[b, t].tolist()]
            q = [math.exp(v / temperature) for v in student[b, t].tolist()]
            p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
            terms.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        expected.append(temperature ** 2 * sum(terms) / len(terms))
    torch.testing.assert_close(answer_kl(student, teacher, labels, temperature), torch.tensor(expected))


def test_a_magnitude_pruned_llava_gets_closer_to_its_teacher_and_its_masks_hold():
    art = pruned(conftest.tiny_llava())
    before_kl = held_out_kl(art)
    before = {n: p.detach().clone() for n, p in art.student.named_parameters()}
    metrics = Distill(config(steps=15)).run(art)
    after_kl = held_out_kl(art)
    assert after_kl < 0.8 * before_kl, (before_kl, after_kl)
    params = dict(art.student.named_parameters())
    towers = set()
    for name, mask in art.masks.items():
        assert torch.count_nonzero(params[name][~mask]) == 0, name
        if float((params[name][mask] - before[name][mask]).detach().abs().max()) > 1e-5:
            towers.add(name.split(".")[1])
    assert towers == {"vision_tower", "multi_modal_projector", "language_model"}  # every part trained
    assert metrics["masked_weights_nonzero"] == 0
    assert metrics["dev_after"]["kl"] < metrics["dev_before"]["kl"]
    assert 0 <= metrics["dev_after"]["top1_agreement"] <= 1


def test_cached_logits_equal_a_fresh_teacher_forward():
    art = pruned(conftest.tiny_llava())
    cfgs = [config(teacher_cache_mb=mb) for mb in (2048, 0)]
    corpus = build_corpus(cfgs[0], art, sorted({modality_key(t) for t in art.adapter.towers}))
    cached, fresh = (Trainer(c, art, *corpus) for c in cfgs)
    assert cached.cache is not None and fresh.cache is None
    local = cached.batch_indices(2)
    inputs = {modality_key(t): cached._collate([cached.train[i] for i in local], t) for t in art.adapter.towers}
    (a, _), (b, _) = (t.teacher_targets(inputs, None, local) for t in (cached, fresh))
    assert set(a) == set(b) == {"vision", "language", "projector"}
    real = inputs["text"]["attention_mask"].bool()
    torch.testing.assert_close(a["language"]["pooled"][real], b["language"]["pooled"][real])
    torch.testing.assert_close(a["projector"]["features"], b["projector"]["features"])
    for layer in b["language"]["hidden"]:
        torch.testing.assert_close(a["language"]["hidden"][layer][real], b["language"]["hidden"][layer][real])
    cached.restore_flags()


@pytest.mark.parametrize("schedule", ["optima", "round_robin"])
def test_arms_span_vision_projector_and_language_and_each_moves_only_its_own_parameters(schedule):
    art = pruned(conftest.tiny_llava())
    cfg = config(schedule=schedule, blocks_per_arm=1, reward_samples=4, window=10)
    t = Trainer(cfg, art, *build_corpus(cfg, art, ["image", "text"]))
    names = [a.name for a in t.arms]
    assert names == ["vision[0:1]", "vision[1:2]", "projector[0:1]", "language[0:1]", "language[1:2]"]
    owners = {"vision[0:1]": "model.vision_tower.encoder.layers.0.",
              "vision[1:2]": "model.vision_tower.encoder.layers.1.",
              "projector[0:1]": "model.multi_modal_projector.",
              "language[0:1]": "model.language_model.layers.0."}
    # The last decoder arm also owns what turns its output into logits.
    owners["language[1:2]"] = ("model.language_model.layers.1.", "model.language_model.norm.", "lm_head.")
    for _ in range(2 * len(names)):
        before = {n: p.detach().clone() for n, p in t.student.named_parameters()}
        picks = list(t.picks)
        t.train_step()
        t.step += 1
        arm = names[next(k for k, (a, b) in enumerate(zip(picks, t.picks)) if a != b)]
        moved = {n for n, p in t.student.named_parameters() if not torch.equal(p, before[n])}
        assert moved and all(n.startswith(owners[arm]) for n in moved), (arm, sorted(moved))
    assert all(n > 0 for n in t.picks)
    t.restore_flags()


def test_an_antgmm_idefics3_student_distils_and_reloads_exactly(tmp_path):
    model = conftest.tiny_idefics3()
    art = generative_art(model)
    antgmm = get_pass("antgmm")
    run_pass(antgmm(antgmm.Config(keep=0.5, importance="activation", shares={"ffn": 0.5, "heads": 0.5})), art)
    structure = read_structure(art.student, art.adapter)
    before_kl = held_out_kl(art)
    # A random tiny teacher's logits are nearly flat (KL ~1e-4): a gentle rate keeps Adam from overshooting.
    metrics = Distill(config(steps=10, lr=5e-4)).run(art)
    assert held_out_kl(art) < 0.8 * before_kl, before_kl
    assert read_structure(art.student, art.adapter) == structure  # shapes kept
    assert metrics["dev_after"]["kl"] < metrics["dev_before"]["kl"]
    save(art.student, tmp_path, {})
    reloaded = load_student(tmp_path)
    batch = {k: v for k, v in art.calib.eval_batches("text")[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, art.student(**batch).logits)


def test_a_plain_text_corpus_for_a_generative_model_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a sentence\nanother sentence\n")
    art = generative_art(conftest.tiny_llava())
    with pytest.raises(LmmcError, match=r"\.jsonl.*\"image\""):
        Distill(config(corpus=str(corpus))).run(art)


def _image_records(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    words = ["a cat", "a dog", "the sun", "a tree"]
    lines = []
    for i in range(n):
        pixels = (torch.rand(20, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": str(folder / f"{i}.png"), "prompt": "what is it ?",
                                 "text": words[i % len(words)]}))
    path = folder / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lmmc_compile_prunes_and_distils_a_saved_llava(tmp_path):
    from lmmc.cli import main

    model = conftest.save_tiny_llava(tmp_path / "llava")
    records = _image_records(tmp_path / "data", 40)
    recipe = {"calibration": {"path": str(records), "samples": 32, "eval_samples": 8, "batch_size": 8,
                              "chat_template": True},
              "passes": [{"wanda": {"sparsity": 0.5}},
                         {"distill": {"steps": 6, "batch_size": 8, "dev_samples": 6, "lr": 5e-4,
                                      "progress": False}}],
              "validate": False}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["compile", str(model), "--recipe", str(tmp_path / "r.yaml"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    record = next(p for p in report["passes"] if p["name"] == "distill")
    m = record["metrics"]
    assert m["steps"] == 6 and m["masked_weights_nonzero"] == 0
    assert m["kept_step"] == 6 and m["dev_after"]["kl"] < m["dev_before"]["kl"]
    assert m["train_samples"] + m["dev_samples"] == 32 and m["dev_samples"] == 6  # no held-out sample
    assert 0 <= m["dev_after"]["top1_agreement"] <= 1


@pytest.mark.parametrize("override", [None, False])
def test_a_corpus_takes_the_calibration_records_chat_template_unless_told_otherwise(tmp_path, override):
    """Corpus prompts reach the student in the form the calibration records did (the chat template
    here), so distillation trains on the inputs the student is validated on; `chat_template: false`
    overrides it."""
    from lmmc.data import load_generative_calibration
    from lmmc.passes.distill import _split_samples

    model = conftest.tiny_llava()
    processor = conftest.tiny_llava_processor()
    records = _image_records(tmp_path / "data", 24)
    cal = CalibrationConfig(path=str(records), samples=16, eval_samples=8, batch_size=8, chat_template=True)
    calib = load_generative_calibration(cal, str(records), processor)
    assert calib.chat_template
    art = Artifact(model_ref="tiny", adapter=get_adapter("llava"), teacher=model, student=make_student(model),
                   preprocessor={"processor": processor}, calib=calib)
    train, dev = build_corpus(config(corpus=str(records), chat_template=override, dev_samples=0), art,
                              ["text", "image"])
    calibrated = Counter(tuple(s["text"]["input_ids"].tolist()) for s in _split_samples(calib.calib, ["text", "image"]))
    corpus = Counter(tuple(s["text"]["input_ids"].tolist()) for s in train + dev)
    assert corpus.total() == 24 - calib.counts["held_out"]  # the held-out records are removed either way
    assert (calibrated <= corpus) == (override is None)
