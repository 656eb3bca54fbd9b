"""SigLIP reads every text padded to its full length, as it was trained and as its model card says
(`padding="max_length"`): its embedding is the last position's. lmmc calibrates, distils, validates and
deploys it that way, so a text's embedding never depends on the other texts of its batch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner

from lmmc.adapters import TowerModule
from lmmc.cli import main
from lmmc.data import encode_text
from lmmc.distiller import collate
from lmmc.modelio import load_teacher, text_pad_length
from lmmc.runtime import open_dir
from lmmc.student import load_student
from tests.conftest import TINY_TEXT, save_tiny, siglip_sentencepiece, spelled, tiny_vocab
from tests.test_task_metric import coco_style

SHORT, LONG = "the water", "a man was on the road and the house of the man was cold in the water"


def text_embeddings(model, adapter, batches) -> torch.Tensor:
    runner = TowerModule(model, adapter.tower("text"))
    with torch.no_grad():
        return torch.cat([runner(b["input_ids"], b["attention_mask"])[1] for b in batches])


def reference_text_features(model, enc) -> np.ndarray:
    """transformers' own normalised text embedding of the tokenizer's output, as it is, mask or none."""
    with torch.no_grad():
        out = model.get_text_features(**enc)
    return torch.nn.functional.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1).numpy()


def test_a_tokenizer_without_a_mask_is_read_as_the_model_was_trained_padding_included(tmp_path):
    """Google's SigLIP tokenizers return input_ids alone: SigLIP reads the padding, and lmmc's batches,
    the teacher's embedding and the deployed one are transformers' on that tokenizer's output."""
    teacher = siglip_sentencepiece(save_tiny("siglip", tmp_path / "m"))
    model, adapter, pre = load_teacher(str(teacher))
    ref = reference_text_features(model, pre["tokenizer"]([SHORT, LONG], padding="max_length", max_length=64,
                                                          truncation=True, return_tensors="pt"))
    batches = encode_text(pre["tokenizer"], [SHORT, LONG], 8, None, pad_to=64)
    assert batches[0]["attention_mask"].shape == (2, 64) and bool(batches[0]["attention_mask"].all())
    assert np.abs(text_embeddings(model, adapter, batches).numpy() - ref).max() < 1e-5
    # A mask of the real tokens would give another embedding: the last position then sees only itself.
    masked = {**batches[0], "attention_mask": (batches[0]["input_ids"] != pre["tokenizer"].pad_token_id).long()}
    assert np.abs(text_embeddings(model, adapter, [masked]).numpy() - ref).max() > 1e-2


