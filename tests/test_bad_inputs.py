"""The catalogue of bad inputs: each gives exit code 2, one message that names the problem and the fix,
and leaves every file as it was (nothing written, nothing removed)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from lmmc.cli import main
from tests.conftest import (CORPUS, TINY_DECODER, TINY_TEXT, TINY_VISION, lmmc_short_of_threads, save_preprocessors,
                            save_tiny, save_tiny_llava, siglip_sentencepiece, spelled, tiny_llava, tiny_llava_processor,
                            tiny_model, tiny_vocab)

QUICK_VALIDATE = {"latency": False, "threads": 1}
RANDOM = {"calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
          "passes": [{"magnitude": {"sparsity": 0.5}}], "validate": QUICK_VALIDATE}


def write_recipe(tmp: Path, data: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def texts(tmp: Path, n: int = 200, name: str = "calib.txt") -> Path:
    path = tmp / name
    path.write_text("\n".join(f"the water of road {spelled(i)} is cold" for i in range(n)))
    return path


def images(tmp: Path, n: int, size: tuple[int, int] = (40, 40), mode: str = "RGB", name: str = "pics") -> Path:
    folder = tmp / name
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if mode == "F":
            image = image.convert("L").convert("F")
            image.save(folder / f"{i}.tiff")
        else:
            image.save(folder / f"{i}.png")
    return folder


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# ---- the cases: each builds its inputs in tmp and returns (arguments after `compile`, fragments) ----------
# The fragments must all appear in the message: at least one names the problem, one the fix.

Case = Callable[[Path], tuple[list, list[str]]]
CASES: dict[str, Case] = {}


def case(name: str):
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn
    return register


def bert(tmp: Path) -> Path:
    return save_tiny("bert", tmp / "tiny-bert")


@case("typo in a relative model path")
def _(tmp):
    bert(tmp)
    return ["tiny-bret", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["no such directory", "check"]


@case("typo under an existing local folder")
def _(tmp):
    save_tiny("bert", tmp / "models" / "tiny-bert")
    return (["models/tiny-bret", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"],
            ["no such directory", "current directory", "check the spelling"])


@case("model path is a file")
def _(tmp):
    (tmp / "model.bin").write_bytes(b"x")
    return ["./model.bin", "-r", write_recipe(tmp, RANDOM), "-o", "out"], ["is a file", "save_pretrained"]


@case("model directory without config.json")
def _(tmp):
    (tmp / "empty").mkdir()
    return ["./empty", "-r", write_recipe(tmp, RANDOM), "-o", "out"], ["has no config.json", "save_pretrained"]


@case("unsupported model type")
def _(tmp):
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp / "gpt")
    return ["./gpt", "-r", write_recipe(tmp, RANDOM), "-o", "out"], ["model_type 'gpt2' is not supported", "bert"]


@case("a config no model can be built from")
def _(tmp):
    model = bert(tmp)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": 30}))   # 4 heads do not divide 30
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "describes no model transformers can build", "not a multiple of the number of attention heads",
        "fix config.json"]


@case("a config declaring 100,000 blocks")
def _(tmp):
    model = bert(tmp)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100_000}))  # built for minutes
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "declares 100000 blocks in its text tower, more than any model has", "fix config.json"]


@case("an image processor resizing to a million pixels a side")
def _(tmp):
    model = save_tiny("vit", tmp / "vit")
    config = json.loads((model / "preprocessor_config.json").read_text())
    (model / "preprocessor_config.json").write_text(json.dumps({**config, "size": {"height": 10**6, "width": 10**6}}))
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "resizes pictures to 1000000 pixels a side, and the model takes 32x32 images"]


@case("a model type transformers does not know")
def _(tmp):
    (tmp / "foo").mkdir()
    (tmp / "foo" / "config.json").write_text(json.dumps({"model_type": "foobert", "hidden_size": 8}))
    return ["./foo", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "declares model_type 'foobert', which transformers", "does not know; lmmc compiles these architectures: bert"]


@case("a model type whose code ships with the model")
def _(tmp):
    (tmp / "foo").mkdir()
    (tmp / "foo" / "config.json").write_text(json.dumps({"model_type": "foobert", "auto_map": {
        "AutoConfig": "modeling.FooConfig", "AutoModel": "modeling.FooModel"}}))
    return ["./foo", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "(auto_map in config.json) and runs only with --trust-remote-code", "architectures: bert"]


@case("truncated safetensors")
def _(tmp):
    model = bert(tmp)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["corrupt or truncated", "download"]


@case("safetensors that is not safetensors")
def _(tmp):
    model = bert(tmp)
    (model / "model.safetensors").write_bytes(b"not a safetensors file" * 8)
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["corrupt or truncated", "again"]


@case("a shard the index names is missing")
def _(tmp):
    model = bert(tmp)
    keys = sorted(load_file(model / "model.safetensors"))
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    shards = {k: "model-00001-of-00002.safetensors" for k in keys} | {keys[0]: "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "model-00002-of-00002.safetensors' is missing", "copy or download it again"]


@case("no weights file")
def _(tmp):
    model = bert(tmp)
    (model / "model.safetensors").unlink()
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["no model.safetensors", "save_pretrained"]


@case("config and weights disagree on a shape")
def _(tmp):
    model = bert(tmp)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    return ([model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"],
            ["do not match its config.json", "[64, 32] in the weights", "restore the config.json"])


@case("config and weights disagree on a shape, under names transformers changes as it loads")
def _(tmp):
    model = save_tiny("vit", tmp / "vit")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    return (["./vit", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"],
            ["do not match its config.json", "encoder.layer.0.intermediate.dense.weight [64, 32] in the weights",
             "restore the config.json"])


@case("blocks the config has no place for, under names transformers changes as it loads")
def _(tmp):
    model = save_tiny("vit", tmp / "vit")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    return (["./vit", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"],
            ["tensor(s) of transformer blocks", "encoder.layer.1.attention.attention.key.bias", "config.json saved"])


@case("a tensor in two weight shards")
def _(tmp):
    from safetensors.torch import load_file, save_file

    model = tmp / "sharded"
    tiny_model("bert").save_pretrained(model, max_shard_size="20KB")
    save_preprocessors("bert", model)
    shards = sorted(model.glob("model-*.safetensors"))
    first, last = load_file(shards[0]), load_file(shards[-1])
    key = next(iter(first))
    save_file({**last, key: first[key] + 100}, shards[-1], metadata={"format": "pt"})
    return (["./sharded", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"],
            [f"hold the tensor '{key}' twice, in {shards[0].name} and {shards[-1].name}", "remove the copy"])


@case("an output name too long for its work area")
def _(tmp):
    return ([bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", "o" * 250, "--dry-run"],
            ["--out's name is 250 bytes long", "name of at most 244 bytes"])


@case("an output path too long for the file system")
def _(tmp):
    deep = "/".join(["d" * 200] * 25)  # past PATH_MAX
    return ([bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", deep + "/out", "--dry-run"],
            ["cannot be used: File name too long", "give a shorter path"])


@case("no tokenizer")
def _(tmp):
    tiny_model("bert").save_pretrained(tmp / "bare")
    return ["./bare", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["has no tokenizer", "save_pretrained"]


@case("stand-in tokenizer")
def _(tmp):
    tiny_model("bert").save_pretrained(tmp / "m")
    # transformers 5 ignores an unknown vocab_file keyword and builds a 5-token stand-in
    transformers.BertTokenizer(vocab_file=str(tiny_vocab(tmp / "vocab.txt"))).save_pretrained(tmp / "m")
    return ["./m", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["has 5 tokens", "stand-in", "save the model's own tokenizer"]


@case("tokenizer larger than the embedding table")
def _(tmp):
    tiny_model("bert").save_pretrained(tmp / "m")
    vocab = tmp / "big.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)]))
    transformers.BertTokenizer(vocab=str(vocab)).save_pretrained(tmp / "m")
    return ["./m", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["index past the table", "not this model's tokenizer"]


@case("tokenizer without a pad token")
def _(tmp):
    tiny_model("bert").save_pretrained(tmp / "m")
    transformers.BertTokenizer(vocab=str(tiny_vocab(tmp / "vocab.txt")), pad_token=None).save_pretrained(tmp / "m")
    return ["./m", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["has no pad token", "tokenizer.pad_token ="]


@case("tokenizer.json that cannot be read")
def _(tmp):
    model = bert(tmp)
    (model / "tokenizer.json").write_text("{garbage")
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["has tokenizer.json", "cannot be read",
                                                                                 "save the model's own tokenizer"]


@case("tokenizer_config.json of another shape")
def _(tmp):
    model = bert(tmp)
    (model / "tokenizer_config.json").write_text("[]")
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["tokenizer cannot be read (AttributeError",
                                                                                 "save the model's own tokenizer"]


@case("a text tower with fewer positions than the export traces")
def _(tmp):
    model = bert(tmp)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    weights = load_file(model / "model.safetensors")
    weights["embeddings.position_embeddings.weight"] = weights["embeddings.position_embeddings.weight"][:8].clone()
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", "out"], [
        "takes at most 8 tokens (max_position_embeddings), and lmmc traces a text tower at 16 tokens"]


@case("vocab.txt alone, not UTF-8")
def _(tmp):
    tiny_model("bert").save_pretrained(tmp / "m")
    (tmp / "m" / "vocab.txt").write_bytes(b"[PAD]\n[UNK]\n\xff\xfe\n")
    return ["./m", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["has vocab.txt, but its tokenizer cannot "
                                                                                "be read (Exception: Error while"]


@case("preprocessor_config.json that cannot be read")
def _(tmp):
    model = save_tiny("vit", tmp / "vit")
    (model / "preprocessor_config.json").write_text("[]")
    return ["./vit", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "has preprocessor_config.json, but its image processor cannot be read", "processor.save_pretrained"]


@case("no image processor")
def _(tmp):
    tiny_model("vit").save_pretrained(tmp / "vit")
    return ["./vit", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["no image processor", "save_pretrained"]


@case("image processor of another size")
def _(tmp):
    tiny_model("vit").save_pretrained(tmp / "vit")
    transformers.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(tmp / "vit")
    return ["./vit", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["makes images 224 wide and 224 high", "takes 32x32"]


@case("image processor that keeps a picture's aspect")
def _(tmp):
    tiny_model("clip").save_pretrained(tmp / "clip")
    save_preprocessors("clip", tmp / "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, do_center_crop=False).save_pretrained(tmp / "clip")
    return ["./clip", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "keeps a picture's aspect (one 48 wide and 40 high becomes 38 wide and 32 high)", "do_center_crop: true with crop_size 32"]


@case("random inputs for a model that is not tiny")
def _(tmp):
    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                                     intermediate_size=1024, vocab_size=99, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(tmp / "big")
    save_preprocessors("bert", tmp / "big")
    return ["./big", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], ["only for tiny test models", "give real data with --calib"]


@case("unknown --device")
def _(tmp):
    return [bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", "out", "--device", "gpu0"], ["unknown --device 'gpu0'", "cuda:N"]


@case("--device cuda on a machine without one")
def _(tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return [bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", "out", "--device", "cuda:1"], ["torch sees none", "--device cpu"]


@case("recipe not UTF-8")
def _(tmp):
    recipe = tmp / "recipe.yaml"
    recipe.write_bytes(yaml.safe_dump(RANDOM).encode() + b"# caf\xe9\n")
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["is not UTF-8", "byte 0xe9", "save it as UTF-8"]


@case("calibration file not UTF-8")
def _(tmp):
    data = tmp / "calib.txt"
    data.write_bytes(b"".join(b"caf\xe9 number %d\n" % i for i in range(100)))
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt"}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["is not UTF-8", "convert it"]


@case("unknown key in the bench section")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "bench": {"repeat": 3}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["bad bench section", "repeat: unknown key"]


@case("bench corpus that does not exist")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "bench": {"corpora": ["prose.txt"]}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["bench.corpora 'prose.txt' does not exist",
                                                                  "relative to the recipe"]


@case("bench calib in a recipe")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "bench": {"calib": "moved.txt"}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["bench.calib is for `lmmc bench --calib`",
                                                                  "runs on its own compile's: drop it"]


@case("bench static IRs shorter than the held-out texts")
def _(tmp):
    texts(tmp)
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt", "eval_samples": 32},
                                "bench": {"static": True, "seq": 4}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["bench.static compiles the IRs for 4 tokens",
                                                                  "set bench.seq to", "or drop bench.static"]


@case("bench static IRs shorter than a bench corpus")
def _(tmp):
    texts(tmp)
    (tmp / "long.txt").write_text("\n".join(" ".join(["water"] * 40) + f" {spelled(i)}" for i in range(8)))
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt", "eval_samples": 32},
                                "bench": {"static": True, "seq": 24, "corpora": ["long.txt"]}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["bench.static compiles the IRs for 24 tokens",
                                                                  "texts of up to 4"]


@case("N:M pattern that fits no matrix")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"magnitude": {"nm": "3:7"}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["fits no matrix", "[32, 64]", "Use an M that divides"]


@case("allocation after the pruner")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"magnitude": {}}, {"uniform": {"sparsity": 0.5}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["no pruner follows it", "Move it before the pruner"]


@case("max_length above the model's positions")
def _(tmp):
    texts(tmp)
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt", "max_length": 128}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["takes at most 64 tokens", "calibration.max_length to 64 or less"]


@case("antgmm's distillation longer than the model's positions")
def _(tmp):
    texts(tmp, name="long.txt")
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"antgmm": {
        "keep": 0.8, "distill": {"corpus": "long.txt", "max_length": 512}, "distill_steps_per_segment": 2}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["antgmm.distill.max_length = 512",
                                                                 "takes at most 64 tokens", "64 or less"]


@case("antgmm's distillation with a layer_map for another depth")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"antgmm": {
        "keep": 0.8, "distill": {"layer_map": [1], "batch_size": 4}, "distill_steps_per_segment": 2}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["antgmm.distill: layer_map", "has 1 entries"]


@case("antgmm's distillation with a layer_map list while the depth stage removes blocks")
def _(tmp):
    # [1, 2] fits the two blocks of the first run; after the depth cut the later runs have fewer
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"antgmm": {
        "keep": 0.5, "shares": {"depth": 0.5, "ffn": 0.5}, "distill": {"layer_map": [1, 2], "batch_size": 4},
        "distill_steps_per_segment": 2}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["distill.layer_map lists a teacher layer per "
                                                                 "student block", "use layer_map: origin"]


@case("antgmm's distillation with a bandit window below its arms")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"antgmm": {
        "keep": 0.8, "distill": {"schedule": "optima", "blocks_per_arm": 1, "window": 1, "batch_size": 4,
                                 "reward_samples": 2, "dev_samples": 0},
        "distill_steps_per_segment": 2}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["antgmm.distill: window (1) must be at least"]


@case("latency_seq above the model's positions")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "validate": {"latency_seq": 77}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["validate.latency_seq = 77", "64 or less"]


@case("latency_seq above the model's positions with latency off")
def _(tmp):
    # lmmc bench, after the compile or alone, timed at it and stopped with exit 3
    recipe = write_recipe(tmp, {**RANDOM, "validate": {"latency": False, "latency_seq": 500}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["validate.latency_seq = 500", "64 or less"]


@case("an ort step that writes nothing")
def _(tmp):
    # it ran, left an empty ort/ folder and said nothing
    recipe = write_recipe(tmp, {**RANDOM, "export": ["onnx", {"ort": {"fuse": "off", "int8": []}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "fuse: off, int8: [] and no fp16 write nothing; ask for an artifact"]


@case("latency_seq for a model without a text tower")
def _(tmp):
    save_tiny("vit", tmp / "vit")
    recipe = write_recipe(tmp, {**RANDOM, "export": ["onnx", {"ort": {"latency_seq": 32, "int8": ["dynamic"]}}]})
    return ["./vit", "-r", recipe, "-o", "out", "--dry-run"], [
        "ort.latency_seq sets the tokens of a text sample, and this vit model has no text tower; remove latency_seq"]


@case("held-out batches outside the tensorrt profile")
def _(tmp):
    # validation ran the engines on them after every pass and every build
    recipe = write_recipe(tmp, {**RANDOM, "export": ["onnx", {"tensorrt": {"batch": {"min": 1, "opt": 4, "max": 4},
                                                                          "optional": True}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "tensorrt.batch takes 1 to 4 samples, and validation runs the engines on the 32 held-out samples in batches "
        "of [8] (calibration.batch_size = 8); widen tensorrt.batch or change calibration.batch_size"]


@case("held-out texts longer than the tensorrt profile")
def _(tmp):
    texts(tmp, n=400)  # texts of up to 11 tokens; a profile of 32 holds them whatever max_length says
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt", "max_length": 48},
                                "export": ["onnx", {"tensorrt": {"seq": {"min": 1, "opt": 4, "max": 4},
                                                                  "optional": True}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "tensorrt.seq takes texts of at most 4 tokens, and validation runs the engines on held-out texts of up to 11; "
        "raise tensorrt.seq.max to 11"]


@case("a tensorrt profile longer than the model's positions")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "export": ["onnx", {"tensorrt": {
        "seq": {"min": 1, "opt": 128, "max": 512}, "optional": True}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["tensorrt.seq.max = 512", "64 or less",
                                                                  "and opt (now 128) with it"]


@case("too few held-out samples once texts that read alike when cut are dropped")
def _(tmp):
    # the message asked for more samples in a file that had plenty
    (tmp / "calib.txt").write_text("\n".join(f"one two three four five six seven {i}" for i in range(400)))
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt", "samples": 64, "eval_samples": 32,
                                                          "max_length": 4}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "only 0 held-out samples", "32 of the 32 texts held out read as the same tokens as a calibration text, "
        "cut where they are: raise calibration.eval_samples or max_length, or lower calibration.samples"]


@case("a hidden stage held whole by min_hidden")
def _(tmp):
    # the floors the message listed left out the one that blocked the cut
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"antgmm": {"keep": 0.7, "shares": {"hidden": 1.0},
                                                                 "min_hidden": 32}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "keep=0.7 of the blocks' flops is below what the floors allow (about 1.000 with",
        "min_hidden=32 and stages ['hidden']"]


@case("a caption template for unlabelled text")
def _(tmp):
    # accepted, and then changed nothing
    texts(tmp)
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt", "caption_template": "a {label}"}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "calibration.caption_template captions the classes of an image folder and prompts those of labelled data",
        "calib.txt' is neither (no sample has a \"label\")", "remove caption_template, or label the samples"]


@case("too few held-out samples to certify")
def _(tmp):
    texts(tmp, n=40)
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt"}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["only 10 held-out samples", "floor of 32",
                                                                  "Give at least 128 distinct samples"]


@case("too few held-out samples, with eval_samples below the floor too")
def _(tmp):
    # more samples alone would still hold out only eval_samples
    texts(tmp, n=20)
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt", "eval_samples": 8}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "only 5 held-out samples", "Raise calibration.eval_samples to 32 and give at least 128 distinct samples"]


@case("a latency target on a generative model")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"antgmm": {"target": {"speedup": 2}}}],
                                "export": ["onnx", {"openvino": {"int8": True}}], "validate": False})
    return [str(save_tiny_llava(tmp / "llava")), "-r", recipe, "-o", "out", "--dry-run"], [
        "sets a latency target", "generative models (llava)", "Set keep"]


@case("a structured cut after the latency target's")
def _(tmp):
    # validation gated the target on a student the target never planned, and reported its prediction
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"antgmm": {"target": {"speedup": 2}}}, {"antgmm": {"keep": 0.6}}],
                                "export": ["onnx", {"openvino": {"int8": True}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "passes[1] 'antgmm' cuts the student again after passes[0] 'antgmm' cut it to its latency target",
        "with the target on the last antgmm pass"]


@case("too few held-out samples asked for")
def _(tmp):
    texts(tmp, n=400)
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt", "eval_samples": 10}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["only 10 held-out samples", "Raise calibration.eval_samples"]


@case("validation without held-out data")
def _(tmp):
    recipe = write_recipe(tmp, {"passes": [{"magnitude": {}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["needs held-out data", "validate: false"]


@case("image folder for a dual encoder")
def _(tmp):
    images(tmp, 40)
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pics"}})
    return ["./clip", "-r", recipe, "-o", "out", "--dry-run"], ["holds 40 images but no texts", "image-text pairs", ".jsonl"]


@case("text file for a dual encoder")
def _(tmp):
    texts(tmp)
    save_tiny("siglip", tmp / "siglip")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt"}})
    return ["./siglip", "-r", recipe, "-o", "out", "--dry-run"], ["but no images", "image-text pairs"]


@case("images of a non-picture mode")
def _(tmp):
    images(tmp, 160, mode="F")
    save_tiny("vit", tmp / "vit")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pics"}})
    return ["./vit", "-r", recipe, "-o", "out", "--dry-run"], ["has mode F", "convert it to 8-bit RGB"]


@case("pictures in a format lmmc does not read among an image folder's")
def _(tmp):
    folder = images(tmp, 40)
    for i in range(3):  # the bytes of a PNG: what matters is that lmmc would skip them by their name
        (folder / f"{i}.png").rename(folder / f"phone-{i}.HEIC")
    save_tiny("vit", tmp / "vit")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pics"}})
    return (["./vit", "-r", recipe, "-o", "out", "--dry-run"],
            ["holds 3 picture(s) in a format lmmc does not read (.heic)", "phone-0.HEIC",
             "convert them to PNG or JPEG"])


@case("distillation without a corpus or calibration data, dry run")
def _(tmp):
    recipe = write_recipe(tmp, {"passes": [{"distill": {"steps": 2}}], "validate": False})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["distill needs data", "give 'corpus'", "--calib"]


@case("retrieval agreement gated with k near the held-out count")
def _(tmp):
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"random": True, "eval_samples": 8},
                                "validate": {**QUICK_VALIDATE, "min_held_out": 8, "min_task_metric": 0.1}})
    return (["./clip", "-r", recipe, "-o", "out", "--dry-run"],
            ["agreement_k = 5 among 8 held-out images and 8 captions a random ranking agrees 0.71 of the time",
             "Lower validate.agreement_k or raise calibration.eval_samples"])


@case("agreement_k for a model of one tower")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "validate": {**QUICK_VALIDATE, "agreement_k": 3}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["has one tower", "remove agreement_k"]


@case("a recipe's calibration path under the home folder that does not exist")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "~/no-such-calibration-file.txt"}})
    return ([bert(tmp), "-r", recipe, "-o", "out", "--dry-run"],
            [f"calibration.path '{Path.home()}/no-such-calibration-file.txt' does not exist",
             "fix the path in the recipe"])


@case("a generative distillation setting for an encoder")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "temperature": 2.0}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["temperature softens", "remove temperature"]


@case("a dual encoder's distillation setting for one tower")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4,
                                                                  "contrastive_loss": "mse"}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["contrastive_loss set the similarity-matrix term",
                                                                 "remove contrastive_loss"]


@case("a caption template for random calibration")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {**RANDOM["calibration"], "caption_template": "a {label}"}})
    return ([bert(tmp), "-r", recipe, "-o", "out", "--dry-run"],
            ["random inputs have neither", "remove caption_template"])


@case("weights named under a prefix transformers does not strip, dry run")
def _(tmp):
    from safetensors.torch import load_file, save_file

    model = bert(tmp)
    weights = load_file(model / "model.safetensors")
    save_file({f"model.{k}": v for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp, RANDOM)
    return [model, "-r", recipe, "-o", "out", "--dry-run"], [
        "name every tensor under the prefix 'model.'", "which transformers does not strip", "Save the model's own"]


@case("a ViT's weights saved from a compiled module (_orig_mod.), dry run")
def _(tmp):
    from safetensors.torch import load_file, save_file

    model = save_tiny("vit", tmp / "vit")
    weights = load_file(model / "model.safetensors")
    save_file({f"_orig_mod.{k}": v for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
    images(tmp, 160)
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pics"}})
    return [model, "-r", recipe, "-o", "out", "--dry-run"], ["name every tensor under the prefix '_orig_mod.'"]


@case("calibration data that is a pipe")
def _(tmp):
    os.mkfifo(tmp / "calib.txt")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "calib.txt"}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "calib.txt' is neither a file nor a folder (a pipe or a device)", "save the data to a file"]


@case("a folder of text files as calibration data")
def _(tmp):
    (tmp / "texts").mkdir()
    texts(tmp / "texts")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "texts"}})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], [
        "is a folder, which lmmc reads as images, and it holds none", "for its texts pass one file", "calib.txt"]


@case("a corrupt image")
def _(tmp):
    folder = images(tmp, 160)
    (folder / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    save_tiny("vit", tmp / "vit")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pics"}})
    return ["./vit", "-r", recipe, "-o", "out", "--dry-run"], ["cannot read image", "7.png", "replace it"]


@case("truncated images")
def _(tmp):
    folder = images(tmp, 160)
    for image in folder.iterdir():  # whole headers, half the pixels: a copy that stopped halfway
        image.write_bytes(image.read_bytes()[:image.stat().st_size // 2])
    save_tiny("vit", tmp / "vit")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pics"}})
    return ["./vit", "-r", recipe, "-o", "out", "--dry-run"], ["cannot read image", "truncated", "replace it"]


def test_an_image_too_large_to_decode_safely_is_one_clear_error(tmp_path, monkeypatch):
    """PIL refuses a decompression bomb with an error of its own kind, which is no OSError."""
    from PIL import Image as PILImage

    monkeypatch.chdir(tmp_path)
    images(tmp_path, 160)
    save_tiny("vit", tmp_path / "vit")
    recipe = write_recipe(tmp_path, {**RANDOM, "calibration": {"path": "pics"}})
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # the 40 x 40 pictures are then over twice the limit
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["compile", "./vit", "-r", str(recipe), "-o", "out"])
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "cannot read image" in result.output
    assert "decompression bomb" in result.output
    assert snapshot(tmp_path) == before


def digit_pairs(tmp: Path, labels: list[str], captions: list[str]) -> Path:
    """A labelled image-text .jsonl, one readable picture per line."""
    folder = images(tmp, len(labels))
    lines = [json.dumps({"image": f"{folder.name}/{i}.png", "text": c, "label": lab})
             for i, (lab, c) in enumerate(zip(labels, captions))]
    (tmp / "pairs.jsonl").write_text("\n".join(lines))
    return tmp / "pairs.jsonl"


@case("a distill corpus without the modality of the towers it trains")
def _(tmp):
    # the dry run said "at most 0 training samples", as if the corpus were too small
    texts(tmp, n=200, name="corpus.txt")
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "corpus": "corpus.txt"}}]})
    return ["./clip", "-r", recipe, "-o", "out", "--dry-run"], [
        "corpus.txt' holds text samples only, and this distill trains on image-text pairs",
        "give a corpus of image-text pairs"]


@case("a distill corpus of one repeated line")
def _(tmp):
    # it trained on one sample with no dev sample, while keep_best promised a checkpoint picked on them
    (tmp / "same.txt").write_text("the man was on the road\n" * 200)
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 1, "corpus": "same.txt"}}],
                                "validate": False})
    return [bert(tmp), "-r", recipe, "-o", "out"], [
        "distill: the corpus gives 1 distinct sample(s) once the held-out ones and repeats are left out, too few to set "
        "a quarter aside as the dev samples that pick the best checkpoint", "dev_samples: 0 to keep the last step"]


@case("an unreadable image in distill's corpus, dry run")
def _(tmp):
    digit_pairs(tmp, ["3", "7"] * 20, [f"a picture of {spelled(i)}" for i in range(40)])
    (tmp / "pics" / "7.png").write_bytes(b"not a picture")
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"magnitude": {"sparsity": 0.5}},
                                                     {"distill": {"steps": 2, "corpus": "pairs.jsonl"}}]})
    return ["./clip", "-r", recipe, "-o", "out", "--dry-run"], ["cannot read image", "7.png", "remove it"]


@case("held-out captions longer than a CLIP tensorrt profile")
def _(tmp):
    # checked for text-only models alone: the engines were built, then refused the first held-out batch
    digit_pairs(tmp, ["3", "7"] * 80, [f"a picture of the water of road {spelled(i)}" for i in range(160)])
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pairs.jsonl", "samples": 64, "eval_samples": 32},
                                "export": ["onnx", {"tensorrt": {"seq": {"min": 1, "opt": 4, "max": 4},
                                                                  "optional": True}}]})
    return ["./clip", "-r", recipe, "-o", "out", "--dry-run"], [
        "tensorrt.seq takes texts of at most 4 tokens, and validation runs the engines on held-out texts of up to",
        "raise tensorrt.seq.max to"]


@case("a tensorrt text length for a model without a text tower")
def _(tmp):
    save_tiny("vit", tmp / "vit")
    recipe = write_recipe(tmp, {**RANDOM, "export": ["onnx", {"tensorrt": {"seq": {"min": 1, "opt": 4, "max": 4},
                                                                          "optional": True}}]})
    return ["./vit", "-r", recipe, "-o", "out", "--dry-run"], [
        "tensorrt.seq sets the tokens of a text", "this vit model has no text tower", "remove seq"]


@case("a generative prompt longer than the decoder's positions, dry run")
def _(tmp):
    folder = images(tmp, 40)
    lines = [json.dumps({"image": f"{folder.name}/{i}.png", "text": "a road",
                         "prompt": "what is it" + " now" * 130 * (i == 3)}) for i in range(40)]
    (tmp / "pairs.jsonl").write_text("\n".join(lines))
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pairs.jsonl", "samples": 36, "eval_samples": 4,
                                                          "batch_size": 4}, "validate": False})
    return [str(save_tiny_llava(tmp / "llava")), "-r", recipe, "-o", "out", "--dry-run"], [
        "the prompt of image", "3.png' takes", "leaving none of the decoder's 128", "shorten the prompt"]


@case("held-out answers a generative model's max_length would cut, dry run")
def _(tmp):
    # validation scored two-token stubs of them: exact match 1.000 where whole answers gave 0.156
    folder = images(tmp, 40)
    lines = [json.dumps({"image": f"{folder.name}/{i}.png", "text": "a road" + " now" * 8, "prompt": "what is it"})
             for i in range(40)]
    (tmp / "pairs.jsonl").write_text("\n".join(lines))
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pairs.jsonl", "samples": 8, "eval_samples": 32,
                                                          "batch_size": 4, "max_length": 8},
                                "export": ["onnx_generative"], "validate": {"min_held_out": 8}})
    return [str(save_tiny_llava(tmp / "llava")), "-r", recipe, "-o", "out", "--dry-run"], [
        "of the 10 held-out answers do not fit calibration.max_length = 8 text tokens with their prompts",
        "validation would score the cut answers: raise calibration.max_length to"]


@case("validation's greedy budget past a generative decoder's positions, dry run")
def _(tmp):
    # every pass and export ran, then validation stopped, naming max_new_tokens, a setting of the runtime's
    folder = images(tmp, 40)
    lines = [json.dumps({"image": f"{folder.name}/{i}.png", "text": "a road", "prompt": "what is it"})
             for i in range(40)]
    (tmp / "pairs.jsonl").write_text("\n".join(lines))
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pairs.jsonl", "samples": 8, "eval_samples": 32,
                                                          "batch_size": 4},
                                "export": ["onnx_generative"], "validate": {"min_held_out": 8, "generation_tokens": 120}})
    return [str(save_tiny_llava(tmp / "llava")), "-r", recipe, "-o", "out", "--dry-run"], [
        "validation generates 120 new tokens after each held-out prompt (validate.generation_tokens = 120",
        "past the decoder's 128; lower validate.generation_tokens to"]


@case("held-out answers longer than a generative decoder's positions, dry run")
def _(tmp):
    # the message asked for a max_length the plan itself refuses
    folder = images(tmp, 40)
    lines = [json.dumps({"image": f"{folder.name}/{i}.png", "text": "a road" + " now" * 150, "prompt": "what is it"})
             for i in range(40)]
    (tmp / "pairs.jsonl").write_text("\n".join(lines))
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pairs.jsonl", "samples": 8, "eval_samples": 32,
                                                          "batch_size": 4},
                                "export": ["onnx_generative"], "validate": {"min_held_out": 8}})
    return [str(save_tiny_llava(tmp / "llava")), "-r", recipe, "-o", "out", "--dry-run"], [
        "validation would score the cut answers: shorten the answers or prompts: the decoder's 128 positions, the "
        "image's tokens among them, hold no more"]


@case("a generative distill corpus record without its answer, dry run")
def _(tmp):
    # the message named the calibration data, which was fine
    folder = images(tmp, 40)
    good = [json.dumps({"image": f"{folder.name}/{i}.png", "text": "a road"}) for i in range(40)]
    (tmp / "pairs.jsonl").write_text("\n".join(good))
    (tmp / "corpus.jsonl").write_text("\n".join(good[:3] + [json.dumps({"image": f"{folder.name}/3.png"})]))
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pairs.jsonl", "samples": 8, "eval_samples": 8,
                                                          "batch_size": 4},
                                "passes": [{"distill": {"steps": 2, "batch_size": 2, "corpus": "corpus.jsonl"}}],
                                "validate": False})
    return [str(save_tiny_llava(tmp / "llava")), "-r", recipe, "-o", "out", "--dry-run"], [
        "distill.corpus '", "corpus.jsonl': sample 4 has no text"]


@case("a caption labelled with another class")
def _(tmp):
    labels = ["3", "7"] * 20
    captions = [f"a picture of the number {lab}" for lab in labels]
    for i in range(1, 40, 8):  # labelled 7: five of forty, more than a caption mentioning another class now and then
        captions[i] = "a picture of the number 3"
    digit_pairs(tmp, labels, captions)
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pairs.jsonl"}})
    return (["./clip", "-r", recipe, "-o", "out", "--dry-run"],
            ["5 of the 40 captions that name a class", "names the class '3' but is labelled '7'",
             "labels do not match the captions", "Fix the labels"])


@case("one caption under two labels")
def _(tmp):
    labels = ["cat", "dog"] * 20
    digit_pairs(tmp, labels, ["a small animal"] * 40)
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pairs.jsonl"}})
    return (["./clip", "-r", recipe, "-o", "out", "--dry-run"],
            ["the text 'a small animal' carries two labels", "Fix the labels"])


def class_folders(tmp: Path) -> Path:
    """An image folder with one subfolder of pictures per class."""
    (tmp / "classes").mkdir()
    for label in ("cat", "dog"):
        images(tmp / "classes", 20, name=label)
    return tmp / "classes"


TEMPLATE = {**RANDOM, "calibration": {"path": "classes", "caption_template": "a picture of a {label}"}}


@case("a class folder with an unreadable image")
def _(tmp):
    folder = class_folders(tmp)
    (folder / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    save_tiny("clip", tmp / "clip")
    return (["./clip", "-r", write_recipe(tmp, TEMPLATE), "-o", "out", "--dry-run"],
            ["cannot read image", "dog/3.png", "replace it"])


@case("a class folder with a file that is not an image")
def _(tmp):
    folder = class_folders(tmp)
    (folder / "cat" / "notes.txt").write_text("taken on monday")
    save_tiny("clip", tmp / "clip")
    return (["./clip", "-r", write_recipe(tmp, TEMPLATE), "-o", "out", "--dry-run"],
            ["1 file(s) that are not images", "notes.txt", "remove them"])


@case("a caption template without the class")
def _(tmp):
    class_folders(tmp)
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**TEMPLATE, "calibration": {"path": "classes", "caption_template": "a picture"}})
    return ["./clip", "-r", recipe, "-o", "out", "--dry-run"], ["caption_template", "must name the class as {label}"]


def vit_config(tmp: Path, **change) -> Path:
    """A tiny ViT built and saved with other config values, its weights to match."""
    config = tiny_model("vit").config
    config.update(change)
    transformers.ViTModel(config).save_pretrained(tmp / "vit")
    return save_preprocessors("vit", tmp / "vit")


@case("a vision tower of grey pictures, dry run")
def _(tmp):
    model, recipe = vit_config(tmp, num_channels=1), write_recipe(tmp, RANDOM)
    return [model, "-r", recipe, "-o", "out", "--dry-run"], ["takes 1-channel pictures (num_channels)", "RGB models only"]


@case("a vision tower of oblong pictures, dry run")
def _(tmp):
    model, recipe = vit_config(tmp, image_size=[32, 48]), write_recipe(tmp, RANDOM)
    return [model, "-r", recipe, "-o", "out", "--dry-run"], ["takes [32, 48] pictures (image_size)", "square pictures only"]


@case("a caption template that formats the class as a number")
def _(tmp):
    class_folders(tmp)
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**TEMPLATE, "calibration": {"path": "classes", "caption_template": "a {label:d}"}})
    return ["./clip", "-r", recipe, "-o", "out", "--dry-run"], ["'a {label:d}' must name the class as {label}"]


@case("a dual-encoder recipe naming one tower only")
def _(tmp):
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 2, "layer_map": {"vision": [1, 2]}}}]})
    return (["./clip", "-r", recipe, "-o", "out", "--dry-run"],
            ["layer_map names towers ['vision'] but not 'text', which this distill trains",
             "give one list of teacher layers per distilled tower"])


@case("one layer_map list for both towers of a dual encoder")
def _(tmp):
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 2, "layer_map": [1, 2]}}]})
    return (["./clip", "-r", recipe, "-o", "out", "--dry-run"],
            ["layer_map is one list, but this distill trains the towers ['text', 'vision']",
             "give {tower: [teacher layers]} per tower"])


@case("a dual encoder's contrastive term over micro-batches of one")
def _(tmp):
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "grad_accum": 4}}]})
    return (["./clip", "-r", recipe, "-o", "out", "--dry-run"],
            ["batch_size 4 / grad_accum 4 leaves one: the term is 0", "set contrastive: 0"])


@case("arm_span towers on a model of one tower")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "arm_span": "towers"}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["arm_span: towers pairs the stages of a dual",
                                                                  "this distill trains one (text); use arm_span: tower"]


@case("skip_hidden over every block with no output term")
def _(tmp):
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "output": 0,
                                                                  "skip_hidden": {"text": [0, 1]}}}]})
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["skip_hidden leaves no block a hidden-state term",
                                                                  "give output a positive weight"]


@case("a distill layer_map naming a tower the model lacks")
def _(tmp):
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "layer_map": {"text": [1, 2],
                                                                                            "image": [1, 2]}}}]})
    return (["./clip", "-r", recipe, "-o", "out", "--dry-run"],
            ["layer_map names the tower(s) ['image'], which this clip model does not have",
             "its towers are ['text', 'vision']"])


@case("a per-tower keep naming a tower the model lacks")
def _(tmp):
    save_tiny("clip", tmp / "clip")
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"antgmm": {"keep": {"text": 0.5, "image": 0.5}}}]})
    return (["./clip", "-r", recipe, "-o", "out", "--dry-run"],
            ["keep names the tower(s) ['image', 'text']", "towers ['text', 'vision']", "give a value for each"])


@case("distill.max_length past a CLIP text tower's positions")
def _(tmp):
    save_tiny("clip", tmp / "clip")
    texts(tmp)
    recipe = write_recipe(tmp, {**RANDOM, "passes": [{"distill": {"steps": 2, "corpus": "calib.txt", "max_length": 100}}]})
    return (["./clip", "-r", recipe, "-o", "out", "--dry-run"], ["distill.max_length = 100", "64"])


@case("a siglip whose towers embed into different widths")
def _(tmp):
    cfg = transformers.SiglipConfig(text_config={**TINY_TEXT, "projection_size": 24}, vision_config=TINY_VISION)
    torch.manual_seed(0)
    transformers.SiglipModel(cfg).save_pretrained(tmp / "siglip")
    save_preprocessors("siglip", tmp / "siglip")
    return (["./siglip", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"],
            ["text tower embeds into 24 dimensions", "vision tower into 32", "set projection_size to 32"])


@case("a siglip whose vision tower has no pooling head")
def _(tmp):
    cfg = transformers.SiglipConfig(text_config=TINY_TEXT, vision_config={**TINY_VISION, "vision_use_head": False})
    torch.manual_seed(0)
    transformers.SiglipModel(cfg).save_pretrained(tmp / "siglip")
    save_preprocessors("siglip", tmp / "siglip")
    return (["./siglip", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"],
            ["no pooling head (vision_config.vision_use_head: false)", "compile a SigLIP checkpoint with its head"])


@case("the hidden stage on an ELECTRA whose embeddings are narrower than its blocks, dry run")
def _(tmp):
    torch.manual_seed(0)
    transformers.ElectraModel(transformers.ElectraConfig(**TINY_TEXT, embedding_size=16)).save_pretrained(tmp / "electra")
    save_preprocessors("bert", tmp / "electra")
    recipe = {**RANDOM, "passes": [{"antgmm": {"keep": 0.6, "shares": {"ffn": 0.5, "hidden": 0.5}}}]}
    return ["./electra", "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "this electra model's embeddings are 16 wide, projected to its blocks' 32 (a factorised embedding)", "drop 'hidden' from the shares"]


@case("an OPTIMA distillation after antgmm with fewer samples than its batch, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"antgmm": {"keep": 0.6}}, {"distill": {"schedule": "optima", "batch_size": 4}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "distill: at most 0 training samples (of 8, less the bandit's reward_samples = 16, after its dev samples) "
        "for a batch_size of 4", "lower batch_size or reward_samples"]


@case("a distill corpus of one line repeated, dry run")
def _(tmp):
    (tmp / "same.txt").write_text("the water is cold\n" * 100)
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "dev_samples": 4,
                                                "corpus": str(tmp / "same.txt")}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "distill: at most 1 training samples (of 1 after its dev samples) for a batch_size of 4"]


@case("a distill samples cap below its batch, dry run")
def _(tmp):
    texts(tmp, n=400)
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "samples": 3, "corpus": "calib.txt"}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "distill: at most 3 training samples", "lower batch_size or raise distill.samples (now 3)"]


@case("a distill samples cap below its batch on a corpus that could not fill it either, dry run")
def _(tmp):
    texts(tmp, n=10)
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 16, "samples": 3, "corpus": "calib.txt"}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "distill: at most 3 training samples", "lower batch_size or give more samples (a corpus, or calibration.samples)"]


@case("a distill chat template for an encoder, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "chat_template": True}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "distill: chat_template applies to generative models, and this bert model is an encoder"]


@case("a distill chat template turned off for an encoder, dry run")
def _(tmp):
    # it was told to set calibration.chat_template, which an encoder refuses
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "chat_template": False}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "distill: chat_template applies to generative models, and this bert model is an encoder",
        "remove chat_template"]


@case("an fp16 gate without an fp16 export")
def _(tmp):
    recipe = {**RANDOM, "validate": {"min_cosine_fp16": 0.9}}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "validate.min_cosine_fp16 gates FP16 artifacts, and no export in this recipe writes one"]


@case("random calibration beside a calibration path")
def _(tmp):
    (tmp / "data.txt").write_text("\n".join(f"sentence number {i}" for i in range(300)))
    recipe = {"calibration": {"path": "data.txt", "random": True, "samples": 8, "eval_samples": 32}}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "random: true and path", "are both given; random inputs replace data, so keep one of them"]


@case("a count beyond any the compile takes, dry run")
def _(tmp):
    # torch's randint overflowed on it after the passes: exit 3
    recipe = {**RANDOM, "validate": {"latency_batch": 10**20}}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "latency_batch: Value error, 100000000000000000000 is larger than any count or size lmmc takes (at most "
        "2147483647)"]


@case("a recipe's bench on a GPU this ONNX Runtime cannot use, dry run")
def _(tmp):
    # the real run wrote the output, then failed in the bench with exit 2
    recipe = {**RANDOM, "bench": {"device": "cuda", "repeats": 3, "memory": False}}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "this ONNX Runtime has no CUDAExecutionProvider"]


@case("a recipe's bench of a runtime the CPU does not run, dry run")
def _(tmp):
    recipe = {**RANDOM, "bench": {"backends": ["onnxruntime", "tensorrt"], "repeats": 3, "memory": False}}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "bench.backends: tensorrt: bench runs onnxruntime and openvino on cpu, not tensorrt; set bench.device to cuda"]


@case("a recipe's bench.seq past the positions, dry run")
def _(tmp):
    recipe = {**RANDOM, "bench": {"seq": 1000, "repeats": 3, "memory": False}}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "bench.seq 1000 is more tokens than the teacher's text tower takes (64 positions); set bench.seq to 64 or less"]


@case("antgmm's keep for a misspelt tower, dry run")
def _(tmp):
    recipe = {**RANDOM, "calibration": {"path": str(texts(tmp))}, "passes": [{"antgmm": {"keep": {"txt": 0.5}}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "passes[0] 'antgmm'.keep names the tower(s) ['txt'], but this bert model has the towers ['text']"]


@case("an ort step's threads past any CPU, dry run")
def _(tmp):
    recipe = {**RANDOM, "export": ["onnx", {"ort": {"threads": 3000000000}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "threads: Input should be less than or equal to 1024"]


@case("a recipe's model path missing beside the recipe")
def _(tmp):
    bert(tmp)  # ./tiny-bert of the current directory, not of the recipe's
    (tmp / "recipes").mkdir()
    return ["-r", write_recipe(tmp / "recipes", {**RANDOM, "model": "./tiny-bert"}), "-o", "out", "--dry-run"], [
        "model './tiny-bert' does not exist: relative paths in a recipe are resolved against the recipe's directory"]


@case("a recipe's empty model path")
def _(tmp):
    return ["-r", write_recipe(tmp, {**RANDOM, "model": ""}), "-o", "out", "--dry-run"], [
        "model is an empty path, which would read as the recipe's directory"]


@case("a distill layer_map past the teacher's layers, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "layer_map": [1, 5]}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "layer_map for the text tower maps student layer 2 to teacher layer 5, which is out of range; the teacher's "
        "text tower has layers 1..2"]


@case("a distill layer_map of fewer entries than the student's blocks, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "layer_map": [1]}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "layer_map for the text tower has 1 entries, but the student has 2 layers"]


@case("distill skip_hidden past the student's blocks, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "skip_hidden": {"text": [99]}}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "skip_hidden names blocks [99] of the text tower, which has blocks 0..1"]


@case("distill with every loss weight 0, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "hidden": 0, "output": 0}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], [
        "distill: all loss weights are 0", "give hidden or output a positive weight"]


@case("recipe's calibration path missing")
def _(tmp):
    (tmp / "recipes").mkdir()
    recipe = write_recipe(tmp / "recipes", {**RANDOM, "calibration": {"path": "calib.txt"}})
    texts(tmp)  # beside the current directory, not beside the recipe
    return [bert(tmp), "-r", recipe, "-o", "out", "--dry-run"], ["resolved against the recipe's directory", "fix the path"]


@case("--calib missing")
def _(tmp):
    return ([bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", "out", "--calib", "data/calib.txt"],
            ["relative to the current directory", "does not exist", "pass --calib"])


@case("validate of the wrong type")
def _(tmp):
    return [bert(tmp), "-r", write_recipe(tmp, {**RANDOM, "validate": 5}), "-o", "out"], ["'validate' is a mapping", "false"]


@case("output exists without --force")
def _(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("keep")
    return [bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", "out"], ["already exists", "--force"]


@case("--force on the current directory")
def _(tmp):
    return [bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", ".", "--force"], ["is the current directory", "--out"]


@case("--force on the model directory")
def _(tmp):
    model = bert(tmp)
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", model, "--force"], ["is the model directory", "Choose a new directory"]


@case("--force on the parent of the model directory")
def _(tmp):
    save_tiny("bert", tmp / "models" / "tiny-bert")
    return (["models/tiny-bert", "-r", write_recipe(tmp, RANDOM), "-o", "models", "--force"],
            ["contains the model directory", "Choose a new directory"])


@case("--force on the folder of a distill corpus given in a list")
def _(tmp):
    (tmp / "texts").mkdir()
    (tmp / "a.txt").write_text("the water is cold\n")
    (tmp / "texts" / "b.txt").write_text("the water is warm\n")
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 1, "corpus": [str(tmp / "a.txt"), str(tmp / "texts/b.txt")]}}]}
    return ([bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "texts", "--force", "--dry-run"],
            ["contains the corpus of 'distill'", "b.txt", "Choose a new directory"])


@case("--out inside the model directory")
def _(tmp):
    model = bert(tmp)
    return [model, "-r", write_recipe(tmp, RANDOM), "-o", model / "out"], ["sits inside the model directory", "outside it"]


@case("distill's checkpoint_dir inside --out, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 1, "checkpoint_dir": "out/checkpoints"}}]}
    return ([bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"],
            ["writes its checkpoint_dir", "checkpoints' inside --out", "outside --out"])


@case("distill's checkpoint_dir inside the model directory, dry run")
def _(tmp):
    model = bert(tmp)
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 1, "checkpoint_dir": str(model / "ckpt")}}]}
    return ([model, "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"],
            ["inside the model directory", "does not write into its inputs", "outside it"])


@case("antgmm's latency_cache inside --out, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"antgmm": {"target": {"speedup": 1.5}, "latency_cache": "out/cache"}}],
              "export": ["onnx", {"openvino": {"int8": True}}]}
    return ([bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"],
            ["writes its latency_cache", "inside --out"])


@case("a latency target whose floors leave nothing to remove, dry run")
def _(tmp):
    # known from the shapes: the pass would fail only after fitting its latency model, minutes in
    recipe = {**RANDOM, "passes": [{"antgmm": {"target": {"speedup": 2}, "min_layers": 9, "min_heads": 9,
                                               "min_ffn": 100000}}],
              "export": ["onnx", {"openvino": {"int8": True}}]}
    return ([bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"],
            ["the floors leave nothing to remove", "lower min_layers=9, min_heads=9, min_ffn=100000"])


@case("antgmm's latency_cache is a file, dry run")
def _(tmp):
    (tmp / "afile").write_text("mine")
    recipe = {**RANDOM, "passes": [{"antgmm": {"target": {"speedup": 1.5}, "latency_cache": "afile/cache"}}],
              "export": ["onnx", {"openvino": {"int8": True}}]}
    return ([bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"],
            ["writes its latency_cache", "afile' is a file", "give a latency_cache that is a directory"])


@case("a seed past 64 bits, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"distill": {"steps": 1, "seed": 2**64}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], ["seed", "less than 9223372036854775808"]


@case("--force on the calibration folder")
def _(tmp):
    images(tmp, 160)
    save_tiny("vit", tmp / "vit")
    recipe = write_recipe(tmp, {**RANDOM, "calibration": {"path": "pics"}})
    return ["./vit", "-r", recipe, "-o", "pics", "--force"], ["is the calibration data", "Choose a new directory"]


@case("--force on a directory lmmc did not write")
def _(tmp):
    (tmp / "photos").mkdir()
    (tmp / "photos" / "holiday.jpg").write_bytes(b"jpeg")
    return ([bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", "photos", "--force"],
            ["is not one (it holds holiday.jpg, which lmmc did not write); it was left untouched",
             "Choose a new --out"])


@case("--force on a directory with another tool's report.json")
def _(tmp):
    (tmp / "results").mkdir()
    (tmp / "results" / "report.json").write_text('{"accuracy": 0.9}')
    return ([bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", "results", "--force"],
            ["replaces only an earlier lmmc output", "it was left untouched"])


@case("symlinked --out")
def _(tmp):
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    return [bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", "link", "--force"], ["is a symbolic link", "give the real directory"]


@case("--out is a file path under a file")
def _(tmp):
    (tmp / "notes.txt").write_text("x")
    return [bert(tmp), "-r", write_recipe(tmp, RANDOM), "-o", "notes.txt/out"], ["is a file, not a directory", "cannot create --out"]


@case("the hidden stage on a dual encoder, dry run")
def _(tmp):
    model = save_tiny("clip", tmp / "clip")
    recipe = {**RANDOM, "passes": [{"antgmm": {"keep": 0.6, "shares": {"ffn": 0.5, "hidden": 0.5}}}]}
    return [model, "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], ["BERT-family text encoders only",
                                                                                "drop 'hidden' from the shares"]


@case("an activation swap naming a tower the model lacks, dry run")
def _(tmp):
    recipe = {**RANDOM, "passes": [{"activation": {"towers": ["vision"]}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], ["no tower ['vision'] in this bert",
                                                                                    "its towers are ['text']"]


@case("ort timing past the positions, dry run")
def _(tmp):
    recipe = {**RANDOM, "export": ["onnx", {"ort": {"latency_seq": 500, "int8": []}}]}
    return [bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"], ["ort.latency_seq = 500",
                                                                                    "set ort.latency_seq to 64 or less"]


# What only a pass used to find out, after the passes before it: the dry run refuses it now.
@case("ecoflap's cap equal to its target, dry run")
def _(tmp):
    recipe = {**RANDOM, "calibration": {**RANDOM["calibration"], "samples": 16},
              "passes": [{"ecoflap": {"sparsity": 0.3, "p_max": 0.3, "samples": 16}}, "wanda"]}
    return ([bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"],
            ["passes[0] 'ecoflap': sparsity 0.3 cannot be reached with p_max = 0.3", "Raise p_max above 0.3"])


@case("ecoflap on one calibration sample, dry run")
def _(tmp):
    recipe = {**RANDOM, "calibration": {**RANDOM["calibration"], "samples": 1, "batch_size": 1},
              "passes": [{"ecoflap": {"sparsity": 0.5}}, "wanda"]}
    return ([bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"],
            ["needs at least 2 calibration samples, and it gets 1", "give more calibration data"])


@case("antgmm's Taylor importance on batches of one, dry run")
def _(tmp):
    recipe = {**RANDOM, "calibration": {**RANDOM["calibration"], "batch_size": 1}, "passes": [{"antgmm": {"keep": 0.6}}]}
    return ([bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"],
            ["batches of at least 2 samples", "and they hold 1", "raise calibration.batch_size"])


@case("optima's window below its modules, dry run")
def _(tmp):
    recipe = {**RANDOM, "calibration": {**RANDOM["calibration"], "samples": 32},
              "passes": [{"distill": {"steps": 2, "batch_size": 4, "reward_samples": 4, "schedule": "optima",
                                      "blocks_per_arm": 1, "window": 1}}]}
    return ([bert(tmp), "-r", write_recipe(tmp, recipe), "-o", "out", "--dry-run"],
            ["window (1) must be at least the number of modules (2: text[0:1], text[1:2])"])


@case("a distillation that diverges")
def _(tmp):
    diverges = {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, "dev_samples": 4, "lr": 1e30,
                                                  "keep_best": False, "progress": False}}], "validate": False}
    return ([bert(tmp), "-r", write_recipe(tmp, diverges), "-o", "out"],
            ["pass 'distill' left NaN/Inf values in", "Lower its learning rate"])


@case("an mpnet whose relative-position buckets transformers cannot run, dry run")
def _(tmp):
    model = transformers.MPNetModel(transformers.MPNetConfig(**TINY_TEXT, pad_token_id=0,
                                                             relative_attention_num_buckets=16))
    model.save_pretrained(tmp / "mpnet")
    save_preprocessors("mpnet", tmp / "mpnet")
    return ["./mpnet", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "relative_attention_num_buckets = 16", "in 32 buckets", "compile a checkpoint with 32 buckets"]


@case("a llava reading its image features at layer 0, dry run")
def _(tmp):
    path = save_tiny_llava(tmp / "llava")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vision_feature_layer": 0}))
    return [str(path), "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "vision_feature_layer 0", "reads layer 0 as no layer", "-1 is the last"]


@case("a llava whose decoder fuses q, k and v into one linear, dry run")
def _(tmp):
    model = tiny_llava()
    config = transformers.LlavaConfig(**{**model.config.to_dict(), "text_config": {
        **TINY_DECODER, "model_type": "phi3", "pad_token_id": 0}})
    transformers.LlavaForConditionalGeneration(config).save_pretrained(tmp / "llava")
    tiny_llava_processor().save_pretrained(tmp / "llava")
    return ["./llava", "-r", write_recipe(tmp, RANDOM), "-o", "out", "--dry-run"], [
        "block (Phi3DecoderLayer) has no 'q' linear", "self_attn.qkv_proj", "does not support this layout",
        "linears of their own"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_names_problem_and_fix_and_touches_nothing(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, fragments = CASES[name](tmp_path)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["compile", *map(str, args)])
    message = result.output
    assert result.exit_code == 2, message
    assert message.count("error:") == 1, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "huggingface.co" not in message and "Traceback" not in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("distill", [{"skip_hidden": {"text": [0]}},
                                     {"towers": ["text"], "layer_map": {"text": [2, 2]}}])
def test_distill_settings_may_leave_out_towers_they_do_not_touch(tmp_path, monkeypatch, distill):
    """skip_hidden of one tower skips nothing in the other, and layer_map needs only the distilled towers:
    both were refused unless every tower was named, the unused ones with values that mean nothing."""
    monkeypatch.chdir(tmp_path)
    save_tiny("clip", tmp_path / "clip")
    recipe = write_recipe(tmp_path, {**RANDOM, "passes": [{"distill": {"steps": 2, "batch_size": 4, **distill}}]})
    for dry in (["--dry-run"], []):
        result = CliRunner().invoke(main, ["compile", "./clip", "-r", str(recipe), "-o", "out", *dry])
        assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "report.json").read_text())["passes"][0]["metrics"]
    assert metrics["skip_hidden"] == distill.get("skip_hidden", {})
    assert metrics["layer_map"] == ({"text": [2, 2]} if "layer_map" in distill else {"text": [1, 2], "vision": [1, 2]})


@pytest.mark.parametrize("value, got", [
    ({"text": "a cat", "image": ["a.png", "b.png"]}, '"image" must be a string, got ["a.png", "b.png"]; write it as a path'),
    ({"text": "a cat", "image": None}, '"image" must be a string, got null; write it as a path'),
    ({"text": "a cat", "image": 7}, '"image" must be a string, got 7; write it as a path'),
    ({"text": None}, '"text" must be a string, got null; write it as text in quotes'),
    ({"text": 3.5}, '"text" must be a string, got 3.5; write it as text in quotes'),
])
def test_a_jsonl_line_whose_text_or_image_is_not_a_string_is_refused(value, got, tmp_path, monkeypatch):
    """A null text would otherwise be read as the text "None", and a list as an image path raised a TypeError."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join([json.dumps({"text": "the water is cold"}), json.dumps(value)]))
    args = [bert(tmp_path), "-r", write_recipe(tmp_path, RANDOM), "-o", "out", "--calib", data, "--dry-run"]
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["compile", *map(str, args)])
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert f"error: {data}:2: {got}" in result.output, result.output
    assert snapshot(tmp_path) == before


