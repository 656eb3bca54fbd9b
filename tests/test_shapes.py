"""The shapes sample teacher (a SigLIP model) on a shortened run: data, captions, pictures, loss, saved model."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from conftest import REPO

SCRIPT = REPO / "samples" / "teachers" / "shapes.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("shapes_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shapes = _load_script()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, float]:
    """The whole script, shrunk: one-block towers of width 32 trained for three steps."""
    out = tmp_path_factory.mktemp("shapes")
    before = torch.get_num_threads()
    try:
        accuracy = shapes.main(["--out", str(out), "--steps", "3", "--batch-size", "16", "--hidden", "32",
                                "--vision-layers", "1", "--text-layers", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    return out, accuracy


def test_split_holds_every_image_once_stratified_and_test_images_are_never_trained_on(short_run):
    out, _ = short_run
    data = {name: _read(out / "data" / f"{name}.jsonl") for name in ("train", "test", "calib")}
    images = {name: {r["image"] for r in recs} for name, recs in data.items()}
    assert not images["train"] & images["test"]
    assert len(images["train"] | images["test"]) == shapes.IMAGES
    # Stratified: each of the 192 classes has 25 pictures, 5 of them held out.
    test_per_class = {}
    for r in {r["image"]: r for r in data["test"]}.values():
        test_per_class[r["label"]] = test_per_class.get(r["label"], 0) + 1
    assert len(test_per_class) == len(shapes.classes()) == 192
    assert set(test_per_class.values()) == {5}
    assert images["calib"] == images["train"] and len(data["calib"]) == len(images["train"])
    assert all(len([r for r in data["train"] if r["image"] == p]) == shapes.CAPTIONS_PER_IMAGE
               for p in sorted(images["train"])[:50])


def test_every_caption_names_each_attribute_of_its_class_and_no_other(short_run):
    out, _ = short_run
    kinds = (shapes.SIZES, shapes.COLOURS, shapes.SHAPES, [c.replace("-", " ") for c in shapes.CORNERS])
    records = _read(out / "data" / "train.jsonl")
    for r in records:
        cls = r["label"].split(" ")
        text = f" {r['text'].replace(',', ' ')} "
        for value, kind in zip([*cls[:3], cls[3].replace("-", " ")], kinds):
            assert [v for v in kind if f" {v} " in text] == [value], (r, kind)
    # Word orders vary: the prompt's order is one of several.
    assert len({r["text"].split(" ")[0] for r in records}) >= 4


def test_each_picture_shows_its_colour_in_its_corner_on_a_dark_background(short_run):
    out, _ = short_run
    half = shapes.SIDE // 2
    quadrants = {"top-left": (slice(0, half), slice(0, half)), "top-right": (slice(0, half), slice(half, None)),
                 "bottom-left": (slice(half, None), slice(0, half)), "bottom-right": (slice(half, None), slice(half, None))}
    area = {"small": [], "large": []}
    for r in _read(out / "data" / "test.jsonl")[::15]:
        size, colour, _, corner = r["label"].split(" ")
        pixels = np.asarray(Image.open(out / "data" / r["image"]).convert("RGB"), dtype=np.float64)
        assert pixels.shape == (shapes.SIDE, shapes.SIDE, 3)
        # The brightest quadrant is the named corner, and its brightest pixels are the named colour.
        brightness = {name: pixels[rows, cols].sum(-1).mean() for name, (rows, cols) in quadrants.items()}
        assert max(brightness, key=brightness.get) == corner
        rows, cols = quadrants[corner]
        region = pixels[rows, cols].reshape(-1, 3)
        shape_pixels = region[region.max(-1) > 120]  # the background's channels are 40 +- 12
        assert len(shape_pixels) > 15
        area[size].append(len(shape_pixels))
        nearest = min(shapes.COLOURS, key=lambda c: np.abs(shape_pixels.mean(0) - shapes.COLOURS[c]).sum())
        assert nearest == colour
    assert np.mean(area["large"]) > 2.5 * np.mean(area["small"])


def test_sigmoid_loss_is_the_sum_over_pairs_of_each_match_log_likelihood():
    torch.manual_seed(0)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    labels = torch.tensor([0, 1, 0, 2, 3])
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-5.0)
    cos = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    expected = 0.0
    for i in range(5):
        for j in range(5):
            p = torch.sigmoid(10.0 * cos[i, j] - 5.0)
            expected -= math.log(p if labels[i] == labels[j] else 1 - p)
    loss = shapes.sigmoid_loss(image, text, labels, scale, bias)
    assert loss.item() == pytest.approx(expected / 5, rel=1e-5)
    aligned = torch.eye(4, 8)[[0, 1, 0, 2, 3]]
    assert shapes.sigmoid_loss(aligned, aligned, labels, scale, bias) < shapes.sigmoid_loss(
        aligned, aligned[[1, 0, 3, 2, 4]], labels, scale, bias)


def test_saved_teacher_reads_texts_as_siglip_does_and_scores_what_the_run_printed(short_run):
    out, accuracy = short_run
    model = transformers.AutoModel.from_pretrained(out / "model").eval()
    assert isinstance(model, transformers.SiglipModel)
    assert model.logit_scale.exp().item() > 1.0  # not transformers' start of 1, where pairs barely separate
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    encoded = tokenizer(["a photo of a large red circle in the top left corner"], padding="max_length",
                        max_length=shapes.MAX_POSITIONS)
    # As Google's SigLIP tokenizers: no attention mask, the text ended and padded with </s>.
    assert list(encoded) == ["input_ids"]
    ids = encoded["input_ids"][0]
    assert len(ids) == shapes.MAX_POSITIONS == model.config.text_config.max_position_embeddings
    assert ids[-1] == tokenizer.pad_token_id == tokenizer.eos_token_id
    # Every class prompt fits the text tower, so none is cut.
    longest = max(len(tokenizer(t)["input_ids"]) for t in [shapes.caption(x, c) for x in shapes.TEMPLATES
                                                           for c in shapes.classes()])
    assert longest <= shapes.MAX_POSITIONS
    processor = transformers.AutoImageProcessor.from_pretrained(out / "model")
    test = _read(out / "data" / "test.jsonl")
    by_image = sorted({r["image"]: shapes.label_of(r) for r in test}.items())
    pixels, index = shapes.digits.load_pixels(out / "data", processor, test)
    reloaded = shapes.evaluate(model, tokenizer, pixels[[index[p] for p, _ in by_image]],
                               torch.tensor([label for _, label in by_image]))
    assert reloaded == pytest.approx(accuracy, abs=1e-6)


def test_lmmc_accepts_the_teacher_and_its_calibration_data(short_run):
    out, _ = short_run
    recipe = REPO / "samples" / "recipes" / "shapes-structured50-distill.yaml"
    result = subprocess.run([str(Path(sys.executable).parent / "lmmc"), "compile", str(out / "model"), "--recipe",
                             str(recipe), "--calib", str(out / "data" / "calib.jsonl"), "--out",
                             str(out / "compiled"), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not (out / "compiled").exists()


def test_the_zero_shot_benchmark_scores_the_teacher_as_its_training_run_did(short_run, capsys):
    """benchmarks/digits.py tokenises the prompts as lmmc deploys a SigLIP (padded to the full length, the
    padding attended), which is how the teacher was trained and scored."""
    out, accuracy = short_run
    spec = importlib.util.spec_from_file_location("zero_shot_bench", REPO / "benchmarks" / "digits.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = transformers.AutoModel.from_pretrained(out / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    images, _ = bench.test_set(out / "data", shapes)
    prompts = shapes.class_prompts()[:6]
    _, got = bench.torch_embeddings(model, out / "model", images[:2], prompts)
    with torch.no_grad():
        trained_as = model.get_text_features(input_ids=shapes.encode_texts(tokenizer, prompts)).pooler_output
        unpadded = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
    np.testing.assert_allclose(got, trained_as.numpy(), atol=1e-5)
    assert np.abs(got - unpadded.numpy()).max() > 1e-2  # the padding is what the comparison tells apart
    bench.main(["--sample", "shapes", "--teacher", str(out / "model"), "--data", str(out / "data"), "--threads", "1"])
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("teacher"))
    assert float(line.split()[3].rstrip("%")) / 100 == pytest.approx(accuracy, abs=5e-5)
