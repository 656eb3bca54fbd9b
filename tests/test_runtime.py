"""lmmc.runtime and manifest.json: a whole compile's artifacts, each loaded by the one runtime and
matching the PyTorch student; encode() applies the saved preprocessing; bad input is one clear error."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner

from lmmc.adapters import TowerModule, get_adapter
from lmmc.cli import main
from lmmc.errors import LmmcError
from lmmc.export.validate import cosine
from lmmc.runtime import load, open_dir, open_generative
from lmmc.student import load_student
from tests.conftest import save_preprocessors, save_tiny

RECIPE = {
    "calibration": {"random": True, "samples": 16, "eval_samples": 32, "batch_size": 8, "max_length": 12},
    "passes": [{"antgmm": {"keep": 0.6, "budget": "flops", "importance": "activation"}}],
    "export": ["onnx", {"ort": {"fuse": "on", "latency_batch": 2, "latency_seq": 8, "repeats": 3}}, "openvino"],
    "validate": {"latency": False, "max_runtime_diff": 1e-4, "min_cosine_int8": 0.98},
}
TEXTS = ["a b c", "hello world again", "one", "the quick brown fox jumps"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A tiny CLIP (two towers) compiled with every deployment export."""
    tmp = tmp_path_factory.mktemp("rt")
    torch.set_num_threads(1)
    model_dir = save_tiny("clip", tmp / "teacher")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(recipe), "-o", str(tmp / "out")])
    assert result.exit_code == 0, result.output
    return tmp / "out"


def test_manifest_lists_every_artifact_with_io_and_validation(compiled):
    manifest = json.loads((compiled / "manifest.json").read_text())
    kinds = sorted((a["tower"], a["backend"], a["precision"], a["variant"]) for a in manifest["artifacts"])
    assert kinds == sorted((t, *k) for t in ("text", "vision") for k in [
        ("onnxruntime", "fp32", "plain"), ("onnxruntime", "fp32", "fused"), ("onnxruntime", "int8", "dynamic"),
        ("onnxruntime", "int8", "static"), ("openvino", "fp32", "plain"), ("openvino", "int8", "nncf")])
    assert manifest["towers"] == {"text": {"modality": "text", "normalized": True},
                                  "vision": {"modality": "image", "normalized": True}}
    # The text tower's 64 positions: the tiny tokenizer declares no limit, and calibration's 12 is not the
    # deployment's (text_truncation)
    assert manifest["preprocessing"]["text"]["max_length"] == 64
    for modality in ("text", "image"):
        files = manifest["preprocessing"][modality]["files"]
        assert files and all((compiled / f).is_file() for f in files)
        # the student's model card is no tokenizer file: encode needs only what preprocessing needs
        assert (compiled / "student" / "README.md").is_file() and "student/README.md" not in files
    for a in manifest["artifacts"]:
        bin_file = [a["path"].removesuffix(".xml") + ".bin"] if a["backend"] == "openvino" else []
        assert a["files"] == [a["path"], *bin_file] and all((compiled / f).is_file() for f in a["files"])
        assert a["bytes"] == sum((compiled / f).stat().st_size for f in a["files"])
        ins = {i["name"]: (i["dtype"], i["shape"]) for i in a["inputs"]}
        if a["tower"] == "text":
            assert ins == {"input_ids": ("int64", [None, None]), "attention_mask": ("int64", [None, None])}
        else:
            assert ins == {"pixel_values": ("float32", [None, 3, 32, 32])}
        outs = {o["name"]: o["dtype"] for o in a["outputs"]}
        assert outs == {"last_hidden_state": "float32", "pooled_embedding": "float32"}
        v = a["validation"]
        if a["precision"] == "fp32":
            assert max(v["max_abs_diff"].values()) <= 1e-4
        else:
            assert v["cosine_to_student"] >= 0.98 and "cosine_to_teacher" in v


def test_every_artifact_loads_and_matches_the_pytorch_student(compiled):
    student = load_student(compiled / "student")
    manifest = json.loads((compiled / "manifest.json").read_text())
    adapter = get_adapter(student.config.model_type)
    gen = torch.Generator().manual_seed(1)
    for a in manifest["artifacts"]:
        tower = adapter.tower(a["tower"])
        if tower.modality == "text":
            ids = torch.randint(0, 99, (32, 10), generator=gen)
            mask = torch.ones_like(ids)
            mask[16:, 6:] = 0
            inputs = (ids, mask)
        else:
            inputs = (torch.randn(32, 3, 32, 32, generator=gen),)
        with torch.no_grad():
            ref = [r.numpy() for r in TowerModule(student, tower)(*inputs)]
        model = load(compiled / a["path"], threads=1)
        assert model.backend == a["backend"]
        assert model.output_names == ["last_hidden_state", "pooled_embedding"]
        got = model.run({n: t.numpy() for n, t in zip(model.input_names, inputs)})
        if a["precision"] == "fp32":
            assert np.abs(got["last_hidden_state"] - ref[0]).max() <= 1e-4, a["path"]
            assert np.abs(got["pooled_embedding"] - ref[1]).max() <= 1e-4, a["path"]
        else:  # the INT8 gate's figure, the mean; on a tiny random model single samples keep 0.93-0.98
            cos = cosine(got["pooled_embedding"], ref[1])
            assert cos.mean() >= 0.98 and cos.min() >= 0.9, (a["path"], cos.mean(), cos.min())


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_encode_applies_the_saved_tokenizer(compiled, backend):
    student = load_student(compiled / "student")
    tokenizer = transformers.AutoTokenizer.from_pretrained(compiled / "student")
    texts = [*TEXTS, "the water " * 40]  # 80 words: cut to the tower's 64 positions, not to calibration's 12
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        ref = TowerModule(student, get_adapter("clip").tower("text"))(enc["input_ids"], enc["attention_mask"])[1]
    got = open_dir(compiled, backend=backend, threads=1).encode(texts, batch_size=3)
    assert got.shape == tuple(ref.shape)
    assert np.abs(got - ref.numpy()).max() <= 1e-4