def _readonly_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write into: chmod for ordinary users; root writes through
    permissions, so for root a read-only place of the system (sysfs) where one exists."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):
        try:
            (candidate / "lmmc-probe").mkdir()
        except OSError:
            return candidate
        (candidate / "lmmc-probe").rmdir()
    pytest.skip("no read-only directory available to root here")


def test_force_onto_an_earlier_output_the_user_made_read_only_is_refused_before_loading(tmp_path, monkeypatch):
    """Moving the earlier output aside needs the right to write into it: the compile ran every pass, then
    failed to place its output and discarded them."""
    import lmmc.compile

    monkeypatch.chdir(tmp_path)
    model, recipe = bert(tmp_path), write_recipe(tmp_path, RANDOM)
    assert CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", "out"]).exit_code == 0
    out = (tmp_path / "out").resolve()
    real = tempfile.TemporaryFile

    def read_only_out(*args, dir=None, **kwargs):  # chmod 555 on out, which root would write through
        if dir is not None and Path(dir).resolve() == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(lmmc.compile.tempfile, "TemporaryFile", read_only_out)
    loaded = []
    monkeypatch.setattr("lmmc.compile.load_teacher", lambda *a, **k: loaded.append(a))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", "out", "--force"])
    assert result.exit_code == 2, result.output
    assert (f"cannot write the output: '{out}' is not writable (Permission denied); choose an --out on a writable "
            f"disk, or fix the permissions") in " ".join(result.output.split())
    assert loaded == [] and snapshot(tmp_path) == before