def test_fixed_length_batches_are_the_tokenizers_own_max_length_padding(tmp_path):
    tok = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))
    texts = [SHORT, LONG, "python"]
    ours = encode_text(tok, texts, 2, None, pad_to=20)
    ref = tok(texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    assert [tuple(b["input_ids"].shape) for b in ours] == [(2, 20), (1, 20)]
    assert torch.equal(torch.cat([b["input_ids"] for b in ours]), ref["input_ids"])
    assert torch.equal(torch.cat([b["attention_mask"] for b in ours]), ref["attention_mask"])
    # A shorter max_length truncates the text and still pads to the fixed length.
    short = encode_text(tok, [LONG], 2, 6, pad_to=20)[0]
    assert short["input_ids"].shape == (1, 20) and int(short["attention_mask"].sum()) == 6
    assert short["input_ids"][0, 5] == tok.sep_token_id


def test_a_siglip_text_embedding_does_not_depend_on_its_batch(tmp_path):
    model, adapter, pre = load_teacher(str(save_tiny("siglip", tmp_path / "m")))
    pad_to = text_pad_length(model.config, adapter)
    assert pad_to == TINY_TEXT["max_position_embeddings"]
    tok = pre["tokenizer"]
    alone = text_embeddings(model, adapter, encode_text(tok, [SHORT], 8, None, pad_to))[0]
    beside = text_embeddings(model, adapter, encode_text(tok, [SHORT, LONG], 8, None, pad_to))[0]
    assert torch.allclose(alone, beside, atol=1e-6)
    # Padded to the longest text instead, the last position is another token in each batch.
    dynamic = [text_embeddings(model, adapter, encode_text(tok, t, 8, None))[0] for t in ([SHORT], [SHORT, LONG])]
    assert (dynamic[0] - dynamic[1]).abs().max() > 1e-3


def test_collate_pads_distillation_samples_to_the_fixed_length():
    samples = [{"text": {"input_ids": torch.arange(2, 2 + n), "attention_mask": torch.ones(n, dtype=torch.long)}}
               for n in (3, 7)]
    batch = collate(samples, "text", pad_id=1, multiple=16, length=64)
    assert batch["input_ids"].shape == (2, 64)
    assert batch["attention_mask"].sum(1).tolist() == [3, 7]
    assert torch.equal(batch["input_ids"][0, 3:], torch.ones(61, dtype=torch.long))
    assert collate(samples, "text", pad_id=1, multiple=16)["input_ids"].shape == (2, 16)


def test_distillation_pads_on_the_side_the_tokenizer_pads(tmp_path):
    """Re-padded on the right whatever the tokenizer did, a left-padding SigLIP (a Gemma tokenizer's default)
    was distilled on inputs whose last position, which it pools, is another token than the one validation and
    deployment read."""
    from lmmc.artifact import Artifact
    from lmmc.data import CalibData
    from lmmc.distiller import Trainer
    from lmmc.modelio import make_student
    from lmmc.passes.distill import DistillConfig, _split_samples, build_corpus

    teacher = save_tiny("siglip", tmp_path / "m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher, padding_side="left")
    model, adapter, _ = load_teacher(str(teacher))
    pad_to = text_pad_length(model.config, adapter)
    texts = [SHORT, LONG, "python"] * 6
    batches = encode_text(tokenizer, texts, 6, None, pad_to)
    samples = _split_samples({"text": batches}, ["text"])
    left = collate(samples[:3], "text", tokenizer.pad_token_id, length=pad_to, left=True)
    assert torch.equal(left["input_ids"], batches[0]["input_ids"][:3])
    assert torch.equal(left["attention_mask"], batches[0]["attention_mask"][:3])
    # the trainer pads as its tokenizer does (a text model here: a dual encoder's corpus needs images too)
    bert = save_tiny("bert", tmp_path / "bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert, padding_side="left")
    model, adapter, _ = load_teacher(str(bert))
    batches = encode_text(tokenizer, [spelled(i) for i in range(1, 40, 2)], 5, None)
    calib = CalibData(calib={"text": batches[:3]}, eval={"text": batches[3:]}, source="texts")
    art = Artifact(model_ref=str(bert), adapter=adapter, teacher=model, student=make_student(model), calib=calib,
                   preprocessor={"tokenizer": tokenizer})
    cfg = DistillConfig(batch_size=4, dev_samples=2, progress=False, teacher_cache_mb=0)
    trained = Trainer(cfg, art, *build_corpus(cfg, art, ["text"]))
    batch = trained._collate(trained.train[:4], adapter.towers[0])
    assert trained.left and bool((batch["attention_mask"][:, -1] == 1).all())  # the last position is a token
    assert int(batch["attention_mask"][:, 0].sum()) < 4  # and the shorter texts' pads come first


@pytest.mark.parametrize("tokenizer", ["wordpiece", "sentencepiece"])
def test_a_compiled_siglip_is_calibrated_distilled_and_deployed_at_its_full_length(tmp_path, tokenizer):
    teacher = save_tiny("siglip", tmp_path / "teacher")
    if tokenizer == "sentencepiece":  # as Google's checkpoints ship it
        siglip_sentencepiece(teacher)
    pairs = coco_style(tmp_path, n_images=48, captions=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "calibration": {"samples": 16, "eval_samples": 12, "batch_size": 8},
        "passes": [{"magnitude": {"sparsity": 0.3}},
                   {"distill": {"steps": 2, "batch_size": 4, "dev_samples": 4, "eval_every": 0, "corpus": str(pairs), "max_length": 64,
                                "progress": False}}],
        "export": ["onnx"], "validate": {"latency": False, "max_runtime_diff": 1e-4, "min_cosine": 0.0,
                     "min_held_out": 12}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(recipe), "-o", str(out), "--calib", str(pairs)])
    assert result.exit_code == 0, result.output
    text = json.loads((out / "manifest.json").read_text())["preprocessing"]["text"]
    assert text["padding"] == "max_length" and text["pad_to"] == 64
    # Google's tokenizer returns no mask: SigLIP then reads its padding, as it was trained.
    assert text["attend_to_padding"] is (tokenizer == "sentencepiece")
    # The deployed text tower against transformers' own student on the model card's own preprocessing.
    student = load_student(out / "student")
    tok = transformers.AutoTokenizer.from_pretrained(out / "student")
    assert type(tok).__name__ == {"wordpiece": "BertTokenizer", "sentencepiece": "SiglipTokenizer"}[tokenizer]
    enc = tok([SHORT, LONG], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    assert ("attention_mask" in enc) is (tokenizer == "wordpiece")
    ref = reference_text_features(student, enc)
    deployed = open_dir(out).encode([SHORT, LONG])
    assert np.abs(deployed - ref).max() < 1e-4
    assert np.abs(open_dir(out).encode([SHORT])[0] - deployed[0]).max() < 1e-5
    if tokenizer == "sentencepiece":  # deployed where the package is missing: one message naming it
        code = ("import sys; sys.modules['sentencepiece'] = None; from lmmc.errors import LmmcError; "
                "from lmmc.runtime import open_dir\ntry: open_dir(sys.argv[1]).encode(['the water'])\n"
                "except LmmcError as e: print(e)")
        message = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True).stdout
        assert "needs a package that is not installed" in message and "pip install sentencepiece" in message
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    # Every text costs the tower's full length, which FLOPs are counted at, not the texts' mean length.
    assert report["flops"]["text"]["tokens"] == 64


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_other_models_keep_padding_to_the_longest_text(tmp_path, kind):
    tok = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))
    model, adapter, _ = load_teacher(str(save_tiny(kind, tmp_path / "m")))
    assert text_pad_length(model.config, adapter) is None
    assert encode_text(tok, [SHORT, "python"], 8, None)[0]["input_ids"].shape == (2, 4)