def test_deployed_texts_are_cut_where_the_models_users_cut_them(tmp_path, minilm):
    from lmmc.modelio import load_teacher, text_truncation

    def truncation(ref) -> int:
        model, adapter, preprocessor = load_teacher(str(ref))
        return text_truncation(model.config, adapter, preprocessor)

    assert truncation(minilm) == 256  # sentence-transformers' max_seq_length; its tokenizer says 512
    teacher = save_tiny("bert", tmp_path / "bert")
    assert truncation(teacher) == 64  # the tokenizer declares no limit: the 64 positions
    transformers.AutoTokenizer.from_pretrained(teacher, model_max_length=20).save_pretrained(teacher)
    assert truncation(teacher) == 20


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_more_tokens_than_the_positions_is_one_clear_error(compiled, backend):
    path = compiled / {"onnxruntime": "onnx/text.onnx", "openvino": "openvino/text.xml"}[backend]
    ids = np.full((2, 70), 7, dtype=np.int64)  # the tower has 64 positions
    with pytest.raises(LmmcError, match=r"input_ids \[2, 70\].*More tokens than the model's position table"):
        load(path, backend, threads=1).run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    # a model that has run before, on another shape, and the same one run again afterwards
    model = load(path, backend, threads=1)
    if backend == "openvino":
        assert model.tokens == 64  # found by OpenVINO's shape inference, before any run
    short = np.full((3, 5), 7, dtype=np.int64)
    first = model.run({"input_ids": short, "attention_mask": np.ones_like(short)})
    for _ in range(2):
        with pytest.raises(LmmcError, match=r"input_ids \[2, 70\].*More tokens than the model's position table"):
            model.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    again = model.run({"input_ids": short, "attention_mask": np.ones_like(short)})
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_encode_applies_the_saved_image_processor(compiled, tmp_path):
    from PIL import Image

    student = load_student(compiled / "student")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]
    images[1].save(tmp_path / "one.png")
    processor = transformers.AutoImageProcessor.from_pretrained(compiled / "student")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = TowerModule(student, get_adapter("clip").tower("vision"))(pixels)[1].numpy()
    deployed = open_dir(compiled, threads=1)
    got = deployed.encode([images[0], tmp_path / "one.png", images[2]], batch_size=2)  # an image or its path
    assert np.abs(got - ref).max() <= 1e-4


def test_an_image_reads_the_same_as_a_file_or_a_picture_upright_and_over_white(compiled, tmp_path):
    """A path and the PIL image of the same file give one embedding: EXIF orientation applied (as
    transformers' load_image does), transparency laid over white, other modes converted to RGB."""
    from PIL import Image

    rng = np.random.default_rng(1)
    upright = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    sideways = upright.transpose(Image.Transpose.ROTATE_270)  # stored as a camera does, with orientation 8
    exif = sideways.getexif()
    exif[0x0112] = 8
    sideways.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    clear = Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA")
    clear.save(tmp_path / "clear.png")
    over_white = Image.alpha_composite(Image.new("RGBA", clear.size, (255, 255, 255)), clear).convert("RGB")
    grey = Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L")
    deployed = open_dir(compiled, threads=1)
    got = deployed.encode([tmp_path / "photo.jpg", tmp_path / "clear.png", clear, grey])
    with Image.open(tmp_path / "photo.jpg") as stored:
        # what orientation 8 asks a viewer to do, as pixels alone (transpose keeps the tag, which says rotate)
        turned = Image.fromarray(np.asarray(stored.transpose(Image.Transpose.ROTATE_90)))
    ref = deployed.encode([turned, over_white, over_white, grey.convert("RGB")])
    assert np.abs(got - ref).max() <= 1e-6
    with Image.open(tmp_path / "photo.jpg") as opened:  # the PIL image of the file, tag and all
        assert np.abs(got[0] - deployed.encode([opened])[0]).max() <= 1e-6
        as_stored = Image.fromarray(np.asarray(opened))  # the same pixels without the tag
        by_hand = opened.transpose(Image.Transpose.ROTATE_90)  # turned upright by the user; PIL keeps the tag
        assert by_hand.getexif().get(0x0112) == 8
        assert np.abs(got[0] - deployed.encode([by_hand])[0]).max() <= 1e-6
    assert np.abs(got[0] - deployed.encode([as_stored])[0]).max() > 1e-3
    with pytest.raises(LmmcError, match="an image has mode I;16 .* not a picture; convert it to 8-bit RGB"):
        deployed.encode([Image.fromarray(np.zeros((40, 40), np.uint16))])


def test_a_pil_image_that_cannot_be_read_is_refused_as_its_file_is(compiled, tmp_path):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    (tmp_path / "whole.png").write_bytes(buffer.getvalue())
    deployed = open_dir(compiled, threads=1)
    with pytest.raises(LmmcError, match="cannot read image '.*cut.png': image file is truncated"):
        deployed.encode([tmp_path / "cut.png"])
    with pytest.raises(LmmcError, match="cannot read an image: image file is truncated; pass an open, whole image"):
        deployed.encode([Image.open(tmp_path / "cut.png")])
    with Image.open(tmp_path / "whole.png") as closed:
        pass
    with pytest.raises(LmmcError, match="cannot read an image: it was closed"):
        deployed.encode([closed])
    for empty in (Image.new("RGB", (0, 0)), Image.new("RGB", (5, 0))):
        with pytest.raises(LmmcError, match="an image is .* pixels: a picture without pixels"):
            deployed.encode([empty])
    with Image.open(tmp_path / "whole.png") as opened:  # an open one reads as its file
        assert np.abs(deployed.encode([opened]) - deployed.encode([tmp_path / "whole.png"])).max() == 0


def test_encode_takes_one_kind_of_item_in_any_list_and_refuses_the_rest(compiled):
    from PIL import Image

    deployed = open_dir(compiled, threads=1)
    listed = deployed.encode(TEXTS)
    assert np.abs(deployed.encode(t for t in TEXTS) - listed).max() == 0  # any iterable
    assert np.abs(deployed.encode(np.array(TEXTS)) - listed).max() == 0
    assert deployed.encode([]).shape == (0, 16)  # both towers project to 16
    assert deployed.encode([], tower="vision").shape == (0, 16)
    picture = Image.new("RGB", (40, 40))
    for items, message in [
            ("a b c", "encode takes a list of texts or images, and got one str; wrap it in a list: encode\(\[item\]\)"),
            (picture, "got one Image; wrap it in a list"),
            (["a", 3], "item 1 is int where item 0 is str"),
            ([picture, "photo.png"], "item 1 is str where item 0 is Image"),
            ([b"a b c"], "item 0 of encode's list is bytes; pass texts as str"),
            (["a", None], "item 1 of encode's list is NoneType"),
            (["a", "b\ud800"], "item 1 of encode's list holds a lone surrogate"),
            ({"a b": 1}, "not a dict; pass list\\(d.values\\(\\)\\) to encode its values"),
            ({"a b", "c"}, "not a set, whose order is not the same in every process; pass a list"),
            (np.array([["a", "b"], ["c", "d"]]), "got an array of shape \\[2, 2\\]; pass a one-dimensional one")]:
        with pytest.raises(LmmcError, match=message):
            deployed.encode(items)
    with pytest.raises(LmmcError, match="has no tower 'image'; its towers are \['text', 'vision'\]"):
        deployed.encode(TEXTS, tower="image")
    with pytest.raises(LmmcError, match="the vision tower reads image, and the items are text"):
        deployed.encode(TEXTS, tower="vision")
    with pytest.raises(LmmcError, match="batch_size must be a positive integer, not 0"):
        deployed.encode(TEXTS, batch_size=0)
    with pytest.raises(LmmcError, match="batch_size must be a positive integer, not True"):
        deployed.encode(TEXTS, batch_size=True)