def test_read_only_output_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ro = _readonly_dir(tmp_path)
    model, recipe = bert(tmp_path), write_recipe(tmp_path, RANDOM)
    loaded = []
    monkeypatch.setattr("lmmc.compile.load_teacher", lambda *a, **k: loaded.append(a))
    before = snapshot(tmp_path)
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", str(ro / "out" / "x"), *extra])
        assert result.exit_code == 2, result.output
        assert "is not writable" in result.output and "choose an --out on a writable disk" in result.output
    assert loaded == [] and snapshot(tmp_path) == before
    assert not (ro / "out").exists()


@pytest.mark.parametrize("code, said", [
    (errno.ENOSPC, "the disk is full: writing"),
    (errno.EFBIG, "a file this large is refused by the disk's filesystem (FAT32 takes at most 4 GiB) or by the "
                  "file-size limit of this shell ('ulimit -f')")], ids=["disk full", "file too large"])
def test_a_write_refused_for_space_during_export_keeps_the_finished_passes(tmp_path, monkeypatch, code, said):
    """No output is half-written, and the finished pass (a distillation can take an hour) is kept for --resume;
    a file too large for the disk (FAT32, ulimit -f) was an internal error, exit 3."""
    monkeypatch.chdir(tmp_path)
    model, recipe = bert(tmp_path), write_recipe(tmp_path, RANDOM)
    real_save = torch.onnx.ONNXProgram.save

    def save_until_full(self, destination, *args, **kwargs):
        real_save(self, destination, *args, **kwargs)
        data = Path(destination).read_bytes()
        Path(destination).write_bytes(data[: len(data) // 3])  # the disk filled a third of the way in
        raise OSError(code, os.strerror(code), str(destination))

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", save_until_full)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", "out"])
    assert result.exit_code == 2, result.output
    area = tmp_path / ".out.lmmc-work"
    assert said in " ".join(result.output.split()) and result.output.count("error:") == 1
    assert (f"nothing was written to '{tmp_path / 'out'}'" in result.output and f"The 1 finished pass(es) are kept in '{area}'"
            in " ".join(result.output.split()))
    assert not (tmp_path / "out").exists() and (area / "state-01").is_dir()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", "out", "--resume"])
    assert result.exit_code == 0, result.output
    assert not area.exists() and (tmp_path / "out" / "onnx" / "text.onnx").is_file()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {k.split("/")[0] for k in after if k not in before} == {"out"}


