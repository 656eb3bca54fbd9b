"""Generative export of Idefics3 / SmolVLM: the vision encoder with its pixel-shuffle connector and the
KV-cache decoder in ONNX Runtime reproduce PyTorch's image features and greedy generate token for token,
for the tiny model and for a student whose heads, SwiGLU channels and blocks AntGMM removed in a compile.
Each model is exported once per module: the dynamo exports dominate the file's time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

import lmmc
from conftest import (LLAVA_IMAGE_TOKEN, assert_greedy_matches_pytorch, greedy_reference, save_tiny_idefics3,
                      tiny_idefics3, tiny_idefics3_processor)
from lmmc.adapters import get_adapter
from lmmc.cli import main
from lmmc.errors import LmmcError
from lmmc.export.generative import export_generative
from lmmc.runtime import open_generative
from lmmc.runtime.generate import Generator, generative_prompt
from lmmc.student import read_structure

NEW_TOKENS = 32
PROMPTS = ["<image>\nthe picture of a house is", "<image>\ncold water"]
ADAPTER = get_adapter("idefics3")


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def left_padded_processor():
    processor = tiny_idefics3_processor()
    processor.tokenizer.padding_side = "left"  # what batched greedy generation needs
    return processor


@pytest.fixture(scope="module")
def plain(threads, tmp_path_factory):
    """(model, processor, Generator) of the tiny Idefics3, exported once."""
    tmp = tmp_path_factory.mktemp("idefics3")
    model, processor = tiny_idefics3(), left_padded_processor()
    export_generative(model, tmp / "onnx")
    return model, processor, Generator(tmp / "onnx", threads=1, preprocessor=processor)


@pytest.fixture(scope="module")
def compiled(threads, tmp_path_factory):
    """(teacher, student, compile output dir, CLI result): a saved tiny Idefics3 compiled with AntGMM
    (depth, FFN and head stages), the generative export and validation with its ONNX Runtime gates."""
    tmp = tmp_path_factory.mktemp("idefics3-compile")
    teacher_dir = save_tiny_idefics3(tmp / "teacher")
    recipe = {"calibration": {"random": True, "samples": 4, "eval_samples": 4, "batch_size": 4},
              "passes": [{"antgmm": {"keep": 0.5, "importance": "activation",
                                     "shares": {"depth": 0.4, "ffn": 0.3, "heads": 0.3}}}],
              "export": [{"onnx_generative": {}}],
              "validate": {"min_held_out": 4, "generation_tokens": 8, "max_runtime_diff": 1e-4}}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp / "out"
    result = CliRunner().invoke(main, ["compile", str(teacher_dir), "-r", str(tmp / "recipe.yaml"), "-o", str(out)])
    student = lmmc.load_student(out / "student") if result.exit_code == 0 else None
    return tiny_idefics3(), student, out, result


def reference(model, enc) -> np.ndarray:
    return greedy_reference(model, enc, NEW_TOKENS)


def features(model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ADAPTER.image_features(model, torch.as_tensor(pixel_values)).numpy()


def test_greedy_matches_pytorch_token_for_token(plain):
    model, processor, gen = plain
    enc = processor(images=[[im] for im in images(2)], text=PROMPTS, padding=True, return_tensors="np")
    assert (enc["attention_mask"][1] == 0).sum() > 0  # the second prompt is left-padded
    assert_greedy_matches_pytorch(model, gen, enc, NEW_TOKENS)


def test_vision_graph_gives_the_connector_features(plain):
    """Two prompts of two images each: [2, 2, 3, 32, 32] -> 2 x 4 image tokens per prompt, in image order."""
    model, processor, gen = plain
    pics = images(4, seed=1)
    enc = processor(images=[pics[:2], pics[2:]], text=["<image> <image> cold", "<image> <image> water"],
                    padding=True, return_tensors="np")
    assert enc["pixel_values"].shape == (2, 2, 3, 32, 32)
    got = gen.vision.run({"pixel_values": enc["pixel_values"]})["image_features"]
    assert got.shape == (2, 2 * ADAPTER.image_tokens.count(model.config), 32)
    want = features(model, enc["pixel_values"].reshape(4, 1, 3, 32, 32))  # one image at a time in PyTorch
    assert np.abs(got.reshape(want.shape) - want).max() < 1e-4
    np.testing.assert_array_equal(gen.generate_ids(enc["pixel_values"], enc["input_ids"], enc["attention_mask"],
                                                   NEW_TOKENS).tokens, reference(model, enc))


def test_generate_text_from_an_image(plain):
    model, processor, gen = plain
    image = images(1)[0]
    text = gen.generate(image, "the picture of a house is", max_new_tokens=12)
    prompt = generative_prompt(processor, "the picture of a house is", False)  # as calibration writes it
    want = reference(model, processor(images=[[image]], text=prompt, return_tensors="np"))[0, :12]
    assert text and text == processor.tokenizer.decode(want, skip_special_tokens=True)


def test_runtime_refuses_what_the_vision_graph_cannot_take(plain):
    model, processor, gen = plain
    # One prompt with two images and one with one: the processor pads the second with an all-zero image.
    enc = processor(images=[images(2), images(1)], text=["<image> <image> cold", "<image> water"],
                    padding=True, return_tensors="np")
    assert not enc["pixel_values"][1, 1].any()
    with pytest.raises(LmmcError, match="all-zero padding images .* give every prompt in a batch the same number"):
        gen.generate_ids(enc["pixel_values"], enc["input_ids"], enc["attention_mask"], 4)
    with pytest.raises(LmmcError, match=r"pixel_values must be \[prompts, images, channels, height, width\] for 1"):
        gen.generate_ids(enc["pixel_values"][0], enc["input_ids"][:1], enc["attention_mask"][:1], 4)
    with pytest.raises(LmmcError, match=r"pixel_values must be .* got shape \(2, 0, "):  # no image: a raw ValueError
        gen.generate_ids(enc["pixel_values"][:, :0], enc["input_ids"], enc["attention_mask"], 4)


def test_compiled_structured_student_exports_and_generates_like_pytorch(compiled):
    teacher, student, out, result = compiled
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    runtime = report["validation"]["generation"]["runtime"]
    assert report["passed"] is True
    assert runtime["greedy_identical"] == 1.0 and runtime["first_logits_max_abs_diff"] <= 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generative"]["image_token_index"] == LLAVA_IMAGE_TOKEN
    assert json.loads((out / manifest["generative"]["spec"]).read_text())["image_tokens_per_image"] == 4
    # AntGMM removed a vision block and vision heads, a decoder key/value group with its query heads, and
    # SwiGLU channels: the decoder's cache has layers of different widths.
    before, after = read_structure(teacher, ADAPTER), read_structure(student, ADAPTER)
    vision, language = after["vision"], after["language"]
    assert vision["layers"] < before["vision"]["layers"]
    assert any(h < before["vision"]["heads"][i] for h, i in zip(vision["heads"], vision["teacher_layers"]))
    assert sum(language["kv_heads"]) < sum(before["language"]["kv_heads"]) and len(set(language["kv_heads"])) > 1
    assert sum(language["ffn"]) < sum(before["language"]["ffn"])

    gen = open_generative(out, threads=1)
    gen.preprocessor.tokenizer.padding_side = "left"
    enc = gen.preprocessor(images=[[im] for im in images(2)], text=PROMPTS, padding=True, return_tensors="np")
    got = gen.vision.run({"pixel_values": enc["pixel_values"]})["image_features"]
    assert np.abs(got - features(student, enc["pixel_values"])).max() < 1e-4
    want = reference(student, enc)
    assert want.shape == (2, NEW_TOKENS) and len(np.unique(want)) >= 4
    np.testing.assert_array_equal(gen.generate_ids(enc["pixel_values"], enc["input_ids"], enc["attention_mask"],
                                                   NEW_TOKENS).tokens, want)
    text = gen.generate(images(1)[0], "the picture of a house is", max_new_tokens=12)
    one = gen.preprocessor(images=[[images(1)[0]]], text=generative_prompt(gen.preprocessor, "the picture of a house is",
                                                                          False), return_tensors="np")
    assert text == gen.preprocessor.tokenizer.decode(reference(student, one)[0, :12], skip_special_tokens=True)
