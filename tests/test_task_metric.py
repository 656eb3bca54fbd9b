"""Task metrics that tell a good student from a broken one, held-out splits by image, and FLOPs counted
at the data's real token lengths."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from PIL import Image

from lmmc.adapters import get_adapter
from lmmc.cli import main
from lmmc.data import load_calibration, read_samples, split, text_tokens
from lmmc.errors import LmmcError
from lmmc.export.validate import (chance_accuracy, nearest_neighbour_accuracy, scored, top_k_agreement,
                                  zero_shot_accuracy)
from lmmc.recipe import CalibrationConfig
from tests.conftest import save_tiny, spelled, tiny_vocab

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def synthetic(seed: int = 0, per_class: int = 8, dim: int = 32):
    """Teacher embeddings of 10 classes: images around their class centre, three near-synonymous captions
    per class (as "a photo of the digit seven", "a picture of a seven", ...)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim))
    truth = np.repeat(np.arange(10), per_class)
    images = centres[truth] + 0.35 * rng.normal(size=(len(truth), dim))
    prompt_class = np.repeat(np.arange(10), 3)
    prompts = centres[prompt_class] + 0.05 * rng.normal(size=(30, dim))
    captions = prompts[truth * 3 + rng.integers(0, 3, len(truth))]  # each image's own caption
    return rng, truth, images, prompt_class, prompts, captions


def old_caption_agreement(t_img, t_txt, s_img, s_txt) -> float:
    """The caption-level metric these replace: the same best held-out caption under both models."""
    return float(((t_img @ t_txt.T).argmax(1) == (s_img @ s_txt.T).argmax(1)).mean())


def test_metrics_rank_a_good_student_above_a_broken_one():
    rng, truth, t_img, prompt_class, t_prompts, t_cap = synthetic()
    students = {
        # small noise everywhere: same classes, but ties among synonyms and look-alikes fall differently
        "good": [x + 0.15 * rng.normal(size=x.shape) for x in (t_img, t_prompts, t_cap)],
        # the image tower broken: its embeddings mostly noise
        "broken": [t_img + 3.0 * rng.normal(size=t_img.shape), t_prompts, t_cap],
    }
    teacher_acc = zero_shot_accuracy(t_img, t_prompts, prompt_class, truth, 10)
    assert teacher_acc >= 0.95
    score = {}
    for name, (img, prompts, cap) in students.items():
        score[name] = {
            "accuracy": zero_shot_accuracy(img, prompts, prompt_class, truth, 10),
            "nn_accuracy": nearest_neighbour_accuracy(img, truth),
            "image_image": top_k_agreement(t_img, t_img, img, img, 5, same=True),
            "text_image": top_k_agreement(t_cap, t_img, cap, img, 5),
            "old": old_caption_agreement(t_img, t_cap, img, cap),
        }
    good, broken = score["good"], score["broken"]
    assert good["accuracy"] >= 0.95 * teacher_acc and broken["accuracy"] < 0.7 * teacher_acc
    assert good["nn_accuracy"] > broken["nn_accuracy"] + 0.2
    assert min(good["image_image"], good["text_image"]) > 0.8
    assert min(broken["image_image"], broken["text_image"]) < 0.5
    # the caption-level agreement these replace ranks the two the wrong way round
    assert good["old"] < broken["old"]


def test_top_k_agreement_is_exact_at_the_teacher_and_never_trivial():
    _, truth, img, _, _, cap = synthetic(seed=1)
    assert top_k_agreement(img, img, img, img, 5, same=True) == 1.0
    assert top_k_agreement(cap, img, cap, img, 5) == 1.0
    # k is capped below the number of candidates: with 3 samples, 1 neighbour out of 2
    three = img[:3]
    reversed_ = three[::-1].copy()
    assert top_k_agreement(three, three, reversed_, reversed_, 50, same=True) < 1.0