def _one_nan(weights, config):
    weights["encoder.layer.1.attention.self.query.weight"][3, 5] = float("nan")


def _overflow(weights, config):
    """Finite weights can still overflow: a huge LayerNorm scale makes the outputs Inf."""
    weights["encoder.layer.0.output.LayerNorm.weight"][:] = 3e38
    weights["encoder.layer.1.output.dense.weight"][:] = 3e38


def _all_zero(weights, config):
    """Finite, but every sample gets the same (zero) embedding: cosines between constants certify nothing."""
    for value in weights.values():
        value.zero_()


def _fewer_layers(weights, config):
    """transformers drops the weights of the blocks the config does not build: the teacher would be cut."""
    config["num_hidden_layers"] = 1


def _relative_positions(weights, config):
    """A relative-position BERT saved by an older transformers: its blocks' distance embeddings have no place
    in the BERT this transformers builds, which would drop them and compute another model."""
    for i in range(config["num_hidden_layers"]):
        weights[f"encoder.layer.{i}.attention.self.distance_embedding.weight"] = torch.zeros(127, 8)


@pytest.mark.parametrize("damage, message", [
    (_one_nan, "1 NaN/Inf value(s) in 'encoder.layer.1.attention.self.query.weight'; repair or re-download the weights"),
    (_overflow, "gives NaN/Inf outputs on the calibration data"),
    (_all_zero, "the teacher's text tower gives an all-zero embedding for every one of 8 different calibration samples"),
    (_fewer_layers, "hold 16 tensor(s) of transformer blocks that the model its config.json describes has no place "
                    "for (encoder.layer.1."),
    (_relative_positions, "hold 2 tensor(s) of transformer blocks that the model its config.json describes has no "
                          "place for (encoder.layer.0.attention.self.distance_embedding.weight, encoder.layer.1.attention.self."
                          "distance_embedding.weight); they are the distance embeddings of a relative-position BERT"),
], ids=["one NaN weight", "outputs overflow", "all-zero weights", "config of fewer layers", "relative positions"])
def test_a_broken_teacher_is_refused_before_any_pass(tmp_path, monkeypatch, damage, message):
    monkeypatch.chdir(tmp_path)
    model = bert(tmp_path)
    weights = load_file(model / "model.safetensors")
    config = json.loads((model / "config.json").read_text())
    damage(weights, config)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    (model / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, RANDOM)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", "out"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert snapshot(tmp_path) == before
    if damage in (_fewer_layers, _relative_positions):  # seen in the weights' headers: the dry run refuses it alike
        dry = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", "out", "--dry-run"])
        assert dry.exit_code == 2 and message in dry.output, dry.output