def test_a_str_naming_an_image_file_is_refused_where_a_tower_reads_pictures(compiled, tmp_path):
    """A str is text; one that names an existing picture was meant as the picture, and would have come back as
    the embedding of its file name."""
    from PIL import Image

    deployed = open_dir(compiled, threads=1)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    name = str(tmp_path / "red.png")
    with pytest.raises(LmmcError, match=f"item 1 of encode's list is the str '{name}', which names an image file; "
                                        f"a str is always text: pass pathlib.Path"):
        deployed.encode(["a photo", name])
    words = deployed.encode(["a photo", name], tower="text")  # asked for in words, it is text
    assert np.abs(words[1:] - deployed.encode([name], tower="text")).max() < 1e-6
    picture = deployed.encode([Path(name)])
    assert np.abs(picture - words[1:]).max() > 0.1
    assert deployed.encode(["see " + "x" * 300 + ".png"]).shape == (1, 16)  # too long for a file name: text
    with pytest.raises(LmmcError, match="cannot read image '.*missing.png': .*; pass the path of a readable PNG or "
                                        "JPEG picture"):
        deployed.encode([tmp_path / "missing.png"])


def test_an_output_opened_by_a_relative_path_encodes_after_the_working_directory_changes(compiled, monkeypatch):
    monkeypatch.chdir(compiled.parent)
    deployed = open_dir(compiled.name, threads=1)
    monkeypatch.chdir("/")
    assert np.abs(deployed.encode(TEXTS) - open_dir(compiled, threads=1).encode(TEXTS)).max() == 0


def test_an_image_array_reads_as_the_picture_of_its_pixels(compiled):
    from PIL import Image

    deployed = open_dir(compiled, threads=1)
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 255, (40, 44, 4), dtype=np.uint8)
    grey = rgba[..., 0]
    pictures = [Image.fromarray(rgba[..., :3]), Image.fromarray(rgba, "RGBA"), Image.fromarray(grey, "L")]
    ref = deployed.encode(pictures)
    for arrays in ([rgba[..., :3], rgba, grey], [rgba[..., :3].transpose(2, 0, 1), rgba.astype(np.int64), grey[..., None]]):
        assert np.abs(deployed.encode(arrays) - ref).max() <= 1e-6
    floats = deployed.encode([rgba[..., :3] + 0.3, rgba.astype(np.float32) + 0.4])  # pixels rounded, as PIL holds them
    assert np.abs(floats - ref[:2]).max() <= 1e-6
    # 1, 3 or 4 pixels high: an image processor given the array would take its height for the channels
    short = [rgba[:h, :, :3] for h in (1, 3, 4)] + [rgba[:4, :4, :3]]
    ref = deployed.encode([Image.fromarray(a) for a in short])
    assert np.abs(deployed.encode(short) - ref).max() <= 1e-6
    # premultiplied grey with alpha, which PIL converts only to plain grey with alpha
    la = Image.fromarray(rgba[..., :2], "LA")
    assert np.abs(deployed.encode([la.convert("La")]) - deployed.encode([la.convert("La").convert("LA")])).max() <= 1e-6
    for item, message in [
            # the fix it gave, encode(stack), is refused in turn
            (np.stack([rgba[..., :3]] * 2), "an array of shape \\[2, 40, 44, 3\\]; one picture is .* a stack of them "
                                            "as list\\(stack\\)\\)$"),
            (rgba[:0], "a picture without pixels"),
            (rgba[..., :3] / 255.0, "float pixels within \\[0, 0.996\\]; .* multiply it by 255"),
            # a [0, 1] picture that a resize overshot: read as 0-255, it was a black picture
            (np.minimum(rgba[..., :3] / 240.0, 1.04), "float pixels within \\[0, 1.04\\]; .* multiply it by 255"),
            (rgba.astype(np.uint16) * 256, "pixel values from 0 to 65024"),
            (3, "item 0 of encode's list is int")]:
        with pytest.raises(LmmcError, match=message):
            deployed.encode([item])
    # one picture, not 40 or 3 (a torch tensor was read as three grey pictures)
    for lone in (np.zeros((40, 48, 3), np.uint8), np.zeros((3, 40, 48), np.float32), torch.zeros(3, 40, 48)):
        with pytest.raises(LmmcError, match=f"got one array of shape \\{list(lone.shape)}; an array is one picture: "
                                            "wrap it in a list"):
            deployed.encode(lone)