def test_agreement_shares_tied_neighbours_instead_of_trusting_rounding():
    """Sample 0's two nearest neighbours tie under the teacher; which one argmax names is rounding. A student
    that picks either agrees; one that cannot tell the two apart agrees as well; one that picks a third
    sample does not."""
    from lmmc.export.validate import neighbour_agreement

    teacher = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    second = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, -0.999, 0.0], [0.0, 0.0, 1.0]])  # picks sample 2
    first = np.array([[1.0, 0.0, 0.0], [1.0, 0.999, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])  # picks sample 1
    for student in (teacher, first, second):
        row0 = top_k_agreement(teacher[:1], teacher[1:], student[:1], student[1:], 1)
        assert row0 == 1.0
    assert neighbour_agreement(teacher, first) == neighbour_agreement(teacher, second)
    wrong = teacher.copy()
    wrong[3] = [0.9, 0.1, 0.1]  # now sample 0's nearest neighbour under the student
    assert top_k_agreement(teacher[:1], teacher[1:], wrong[:1], wrong[1:], 1) == 0.0
    # ties on the student's side count the share of its tied picks the teacher ranks best
    assert top_k_agreement(second[:1], second[1:], teacher[:1], teacher[1:], 1) == 0.5


def test_metrics_over_row_blocks_equal_the_whole_matrix_ones(monkeypatch):
    # the held-out set against itself is compared a block of rows at a time (each N x N matrix was 10 GB at 50,000)
    import lmmc.export.validate as v

    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((37, 8)).astype(np.float32)
    student = teacher + 0.7 * rng.standard_normal((37, 8)).astype(np.float32)
    student[5] = student[9]  # a tie that the blocks must share as the whole matrix does
    truth = [int(i) for i in rng.integers(0, 3, 37)]

    def whole(e):  # the whole matrix, each sample never its own match
        sim = v._unit(e) @ v._unit(e).T
        np.fill_diagonal(sim, -np.inf)
        return sim

    labels = np.asarray(truth)
    reference = {"agreement": v._shared_best(whole(student), v._best(whole(teacher), 1)),
                 "accuracy": v._tied_hits(whole(student), labels, labels),
                 "top5": v._shared_best(whole(student), v._best(whole(teacher), 5)),
                 "retrieval": v._shared_best(v._unit(student[:20]) @ v._unit(student[20:]).T,
                                             v._best(v._unit(teacher[:20]) @ v._unit(teacher[20:]).T, 3))}
    monkeypatch.setattr(v, "_ROWS", 4)
    got = {"agreement": v.neighbour_agreement(teacher, student),
           "accuracy": nearest_neighbour_accuracy(student, truth),
           "top5": top_k_agreement(teacher, teacher, student, student, 5, same=True),
           "retrieval": top_k_agreement(teacher[:20], teacher[20:], student[:20], student[20:], 3)}
    assert got == pytest.approx(reference, abs=1e-12)
    assert 0.0 < got["agreement"] < 1.0 and 0.0 < got["accuracy"] < 1.0

    import tracemalloc
    big = rng.standard_normal((4000, 8)).astype(np.float32)
    monkeypatch.setattr(v, "_ROWS", 256)
    tracemalloc.start()
    v.neighbour_agreement(big, big + 0.1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4000 * 4000 * 4  # less than one whole float32 matrix; the whole-matrix code held three


def test_retrieval_agreement_counts_the_captions_each_image_ranks_first():
    """Zero-shot classification ranks captions per image. A student that keeps every caption's best image
    but swaps each image's best caption for a near-synonym agrees text -> image, and the metric still
    catches it."""
    from types import SimpleNamespace

    from lmmc.adapters import get_adapter
    from lmmc.export.validate import task_metric

    rng = np.random.default_rng(0)
    centres = 4.0 * np.eye(8)[:4]  # 4 images far apart, 2 captions each, caption a nearer than caption b
    t_img = centres + 0.01 * rng.normal(size=centres.shape)
    offsets = np.zeros((2, 8))
    offsets[0, 4], offsets[1, 5] = 0.3, 0.3
    t_txt = np.concatenate([centres + offsets[0], centres + offsets[1] - 0.6 * np.eye(8)[:4]])  # a, then b
    s_img = t_img + 1.0 * np.eye(8)[5]  # every image now nearer its caption b
    art = SimpleNamespace(calib=None, adapter=get_adapter("clip"))
    out = task_metric(art, SimpleNamespace(agreement_k=1), {"text": (t_txt, t_txt), "vision": (t_img, s_img)})
    assert out["parts"]["text -> image"] == 1.0
    assert out["parts"]["image -> text"] == 0.0 and out["value"] == 0.0


def test_a_caption_held_out_under_several_images_is_ranked_once():
    """40 images, 4 captions ten times each: a student that ranks every image's caption as the teacher does
    agrees, whichever copy of the caption it finds first (0.55 when the copies were ranked)."""
    from types import SimpleNamespace

    import torch

    from lmmc.adapters import get_adapter
    from lmmc.export.validate import distinct_texts, task_metric

    rng = np.random.default_rng(0)
    captions = 4.0 * np.eye(8)[:4]
    t_img = captions[np.arange(40) % 4] + 0.3 * rng.normal(size=(40, 8))
    s_img = t_img + 0.01 * rng.normal(size=t_img.shape)
    ids = torch.tensor([[101, 7 + i % 4, 102, 0] for i in range(40)])
    mask = (ids != 0).long()
    mask[:20, 3], ids[:20, 3] = 1, 5  # the first 20 read "caption, 5": other texts, with the same embeddings
    batches = [{"input_ids": ids[:24], "attention_mask": mask[:24]}, {"input_ids": ids[24:], "attention_mask": mask[24:]}]
    assert distinct_texts(batches) == [0, 1, 2, 3, 20, 21, 22, 23]
    t_txt = np.concatenate([captions, captions])[np.r_[np.arange(20) % 4, 4 + np.arange(20) % 4]]
    art = SimpleNamespace(calib=SimpleNamespace(eval_batches=lambda m: batches, labels=None),
                          adapter=get_adapter("clip"))
    # copies of a caption in other batches differ in the last bits, as padding to another width leaves them
    t_txt, s_txt = (t_txt + 1e-6 * rng.normal(size=t_txt.shape) for _ in range(2))
    out = task_metric(art, SimpleNamespace(agreement_k=5), {"text": (t_txt, s_txt), "vision": (t_img, s_img)})
    assert out["parts"]["image -> text"] == 1.0


# --- held-out split by image ---------------------------------------------------------------------

def coco_style(tmp: Path, n_images: int = 40, captions: int = 3) -> Path:
    """Image-text pairs with three captions per image, labelled with the digit class."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp / f"{i}.png")
        label = NUMBERS[i % 10]
        for c in range(captions):
            text = ["a picture of the number {}", "the number {} in a picture", "a {} on a road"][c].format(label)
            lines.append(json.dumps({"image": f"{i}.png", "text": text, "label": label}))
    (tmp / "pairs.jsonl").write_text("\n".join(lines))
    return tmp / "pairs.jsonl"


def test_split_holds_out_whole_images(tmp_path):
    records = read_samples(coco_style(tmp_path))
    calib, held = split(records, n_calib=2000, n_eval=64, seed=0)
    held_images = [r["image"] for r in held]
    assert len(held_images) == len(set(held_images)) == 10  # a quarter of the 40 images, one pair each
    assert not set(held_images) & {r["image"] for r in calib}
    assert len(calib) == 30 * 3  # every caption of every other image
    # text alone: held out by text
    texts = [{"text": f"sentence {i % 30}"} for i in range(90)]
    calib, held = split(texts, n_calib=100, n_eval=5, seed=0)
    assert len(held) == 5 and not {r["text"] for r in held} & {r["text"] for r in calib}


def tiny_preprocessors(tmp: Path) -> dict:
    tok = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp / "vocab.txt")))
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return {"tokenizer": tok, "image_processor": proc}


def test_distillation_corpus_drops_held_out_images_under_any_caption(tmp_path):
    import hashlib

    from lmmc.pipeline import get_pass
    from lmmc.passes.distill import _split_samples, build_corpus

    pre = tiny_preprocessors(tmp_path)
    cfg = CalibrationConfig(samples=2000, eval_samples=8, batch_size=4)
    calib = load_calibration(cfg, str(coco_style(tmp_path)), {"text", "image"}, pre)
    # distil on the calibration pairs and, as a corpus, on every pair of the data set
    for corpus in (None, str(tmp_path / "pairs.jsonl")):
        distill_cfg = get_pass("distill").Config(steps=1, dev_samples=4, corpus=corpus)
        art = SimpleNamespace(calib=calib, preprocessor=pre, adapter=get_adapter("clip"),
                              teacher=SimpleNamespace(config=transformers.CLIPConfig()))
        train, dev = build_corpus(distill_cfg, art, ["image", "text"])

        def image_key(sample):
            return hashlib.sha1(sample["image"]["pixel_values"].float().numpy().tobytes()).hexdigest()

        held = {image_key(s) for s in _split_samples(calib.eval, ["image", "text"])}
        assert len(held) == 8
        used = {image_key(s) for s in train + dev}
        assert not used & held
        assert len(used) == 40 - 8


def test_labels_give_classes_prompts_and_held_out_truth(tmp_path):
    pre = tiny_preprocessors(tmp_path)
    path = coco_style(tmp_path)
    cfg = CalibrationConfig(samples=64, eval_samples=8, batch_size=4)
    data = load_calibration(cfg, str(path), {"text", "image"}, pre)
    labels = data.labels
    assert labels.classes == sorted(NUMBERS)
    held_images = [r for r in split(read_samples(path), 64, 8, 0)[1]]
    assert [labels.classes[i] for i in labels.held_out] == [r["label"] for r in held_images]
    assert len(labels.prompt_class) == 30 and sum(b["input_ids"].shape[0] for b in labels.prompts) == 30
    # a caption written again with other case or spacing is the same prompt, not a second vote for its class
    lines = path.read_text().splitlines()
    twin = json.loads(lines[0])
    path.write_text("\n".join([*lines, json.dumps({**twin, "text": "  " + twin["text"].upper()})]))
    again = load_calibration(cfg, str(path), {"text", "image"}, pre).labels
    assert again.prompt_class == labels.prompt_class
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again.prompts, labels.prompts))
    # with a caption template: one prompt per class
    templated = load_calibration(CalibrationConfig(samples=64, eval_samples=8, batch_size=4,
                                                   caption_template="a picture of the number {label}"),
                                 str(path), {"text", "image"}, pre)
    assert templated.labels.prompt_class == list(range(10))


def test_images_without_captions_take_no_held_out_place_and_no_class(tmp_path):
    """A dual encoder scores pairs: an image-only record cannot be held out, and a class that only such
    records carry has no prompt, so zero-shot accuracy could not choose it: refused."""
    pre = tiny_preprocessors(tmp_path)
    path = coco_style(tmp_path)
    rng = np.random.default_rng(1)
    lines = path.read_text().splitlines()
    for i in range(40, 56):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "label": NUMBERS[i % 10]}))
    path.write_text("\n".join(lines))
    cfg = CalibrationConfig(samples=64, eval_samples=16, batch_size=4)
    data = load_calibration(cfg, str(path), {"text", "image"}, pre)
    assert data.counts["held_out"] == 10  # a quarter of the 40 captioned images, none of the 16 others
    assert data.labels.classes == sorted(NUMBERS)
    assert sorted(set(data.labels.prompt_class)) == list(range(10))
    assert f"16 record(s) of '{path}' lack a text or an image and were left out" in data.warnings[0]
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "56.png")
    path.write_text("\n".join([*lines, json.dumps({"image": "56.png", "label": "twelve"})]))
    with pytest.raises(LmmcError, match="class\\(es\\) 'twelve' have no record with both a text and an image"):
        load_calibration(cfg, str(path), {"text", "image"}, pre)


# --- FLOPs at the real token lengths ----------------------------------------------------------------

def test_text_tokens_are_the_real_mean_length_capped_at_positions(tmp_path):
    pre = tiny_preprocessors(tmp_path)
    data = load_calibration(CalibrationConfig(samples=64, eval_samples=8, batch_size=4),
                            str(coco_style(tmp_path)), {"text", "image"}, pre)
    lengths = [int(m.sum()) for b in data.calib["text"] for m in b["attention_mask"]]
    assert text_tokens(data, positions=77) == round(sum(lengths) / len(lengths))
    assert text_tokens(data, positions=5) == 5
    assert text_tokens(data, positions=77, deployment=32) == 32
    assert text_tokens(data, positions=16, deployment=32) == 16


def test_chance_levels_and_the_accuracy_that_clears_them():
    truth = [0] * 6 + [1] * 3 + [2] * 3
    chance, bound = chance_accuracy("zero_shot_accuracy", truth)
    assert chance == pytest.approx(0.5) and bound == pytest.approx(0.5 + 3 * np.sqrt(0.25 / 12))
    chance, bound = chance_accuracy("nearest_neighbour_accuracy", truth)
    assert chance == pytest.approx((6 * 5 + 3 * 2 + 3 * 2) / (12 * 11))
    assert bound == pytest.approx(chance + 3 * np.sqrt(chance * (1 - chance) / 12))
    # A teacher that knows its classes clears the bound; the same embeddings against shuffled labels do not.
    rng, truth, images, prompt_class, prompts, _ = synthetic()
    shuffled = rng.permutation(truth)
    for labels, clears in ((truth, True), (shuffled, False)):
        for kind, accuracy in (("zero_shot_accuracy", zero_shot_accuracy(images, prompts, prompt_class, labels, 10)),
                               ("nearest_neighbour_accuracy", nearest_neighbour_accuracy(images, labels))):
            assert (accuracy >= chance_accuracy(kind, labels)[1]) is clears, (kind, accuracy)


def test_samples_without_a_right_answer_are_not_scored():
    """One image alone in its class had no neighbour that could be right, and an image of a class no prompt
    names no prompt that could: each counted as a miss, so a perfect embedding of 120 classes scored 0.3."""
    truth = [0, 0, 1, 1, 2, 3]  # classes 2 and 3 hold one sample each
    one_hot = np.eye(4)[truth] + 0.01 * np.arange(6)[:, None]
    assert nearest_neighbour_accuracy(one_hot, truth) == 1.0
    chance, bound = chance_accuracy("nearest_neighbour_accuracy", truth)
    assert chance == pytest.approx((2 + 2) / (4 * 5)) and bound == pytest.approx(chance + 3 * np.sqrt(chance * (1 - chance) / 4))
    assert np.isnan(nearest_neighbour_accuracy(one_hot[[0, 2, 4]], [0, 1, 2]))  # none has an answer
    # zero-shot: prompts name classes 0 and 1 only
    prompts, prompt_class = np.eye(4)[[0, 1]], [0, 1]
    assert zero_shot_accuracy(one_hot, prompts, prompt_class, truth, 4) == 1.0
    assert scored("zero_shot_accuracy", truth, prompt_class).tolist() == [True] * 4 + [False] * 2
    assert scored("nearest_neighbour_accuracy", truth).tolist() == [True] * 4 + [False] * 2


def test_a_held_out_images_own_captions_are_no_class_prompt(tmp_path):
    """A caption per image: were a held-out image's caption a prompt of its class, a model that matches
    images to their captions, knowing no class, would score 1.0 (0.0 without it, chance 0.1)."""
    pre = tiny_preprocessors(tmp_path)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": f"the picture {spelled(i)}", "label": NUMBERS[i % 10]}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines))
    data = load_calibration(CalibrationConfig(samples=64, eval_samples=8, batch_size=4), str(path), {"text", "image"}, pre)
    calib, held = split(read_samples(path), 64, 8, 0)
    index = {c: i for i, c in enumerate(data.labels.classes)}
    assert len(held) == 8 and sorted(data.labels.prompt_class) == sorted(index[r["label"]] for r in calib)
    tokenizer = pre["tokenizer"]
    prompts = {tuple(row[m.bool()].tolist()) for b in data.labels.prompts for row, m in zip(b["input_ids"],
                                                                                            b["attention_mask"])}
    assert not prompts & {tuple(tokenizer(r["text"])["input_ids"]) for r in held}
    assert len(prompts) == len(calib) == 32


def test_a_model_that_cannot_tell_samples_apart_scores_chance_not_the_first_class():
    truth = [0] * 8 + [1] * 2 + [2] * 2  # the first sample's class is the commonest
    same = np.ones((12, 4), dtype=np.float32)
    assert nearest_neighbour_accuracy(same, truth) == pytest.approx(chance_accuracy("nearest_neighbour_accuracy", truth)[0])
    assert zero_shot_accuracy(same, np.ones((3, 4)), [0, 1, 2], truth, 3) == pytest.approx(1 / 3)
    # a tie between two of three classes: half a hit for a sample of either, none for the third
    images = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    prompts = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 0.0]])
    assert zero_shot_accuracy(images, prompts, [0, 1, 2], [0, 1, 2], 3) == pytest.approx(1 / 3)


def class_folder(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("water", "house", "road", "man"):  # one token each in the tiny vocabulary
        (tmp / "classes" / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp / "classes" / label / f"{i}.png")
    return tmp / "classes"


def compile_classes(tmp_path: Path, validate: dict):
    save_tiny("clip", tmp_path / "clip")
    class_folder(tmp_path)
    recipe = {"calibration": {"path": "classes", "caption_template": "a picture of the {label}",
                              "samples": 32, "eval_samples": 12, "batch_size": 4},
              "passes": [{"antgmm": {"keep": 0.5, "importance": "activation"}}],
              "validate": {"latency": False, "threads": 1, "min_held_out": 12, **validate}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["compile", "./clip", "-r", "r.yaml", "-o", "out"])
    return result, json.loads((tmp_path / "out" / "report.json").read_text())


def test_compile_reports_teacher_and_student_accuracy_and_flops_per_tower(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    result, report = compile_classes(tmp_path, {"min_task_metric": 0.0})
    assert result.exit_code == 0, result.output
    task = report["validation"]["task_metric"]
    assert task["kind"] == "zero_shot_accuracy" and task["classes"] == 4
    assert task["value"] == task["student"] and task["ratio"] == pytest.approx(task["student"] / task["teacher"])
    flops = report["flops"]
    caption = "a picture of the road"  # every caption has this length
    tokens = len(transformers.BertTokenizer.from_pretrained(str(tmp_path / "clip"))(caption)["input_ids"])
    assert flops["text"]["tokens"] == tokens
    assert flops["vision"]["tokens"] == (32 // 8) ** 2 + 1
    assert report["passes"][0]["metrics"]["tokens"] == {"text": tokens, "vision": 17}
    teacher = sum(f["teacher"] for f in flops.values())
    student = sum(f["student"] for f in flops.values())
    assert student / teacher == pytest.approx(0.5, abs=0.05)
    assert "FLOPs kept" in result.output and "teacher" in result.output
    # The tiny CLIP reads a caption at its highest token id (eos_token_id 2), which every caption of this
    # template holds before its label: the text tower embeds them alike (two in the first batch), as the report says.
    assert [w for w in report["warnings"] if "one and the same embedding" in w] == [
        "the teacher's text tower gives one and the same embedding for every one of 2 different calibration "
        "samples, so its cosine to the student compares constants (a CLIP text tower reads each caption at one "
        "token, its end token or, where the config's eos_token_id is 2, its highest id: captions alike up to that "
        "token embed alike); calibrate on more varied texts to measure that tower"]


def test_a_ratio_to_a_teacher_at_chance_fails_the_compile(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    result, report = compile_classes(tmp_path, {"min_task_metric_ratio": 0.01})
    task = report["validation"]["task_metric"]
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    assert gates["zero-shot accuracy (image -> class prompt): student / teacher"]["passed"]
    # The random teacher is at chance on these labels (the most common of four classes among the 12
    # held-out images), so its ratio cannot judge the student: the compile fails on that, naming it.
    chance = task["chance"]
    assert chance * 12 == round(chance * 12) and 0.25 <= chance < 0.5 and task["teacher"] < task["chance_bound"]
    chance_gate = gates["zero-shot accuracy (image -> class prompt): teacher above chance"]
    assert not chance_gate["passed"] and chance_gate["value"] == task["teacher"]
    assert chance_gate["threshold"] == pytest.approx(chance + 3 * np.sqrt(chance * (1 - chance) / 12))
    assert result.exit_code == 1 and "teacher above chance" in result.output


def test_random_embeddings_clear_the_chance_bound_as_rarely_as_the_readme_says():
    """The false-pass rate the README and chance_accuracy state: about 1 % for nearest neighbour, almost
    never for zero-shot (400 draws of 100 samples in 4 classes)."""
    rng = np.random.default_rng(0)
    passed = {"nearest_neighbour_accuracy": 0, "zero_shot_accuracy": 0}
    for _ in range(400):
        truth = list(rng.integers(0, 4, 100))
        images = rng.normal(size=(100, 32))
        passed["nearest_neighbour_accuracy"] += nearest_neighbour_accuracy(images, truth) >= \
            chance_accuracy("nearest_neighbour_accuracy", truth)[1]
        passed["zero_shot_accuracy"] += zero_shot_accuracy(images, rng.normal(size=(4, 32)), [0, 1, 2, 3], truth, 4) >= \
            chance_accuracy("zero_shot_accuracy", truth)[1]
    assert 1 <= passed["nearest_neighbour_accuracy"] <= 12 and passed["zero_shot_accuracy"] <= 2, passed


@pytest.mark.parametrize("k", [5, 100000])
def test_a_task_gate_on_retrieval_agreement_that_a_random_student_meets_is_missed(tmp_path, monkeypatch, one_thread, k):
    """agreement_k 100000 against 32 held-out pairs made every part 1.0: a student pruned to noise passed
    min_task_metric 0.9. The report names the k used and a random student's agreement."""
    monkeypatch.chdir(tmp_path)
    save_tiny("clip", tmp_path / "clip")
    recipe = {"calibration": {"random": True, "samples": 16, "eval_samples": 32, "batch_size": 8},
              "passes": [{"magnitude": {"sparsity": 0.9}}],
              "validate": {"latency": False, "threads": 1, "min_task_metric": 0.0, "agreement_k": k}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    if k != 5:  # the plan knows the held-out count: refused before anything loads
        result = CliRunner().invoke(main, ["compile", "./clip", "-r", "r.yaml", "-o", "out", "--dry-run"])
        assert result.exit_code == 2, result.output
        assert ("with agreement_k = 100000 among 32 held-out images and 32 captions a random ranking agrees 0.97 of "
                "the time, above 0.5: it would certify nothing. Lower validate.agreement_k or raise "
                "calibration.eval_samples") in " ".join(result.output.split())
        import lmmc.compile  # validation's own gate stays, for counts the plan cannot foresee

        monkeypatch.setattr(lmmc.compile, "_check_agreement", lambda *args: None)
    result = CliRunner().invoke(main, ["compile", "./clip", "-r", "r.yaml", "-o", "out"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    task = report["validation"]["task_metric"]
    gate = next(g for g in report["validation"]["gates"] if g["name"].endswith("agreement by chance"))
    # image -> image leaves the image itself out of 31 others; text -> image ranks all 32 images
    assert task["chance"] == pytest.approx(max(min(k, 30) / 31, min(k, 31) / 32)) and gate["value"] == task["chance"]
    if k == 5:
        assert result.exit_code == 0 and gate["passed"], result.output
        assert task["name"] == "retrieval agreement with the teacher (top-1 in its top 5)"
    else:
        assert result.exit_code == 1 and not gate["passed"], result.output
        assert task["name"] == "retrieval agreement with the teacher (top-1 in its top 31 of the 100000 asked)"
        assert task["value"] >= 0.9, task["parts"]  # what min_task_metric 0.9 alone would have certified


def test_channels_that_carry_the_embeddings_length_are_found_and_warned_of(tmp_path):
    """A teacher with outlier features (two channels of its last LayerNorm scaled up, as some checkpoints
    have): a pruned student kept cosine 0.97 to it with nearest-neighbour agreement 0, and the report said
    nothing. The channels are found, and the report says what the cosine gate measures there."""
    from safetensors.torch import load_file, save_file

    from lmmc.export.validate import dominant_channels
    from tests.conftest import compile_tiny_text

    rng = np.random.default_rng(0)
    plain = rng.normal(size=(64, 384))
    assert dominant_channels(plain) is None
    outliers = plain.copy()
    outliers[:, [5, 300]] += 40.0  # MiniLM's largest channel holds 0.9 %; these two hold 90 %
    found = dominant_channels(outliers)
    assert sorted(found["channels"]) == [5, 300] and found["share"] == pytest.approx(0.90, abs=0.01)
    assert dominant_channels(plain[:, :6]) is None  # too few channels to tell

    teacher = save_tiny("bert", tmp_path / "teacher")
    weights = load_file(teacher / "model.safetensors")
    for layer in range(2):
        weights[f"encoder.layer.{layer}.output.LayerNorm.weight"][[3, 17]] = 300.0
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    out = compile_tiny_text(teacher, tmp_path / "out", [{"magnitude": {"sparsity": 0.3}}])
    report = json.loads((out / "report.json").read_text())
    found = report["validation"]["towers"]["text"]["dominant_channels"]
    assert sorted(found["channels"]) in ([3], [17], [3, 17]) and found["share"] >= 0.5
    assert any(w.startswith(f"text: {len(found['channels'])} of the teacher's 32 embedding channels") and
               "Gate the task metric" in w for w in report["warnings"])


def test_match_probabilities_are_each_models_sigmoid_of_its_scaled_and_biased_cosine():
    """SigLIP scores each pair alone: a student whose similarities all sit lower ranks as the teacher does,
    so the task metric passes it, and every match probability moves; the report measures that."""
    from types import SimpleNamespace

    from lmmc.export.validate import match_probabilities

    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    teacher = SimpleNamespace(logit_scale=torch.tensor([np.log(10.0)]), logit_bias=torch.tensor([-2.0]))
    student = SimpleNamespace(logit_scale=torch.tensor([np.log(10.0)]), logit_bias=torch.tensor([-3.0]))
    got = match_probabilities(teacher, student, {"text": (txt, 2 * txt), "vision": (img, img)})
    p_t = 1 / (1 + np.exp(-(10 * unit(img) @ unit(txt).T - 2)))
    p_s = 1 / (1 + np.exp(-(10 * unit(img) @ unit(txt).T - 3)))  # the embeddings' norms do not count
    assert got["pairs"] == 35 and "unmatched" not in got  # 7 captions for 5 images: no pairs to tell apart
    assert got["mean_abs_diff"] == pytest.approx(float(np.abs(p_t - p_s).mean()), rel=1e-6)
    assert got["max_abs_diff"] == pytest.approx(float(np.abs(p_t - p_s).max()), rel=1e-6)
    assert got["decision_agreement"] == float(((p_t > 0.5) == (p_s > 0.5)).mean()) < 1.0
    # One caption per image: the true pairs on their own. A student whose every true pair fell below 0.5 read
    # as 0.96 agreement averaged over all 25 combinations, which sit below 0.5 for both models.
    pair = np.eye(5, 8)  # each image alike only its own caption
    scaled = SimpleNamespace(logit_scale=torch.tensor([np.log(100.0)]), logit_bias=torch.tensor([-10.0]))
    shifted = SimpleNamespace(logit_scale=torch.tensor([np.log(100.0)]), logit_bias=torch.tensor([-110.0]))
    got = match_probabilities(scaled, shifted, {"text": (pair, pair), "vision": (pair, pair)})
    assert got["pairs"] == 5 and got["decision_agreement"] == 0.0 and got["mean_abs_diff"] > 0.99
    assert got["unmatched"]["pairs"] == 20 and got["unmatched"]["decision_agreement"] == 1.0
    clip = SimpleNamespace(logit_scale=torch.tensor([np.log(10.0)]))  # a softmax model: rankings are its output
    assert match_probabilities(clip, clip, {"text": (txt, txt), "vision": (img, img)}) is None