def test_a_shard_index_left_beside_model_safetensors_is_not_what_is_checked(tmp_path):
    """transformers loads model.safetensors first; a stale index beside it names shards it never opens."""
    model = bert(tmp_path)
    for shard in ("model-00002-of-00006.safetensors", "pytorch_model-00001-of-00002.bin"):
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": shard}}))
        for dry in (["--dry-run"], []):  # the dry run and the real run read the same file
            result = CliRunner().invoke(main, ["compile", str(model), "-r", str(write_recipe(tmp_path, RANDOM)), "-o",
                                               str(tmp_path / "out"), "--force", *dry])
            assert result.exit_code == 0, result.output


# A child process where `import sentencepiece` fails, as on an install without the package.
_NO_SENTENCEPIECE = "import sys; sys.modules['sentencepiece'] = None; from lmmc.cli import main; main(sys.argv[1:])"


def test_a_tokenizer_whose_package_is_missing_names_the_package(tmp_path):
    """SigLIP checkpoints ship a SentencePiece tokenizer: without the package, transformers raises an
    ImportError, which must reach the user as one message naming what to install, not as a crash."""
    model = siglip_sentencepiece(save_tiny("siglip", tmp_path / "siglip"))
    recipe = write_recipe(tmp_path, RANDOM)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _NO_SENTENCEPIECE, "compile", str(model), "-r", str(recipe), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    assert f"reading the tokenizer of '{model}' needs a package that is not installed" in proc.stderr
    assert "SiglipTokenizer requires the SentencePiece library" in proc.stderr
    assert "pip install sentencepiece" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