def test_random_calibration_gives_a_fixed_length_model_its_full_length(tmp_path):
    """Random token batches (tiny test models) come at the length a SigLIP reads, every position unmasked,
    so a static IR compiled for that length takes the held-out split bench re-derives; other models keep
    16 tokens with masked padding."""
    from lmmc.data import random_calibration
    from lmmc.recipe import CalibrationConfig

    cfg = CalibrationConfig(random=True, samples=8, eval_samples=8, batch_size=4, max_length=12)
    for kind, seq, full in (("siglip", TINY_TEXT["max_position_embeddings"], True), ("bert", 12, False)):
        model, adapter, _ = load_teacher(str(save_tiny(kind, tmp_path / kind)))
        for batch in random_calibration(cfg, model, adapter).eval_batches("text"):
            assert batch["input_ids"].shape == (4, seq) and bool(batch["attention_mask"].all()) == full


def test_a_siglip_text_artifact_copied_alone_still_refuses_another_length(tmp_path):
    """Each text artifact carries the length it reads: taken out of its output, away from manifest.json,
    a SigLIP text graph fed the tokenizer's longest-padding ids embedded them 0.37 off without a word."""
    import shutil

    from lmmc.errors import LmmcError
    from lmmc.runtime import load

    teacher = save_tiny("siglip", tmp_path / "teacher")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
        "passes": [{"magnitude": {"sparsity": 0.3}}],
        "export": ["onnx", {"ort": {"fuse": "on", "int8": ["dynamic", "static"], "threads": 1}},
                   {"openvino": {"int8": True}}],
        "validate": {"latency": False, "min_cosine": 0.0, "threads": 1}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    texts = [a for a in json.loads((out / "manifest.json").read_text())["artifacts"] if a["tower"] == "text"]
    assert len(texts) == 6  # plain, fused, dynamic and static INT8 ONNX; fp32 and INT8 IR
    ids = np.random.default_rng(0).integers(1, TINY_TEXT["vocab_size"], (2, 64))
    for entry in texts:
        alone = tmp_path / "alone" / entry["path"].replace("/", "_")
        alone.mkdir(parents=True)
        for name in entry["files"]:
            shutil.copy(out / name, alone / (out / name).name)
        copy = load(alone / (out / entry["path"]).name, threads=1)
        assert copy.pad_to == 64, entry["path"]
        with pytest.raises(LmmcError, match="padded to 64 tokens"):
            copy.run({"input_ids": ids[:, :16], "attention_mask": np.ones((2, 16), np.int64)})
        full = {"input_ids": ids, "attention_mask": np.ones((2, 64), np.int64)}
        original = load(out / entry["path"], threads=1).run(full)["pooled_embedding"]
        assert np.array_equal(copy.run(full)["pooled_embedding"], original), entry["path"]
