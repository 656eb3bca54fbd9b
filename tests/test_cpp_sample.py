"""The C++ embedding sample (samples/cpp) built with cmake and g++ against the openvino wheel's C++ API:
its embeddings from a real compile's manifest equal lmmc.runtime's, fp32 within 1e-4 and INT8 within 1e-2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from click.testing import CliRunner

from lmmc.cli import main
from lmmc.errors import LmmcError
from lmmc.runtime import load, open_dir, read_manifest
from lmmc.runtime.openvino import cpu_has_bf16
from tests.conftest import REPO, save_tiny, tiny_vocab
from tests.test_cli import write_recipe

RECIPE = {
    "calibration": {"random": True, "samples": 16, "eval_samples": 32, "batch_size": 8},
    "export": ["onnx", {"ort": {"fuse": "off", "int8": ["static"]}}, {"openvino": {"int8": True}}],
    "validate": {"latency": False, "threads": 1},
}
TEXTS = ["the man was on the road", "cold water", "a picture of a house in the data", "python"]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} is not installed; .ci/run installs it (apt-get install cmake g++, or pip install cmake)")
    return found


@pytest.fixture(scope="module")
def lmmc_embed(tmp_path_factory) -> Path:
    """samples/cpp built the way the README says, in a fresh build folder."""
    cmake, _ = _tool("cmake"), _tool("g++")
    import openvino.utils

    build = tmp_path_factory.mktemp("cpp-build")
    configure = subprocess.run([cmake, "-S", str(REPO / "samples" / "cpp"), "-B", str(build),
                                f"-DOpenVINO_DIR={openvino.utils.get_cmake_path()}", "-DCMAKE_CXX_COMPILER=g++"],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run([cmake, "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert "warning" not in compiled.stdout + compiled.stderr
    return build / "lmmc_embed"


@pytest.fixture(scope="module")
def compiled_out(tmp_path_factory) -> Path:
    """A tiny CLIP compiled to ONNX, ONNX Runtime static INT8 and OpenVINO fp32/INT8: a text and an image tower."""
    root = tmp_path_factory.mktemp("cpp-compile")
    model_dir = save_tiny("clip", root / "teacher")
    out = root / "out"
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(root, RECIPE)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _token_feed(out: Path, path: Path) -> dict[str, np.ndarray]:
    """The texts tokenised by the saved tokenizer, written one sample a line; returns the padded feed the
    sample builds from that file (pad id 0, mask 0)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "student")
    rows = [tokenizer(t)["input_ids"] for t in TEXTS]
    path.write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    assert mask.sum(1).min() < width  # padding is exercised
    return {"input_ids": ids, "attention_mask": mask}


def _run(binary: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=300)


def _artifact(out: Path, tower: str, backend: str, precision: str, variant: str) -> Path:
    entries = [a for a in read_manifest(out)["artifacts"] if (a["tower"], a["backend"], a["precision"], a["variant"])
               == (tower, backend, precision, variant)]
    assert len(entries) == 1
    return out / entries[0]["path"]


@pytest.mark.parametrize("fmt, precision, backend, variant, atol", [
    ("ir", "fp32", "openvino", "plain", 1e-4), ("ir", "int8", "openvino", "nncf", 1e-2),
    ("onnx", "fp32", "onnxruntime", "plain", 1e-4), ("onnx", "int8", "onnxruntime", "static", 1e-2)])
def test_text_embeddings_equal_lmmc_runtime(lmmc_embed, compiled_out, tmp_path, fmt, precision, backend, variant, atol):
    feed = _token_feed(compiled_out, tmp_path / "ids.txt")
    done = _run(lmmc_embed, compiled_out, tmp_path / "ids.txt", tmp_path / "emb.txt", "--format", fmt,
                "--precision", precision, "--threads", 1)
    assert done.returncode == 0, done.stderr
    got = np.loadtxt(tmp_path / "emb.txt", ndmin=2)
    ref = load(_artifact(compiled_out, "text", backend, precision, variant), threads=1).run(feed)["pooled_embedding"]
    assert got.shape == ref.shape == (len(TEXTS), 16)
    assert np.abs(got - ref).max() <= atol