def fake_hub(tmp: Path) -> tuple[Path, Path]:
    """A hub cache under `tmp` holding acme/tinybert (a tiny BERT) as huggingface_hub lays one out once lmmc
    or sentence-transformers has read it online: the repo folder, its snapshot, and the record that it has
    no modules.json (without it, an offline compile cannot tell the model's pooling: tests/test_st_modules.py)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp / "hf" / "hub" / "models--acme--tinybert"
    snapshot_dir = save_tiny("bert", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / "modules.json").touch()
    return repo, snapshot_dir


def hub_compile(tmp: Path, *args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """lmmc compile in a child process reading `tmp`'s hub cache, offline unless `env` says otherwise:
    huggingface_hub reads the cache's place from the environment at import."""
    env = env or {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_CACHE": str(tmp / "hf" / "hub"),
                  "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", "import sys; from lmmc.cli import main; main(sys.argv[1:])",
                           "compile", *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp)


@pytest.mark.parametrize("dry", [False, True])
def test_a_hub_teacher_with_pickle_weights_only_is_refused(tmp_path, dry):
    """A hub id whose cached snapshot holds pytorch_model.bin alone: lmmc never unpickles weights and says
    how to convert them, before any pass as in a dry run."""
    _, snapshot_dir = fake_hub(tmp_path)
    (snapshot_dir / "model.safetensors").unlink()
    torch.save(tiny_model("bert").state_dict(), snapshot_dir / "pytorch_model.bin")
    recipe = write_recipe(tmp_path, RANDOM)
    before = snapshot(tmp_path)
    proc = hub_compile(tmp_path, "acme/tinybert", "-r", recipe, "-o", tmp_path / "out", *(["--dry-run"] if dry else []))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    reason = "acme/tinybert has no model.safetensors or model.safetensors.index.json"
    assert (f"error: the weights of 'acme/tinybert' cannot be read as safetensors ({reason}); lmmc loads safetensors weights only (never pickle such as pytorch_model.bin): convert "
            f"them once yourself, from_pretrained('acme/tinybert') and then save_pretrained(DIR, "
            f"safe_serialization=True), and pass DIR") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