def test_a_directory_without_its_tokenizer_files_is_an_error_not_a_blank_tokenizer(compiled, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    (out / "student" / "tokenizer.json").unlink()  # transformers would build an empty vocabulary from config.json
    with pytest.raises(LmmcError, match="lacks \\['student/tokenizer.json'\\], the tokenizer files its manifest lists"):
        open_dir(out, threads=1)


def test_an_output_whose_tokenizer_was_swapped_warns_as_it_opens(compiled, tmp_path):
    """Another tokenizer of the same size in student/ encoded other numbers than those the manifest vouches
    for, without a word: the file list's digests say which files are no longer the compile's."""
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        reference = open_dir(out, threads=1).encode(TEXTS)
    assert not [w for w in seen if "not what the compile wrote" in str(w.message)]
    tok = transformers.AutoTokenizer.from_pretrained(out / "student")
    first, second = [t for t in tok.convert_ids_to_tokens(tok(TEXTS[1])["input_ids"]) if t not in tok.all_special_tokens][:2]
    spec = json.loads((out / "student" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (out / "student" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.warns(UserWarning, match="student/tokenizer.json in .* is not what the compile wrote .* restore the "
                                         "compile's files, or compile again"):
        swapped = open_dir(out, threads=1).encode(TEXTS)
    assert np.abs(swapped[1] - reference[1]).max() > 1e-3 and np.array_equal(swapped[0], reference[0])


def test_a_directory_replaced_while_it_is_opened_is_an_error_not_a_mixed_deployment(compiled, tmp_path, monkeypatch):
    # a compile --force puts its output in place between the manifest's reading and the graphs' loading
    import lmmc.runtime

    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    newer = tmp_path / "newer"
    shutil.copytree(compiled, newer)
    (newer / ".lmmc-files.json").write_text((newer / ".lmmc-files.json").read_text() + " ")
    loaded = lmmc.runtime.load

    def load_as_the_folder_is_replaced(*args, **kwargs):
        if newer.exists():
            out.rename(tmp_path / "older")
            newer.rename(out)
        return loaded(*args, **kwargs)

    monkeypatch.setattr(lmmc.runtime, "load", load_as_the_folder_is_replaced)
    with pytest.raises(LmmcError, match="was replaced by a compile while it was being opened, so its manifest and "
                                        "its artifacts may belong to different compiles; open it again"):
        open_dir(out, threads=1)
    monkeypatch.setattr(lmmc.runtime, "load", loaded)
    assert np.abs(open_dir(out, threads=1).encode(TEXTS) - open_dir(compiled, threads=1).encode(TEXTS)).max() == 0


def test_two_threads_encoding_at_once_on_a_fresh_process_agree(compiled):
    """The tokenizer and image processor are read when the folder is opened: threads' first encodes used to
    import transformers together, and one of them failed on the half-imported module."""
    code = f"""
import threading, numpy as np
from lmmc.runtime import open_dir
d = open_dir({str(compiled)!r}, threads=1)
barrier, got = threading.Barrier(2), [None, None]
def go(i):
    barrier.wait()
    got[i] = d.encode({TEXTS!r})
threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
print(float(np.abs(got[0] - got[1]).max()))
"""
    for _ in range(3):  # the failure needed two imports racing, which a fresh process gives most times
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and run.stdout.split() == ["0.0"], run.stdout + run.stderr


def test_threads_opening_the_folder_at_once_on_a_fresh_process_each_get_a_deployment(compiled):
    """A server's workers each opening the folder: all but one of them failed on transformers half-imported
    (no attribute 'AutoTokenizer') while another thread's first read imported it."""
    code = f"""
import threading, numpy as np
from lmmc.runtime import open_dir
barrier, got = threading.Barrier(4), [None] * 4
def go(i):
    barrier.wait()
    got[i] = open_dir({str(compiled)!r}, threads=1).encode({TEXTS!r})
threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(max(float(np.abs(g - got[0]).max()) for g in got))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["0.0"], run.stdout + run.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is a POSIX call")
def test_a_process_forked_while_a_thread_tokenizes_encodes_in_the_child(compiled):
    """The tokenizer's lock, held by a parent's thread at the fork, stayed held in the child, whose first
    encode then waited forever. The parent's lock is held here as a tokenizing thread holds it."""
    code = f"""
import os, time, numpy as np
from lmmc.runtime import open_dir
d = open_dir({str(compiled)!r}, threads=1)
want = d.encode(["a b c"])
d._tokenizing.acquire()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, repr(float(np.abs(d.encode(["a b c"]) - want).max())).encode())
    os._exit(0)
os.close(w)
deadline = time.time() + 60
while not os.waitpid(pid, os.WNOHANG)[0]:
    if time.time() > deadline:
        os.kill(pid, 9); os.waitpid(pid, 0); break
    time.sleep(0.05)
print(os.read(r, 100).decode() or "hung")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["0.0"], run.stdout + run.stderr


def test_a_folder_moved_after_opening_keeps_its_tokenizer(compiled, tmp_path):
    shutil.copytree(compiled, tmp_path / "a")
    deployed = open_dir(tmp_path / "a", threads=1)
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert np.abs(deployed.encode(TEXTS) - open_dir(tmp_path / "b", threads=1).encode(TEXTS)).max() == 0


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_feed_the_model_cannot_take_is_one_clear_error_before_it_runs(compiled, backend):
    suffix = {"onnxruntime": "onnx/{}.onnx", "openvino": "openvino/{}.xml"}[backend]
    text, vision = (load(compiled / suffix.format(t), backend, threads=1) for t in ("text", "vision"))
    name = text.path.name
    ids = np.full((2, 5), 7, dtype=np.int64)
    for feed, message in [
            ({"input_ids": ids[0], "attention_mask": ids[0]}, f"{name} takes 'input_ids' of shape \['any', 'any'\], "
                                                             f"and the feed has \[5\]"),
            ({"input_ids": ids, "attention_mask": np.ones((3, 5))}, "disagree on the batch size"),
            ({"input_ids": ids[:, :0], "attention_mask": ids[:, :0]}, "'input_ids' of shape \[2, 0\] is empty"),
            ({"input_ids": ids - 8, "attention_mask": ids}, "'input_ids' holds id -1; token ids are never negative"),
            # ONNX Runtime failed with its own INVALID_ARGUMENT text; OpenVINO reads such rows as zeros
            ({"input_ids": ids + 10**6, "attention_mask": ids > 0}, f"'input_ids' holds id 1000007, outside the \\d+ rows "
                                                                f"of the table {name} looks it up in"),
            ({"input_ids": ids + 0.5, "attention_mask": ids}, "'input_ids' holds fractions"),
            ({"input_ids": np.full((2, 5), np.nan), "attention_mask": ids}, "'input_ids' holds NaN or infinite values"),
            # a mask fed as ids ran as ids 0 and 1
            ({"input_ids": ids > 0, "attention_mask": ids}, "'input_ids' holds booleans, .* only attention_mask may be"),
            ([ids, ids], f"{name} takes a dict of input name -> array, not list"),
            ({"input_ids": ids.astype(str), "attention_mask": ids}, "'input_ids' holds <U21 values"),
            ({"input_ids": [[1, 2], [3]], "attention_mask": ids}, "'input_ids' is not an array"),
            # a value the model never reads was dropped without a word
            ({"input_ids": ids, "attention_mask": ids, "position_ids": ids}, f"{name} takes no input\\(s\\) "
                                                                            f"\\['position_ids'\\]; its inputs are"),
            # a sentence pair: dropping its segment ids, as the message above advises, reads both texts as one
            ({"input_ids": ids, "attention_mask": ids, "token_type_ids": np.array([[0, 0, 1, 1, 1]] * 2)},
             f"{name} reads every token as segment 0, and the feed's token_type_ids mark a second segment"),
            # OpenVINO ran this, and its request then answered later, correct feeds with stale outputs
            ({"input_ids": ids, "attention_mask": np.ones((2, 3))}, "the token inputs of .* differ in shape"),
            ({"input_ids": ids, "attention_mask": -np.ones((2, 5))}, "'attention_mask' holds values other than 0 and 1"),
            # one backend gave zeros for such a row, another NaN
            ({"input_ids": ids, "attention_mask": np.array([[1] * 5, [0] * 5])}, "'attention_mask' rows \\[1\\] mark no token")]:
        with pytest.raises(LmmcError, match=message):
            text.run(feed)
    # segment ids all 0 are what the model reads: a tokenizer's whole output feeds as it is
    mask = np.ones_like(ids)
    assert np.abs(text.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[
        "pooled_embedding"] - text.run({"input_ids": ids, "attention_mask": mask})["pooled_embedding"]).max() == 0
    with pytest.raises(LmmcError, match="takes 'pixel_values' of shape \['any', 3, 32, 32\], and the feed has "
                                        "\[1, 3, 40, 40\]"):
        vision.run({"pixel_values": np.zeros((1, 3, 40, 40), np.float32)})
    pixels = np.zeros((3, 3, 32, 32), np.float32)
    pixels[1, 0, 5, 5] = np.nan
    with pytest.raises(LmmcError, match="'pixel_values' holds NaN or infinite values.* \\(batch rows \\[1\\]\\)"):
        vision.run({"pixel_values": pixels})
    big = np.zeros((3, 3, 32, 32))  # float64, finite, but infinite as the float32 the model takes
    big[2, 1, 0, 0] = 1e300
    with pytest.raises(LmmcError, match="values beyond float32 \\(batch rows \\[2\\]\\)"):
        vision.run({"pixel_values": big})
    with pytest.raises(LmmcError, match=f"'input_ids' holds 9223372036854775813, beyond the int64 {name} takes"):
        text.run({"input_ids": np.full((1, 5), 2**63 + 5, np.uint64), "attention_mask": ids[:1]})
    # An id past the 99-token vocabulary: ONNX Runtime's Gather fails, OpenVINO's would return zeros.
    with pytest.raises(LmmcError, match="id 99|Gather"):
        text.run({"input_ids": ids + 92, "attention_mask": np.ones_like(ids)})
    for threads in (0, 10**20):
        with pytest.raises(LmmcError, match="threads must be an integer from 1 to 1024"):
            load(text.path, backend, threads=threads)


def test_an_artifact_that_gives_nan_is_an_error_not_an_embedding(compiled, tmp_path):
    import shutil

    import onnx
    from onnx import numpy_helper

    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    model = onnx.load(out / "onnx" / "text.onnx")
    # A weight of the last layer norm made NaN, as an overflow in a reduced-precision artifact would.
    init = next(i for i in reversed(model.graph.initializer) if i.data_type == onnx.TensorProto.FLOAT
                and numpy_helper.to_array(i).ndim == 1)
    init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name))
    onnx.save(model, out / "onnx" / "text.onnx")
    deployed = open_dir(out, variant="plain", threads=1)
    with pytest.raises(LmmcError, match="the text tower's artifact text.onnx gave NaN or infinite embeddings for "
                                        "item\\(s\\) \\[0, 1, 2, 3\\]; try the fp32 artifact"):
        deployed.encode(TEXTS)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_threads_sharing_one_loaded_model_each_get_their_own_results(compiled, backend):
    from concurrent.futures import ThreadPoolExecutor

    deployed = open_dir(compiled, backend=backend, threads=1)
    batches = [[f"{w} " * (1 + 3 * i) for w in TEXTS[:1 + i % 4]] for i in range(8)]
    expected = [deployed.encode(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: deployed.encode(batches[i % 8]), range(64)))
    for i, g in enumerate(got):
        assert g.shape == expected[i % 8].shape and np.abs(g - expected[i % 8]).max() <= 1e-6, i


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_runtime_needs_no_torch(compiled, tmp_path, backend):
    """lmmc.runtime runs where PyTorch is not installed (an edge device): the same embeddings."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    script = (f"import sys, numpy as np\n"
              f"sys.modules['torch'] = sys.modules['torchvision'] = None  # as if not installed\n"
              f"from pathlib import Path\n"
              f"import lmmc.runtime\n"
              f"d = lmmc.runtime.open_dir({str(compiled)!r}, backend={backend!r}, threads=1)\n"
              f"np.save({str(tmp_path / 'text.npy')!r}, d.encode({TEXTS!r}))\n"
              f"np.save({str(tmp_path / 'image.npy')!r}, d.encode([Path({str(tmp_path / 'a.png')!r})]))\n"
              f"assert not any(m.startswith('torch') for m, v in sys.modules.items() if v is not None)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    deployed = open_dir(compiled, backend=backend, threads=1)
    assert np.abs(np.load(tmp_path / "text.npy") - deployed.encode(TEXTS)).max() <= 1e-6
    assert np.abs(np.load(tmp_path / "image.npy") - deployed.encode([tmp_path / "a.png"])).max() <= 1e-6


def test_static_shape_pads_any_batch_up_to_the_compiled_shape(compiled):
    """An IR compiled for one input shape: static inputs, and feeds of any batch and any length up to the
    shape give the dynamic IR's outputs (fp32 within 1e-5, INT8 at cosine 0.99), shape for shape."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 99, (5, 7))
    mask = np.ones_like(ids)
    mask[4, 3:] = 0
    feeds = {"text": ({"input_ids": ids, "attention_mask": mask}, (2, 12), [(2, 12), (2, 12)]),
             "vision": ({"pixel_values": rng.standard_normal((5, 3, 32, 32)).astype(np.float32)}, (2,), [(2, 3, 32, 32)])}
    for tower, (feed, shape, inputs) in feeds.items():
        for name in (f"{tower}.xml", f"{tower}.int8.xml"):
            path = compiled / "openvino" / name
            dynamic, static = load(path, threads=1), load(path, threads=1, static_shape=shape)
            assert [s.shape for s in static.inputs] == inputs
            ref, got = dynamic.run(feed), static.run(feed)
            assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
            assert got["last_hidden_state"].shape[0] == 5
            if "int8" in name:
                assert cosine(got["pooled_embedding"], ref["pooled_embedding"]).min() >= 0.99, name
            else:
                for k in ref:
                    assert np.abs(got[k] - ref[k]).max() <= 1e-5, (name, k)
    texts = open_dir(compiled, backend="openvino", threads=1).encode(TEXTS)  # 21 tokens at most
    padded = open_dir(compiled, backend="openvino", threads=1, static_shape=(3, 24)).encode(TEXTS)
    assert np.abs(padded - texts).max() <= 1e-5
    # A static shape shorter than a text cuts the text there.
    enc = transformers.AutoTokenizer.from_pretrained(compiled / "student")(
        TEXTS, padding=True, truncation=True, max_length=12, return_tensors="np")
    cut = load(compiled / "openvino" / "text.xml", threads=1).run(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})["pooled_embedding"]
    # 64: what encode reads without a static shape, not the 12 calibration read (a warning at every (8, 128) on MiniLM)
    with pytest.warns(UserWarning, match="static_shape's 12 tokens are fewer than the 64 that .*'s encode\\(\\) reads "
                                         "otherwise \\(its tokenizer's limit\\): encode\\(\\) cuts every text to 12 tokens"):
        short = open_dir(compiled, backend="openvino", threads=1, static_shape=(3, 12)).encode(TEXTS)
    assert np.abs(short - cut).max() <= 1e-5 and np.abs(short - texts).max() > 1e-3



def test_a_static_shape_for_texts_read_at_a_fixed_length_takes_that_length(compiled, tmp_path):
    """A model whose texts are padded to one length (SigLIP's pad_to): a static length other than it is
    refused when the directory is opened, not at the first encode; that length itself runs as it should."""
    fixed = tmp_path / "fixed"
    shutil.copytree(compiled, fixed)
    manifest = json.loads((fixed / "manifest.json").read_text())
    manifest["preprocessing"]["text"]["pad_to"] = 24
    (fixed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmmcError, match="reads every text padded to 24 tokens .* static_shape=\\(3, 24\\)"):
        open_dir(fixed, backend="openvino", threads=1, static_shape=(3, 16))
    padded = open_dir(fixed, backend="openvino", threads=1).encode(TEXTS)
    static = open_dir(fixed, backend="openvino", threads=1, static_shape=(3, 24)).encode(TEXTS)
    assert np.abs(static - padded).max() <= 1e-5
    # loaded alone, the IR still knows its texts come at that length: a shorter feed would be padded and pooled
    # at another position, so it is refused
    short = {"input_ids": np.full((2, 10), 7, np.int64), "attention_mask": np.ones((2, 10), np.int64)}
    for artifact, shape in (("openvino/text.xml", (2, 24)), ("openvino/text.xml", None), ("onnx/text.onnx", None)):
        with pytest.raises(LmmcError, match="text.(xml|onnx) reads texts padded to 24 tokens .* the feed has 10: pad it"):
            load(fixed / artifact, threads=1, static_shape=shape).run(short)
    whole = {k: np.pad(v, [(0, 0), (0, 14)]) for k, v in short.items()}
    static_ir = load(fixed / "openvino" / "text.xml", threads=1, static_shape=(2, 24))
    assert static_ir.run(whole)["pooled_embedding"].shape[0] == 2
    # and another static length is refused when the IR is loaded, as open_dir refuses it
    with pytest.raises(LmmcError, match="text.xml's text tower reads every text padded to 24 tokens .* "
                                        "static_shape=\\(2, 24\\)"):
        load(fixed / "openvino" / "text.xml", threads=1, static_shape=(2, 16))


def test_static_shape_bad_input_is_one_clear_error(compiled):
    text = compiled / "openvino" / "text.xml"
    longer = {"input_ids": np.ones((2, 13), np.int64), "attention_mask": np.ones((2, 13), np.int64)}
    with pytest.raises(LmmcError, match="compiled for inputs of 12 on axis 1 of 'input_ids', and the feed has 13"):
        load(text, threads=1, static_shape=(2, 12)).run(longer)
    with pytest.raises(LmmcError, match="has inputs of dynamic length; give static_shape as \\(batch, seq\\)"):
        load(text, threads=1, static_shape=(2,))
    with pytest.raises(LmmcError, match="a seq of 1000 past the model's position table is the usual cause"):
        load(text, threads=1, static_shape=(2, 1000))
    for shape in ((0, 12), 2, (True, 12)):
        with pytest.raises(LmmcError, match="static_shape must be \\(batch,\\) or \\(batch, seq\\) of positive integers"):
            load(text, threads=1, static_shape=shape)
    with pytest.raises(LmmcError, match="static_shape must be \\(batch,\\) or \\(batch, seq\\) of positive integers"):
        open_dir(compiled, backend="openvino", static_shape=8)
    with pytest.raises(LmmcError, match="static_shape \\(1000000000000, 8\\) holds a size past 2\\*\\*31 - 1"):
        load(compiled / "openvino" / "text.xml", static_shape=(10**12, 8))
    small = {"pixel_values": np.zeros((1, 3, 28, 28), np.float32)}  # not padded into a 32 x 32 image
    with pytest.raises(LmmcError, match="vision.xml takes 'pixel_values' of shape \\[2, 3, 32, 32\\] \\(any batch\\)"):
        load(compiled / "openvino" / "vision.xml", threads=1, static_shape=(2,)).run(small)
    with pytest.raises(LmmcError, match="static_shape is for OpenVINO IRs; text.onnx runs on onnxruntime"):
        load(compiled / "onnx" / "text.onnx", static_shape=(2, 12))


def test_torch_tensors_feed_as_their_values(compiled):
    """A tensor that requires grad, or holds bf16, has no numpy view: its values are fed, as an array's are."""
    text, vision = (load(compiled / "onnx" / f"{t}.onnx", threads=1) for t in ("text", "vision"))
    pixels = torch.rand(2, 3, 32, 32)
    ref = vision.run({"pixel_values": pixels.numpy()})["pooled_embedding"]
    got = vision.run({"pixel_values": pixels.clone().requires_grad_()})["pooled_embedding"]
    assert np.abs(got - ref).max() == 0
    ids = torch.tensor([[1, 5, 7, 2]])
    ref = text.run({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["pooled_embedding"]
    got = text.run({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bfloat16)})["pooled_embedding"]
    assert np.abs(got - ref).max() == 0
    deployed = open_dir(compiled, threads=1)
    picture = torch.randint(0, 255, (3, 40, 40)).float()
    assert np.abs(deployed.encode([picture.requires_grad_()]) - deployed.encode([picture.detach().numpy()])).max() == 0


def test_open_dir_names_what_is_missing(compiled, tmp_path):
    with pytest.raises(LmmcError, match="has no onnxruntime int8 fused artifact for the text tower"):
        open_dir(compiled, precision="int8", variant="fused")
    with pytest.raises(LmmcError, match="has no onnxruntime fp16 artifact for the text tower; it has"):
        open_dir(compiled, precision="fp16")
    with pytest.raises(LmmcError, match="OpenVINO opens an IR \\(.xml with its .bin\\), and 'text.onnx' is not one"):
        load(compiled / "onnx" / "text.onnx", backend="openvino")
    with pytest.raises(LmmcError, match="has no manifest.json"):
        open_dir(tmp_path)
    with pytest.raises(LmmcError, match="text.onnx' is a file; open one artifact with load\\(\\), or pass its compile"):
        open_dir(compiled / "onnx" / "text.onnx")
    with pytest.raises(LmmcError, match="manifest.json' is a compile manifest; .* open a compile's whole output with open_dir"):
        load(compiled / "manifest.json")
    assert open_dir(compiled / "manifest.json", threads=1).out_dir == compiled.resolve()
    with pytest.raises(LmmcError, match="open_dir takes the path of a compile's output directory, not NoneType"):
        open_dir(None)
    # None matched no artifact, and the message then listed several
    with pytest.raises(LmmcError, match="unknown backend None; choose one of onnxruntime, openvino, tensorrt$"):
        open_dir(compiled, backend=None)
    with pytest.raises(LmmcError, match="precision must name one, not None: .*'s onnxruntime artifacts are fp32, int8$"):
        open_dir(compiled, precision=None)
    for variant in (3, ""):  # "" matched nothing, and the message left it out
        with pytest.raises(LmmcError, match=f"variant must name one, such as 'fused'.*not {variant!r}$"):
            open_dir(compiled, variant=variant)
    with pytest.raises(LmmcError, match="open_generative takes the path of a compile's output directory, not NoneType"):
        open_generative(None)
    # 0 is GPU 0 to PyTorch: it ran on the CPU without a word
    for device in (0, "", False):
        with pytest.raises(LmmcError, match=f"unknown device '{device}'; use cpu, cuda or cuda:N"):
            load(compiled / "onnx" / "text.onnx", device=device)
    with pytest.raises(LmmcError, match="has no tower \\['text'\\]; its towers are"):
        open_dir(compiled, threads=1).encode(["a"], tower=["text"])
    copy = tmp_path / "copy"
    shutil.copytree(compiled, copy)
    (copy / "onnx" / "text.onnx").unlink()
    with pytest.raises(LmmcError, match="'onnx/text.onnx' is listed in .*manifest.json but missing; copy the whole "
                                        "output directory, or compile again"):
        open_dir(copy, variant="plain")
    (copy / "openvino" / "text.bin").unlink()  # the IR's weights, beside the .xml the entry's path names
    with pytest.raises(LmmcError, match="'openvino/text.bin' is listed in .*manifest.json but missing"):
        open_dir(copy, backend="openvino")


@pytest.mark.parametrize("backend, folder, suffix", [("onnxruntime", "onnx", ".onnx"), ("openvino", "openvino", ".xml")])
def test_an_artifact_replaced_by_another_models_file_is_refused(compiled, tmp_path, backend, folder, suffix):
    """Another model's graph copied over an artifact (whose digest open_dir does not read) encoded at its own
    width, without a word."""
    copy = tmp_path / "copy"
    shutil.copytree(compiled, copy)
    for ext in (suffix, ".bin") if backend == "openvino" else (suffix,):
        shutil.copy(copy / folder / f"vision{ext}", copy / folder / f"text{ext}")
    with pytest.raises(LmmcError, match=f"'{folder}/text{suffix}' in .* has inputs pixel_values float32\\[\\?, 3, 32, "
                                        f"32\\], but manifest.json lists input_ids int64\\[\\?, \\?\\], "
                                        f"attention_mask int64\\[\\?, \\?\\]: the file was replaced"):
        open_dir(copy, backend=backend, variant="plain" if backend == "onnxruntime" else None, threads=1)


def test_a_deployment_and_a_model_pickle_as_how_they_were_opened(compiled, tmp_path):
    """A process pool's workers receive them pickled; a runtime's session itself cannot be pickled."""
    import pickle

    deployed = open_dir(compiled, backend="openvino", precision="int8", threads=1)
    again = pickle.loads(pickle.dumps(deployed))
    assert again is not deployed and again.models["text"].path == deployed.models["text"].path
    assert np.abs(again.encode(TEXTS) - deployed.encode(TEXTS)).max() == 0
    model = load(compiled / "onnx" / "vision.onnx", threads=1)
    pixels = {"pixel_values": np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)}
    assert np.abs(pickle.loads(pickle.dumps(model)).run(pixels)["pooled_embedding"]
                  - model.run(pixels)["pooled_embedding"]).max() == 0
    # compiled again between the sending and the receiving: its artifacts are not the ones opened
    copy = tmp_path / "copy"
    shutil.copytree(compiled, copy)
    sent = pickle.dumps(open_dir(copy, threads=1))
    files = copy / ".lmmc-files.json"
    files.write_text(files.read_text() + " ")
    with pytest.raises(LmmcError, match="was compiled again since the process that sent this Deployment opened it"):
        pickle.loads(sent)


def _spins(model) -> bool:
    """Whether an ONNX Runtime session's idle worker threads spin for work (the runtime's default)."""
    try:
        return model.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    except RuntimeError:  # not set: the runtime's default
        return True


def test_two_towers_in_one_process_do_not_spin_in_each_others_turns(compiled, tmp_path):
    """A search service embeds a query text, then an image, in turns: each session's threads spinning after its
    run took the cores from the other's (a CLIP-size text tower 33 % slower; BENCHMARKS.md). The default stops
    them for two towers and keeps ONNX Runtime's own for one; `spinning` says otherwise."""
    import pickle

    deployed = open_dir(compiled, threads=1)
    assert {t: _spins(m) for t, m in deployed.models.items()} == {"text": False, "vision": False}
    spinning = open_dir(compiled, threads=1, spinning=True)
    assert {t: _spins(m) for t, m in spinning.models.items()} == {"text": True, "vision": True}
    assert np.abs(spinning.encode(TEXTS) - deployed.encode(TEXTS)).max() == 0
    assert [_spins(m) for m in pickle.loads(pickle.dumps(spinning)).models.values()] == [True, True]
    one = tmp_path / "one"  # the text tower alone
    shutil.copytree(compiled, one)
    manifest = json.loads((one / "manifest.json").read_text())
    del manifest["towers"]["vision"]
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["tower"] == "text"]
    (one / "manifest.json").write_text(json.dumps(manifest))
    (one / ".lmmc-files.json").unlink()  # the digests of the files as compiled, which the manifest no longer is
    alone = open_dir(one, threads=1)
    assert [_spins(m) for m in alone.models.values()] == [True]
    with pytest.raises(LmmcError, match="spinning is ONNX Runtime's setting, True, False or None; not False for openvino"):
        open_dir(compiled, backend="openvino", spinning=False)


def _identity_onnx(path):
    """A valid one-node ONNX file, which ONNX Runtime loads."""
    import onnx
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _tamper_path(m, outside):
    m["artifacts"][0]["path"] = "../outside.onnx"


def _tamper_absolute(m, outside):
    m["artifacts"][0]["path"] = str(outside)


def _tamper_files(m, outside):
    m["artifacts"][0]["files"] = ["onnx/text.onnx", "../outside.onnx"]


def _tamper_preprocessing(m, outside):
    m["preprocessing"]["text"]["files"] = [str(outside)]


NOT_A_MANIFEST = ("is not an lmmc manifest (each artifact needs a tower, backend, precision and path, each tower "
                  "a modality and its preprocessing); recompile to rewrite it")


@pytest.mark.parametrize("tamper, message", [
    (_tamper_path, "names '../outside.onnx', which is not a file inside"),
    (_tamper_absolute, "names '{outside}', which is not a file inside"),
    (_tamper_files, "names '../outside.onnx', which is not a file inside"),
    (_tamper_preprocessing, "names '{outside}', which is not a file inside"),
    (lambda m, outside: m["artifacts"][0].pop("tower"), NOT_A_MANIFEST),
    (lambda m, outside: m["artifacts"][0].pop("path"), NOT_A_MANIFEST),
    (lambda m, outside: m.update(artifacts="x"), NOT_A_MANIFEST),
    (lambda m, outside: m["towers"].update(text="text"), NOT_A_MANIFEST),
    (lambda m, outside: m.pop("preprocessing"), NOT_A_MANIFEST),
    (lambda m, outside: m["preprocessing"]["text"].pop("max_length"), NOT_A_MANIFEST),
    (lambda m, outside: m["preprocessing"]["text"].update(max_length="8"), NOT_A_MANIFEST),
    (lambda m, outside: m["preprocessing"]["text"].update(pad_to=True), NOT_A_MANIFEST),
    # encode padded every text to it: a MemoryError from the tokenizer, after trying to allocate many GB
    (lambda m, outside: m["preprocessing"]["text"].update(pad_to=10**9), NOT_A_MANIFEST),
    (lambda m, outside: m["artifacts"][0].update(files="onnx/text.onnx"), NOT_A_MANIFEST),
], ids=["relative path", "absolute path", "file beside", "preprocessing file", "no tower", "no path",
        "artifacts not a list", "tower not an object", "no preprocessing", "no length", "length a string",
        "pad_to not a number", "pad_to past any model", "files a string"])
def test_open_dir_refuses_a_tampered_manifest(tmp_path, tamper, message):
    """An edited manifest must not make lmmc open files outside the output directory, nor crash on a
    missing key: one error naming manifest.json."""
    out, outside = tmp_path / "out", tmp_path / "outside.onnx"
    (out / "onnx").mkdir(parents=True)
    _identity_onnx(out / "onnx" / "text.onnx")
    _identity_onnx(outside)  # a loadable model: only the manifest check keeps it out
    save_preprocessors("bert", out / "student")  # read as the folder opens
    manifest = {"towers": {"text": {"modality": "text", "normalized": True}},
                "preprocessing": {"text": {"kind": "tokenizer", "max_length": 8, "files": ["student/tokenizer.json"]}},
                "artifacts": [{"tower": "text", "backend": "onnxruntime", "precision": "fp32", "variant": "plain",
                               "path": "onnx/text.onnx", "files": ["onnx/text.onnx"]}]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert str(open_dir(out).models["text"].path) == str(out / "onnx" / "text.onnx")  # untampered: it opens
    tamper(manifest, outside)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmmcError) as err:
        open_dir(out)
    assert str(err.value).startswith(f"{out / 'manifest.json'} "), str(err.value)
    assert message.format(outside=outside) in str(err.value)
    if message != NOT_A_MANIFEST:
        assert str(err.value).endswith(f"inside '{out}'; a manifest names only files of its own output directory: "
                                       f"recompile to rewrite it")


def test_a_manifest_of_another_format_is_refused_not_read_as_this_one(compiled, tmp_path):
    """A manifest a later lmmc writes in another format opened as this one's, whatever its keys now mean."""
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "lmmc-manifest/1"
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": "lmmc-manifest/2", "lmmc_version": "9.0"}))
    with pytest.raises(LmmcError, match="manifest.json is of format 'lmmc-manifest/2' \\(lmmc 9.0 wrote it\\), and this "
                                        "lmmc reads 'lmmc-manifest/1'; open it with the lmmc that wrote it, or "
                                        "recompile"):
        open_dir(out, threads=1)


def test_an_output_whose_files_link_elsewhere_opens_as_a_hub_snapshot_does(compiled, tmp_path):
    """A hub cache snapshot (or git-annex, DVC) links each file to a blob outside the folder."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    for i, f in enumerate(p for p in sorted(compiled.rglob("*")) if p.is_file()):
        shutil.copy(f, blobs / str(i))
        (snapshot / f.relative_to(compiled)).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / f.relative_to(compiled)).symlink_to(blobs / str(i))
    assert np.abs(open_dir(snapshot, threads=1).encode(TEXTS) - open_dir(compiled, threads=1).encode(TEXTS)).max() == 0


def test_an_ir_opened_with_the_wrong_backend_or_device_names_the_right_one(compiled):
    ir = compiled / "openvino" / "text.xml"
    with pytest.raises(LmmcError, match="The file is an OpenVINO IR, not an ONNX model; open it with "
                                        "backend='openvino'"):
        load(ir, "onnxruntime")
    with pytest.raises(LmmcError, match="not on 'CPU'; pass device='cpu' or None, or load the ONNX artifact with "
                                        "device='cuda' for a GPU"):
        load(ir, device="CPU")


def test_a_manifest_that_is_not_utf8_is_one_clear_error(compiled, tmp_path):
    shutil.copytree(compiled, tmp_path / "out")
    (tmp_path / "out" / "manifest.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(LmmcError, match="manifest.json is not UTF-8 text, so not a manifest lmmc wrote"):
        open_dir(tmp_path / "out")


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"\x08\x07" * 50])
def test_corrupt_onnx_is_one_clear_error(tmp_path, content):
    path = tmp_path / "text.onnx"
    path.write_bytes(content)
    with pytest.raises(LmmcError, match="The file is corrupt or not an ONNX model; export it again") as err:
        load(path)
    assert str(path) in str(err.value)


def test_a_cut_ir_weights_file_is_one_error_saying_what_openvino_found(compiled, tmp_path):
    shutil.copytree(compiled / "openvino", tmp_path / "ir")
    weights = tmp_path / "ir" / "text.bin"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(LmmcError, match=r"OpenVINO cannot load '.*text.xml': Incorrect weights in bin file!\. The IR is "
                                        r"corrupt"):
        load(tmp_path / "ir" / "text.xml")


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(LmmcError, match="neither an ONNX file"):
        load(tmp_path / "m.pt")
    with pytest.raises(LmmcError, match="does not exist"):
        load(tmp_path / "absent.onnx")
    with pytest.raises(LmmcError, match="is a directory; pass the path of an exported .onnx, .xml or .engine file, "
                                        "or open a compile's whole output with open_dir"):
        load(tmp_path)
    with pytest.raises(LmmcError, match="unknown backend 'tflite'; choose one of onnxruntime, openvino, tensorrt"):
        load(tmp_path / "m.pt", backend="tflite")
    with pytest.raises(LmmcError, match="unknown backend ''; .* or None for the one the file's suffix implies"):
        load(tmp_path / "m.pt", backend="")
    with pytest.raises(LmmcError, match="load takes the path of an exported .onnx, .xml or .engine file, not int"):
        load(5)


def test_compile_without_openvino_exits_2_before_loading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without the package sees
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "pip install 'lmmc[openvino]'" in result.output
    assert not (tmp_path / "out").exists()


def test_an_output_that_missed_a_gate_opens_with_a_warning(compiled, tmp_path, recwarn):
    open_dir(compiled, threads=1)
    assert not [w for w in recwarn if "validation gate" in str(w.message)]
    failed = tmp_path / "failed"
    shutil.copytree(compiled, failed)
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["passed"] is True
    (failed / "manifest.json").write_text(json.dumps({**manifest, "passed": False}))
    with pytest.warns(UserWarning, match="missed a validation gate when it was compiled .* read its report.json"):
        open_dir(failed, threads=1)
