"""A CLIP as hub checkpoints ship it: a byte-level BPE tokenizer that pads with its end token, 77 positions,
and the text embedding read at the first end token. lmmc compiles and deploys it so that the runtime's
embeddings equal Hugging Face's own `get_text_features` / `get_image_features`."""

from __future__ import annotations

import numpy as np
import torch
import transformers
import yaml
from click.testing import CliRunner

from lmmc.cli import main
from lmmc.data import ordinary_token_ids
from lmmc.runtime import open_dir
from lmmc.student import load_student
from tests.conftest import TINY_TEXT, TINY_VISION
from tests.test_task_metric import coco_style

MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("w", "a"), ("wa", "t"), ("e", "r</w>"),
          ("o", "n</w>"), ("o", "f</w>"), ("i", "n</w>")]
TEXTS = ["the water", "a man was on the road and the house of the man was cold in the water", "cold <> house"]


def byte_level_symbols() -> list[str]:
    """The 256 printable stand-ins a byte-level BPE writes bytes as (GPT-2's table, as CLIP uses it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_tokenizer() -> transformers.CLIPTokenizer:
    symbols = byte_level_symbols()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in MERGES),
             "<|startoftext|>", "<|endoftext|>"]
    tok = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=MERGES)
    tok.model_max_length = 77
    return tok


def save_clip(path) -> tuple:
    """A tiny CLIP with that tokenizer, whose config names the tokenizer's end token (the pooling of recent
    checkpoints), saved with its image processor."""
    tok = clip_tokenizer()
    torch.manual_seed(0)
    text = {**TINY_TEXT, "vocab_size": len(tok), "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=TINY_VISION,
                                                           projection_dim=16)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    side = TINY_VISION["image_size"]
    transformers.CLIPImageProcessor(size={"shortest_edge": side},
                                    crop_size={"height": side, "width": side}).save_pretrained(path)
    return path, tok


def test_byte_level_tokens_that_look_like_tags_are_ordinary_text():
    tok = clip_tokenizer()
    ordinary = set(tok.convert_ids_to_tokens(ordinary_token_ids(tok)))
    assert {"<", "<</w>", ">", "></w>", "the</w>"} <= ordinary
    assert len(ordinary) == len(tok) - 2  # all but <|startoftext|> and <|endoftext|>


def features(output) -> torch.Tensor:
    pooled = output.pooler_output if hasattr(output, "pooler_output") else output
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_a_hub_style_clip_deploys_as_hugging_face_encodes_it(tmp_path):
    teacher, tok = save_clip(tmp_path / "teacher")
    assert tok.pad_token_id == tok.eos_token_id  # padding is end tokens: the pooling must take the first one
    pairs = coco_style(tmp_path, n_images=160, captions=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "calibration": {"samples": 16, "eval_samples": 32, "batch_size": 8, "max_length": 77},
        "passes": [{"antgmm": {"keep": 0.6, "budget": "flops", "importance": "activation"}}],
        "export": ["onnx", "openvino"], "validate": {"latency": False, "max_runtime_diff": 1e-4, "min_cosine": 0.0}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(recipe), "-o", str(out), "--calib", str(pairs)])
    assert result.exit_code == 0, result.output
    student = load_student(out / "student")
    saved = transformers.AutoTokenizer.from_pretrained(out / "student")
    assert saved("the water").input_ids == tok("the water").input_ids
    from PIL import Image

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)) for i in range(3)]
    with torch.no_grad():
        text_ref = features(student.get_text_features(**tok(TEXTS, padding=True, return_tensors="pt"))).numpy()
        pixels = transformers.AutoImageProcessor.from_pretrained(out / "student")(images=images, return_tensors="pt")
        image_ref = features(student.get_image_features(**pixels)).numpy()
    for backend in ("onnxruntime", "openvino"):
        deployed = open_dir(out, backend=backend, threads=1)
        assert np.abs(deployed.encode(TEXTS, batch_size=2) - text_ref).max() < 1e-4, backend
        assert np.abs(deployed.encode(images) - image_ref).max() < 1e-4, backend
        # Each text's embedding is its own, whatever the batch pads it to.
        assert np.abs(deployed.encode(TEXTS[:1]) - text_ref[:1]).max() < 1e-4, backend