def test_out_inside_a_hub_models_cache_is_refused(tmp_path):
    """A hub id is read from its cached snapshot: an output there would write into the cache."""
    repo, snapshot_dir = fake_hub(tmp_path)
    recipe = write_recipe(tmp_path, RANDOM)
    before = snapshot(tmp_path)
    proc = hub_compile(tmp_path, "acme/tinybert", "-r", recipe, "-o", snapshot_dir / "out", "--dry-run")
    assert proc.returncode == 2, proc.stderr
    assert f"sits inside the model's hub cache ({repo})" in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before


def test_a_cached_hub_model_compiles_offline_when_the_hub_cannot_be_reached(tmp_path):
    """Without the hub, huggingface_hub retried each file it looked for (8 minutes for a tiny model): a cached
    model is read offline at once, with a warning, and an uncached one is refused at once."""
    fake_hub(tmp_path)
    recipe = write_recipe(tmp_path, RANDOM)
    proxies = {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
               "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    env = {**{k: v for k, v in os.environ.items() if k not in proxies}, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens
    for ref, code, message in [
            ("acme/tinybert", 0, "warning: the hub (http://127.0.0.1:9) cannot be reached (Connection refused): "
                                 "'acme/tinybert' was read from its cached snapshot, offline"),
            ("acme/other", 2, "error: 'acme/other' is not a local directory nor in the hub cache, and the hub "
                              "(http://127.0.0.1:9) cannot be reached (Connection refused): for a hub id, connect to "
                              "the network; for a local model, check the spelling of its path")]:
        proc = hub_compile(tmp_path, ref, "-r", recipe, "-o", tmp_path / "out", "--dry-run", env=env)
        assert proc.returncode == code, proc.stderr
        assert message in proc.stderr and "Retry" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("where,dry,name", [("hub", False, "model.safetensors"), ("hub", True, "model.safetensors"),
                                            ("local", True, "model.safetensors"), ("hub", True, "config.json"),
                                            ("local", False, "config.json")])
def test_a_snapshot_whose_weights_link_points_nowhere_is_an_unfinished_download(tmp_path, where, dry, name):
    """A hub snapshot links each file into blobs/; a stopped download leaves model.safetensors a link to
    nothing. The dry run let it through and the real run called it pickle weights to convert; a config.json
    link was no such model."""
    repo, snapshot_dir = fake_hub(tmp_path)
    (repo / "blobs").mkdir()
    (snapshot_dir / name).rename(repo / "blobs" / "abc123")
    (snapshot_dir / name).symlink_to("../../blobs/abc123")
    (repo / "blobs" / "abc123").unlink()
    ref = "acme/tinybert" if where == "hub" else str(snapshot_dir)
    proc = hub_compile(tmp_path, ref, "-r", write_recipe(tmp_path, RANDOM), "-o", tmp_path / "out",
                       *(["--dry-run"] if dry else []))
    assert proc.returncode == 2, proc.stderr
    assert (f"error: '{snapshot_dir / name}' is a link to '../../blobs/abc123', which is not there (a "
            f"download that did not finish); download the model again") in proc.stderr, proc.stderr
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


HOST = """
import logging, os, random, sys, numpy, torch
from pathlib import Path
from huggingface_hub import constants
from lmmc.compile import compile_model
from lmmc.recipe import load_recipe
def state():
    return (os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE, torch.initial_seed(),
            torch.get_rng_state().sum().item(), logging.getLogger("torch.onnx").level, hash(random.getstate()),
            int(numpy.random.get_state()[1].sum()))
recipe = load_recipe(sys.argv[1])  # its imports draw from Python's generator (rich does at import)
torch.manual_seed(1234)
before = state()
report = compile_model("acme/tinybert", recipe, Path(sys.argv[2]))
print(report["warnings"][0], before == state(), before, state(), sep="|")
"""


def test_a_compile_called_from_python_leaves_the_host_process_as_it_was(tmp_path):
    """A host that calls compile_model kept the hub offline for good once the hub was unreachable, and had
    its torch random stream reseeded and the exporter's warnings silenced."""
    fake_hub(tmp_path)
    proxies = {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
               "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    env = {**{k: v for k, v in os.environ.items() if k not in proxies}, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    recipe = write_recipe(tmp_path, {**RANDOM, "export": ["onnx", {"openvino": {"int8": True}}]})  # NNCF draws too
    proc = subprocess.run([sys.executable, "-c", HOST, str(recipe), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warned, same, before, _ = proc.stdout.strip().splitlines()[-1].split("|")
    assert warned.startswith("the hub (http://127.0.0.1:9) cannot be reached")  # offline for its own run
    assert same == "True" and before.startswith("(None, False, 1234, "), proc.stdout


@pytest.mark.parametrize("where,dry", [("hub", False), ("hub", True), ("local", False)])
def test_a_safetensors_index_naming_pickle_shards_is_refused(tmp_path, where, dry):
    """transformers reads whatever a model.safetensors.index.json names, a pickle shard included: the index
    is checked before any weight loads, for a hub snapshot as for a local directory, and by a dry run."""
    _, snapshot_dir = fake_hub(tmp_path)
    weights = load_file(snapshot_dir / "model.safetensors")
    (snapshot_dir / "model.safetensors").unlink()
    torch.save(weights, snapshot_dir / "pytorch_model-00001-of-00001.bin")
    (snapshot_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in weights}}))
    recipe = write_recipe(tmp_path, RANDOM)
    ref = "acme/tinybert" if where == "hub" else str(snapshot_dir)
    before = snapshot(tmp_path)
    proc = hub_compile(tmp_path, ref, "-r", recipe, "-o", tmp_path / "out", *(["--dry-run"] if dry else []))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (f"error: the safetensors index of '{ref}' names pytorch_model-00001-of-00001.bin, which is not a "
            f"safetensors file; lmmc loads safetensors weights only (never pickle)") in proc.stderr
    assert snapshot(tmp_path) == before


def test_a_task_checkpoint_without_the_pooler_compiles_and_one_missing_a_used_weight_is_refused(tmp_path, monkeypatch,
                                                                                                caplog):
    """google/vit-base-patch16-224 is a ViTForImageClassification checkpoint: no pooler, which ViTModel has
    but lmmc's embedding (the [CLS] state) never reads. That compiles, the report says so; a checkpoint
    lacking a weight the embedding does read is still refused."""
    from lmmc.adapters import TowerModule
    from lmmc.modelio import load_teacher
    from lmmc.student import load_student

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    task = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VISION, num_labels=5)).eval()
    model = save_preprocessors("vit", tmp_path / "vit-cls")
    task.save_pretrained(model)
    with caplog.at_level(logging.WARNING):
        teacher, adapter, _ = load_teacher(str(model))
    assert teacher.lmmc_absent_weights == ["pooler.dense.bias", "pooler.dense.weight"]
    # transformers' load report calls them newly initialized; lmmc's own warning says what it did
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert float(teacher.pooler.dense.weight.detach().abs().sum()) == 0.0
    pixels = torch.randn(3, 3, TINY_VISION["image_size"], TINY_VISION["image_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = TowerModule(teacher, adapter.towers[0])(pixels)[1]
        ref = torch.nn.functional.normalize(task.vit(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)
    assert torch.allclose(ours, ref, atol=1e-6)

    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(write_recipe(tmp_path, RANDOM)), "-o", "out"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("lacks pooler.dense.bias, pooler.dense.weight" in w for w in report["warnings"]), report["warnings"]
    # its classifier is not in the student: said, not dropped in silence
    assert teacher.lmmc_dropped_weights == ["classifier.bias", "classifier.weight"]
    assert ("the teacher's checkpoint holds 2 tensor(s) outside the vit model lmmc compiles (classifier.*: a task "
            "head, such as a classifier, or other tensors the model does not read); the student has none") \
        in " ".join(report["warnings"])
    assert float(load_student(tmp_path / "out" / "student").pooler.dense.weight.detach().abs().sum()) == 0.0

    weights = load_file(model / "model.safetensors")
    del weights["vit.encoder.layer.1.attention.attention.query.weight"]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    recipe = write_recipe(tmp_path, RANDOM)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", "out2"])
    assert result.exit_code == 2, result.output
    # named as transformers names it once loaded (layers.1.attention.q_proj.weight), not as the file does
    assert "lack or mis-shape 1 tensor(s) the model needs (" in result.output
    assert "1.attention.q_proj.weight)" in result.output
    assert snapshot(tmp_path) == before


def test_distills_default_length_is_capped_at_a_clip_text_towers_positions(tmp_path, monkeypatch):
    """distill's max_length of 128 is a default the text tower's 64 positions lower, not an error."""
    monkeypatch.chdir(tmp_path)
    save_tiny("clip", tmp_path / "clip")
    images(tmp_path, 40)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps({"image": f"pics/{i}.png", "text": f"the road {spelled(i)}"})
                                                    for i in range(40)))
    recipe = write_recipe(tmp_path, {**RANDOM, "passes": [{"distill": {"steps": 2, "corpus": "pairs.jsonl"}}]})
    result = CliRunner().invoke(main, ["compile", "./clip", "-r", str(recipe), "-o", "out", "--dry-run"])
    assert result.exit_code == 0, result.output


def test_a_batch_the_ranks_cannot_share_is_refused_by_the_dry_run(tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE set), a micro-batch that does not split over the ranks is refused before
    any pass, not by the distillation after the pruning."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = write_recipe(tmp_path, {**RANDOM, "passes": [{"magnitude": {"sparsity": 0.5}},
                                                          {"distill": {"steps": 2, "batch_size": 6, "grad_accum": 2}}]})
    result = CliRunner().invoke(main, ["compile", str(bert(tmp_path)), "-r", str(recipe), "-o", "out", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "batch_size / grad_accum = 3 samples per micro-batch cannot be split evenly over 2 ranks" in result.output
    monkeypatch.setenv("WORLD_SIZE", "3")
    result = CliRunner().invoke(main, ["compile", str(bert(tmp_path / "again")), "-r", str(recipe), "-o", "out",
                                       "--dry-run"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_the_dry_run_refuses_an_antgmm_keep_below_its_floors_as_the_pass_does(tmp_path, monkeypatch, kind):
    """Planned on the model's shapes, with the text lengths of the calibration data (BERT) and an image
    tower's tokens (CLIP's vision tower): the same refusal, figure included, that the pass gave only once
    the passes before it (here a distillation) had run."""
    monkeypatch.chdir(tmp_path)
    save_tiny(kind, tmp_path / kind)
    antgmm = {"keep": 0.3 if kind == "bert" else {"text": 1.0, "vision": 0.3}, "min_heads": 2, "min_ffn": 40,
              "importance": "activation"}
    calibration = {"path": str(texts(tmp_path)), "samples": 64, "eval_samples": 32} if kind == "bert" else \
        RANDOM["calibration"]
    messages = []
    for first in ([], [{"distill": {"steps": 2, "batch_size": 4}}]):
        recipe = write_recipe(tmp_path, {**RANDOM, "calibration": calibration, "passes": [*first, {"antgmm": antgmm}],
                                         "validate": False})
        args = ["compile", f"./{kind}", "-r", str(recipe), "-o", "out"] + (["--dry-run"] if first else [])
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
        assert first == [] or "calibrating" not in result.output  # the plan runs nothing to show progress of
        messages.append(result.output.split("error: ")[1])
    assert "is below what the floors allow (about 0." in messages[0]
    assert messages[1] == messages[0]
    assert not (tmp_path / "out").exists()


def test_buffers_a_checkpoint_saves_are_not_called_a_dropped_head(tmp_path):
    """Some checkpoints save the token-type and position ids BERT makes itself; no head is lost with them."""
    from lmmc.modelio import load_teacher

    model = bert(tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["embeddings.token_type_ids"] = torch.zeros(1, 64, dtype=torch.int64)
    weights["embeddings.position_ids"] = torch.arange(64)[None]
    weights["stray.weight"] = torch.ones(2)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    teacher, _, _ = load_teacher(str(model))
    assert teacher.lmmc_dropped_weights == ["stray.weight"]



def test_loading_weights_that_do_not_fit_the_config_is_one_clear_error(tmp_path):
    """transformers' own refusal of a mis-shaped tensor reached the user as a bug in lmmc (exit 3) where the
    plan's header check could not see it (a hub model downloaded in the run)."""
    from lmmc.errors import LmmcError
    from lmmc.modelio import load_teacher

    model = save_tiny("vit", tmp_path / "vit")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(LmmcError, match="do not match its config.json .*restore the config.json saved with these"):
        load_teacher(str(model))


def test_a_model_shipping_its_code_compiles_with_consent_and_asks_nothing(tmp_path, monkeypatch):
    """A BERT whose config names its own classes (auto_map): with --trust-remote-code the plan built the model
    without passing the consent on, and transformers asked on the terminal, which a compile has none of."""
    from click.testing import CliRunner

    from lmmc.cli import main

    model = bert(tmp_path)
    (model / "custom.py").write_text("from transformers import BertConfig, BertModel\n\n\n"
                                     "class CustomConfig(BertConfig):\n    model_type = 'bert'\n\n\n"
                                     "class CustomModel(BertModel):\n    config_class = CustomConfig\n")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "custom.CustomConfig",
                                                                          "AutoModel": "custom.CustomModel"}}))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(write_recipe(tmp_path, RANDOM)), "-o",
                                       str(tmp_path / "out"), "--dry-run", "--trust-remote-code"], input="")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapter"] and "[y/N]" not in result.output