@pytest.mark.skipif(not cpu_has_bf16(), reason="bf16 inference needs a CPU with bf16 units (AVX512-BF16 or AMX)")
@pytest.mark.parametrize("precision, variant", [("fp32", "plain"), ("int8", "nncf")])
def test_bf16_inference_equals_lmmc_runtime_in_bf16(lmmc_embed, compiled_out, tmp_path, precision, variant):
    feed = _token_feed(compiled_out, tmp_path / "ids.txt")
    path = _artifact(compiled_out, "text", "openvino", precision, variant)
    got = {}
    for inference in ("f32", "bf16"):
        done = _run(lmmc_embed, compiled_out, tmp_path / "ids.txt", tmp_path / f"{inference}.txt", "--precision",
                    precision, "--threads", 1, "--inference", inference)
        assert done.returncode == 0, done.stderr
        got[inference] = np.loadtxt(tmp_path / f"{inference}.txt", ndmin=2)
    ref = load(path, threads=1, inference_precision="bf16").run(feed)["pooled_embedding"]
    assert np.abs(got["bf16"] - ref).max() <= 1e-5  # the same plugin at the same precision
    assert np.abs(got["bf16"] - got["f32"]).max() > 1e-5  # and bf16 was really asked for


@pytest.mark.parametrize("precision, variant, atol", [("fp32", "plain", 1e-4), ("int8", "nncf", 1e-2)])
def test_image_embeddings_equal_lmmc_runtime(lmmc_embed, compiled_out, tmp_path, precision, variant, atol):
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (tmp_path / "pixels.f32").write_bytes(pixels.tobytes())
    done = _run(lmmc_embed, compiled_out, tmp_path / "pixels.f32", tmp_path / "emb.txt", "--tower", "vision",
                "--precision", precision)
    assert done.returncode == 0, done.stderr
    got = np.loadtxt(tmp_path / "emb.txt", ndmin=2)
    ref = load(_artifact(compiled_out, "vision", "openvino", precision, variant)).run({"pixel_values": pixels})
    assert got.shape == ref["pooled_embedding"].shape == (3, 16)
    assert np.abs(got - ref["pooled_embedding"]).max() <= atol


@pytest.mark.parametrize("precision, variant", [("fp32", "plain"), ("int8", "nncf")])
def test_static_shape_equals_lmmc_runtime_static(lmmc_embed, compiled_out, tmp_path, precision, variant):
    """--static 3,12: four texts in two runs of three, each padded to 12 tokens; images in runs of two."""
    feed = _token_feed(compiled_out, tmp_path / "ids.txt")
    done = _run(lmmc_embed, compiled_out, tmp_path / "ids.txt", tmp_path / "emb.txt", "--precision", precision,
                "--threads", 1, "--static", "3,12")
    assert done.returncode == 0, done.stderr
    got = np.loadtxt(tmp_path / "emb.txt", ndmin=2)
    path = _artifact(compiled_out, "text", "openvino", precision, variant)
    ref = load(path, threads=1, static_shape=(3, 12)).run(feed)["pooled_embedding"]
    assert got.shape == ref.shape == (len(TEXTS), 16)
    assert np.abs(got - ref).max() <= 1e-5  # the same plugin, compiled for the same shape
    if precision == "fp32":  # and padding changed nothing
        assert np.abs(got - load(path, threads=1).run(feed)["pooled_embedding"]).max() <= 1e-4
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (tmp_path / "pixels.f32").write_bytes(pixels.tobytes())
    done = _run(lmmc_embed, compiled_out, tmp_path / "pixels.f32", tmp_path / "img.txt", "--tower", "vision",
                "--precision", precision, "--threads", 1, "--static", "2")
    assert done.returncode == 0, done.stderr
    vision = _artifact(compiled_out, "vision", "openvino", precision, variant)
    ref = load(vision, threads=1, static_shape=(2,)).run({"pixel_values": pixels})["pooled_embedding"]
    assert np.abs(np.loadtxt(tmp_path / "img.txt", ndmin=2) - ref).max() <= 1e-5