def test_no_writable_temporary_folder_is_one_clear_error(tmp_path):
    """A read-only root with only a volume writable: the libraries lmmc imports found no temporary folder, the
    crash handler failed the same way, and two tracebacks ended in exit 1, the missed gate's code."""
    import subprocess
    import sys

    script = ("import sys, tempfile\n"
              "tempfile.tempdir = None\n"
              "def none(*a, **k): raise FileNotFoundError(2, 'No usable temporary directory found in []')\n"
              "tempfile._get_default_tempdir = none\n"
              "from lmmc.cli import main\n"
              "sys.argv = ['lmmc', 'compile', sys.argv[1], '-r', sys.argv[2], '-o', sys.argv[3]]\n"
              "main()\n")
    done = subprocess.run([sys.executable, "-c", script, str(bert(tmp_path)), str(write_recipe(tmp_path, RANDOM)),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("Traceback") == 0 and ("error: no writable temporary folder (TMPDIR, /tmp, /var/tmp)"
                                                    in done.stderr), done.stderr[-2000:]


def test_weights_this_user_cannot_read_are_named_as_such_not_as_corrupt(tmp_path):
    """safetensors reports a file it may not read as "No such file": lmmc said the weights were corrupt and
    asked for a new download."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv, to drop the right to read any file")
    model = bert(tmp_path)
    (model / "model.safetensors").chmod(0)
    drop = "-dac_override,-dac_read_search"
    done = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-c",
                           "import sys; from lmmc.cli import main; sys.exit(main())", "compile", str(model), "-r", str(write_recipe(tmp_path, RANDOM)), "-o",
                           str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if "Permission denied" in done.stderr and "model.safetensors" not in done.stderr:
        pytest.skip(f"this process cannot drop its capabilities and still run Python: {done.stderr[-300:]}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: weights file '{model / 'model.safetensors'}' cannot be read by this user (permission denied); " \
           f"fix its permissions" in " ".join(done.stderr.split()), done.stderr[-2000:]


def test_an_ir_stopped_by_the_file_size_limit_is_said_as_such(tmp_path):
    """OpenVINO's writer meets 'ulimit -f' as "basic_ios::clear: iostream error": an internal error (exit 3)
    where the user's limit stopped a file, and the finished passes were left to a line about --resume."""
    import resource
    import subprocess
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True, "samples": 8, "eval_samples": 32},
                                      "passes": [{"magnitude": {"sparsity": 0.5}}], "export": ["openvino"],
                                      "validate": False}))
    limit = 120 * 1024  # the student's weights (98 kB) fit; the INT8 IR does not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-c", "import sys; from lmmc.cli import main; sys.exit(main())", "compile",
                           str(bert(tmp_path)), "-r", str(recipe), "-o", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limited)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2, said[-2000:]
    assert f"error: writing '{tmp_path}/.out.lmmc-work/output/openvino/text.int8.xml' failed (File too large, likely: " \
           f"basic_ios::clear: iostream error)" in said and "or by the file-size limit of this shell ('ulimit -f')" \
           in said and "The 1 finished pass(es) are kept in" in said, said[-2000:]
    assert not (tmp_path / "out").exists()


def test_more_threads_than_the_process_may_start_is_one_clear_error_before_any_pass(tmp_path):
    """A thousand threads' stacks past a memory limit failed inside the exporter, as an internal error."""
    recipe = write_recipe(tmp_path, {**RANDOM, "validate": {"latency": True, "threads": 1000}})
    done = lmmc_short_of_threads("compile", save_tiny("bert", tmp_path / "teacher"), "-r", recipe, "-o", tmp_path / "out")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: validate.threads 1000: this process cannot start 1000 threads (can't start new thread); a limit on its "
        f"memory ('ulimit -v') or processes ('ulimit -u') stops it. Ask for fewer: it may run on "
        f"{len(os.sched_getaffinity(0))} CPU(s)")
    assert not (tmp_path / "out").exists()
    # within the limit the same recipe plans
    planned = lmmc_short_of_threads("compile", tmp_path / "teacher", "-r", write_recipe(
        tmp_path, {**RANDOM, "validate": {"latency": True, "threads": 2}}, "two.yaml"), "-o", tmp_path / "out", "--dry-run")
    assert planned.returncode == 0, planned.stderr[-3000:]