@pytest.fixture(scope="module", params=["right", "left"])
def compiled_siglip(tmp_path_factory, request) -> Path:
    """A tiny SigLIP, whose texts are read at the tower's full length, with SigLIP's pad = end-of-text and,
    as Google's tokenizers, no attention mask: the model reads its padding. Padded on the left, as a Gemma
    tokenizer pads by default, its last position is another token: the sample padded on the right."""
    root = tmp_path_factory.mktemp("cpp-siglip")
    model_dir = save_tiny("siglip", root / "teacher")
    transformers.BertTokenizer(vocab=str(tiny_vocab(root / "vocab.txt")), pad_token="[SEP]",
                               model_input_names=["input_ids"], padding_side=request.param).save_pretrained(model_dir)
    recipe = {**RECIPE, "export": ["onnx", "openvino"]}
    out = root / "out"
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(root, recipe)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_fixed_length_model_is_fed_padded_to_its_length_with_its_pad_id(lmmc_embed, compiled_siglip, tmp_path):
    text = read_manifest(compiled_siglip)["preprocessing"]["text"]
    assert (text["pad_to"], text["pad_id"], text["attend_to_padding"]) == (64, 3, True)
    assert text["padding_side"] == transformers.AutoTokenizer.from_pretrained(compiled_siglip / "student").padding_side
    feed = _token_feed(compiled_siglip, tmp_path / "ids.txt")  # unpadded ids, one text a line
    done = _run(lmmc_embed, compiled_siglip, tmp_path / "ids.txt", tmp_path / "emb.txt", "--threads", 1)
    assert done.returncode == 0, done.stderr
    got = np.loadtxt(tmp_path / "emb.txt", ndmin=2)
    ref = open_dir(compiled_siglip, backend="openvino").encode(TEXTS)
    assert np.abs(got - ref).max() <= 1e-4
    # Padded to the longest text only, the pooling would read another position: refused in Python too.
    with pytest.raises(LmmcError, match="text.xml reads texts padded to 64 tokens with the pad id .* the feed has"):
        load(_artifact(compiled_siglip, "text", "openvino", "fp32", "plain")).run(feed)
    (tmp_path / "long.txt").write_text(" ".join(["5"] * 65) + "\n")
    done = _run(lmmc_embed, compiled_siglip, tmp_path / "long.txt", tmp_path / "emb.txt")
    assert done.returncode != 0 and "reads texts of 64 tokens" in done.stderr


def test_bad_inputs_are_one_clear_message(lmmc_embed, compiled_out, tmp_path):
    (tmp_path / "bad.txt").write_text("12 7 x\n")
    done = _run(lmmc_embed, compiled_out, tmp_path / "bad.txt", tmp_path / "emb.txt")
    assert done.returncode == 1 and "line 1 is not token ids" in done.stderr
    # a blank line would shift every row after it; trailing blank lines are no sample
    (tmp_path / "gap.txt").write_text("5 6\n\n5 7 x\n")
    done = _run(lmmc_embed, compiled_out, tmp_path / "gap.txt", tmp_path / "emb.txt")
    assert done.returncode == 1 and "line 3 is not token ids" in done.stderr
    (tmp_path / "gap.txt").write_text("5 6\n\n5 7\n")
    done = _run(lmmc_embed, compiled_out, tmp_path / "gap.txt", tmp_path / "emb.txt")
    assert done.returncode == 1 and "line 2 holds no token ids; every line is one sample" in done.stderr
    (tmp_path / "odd.f32").write_bytes(b"\0" * 10)
    done = _run(lmmc_embed, compiled_out, tmp_path / "odd.f32", tmp_path / "emb.txt", "--tower", "vision")
    assert done.returncode == 1 and "not a whole number of float32 images of 3072 values" in done.stderr
    done = _run(lmmc_embed, compiled_out, tmp_path / "bad.txt", tmp_path / "emb.txt", "--precision", "fp16")
    assert done.returncode == 2 and "usage: lmmc_embed" in done.stderr
    done = _run(lmmc_embed, compiled_out, tmp_path / "bad.txt", tmp_path / "emb.txt", "--inference", "fp16")
    assert done.returncode == 2 and "--inference is f32 or bf16" in done.stderr
    done = _run(lmmc_embed, tmp_path, tmp_path / "bad.txt", tmp_path / "emb.txt")
    assert done.returncode == 1 and "manifest.json" in done.stderr
    for value, message in [("0,12", "--static is BATCH or BATCH,SEQ, positive integers, not '0,12'"),
                           ("4", "--static needs BATCH,SEQ for a text tower")]:
        done = _run(lmmc_embed, compiled_out, tmp_path / "bad.txt", tmp_path / "emb.txt", "--static", value)
        assert done.returncode == 2 and message in done.stderr
    (tmp_path / "long.txt").write_text(" ".join(["5"] * 13) + "\n")
    done = _run(lmmc_embed, compiled_out, tmp_path / "long.txt", tmp_path / "emb.txt", "--static", "2,12")
    assert done.returncode == 1 and "has 13 token ids; --static compiles the model for 12 tokens" in done.stderr
    for value in ("abc", "-3", "0"):
        done = _run(lmmc_embed, compiled_out, tmp_path / "long.txt", tmp_path / "emb.txt", "--threads", value)
        assert done.returncode == 2 and f"--threads is a positive integer, not '{value}'" in done.stderr
    text = read_manifest(compiled_out)["preprocessing"]["text"]
    # OpenVINO reads an id outside the table as zeros: the sample refuses it, as lmmc.runtime does
    for wrong in (-7, text["vocab_size"]):
        (tmp_path / "ids.txt").write_text(f"5 {wrong} 6\n")
        done = _run(lmmc_embed, compiled_out, tmp_path / "ids.txt", tmp_path / "emb.txt")
        assert done.returncode == 1 and (f"line 1 holds token id {wrong}, outside this model's vocabulary "
                                         f"[0, {text['vocab_size']})") in done.stderr
    (tmp_path / "long.txt").write_text(" ".join(["5"] * (text["max_length"] + 1)) + "\n")
    done = _run(lmmc_embed, compiled_out, tmp_path / "long.txt", tmp_path / "emb.txt")
    assert done.returncode == 1 and (f"has {text['max_length'] + 1} token ids; this model reads at most "
                                     f"{text['max_length']} tokens") in done.stderr
    assert not (tmp_path / "emb.txt").exists()
    # pixels that hold a NaN gave a NaN row and exit 0
    pixels = np.zeros((3, 3, 32, 32), np.float32)
    pixels[1, 0, 4, 4] = np.nan
    (tmp_path / "nan.f32").write_bytes(pixels.tobytes())
    done = _run(lmmc_embed, compiled_out, tmp_path / "nan.f32", tmp_path / "emb.txt", "--tower", "vision")
    assert done.returncode == 1 and "holds a NaN or infinite value in image 1" in done.stderr
    # a full disk was reported as written
    (tmp_path / "ok.txt").write_text("5 6 7\n")
    done = _run(lmmc_embed, compiled_out, tmp_path / "ok.txt", "/dev/full")
    assert done.returncode == 1 and "could not write all of '/dev/full' (is the disk full?)" in done.stderr
    # a manifest's bad \u escape was a usage error (exit 2) saying only "stoul"
    broken = tmp_path / "broken"
    shutil.copytree(compiled_out, broken)
    manifest = broken / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", '{"x": "\\uZZ1f", ', 1))
    done = _run(lmmc_embed, broken, tmp_path / "ok.txt", tmp_path / "emb.txt")
    assert done.returncode == 1 and "invalid JSON at byte" in done.stderr and "bad \\u escape" in done.stderr
    # OpenVINO's message for a missing weights file named a check in its sources and no file
    lost = tmp_path / "lost"
    shutil.copytree(compiled_out, lost)
    (lost / "openvino" / "text.bin").unlink()
    done = _run(lmmc_embed, lost, tmp_path / "ok.txt", tmp_path / "emb.txt")
    assert done.returncode == 1 and (f"'openvino/text.bin', which the manifest lists, is missing from '{lost}'; copy "
                                     f"the whole output directory, or compile again") in done.stderr, done.stderr



def test_an_edited_manifest_is_refused_not_followed(lmmc_embed, compiled_out, tmp_path):
    """The sample read an artifact a manifest named outside the folder, and a size of 0 in an image shape
    killed it with a floating-point exception (a huge pad_to: bad_alloc)."""
    (tmp_path / "ok.txt").write_text("5 6 7\n")
    (tmp_path / "zero.f32").write_bytes(np.zeros((1, 3, 32, 32), np.float32).tobytes())
    original = json.loads((compiled_out / "manifest.json").read_text())

    def path_outside(m):
        for a in m["artifacts"]:
            a["path"] = "../" + a["path"]

    def zero_dim(m):
        for a in m["artifacts"]:
            if a["tower"] == "vision":
                a["inputs"][0]["shape"][1] = 0

    def huge_length(m):
        m["preprocessing"]["text"]["max_length"] = 10**15

    for edit, tower, data, message in [
            (path_outside, "text", "ok.txt", "the manifest names '../"),
            (zero_dim, "vision", "zero.f32", "the manifest's image input's shape is not a whole number from 1 to 65536"),
            (huge_length, "text", "ok.txt", "preprocessing.text.max_length is not a whole number from 1 to 1048576")]:
        edited = tmp_path / edit.__name__
        shutil.copytree(compiled_out, edited)
        manifest = json.loads(json.dumps(original))
        edit(manifest)
        (edited / "manifest.json").write_text(json.dumps(manifest))
        done = _run(lmmc_embed, edited, tmp_path / data, tmp_path / "emb.txt", "--tower", tower)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert not (tmp_path / "emb.txt").exists()
