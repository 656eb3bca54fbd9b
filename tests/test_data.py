"""Calibration data: formats, the deterministic non-overlapping split, and encoding."""

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image

from lmmc.data import load_calibration, read_corpus, read_samples, select, split, text_key
from lmmc.errors import LmmcError
from lmmc.recipe import CalibrationConfig
from lmmc.resume import hash_data
from tests.conftest import CORPUS, REPO, tiny_vocab


def test_split_is_deterministic_and_never_overlaps():
    records = [{"text": f"sentence {i % 90}"} for i in range(120)]  # 30 duplicates
    calib, held = split(records, n_calib=50, n_eval=20, seed=7)
    again_calib, again_held = split(records, n_calib=50, n_eval=20, seed=7)
    assert (calib, held) == (again_calib, again_held)
    texts_c, texts_h = {r["text"] for r in calib}, {r["text"] for r in held}
    assert len(texts_c) == 50 and len(texts_h) == 20
    assert not texts_c & texts_h
    other_calib, _ = split(records, n_calib=50, n_eval=20, seed=8)
    assert other_calib != calib


def test_unicode_forms_and_invisible_characters_make_no_second_text(tmp_path):
    """"café" composed and decomposed, or a line with a zero-width space or a byte-order mark inside, read the
    same to a tokenizer: one text to the split, not a duplicate calibrated twice or held out beside itself; a
    line of invisible characters only is no text."""
    lines = []
    for i in range(20):
        text = f"the café number {i}"
        lines += [unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text),
                  text.replace("number", "num\u200bber"), "\ufeff" + text]
    (tmp_path / "d.txt").write_text("\n".join([*lines, "\u200b\u200b", "\ufeff"]) + "\n", encoding="utf-8")
    records = read_samples(tmp_path / "d.txt")
    assert len(records) == 80  # the two invisible lines are no samples
    calib, held = split(records, 200, 40, seed=0, modalities={"text"})
    assert (len(held), len(calib)) == (5, 15)  # a quarter of the 20 texts held out, the other 15 calibrated once


def test_no_held_out_text_is_calibrated_on_in_another_case_or_spacing(tmp_path):
    """An uncased tokenizer reads "The water" and "the  water " alike: such variants are one text to the split,
    so none is held out while another is calibrated on; .jsonl texts are stripped as .txt lines are."""
    lines = []
    for i in range(80):
        text = f"sample number {i} of the set"
        lines += [{"text": text}, {"text": text + " "}, {"text": text.upper()}, {"text": text.replace(" ", "  ")}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    records = read_samples(tmp_path / "d.jsonl")
    assert {r["text"] for r in records[:2]} == {"sample number 0 of the set"}
    calib, held = split(records, 200, 40, seed=0)
    norm = lambda r: " ".join(r["text"].split()).lower()
    # a quarter of the 80 texts held out, one sample each; the three distinct variants of each other one calibrated
    assert len(held) == 20 and len(calib) == 60 * 3
    assert not {norm(r) for r in held} & {norm(r) for r in calib}


def test_a_copied_or_linked_image_is_one_image_to_the_split(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}-link.png").symlink_to(tmp_path / f"{i}.png")
        (tmp_path / f"{i}-copy.png").write_bytes((tmp_path / f"{i}.png").read_bytes())
    calib, held = split(read_samples(tmp_path), n_calib=100, n_eval=5, seed=0)
    pixels = lambda records: {Path(r["image"]).resolve().read_bytes() for r in records}
    assert len(held) == 5 and len(pixels(held)) == 5 and len(calib) == 15 * 3
    assert not pixels(held) & pixels(calib)


def test_a_text_model_splits_image_caption_records_by_their_text():
    # two images per caption: held out by image, a caption would be calibrated on beside its other image
    records = [{"text": f"caption {i // 2}", "image": f"/nowhere/{i}.png"} for i in range(80)]
    calib, held = split(records, n_calib=200, n_eval=10, seed=0, modalities={"text"})
    assert len({r["text"] for r in held}) == 10 and not {r["text"] for r in held} & {r["text"] for r in calib}


def test_held_out_texts_that_read_as_calibration_tokens_once_cut_are_not_held_out(tmp_path):
    """Texts that share their first max_length tokens are one input to the model, however they end."""
    tok = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))
    opening = "the man was on the road to the house of the cold water and the data"
    words = ["python", "function", "picture", "number", "text", "a", "of", "is", "in", "to"]
    (tmp_path / "d.txt").write_text("\n".join(f"{opening} {a} {b}" for a in words for b in words))
    cfg = CalibrationConfig(samples=64, eval_samples=16, batch_size=8)
    full = load_calibration(cfg.model_copy(update={"max_length": 24}), str(tmp_path / "d.txt"), {"text"}, {"tokenizer": tok})
    assert full.counts == {"calibration": 64, "held_out": 16} and not full.warnings
    cut = load_calibration(cfg.model_copy(update={"max_length": 12}), str(tmp_path / "d.txt"), {"text"}, {"tokenizer": tok})
    held = [tuple(row[m.bool()].tolist()) for b in cut.eval["text"] for row, m in zip(b["input_ids"], b["attention_mask"])]
    calib = {tuple(row[m.bool()].tolist()) for b in cut.calib["text"] for row, m in zip(b["input_ids"], b["attention_mask"])}
    assert len(calib) == 1 and held == [] and cut.counts == {"calibration": 64, "held_out": 0}
    assert cut.warnings[-1] == ("16 held-out text(s) read as the same 12 tokens as a calibration text or another "
                                "held-out one (they differ only past the cut, or in characters the tokenizer drops) and were "
                                "not held out; 0 remain")


def test_held_out_samples_of_one_class_are_refused(tmp_path):
    """Accuracy over one class is 1.0 for any model, and so is chance: no gate could fail."""
    tok = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))
    words = ["python", "function", "picture", "number", "text", "a", "of", "is", "in", "to"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"the {words[i // 10]} {words[i % 10]}",
                                                            "label": "cat" if i < 30 else "dog"}) for i in range(32)))
    cfg = CalibrationConfig(samples=24, eval_samples=8, batch_size=8)
    with pytest.raises(LmmcError, match="all 8 held-out samples have the label 'cat'"):
        load_calibration(cfg, str(tmp_path / "d.jsonl"), {"text"}, {"tokenizer": tok})
    data = load_calibration(cfg.model_copy(update={"seed": 2}), str(tmp_path / "d.jsonl"), {"text"}, {"tokenizer": tok})
    assert sorted(data.labels.held_out) == [0] * 7 + [1]


def test_text_with_a_byte_order_mark_reads_as_without(tmp_path):
    lines = ["café au lait", "the water is cold"]
    expected = [{"text": t} for t in lines]
    for name, encoding in (("utf8.txt", "utf-8-sig"), ("le.txt", "utf-16"), ("be.txt", "utf-16-be")):
        data = "\n".join(lines).encode(encoding)
        (tmp_path / name).write_bytes(b"\xfe\xff" + data if encoding == "utf-16-be" else data)
        assert read_samples(tmp_path / name) == expected, name
    blank = [{"text": "  "}, {"text": "", "image": "a.png"}]   # a blank text is dropped, as a blank .txt line is
    (tmp_path / "D.JSONL").write_bytes("\n".join(json.dumps(r) for r in expected + blank).encode("utf-8-sig"))
    assert read_samples(tmp_path / "D.JSONL") == expected + [{"image": str(tmp_path / "a.png")}]


def test_a_compressed_file_is_refused_as_compressed(tmp_path):
    """A gzip file named .txt was refused as text not UTF-8, with advice to convert it from cp1252."""
    import bz2
    import gzip
    import lzma
    import zipfile

    text = b"the water is cold\nthe house on the road\n"
    for kind, data in (("gzip", gzip.compress(text)), ("bzip2", bz2.compress(text)), ("xz", lzma.compress(text))):
        (tmp_path / "corpus.txt").write_bytes(data)
        with pytest.raises(LmmcError, match=f"corpus.txt' is a {kind}-compressed file, not text; decompress it first"):
            read_samples(tmp_path / "corpus.txt")
    with zipfile.ZipFile(tmp_path / "corpus.txt", "w") as z:
        z.writestr("corpus.txt", text)
    with pytest.raises(LmmcError, match="is a zip-compressed file, not text; decompress it first \\(unzip\\)"):
        read_samples(tmp_path / "corpus.txt")


def test_utf32_with_its_mark_reads_and_utf16_without_a_mark_is_refused(tmp_path):
    lines = ["don’t say “never” — it’s 😀", "the water is cold"]
    for name, encoding in (("le32.txt", "utf-32"), ("be32.txt", "utf-32-be")):
        data = "\n".join(lines).encode(encoding)
        (tmp_path / name).write_bytes(b"\0\0\xfe\xff" + data if encoding == "utf-32-be" else data)
        assert read_samples(tmp_path / name) == [{"text": t} for t in lines], name
    for encoding in ("utf-16-le", "utf-16-be", "utf-32-le"):
        (tmp_path / "nomark.txt").write_bytes("\n".join(lines).encode(encoding))
        with pytest.raises(LmmcError, match="looks like UTF-16 or UTF-32 text without a byte-order mark"):
            read_samples(tmp_path / "nomark.txt")
    (tmp_path / "odd.txt").write_bytes("\n".join(lines).encode("utf-16") + b"x")
    with pytest.raises(LmmcError, match="is not UTF-16 text .*starts with a UTF-16 byte-order mark"):
        read_samples(tmp_path / "odd.txt")
    (tmp_path / "cp1252.txt").write_bytes("first line\nsecond “line”".encode("cp1252"))
    with pytest.raises(LmmcError, match=r"is not UTF-8 text \(line 2, byte 0x93\).*iconv -f cp1252"):
        read_samples(tmp_path / "cp1252.txt")


def test_split_shrinks_to_what_exists():
    calib, held = split([{"text": str(i)} for i in range(10)], n_calib=100, n_eval=64, seed=0)
    assert (len(calib), len(held)) == (8, 2)


def test_shipped_corpus_is_real_text():
    records = read_samples(CORPUS)
    assert len(records) > 4000
    assert all(len(r["text"]) >= 50 for r in records)


def test_the_distillation_corpora_hold_no_held_out_text():
    """The held-out corpora of other domains judge generalisation only if nothing distilled on holds their texts;
    the Wikipedia, Factbook and speeches corpora, read beside the general one, repeat none of its texts either."""
    samples = REPO / "samples"
    trained = ("calib/general_en.txt", "calib/wiki_en.txt", "calib/factbook_en.txt", "calib/speeches_en.txt")
    keys = {name: {text_key(t) for t in (samples / name).read_text().splitlines()}
            for name in (*trained, "heldout/austen.txt", "heldout/reuters.txt")}
    assert len(keys["calib/wiki_en.txt"]) > 14000 and len(keys["calib/factbook_en.txt"]) > 13000
    assert len(keys["calib/speeches_en.txt"]) == 15000
    for corpus in trained:
        for held in ("heldout/austen.txt", "heldout/reuters.txt"):
            assert not keys[corpus] & keys[held], (corpus, held)
    for i, corpus in enumerate(trained):
        for earlier in trained[:i]:
            assert not keys[corpus] & keys[earlier], (corpus, earlier)


def test_text_and_jsonl_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  second line  \n")
    assert read_samples(tmp_path / "a.txt") == [{"text": "first line"}, {"text": "second line"}]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x", "image": "img/1.png"}) + "\n")
    assert read_samples(tmp_path / "b.jsonl") == [{"text": "x", "image": str(tmp_path / "img/1.png")}]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(LmmcError, match="holds no samples"):
        read_samples(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(LmmcError, match="bad.jsonl:2: not valid JSON"):
        read_samples(tmp_path / "bad.jsonl")
    (tmp_path / "deep.jsonl").write_text('{"text": "ok"}\n{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    with pytest.raises(LmmcError, match="deep.jsonl:2: not valid JSON \\(nested too deep\\)"):  # a RecursionError
        read_samples(tmp_path / "deep.jsonl")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(LmmcError, match="unknown format"):
        read_samples(tmp_path / "c.csv")


def test_image_text_pairs_are_encoded_in_matching_order(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"text": f"picture number {i}", "image": f"{i}.png"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    tok = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp_path / "vocab.txt")))
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cfg = CalibrationConfig(samples=8, eval_samples=4, batch_size=3)
    data = load_calibration(cfg, str(tmp_path / "pairs.jsonl"), {"text", "image"}, {"tokenizer": tok, "image_processor": proc})
    assert data.counts == {"calibration": 8, "held_out": 3}
    assert [b["pixel_values"].shape[0] for b in data.calib["image"]] == [3, 3, 2]
    assert [b["input_ids"].shape[0] for b in data.calib["text"]] == [3, 3, 2]
    assert data.eval["image"][0]["pixel_values"].shape[1:] == (3, 32, 32)
    # only text in the data, but the model has an image tower
    (tmp_path / "only.txt").write_text("\n".join(f"text {i}" for i in range(10)))
    with pytest.raises(LmmcError, match="image-text pairs"):
        load_calibration(cfg, str(tmp_path / "only.txt"), {"text", "image"}, {"tokenizer": tok, "image_processor": proc})



def test_class_folders_read_as_labelled_captioned_images(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "pics" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "pics" / label / f"{i}.png")
    (tmp_path / "pics" / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden files are not samples
    records = read_samples(tmp_path / "pics", "a photo of a {label}")
    assert [(Path(r["image"]).relative_to(tmp_path / "pics").as_posix(), r["label"], r["text"]) for r in records] == [
        (f"{label}/{i}.png", label, f"a photo of a {label}") for label in ("cat", "dog") for i in range(3)]
    # without a template the same folder is plain images, hidden ones left out alike
    (tmp_path / "pics" / "cat" / "._0.png").write_bytes(b"\0\5\26\7")  # macOS's resource fork of 0.png
    (tmp_path / "pics" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "pics" / ".ipynb_checkpoints" / "0.png").hardlink_to(tmp_path / "pics" / "cat" / "0.png")
    assert read_samples(tmp_path / "pics") == [{"image": r["image"]} for r in records]
    # a class without pictures was dropped from the classes zero-shot accuracy chooses among
    (tmp_path / "pics" / "bird").mkdir()
    (tmp_path / "pics" / "bird" / ".DS_Store").write_bytes(b"\0\1")
    with pytest.raises(LmmcError, match=r"the class folder\(s\) \['bird'\] hold no images; add pictures"):
        read_samples(tmp_path / "pics", "a photo of a {label}")


def test_a_class_folder_with_pictures_lmmc_does_not_read_names_their_format(tmp_path):
    """A class folder refused its .avif pictures as "not images"; plain folders left them out without a word."""
    (tmp_path / "pics" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "pics" / "cat" / "0.png")
    (tmp_path / "pics" / "cat" / "1.avif").write_bytes(b"\0")
    (tmp_path / "pics" / "notes.md").write_text("not a picture: skipped in a plain folder")
    for template in (None, "a photo of a {label}"):
        with pytest.raises(LmmcError, match=r"holds 1 picture\(s\) in a format lmmc does not read \(.avif\)"):
            read_samples(tmp_path / "pics", template)
    (tmp_path / "pics" / "cat" / "1.avif").unlink()
    assert [Path(r["image"]).name for r in read_samples(tmp_path / "pics")] == ["0.png"]


def test_class_folders_read_unlabelled_by_a_vision_model_are_said(tmp_path):
    """Without caption_template a vision-only model read the folders as unlabelled images and its task metric
    was agreement with the teacher, with nothing saying how to have accuracy on the classes."""
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "pics" / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "pics" / label / f"{i}.png")
    cfg = CalibrationConfig(samples=12, eval_samples=4)
    warned = [w for w in select(cfg, tmp_path / "pics", read_samples(tmp_path / "pics"), {"image"}).warnings
              if "as classes are laid out" in w]
    assert warned == [f"calibration data '{tmp_path / 'pics'}' holds its images in 2 subfolders, as classes are laid "
                      f"out, and is read unlabelled: the task metric is nearest-neighbour agreement with the teacher. "
                      f"To measure nearest-neighbour accuracy on those classes, set calibration.caption_template "
                      f"(e.g. '{{label}}'), which labels each image by its folder"]
    labelled = CalibrationConfig(samples=12, eval_samples=4, caption_template="{label}")
    data = read_samples(tmp_path / "pics", "{label}")
    assert not [w for w in select(labelled, tmp_path / "pics", data, {"image"}).warnings if "laid out" in w]
    (tmp_path / "pics" / "loose.png").write_bytes((tmp_path / "pics" / "cat" / "0.png").read_bytes())
    assert not [w for w in select(cfg, tmp_path / "pics", read_samples(tmp_path / "pics"), {"image"}).warnings
                if "laid out" in w]  # an image beside the folders: not a class layout


def test_held_out_captions_shared_with_calibration_and_unpaired_records_are_said(tmp_path):
    """The split keeps held-out images apart, not captions: a class's one templated caption is a calibration
    caption too, so the text tower's figures are on fitted texts; pairs with captions of their own are not."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": f"picture number {i}", "label": ["cat", "dog"][i % 2]})
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines))
    cfg = CalibrationConfig(samples=12, eval_samples=4)
    assert select(cfg, data, read_samples(data), {"text", "image"}).warnings == []
    # held-out captions that repeat only each other are no calibrated text
    held_out = {Path(r["image"]).name for r in select(cfg, data, read_samples(data), {"text", "image"}).held_out}
    for line in lines:
        if line["image"] in held_out:
            line["text"] = f"a held out {line['label']}"
    data.write_text("\n".join(json.dumps(line) for line in lines))
    assert select(cfg, data, read_samples(data), {"text", "image"}).warnings == []

    for line in lines:
        line["text"] = f"a photo of a {line['label']}"
    data.write_text("\n".join(json.dumps(line) for line in lines))
    chosen = select(cfg, data, read_samples(data), {"text", "image"})
    assert chosen.warnings == ["4 of the 4 held-out pairs have a caption the compile calibrated on (2 of the 2 "
                               "distinct held-out captions are among the 2 distinct calibration captions): the text "
                               "tower's figures, the gates of its INT8 artifacts "
                               "(quantised on those captions) included, measure texts the compile calibrated on, and "
                               "distils on if distill reads this data, more than unseen text; give pairs with captions "
                               "of their own to measure that"]
    # a captioner's answers are no text tower's inputs
    assert select(cfg, data, read_samples(data), {"text", "image"}, generative=True).warnings == []

    # the dogs without captions: dropped from zero-shot's choices, unless a template prompts the classes
    for line in lines[1::2]:
        del line["text"]
    data.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(LmmcError, match="class\\(es\\) 'dog' have no record with both a text and an image"):
        select(cfg, data, read_samples(data), {"text", "image"})
    templated = CalibrationConfig(samples=12, eval_samples=4, caption_template="a photo of a {label}")
    warnings = select(templated, data, read_samples(data, templated.caption_template), {"text", "image"}).warnings
    assert warnings[0] == (f"8 record(s) of '{data}' lack a text or an image and were left out: a model with a text "
                           f"and an image tower calibrates and validates on image-text pairs")


def test_linked_class_folders_are_read_and_a_link_back_up_does_not_loop(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "store" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "store" / label / f"{i}.png")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "cat").symlink_to(tmp_path / "store" / "cat", target_is_directory=True)
    (tmp_path / "pics" / "dog").symlink_to(tmp_path / "store" / "dog", target_is_directory=True)
    (tmp_path / "store" / "dog" / "up").symlink_to(tmp_path / "pics", target_is_directory=True)
    records = read_samples(tmp_path / "pics", "a photo of a {label}")
    assert [(Path(r["image"]).relative_to(tmp_path / "pics").as_posix(), r["label"]) for r in records] == [
        (f"{label}/{i}.png", label) for label in ("cat", "dog") for i in range(2)]
    assert [Path(r["image"]).name for r in read_samples(tmp_path / "pics")] == ["0.png", "1.png"] * 2


@pytest.mark.parametrize("lines, message", [
    ([{"text": "a cat", "label": "cat"}, {"text": "a dog"}], "sample 2 has none"),
    ([{"text": "a cat", "label": "cat"}, {"text": "another cat", "label": "cat"}], "needs at least two classes"),
    ([{"image": "1.png", "text": "a cat", "label": "cat"}, {"image": "2.png", "text": "a dog", "label": "cat"},
      {"image": "3.png", "text": "a puppy", "label": "dog"}], "names the class 'dog' but is labelled 'cat'"),
    ([{"text": "a pet", "label": "cat"}, {"text": "a pet", "label": "dog"}], "the text 'a pet' carries two labels"),
    # the split reads them as one text: held out under one label, the other label was never scored
    ([{"text": "a pet", "label": "cat"}, {"text": "A  Pet", "label": "dog"}],
     r"the text 'A  Pet' \(the same text, case, spacing and Unicode form aside, as 'a pet'\) carries two labels"),
    ([{"image": "1.png", "text": "one", "label": "cat"}, {"image": "1.png", "text": "two", "label": "dog"}],
     "carries two labels, 'cat' and 'dog'"),
    # two classes the accuracy would count apart, whose prompts the text tower reads alike
    ([{"image": "1.png", "text": "a kitten", "label": "Cat"}, {"image": "2.png", "text": "a puppy", "label": "dog"},
      {"image": "3.png", "text": "a tabby", "label": "cat"}], "the labels 'Cat' and 'cat' differ only in case"),
    ([{"text": "a kitten", "label": "cat"}, {"text": "a puppy", "label": " "}], r"d.jsonl:2: \"label\" is empty"),
])
def test_labels_must_match_the_captions(tmp_path, lines, message):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(LmmcError, match=message):
        read_samples(tmp_path / "d.jsonl")


def test_nul_bytes_are_no_text(tmp_path):
    (tmp_path / "d.txt").write_bytes(b"a cat\n\0\0\n\0 a dog\0\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "\0"}) + "\n" + json.dumps({"text": "a\0 cat"}) + "\n")
    assert read_samples(tmp_path / "d.txt") == [{"text": "a cat"}, {"text": "a dog"}]
    assert read_samples(tmp_path / "d.jsonl") == [{"text": "a cat"}]


def test_a_caption_may_mention_another_class_now_and_then(tmp_path):
    lines = [{"image": f"{i}.png", "text": f"a {'dog' if i % 2 else 'cat'} on a sofa", "label": "dog" if i % 2 else "cat"}
             for i in range(20)]
    lines[3]["text"] = "a puppy chasing a cat"  # labelled dog: one of twenty
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert [r["label"] for r in read_samples(tmp_path / "d.jsonl")] == ["cat", "dog"] * 10
    lines[5]["text"] = lines[7]["text"] = "a cat asleep"  # three of twenty: the labels are not the captions'
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(LmmcError, match="3 of the 20 captions that name a class name another class than their label"):
        read_samples(tmp_path / "d.jsonl")


def test_numbered_classes_are_ids_unless_the_captions_say_their_numbers(tmp_path):
    ids = [{"image": f"{i}.png", "text": t, "label": i % 2} for i, t in
           enumerate(["a dog with 1 ball", "a cat and 0 mice", "a dog", "a cat", "a dog in the snow", "a cat"])]
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps(line) for line in ids))
    assert [r["label"] for r in read_samples(tmp_path / "ids.jsonl")] == ["0", "1"] * 3
    names = [{"image": f"{i}.png", "text": f"the number {3 + 4 * (i % 2)}", "label": 3 + 4 * (i % 2)} for i in range(6)]
    names[4]["text"] = "the number 7"  # labelled 3, where the other captions say their numbers
    (tmp_path / "names.jsonl").write_text("\n".join(json.dumps(line) for line in names))
    with pytest.raises(LmmcError, match="the caption 'the number 7' names the class '7' but is labelled '3'"):
        read_samples(tmp_path / "names.jsonl")
    shifted = [{"image": f"{i}.png", "text": f"the number {i % 3}", "label": i % 3 + 1} for i in range(6)]  # 1-based
    (tmp_path / "shifted.jsonl").write_text("\n".join(json.dumps(line) for line in shifted))
    with pytest.raises(LmmcError, match="the caption 'the number 1' names the class '1' but is labelled '2'"):
        read_samples(tmp_path / "shifted.jsonl")


def test_a_picture_of_any_size_is_read_as_the_processor_resizes_it(tmp_path):
    from lmmc.data import check_images, encode_images

    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(0)
    paths = []
    for w, h in [(1, 1), (6, 300), (300, 3)]:  # each smaller than an 8-pixel patch on one side
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{w}x{h}.png")
        paths.append(str(tmp_path / f"{w}x{h}.png"))
    check_images(paths)
    pixels = encode_images(proc, paths, 3)[0]["pixel_values"]
    expected = proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32) and float((pixels - expected).abs().max()) == 0.0


def test_a_text_without_an_image_may_name_another_class(tmp_path):
    """Only a caption describes its image: a labelled review may say "1 star" and be of class 0."""
    lines = [{"text": "i give the house 1 star", "label": 0}, {"text": "the water is not negative", "label": "1"},
             {"text": "negative", "label": "negative"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert [r["label"] for r in read_samples(tmp_path / "d.jsonl")] == ["0", "1", "negative"]


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "kitty").symlink_to(tmp_path / "cat", target_is_directory=True)
    with pytest.raises(LmmcError, match="the class folders 'cat' and 'kitty' hold the same pictures"):
        read_samples(tmp_path, "a photo of a {label}")
    (tmp_path / "kitty").unlink()
    (tmp_path / "cat" / "tabby").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "cat" / "tabby" / "0.png")
    (tmp_path / "tabby").symlink_to(tmp_path / "cat" / "tabby", target_is_directory=True)  # inside another class
    with pytest.raises(LmmcError, match="the class folders 'cat' and 'tabby' hold the same pictures"):
        read_samples(tmp_path, "a photo of a {label}")


def test_a_folder_linked_into_two_classes_or_a_link_above_the_data_is_refused(tmp_path):
    """Read once, a folder linked into two class folders gave its pictures the first class's label, and a
    link to a folder above the data pulled in every folder beside it."""
    rng = np.random.default_rng(0)
    for folder in ("pics/cat", "pics/dog", "shared", "beside"):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "pics" / "cat" / "more").symlink_to(tmp_path / "shared", target_is_directory=True)
    assert len(read_samples(tmp_path / "pics", "a photo of a {label}")) == 6  # in one class: read
    (tmp_path / "pics" / "dog" / "extra").symlink_to(tmp_path / "shared", target_is_directory=True)
    with pytest.raises(LmmcError, match=f"'{tmp_path / 'pics' / 'cat' / 'more'}' and '{tmp_path / 'pics' / 'dog' / 'extra'}' "
                                        f"are one folder \\(through a link\\), in the class folders 'cat' and 'dog'"):
        read_samples(tmp_path / "pics", "a photo of a {label}")
    (tmp_path / "pics" / "dog" / "extra").unlink()
    (tmp_path / "pics" / "dog" / "up").symlink_to(tmp_path, target_is_directory=True)
    for template in ("a photo of a {label}", None):
        with pytest.raises(LmmcError, match="which holds the data folder .* itself: every folder beside it would be "
                                            "read as data too"):
            read_samples(tmp_path / "pics", template)


def test_image_paths_in_jsonl_urls_home_and_other_picture_suffixes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "0.jfif", format="JPEG")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "1.ppm")
    assert sorted(Path(r["image"]).name for r in read_samples(tmp_path)) == ["0.jfif", "1.ppm"]
    monkeypatch.setenv("HOME", str(tmp_path))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "~/1.ppm", "text": "a picture"}) + "\n")
    assert read_samples(data)[0]["image"] == str(tmp_path / "1.ppm")
    data.write_text(json.dumps({"image": "https://example.com/a.png", "text": "a picture"}) + "\n")
    with pytest.raises(LmmcError, match="d.jsonl:1: \"image\" is a URL \\(https://example.com/a.png\\); lmmc reads "
                                        "image files: download it"):
        read_samples(data)
    # an empty path read as the .jsonl's folder; a NUL byte, which no path holds, failed inside Python's open
    for bad, shown in (("", '""'), ("1.ppm\0x", '"1.ppm\\\\u0000x"')):
        data.write_text(json.dumps({"image": bad, "text": "a picture"}) + "\n")
        with pytest.raises(LmmcError, match=f'd.jsonl:1: "image" {shown} is no file path; give the image\'s path'):
            read_samples(data)


def test_the_data_hash_reads_linked_folders_and_jsonl_in_any_case(tmp_path):
    """--resume and bench know the data by this hash: an image edited in a linked class folder, or named by a
    .JSONL file, changes the samples, so it changes the hash."""
    (tmp_path / "store").mkdir()
    image = tmp_path / "store" / "0.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "cat").symlink_to(tmp_path / "store", target_is_directory=True)
    (tmp_path / "pairs.JSONL").write_text(json.dumps({"text": "a cat", "image": str(image)}) + "\n")
    before = hash_data(tmp_path / "pics"), hash_data(tmp_path / "pairs.JSONL")
    Image.fromarray(np.ones((8, 8, 3), dtype=np.uint8)).save(image)
    after = hash_data(tmp_path / "pics"), hash_data(tmp_path / "pairs.JSONL")
    assert before[0] != after[0] and before[1] != after[1]


def test_a_one_tower_model_calibrates_on_each_sample_once(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        for c in range(3):
            (tmp_path / f"{i}-copy{c}.png").write_bytes((tmp_path / f"{i}.png").read_bytes())
    calib, held = split(read_samples(tmp_path), n_calib=100, n_eval=3, seed=0, modalities={"image"})
    pixels = [Path(r["image"]).read_bytes() for r in calib]
    assert len(held) == 3 and len(calib) == len(set(pixels)) == 9
    texts = [{"text": f"text {i % 5}"} for i in range(40)]
    calib, held = split(texts, n_calib=100, n_eval=2, seed=0, modalities={"text"})
    assert len(held) == 2 and sorted(r["text"] for r in calib) == sorted({r["text"] for r in calib}) and len(calib) == 3


def test_data_of_the_other_kind_is_named(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(f"line {i}" for i in range(20)))
    cfg = CalibrationConfig(samples=8, eval_samples=4, batch_size=4)
    with pytest.raises(LmmcError, match=r"'.*t.txt' holds 20 texts and no images; this model reads images only: "
                                        r"give a folder of images"):
        select(cfg, tmp_path / "t.txt", read_samples(tmp_path / "t.txt"), {"image"})
    with pytest.raises(LmmcError, match=r"distill.corpus '.*latin.txt' is not UTF-8 text"):
        (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
        read_corpus(tmp_path / "latin.txt", "distill.corpus")


def test_a_copy_of_an_image_under_another_label_is_refused(tmp_path):
    """The split knows an image by its bytes, so a copy under another name is the same image: it cannot be
    of two classes, or which one is held out would depend on the shuffle."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "0.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "0.png").read_bytes())
    lines = [{"image": "0.png", "text": "one", "label": "cat"}, {"image": "copy.png", "text": "two", "label": "dog"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(LmmcError, match=r"the image '.*copy.png' \(the same picture as '.*0.png'\) carries two labels, "
                                        r"'cat' and 'dog'"):
        read_samples(tmp_path / "d.jsonl")
    lines[1]["label"] = "cat"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "1.png")
    lines.append({"image": "1.png", "text": "three", "label": "dog"})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert len(read_samples(tmp_path / "d.jsonl")) == 3


def test_lines_split_at_line_feeds_only(tmp_path):
    """A form feed, U+2028 or NEL inside a line (PDF extracts hold them) is not a line break; CRLF and a
    carriage return alone are."""
    txt = tmp_path / "pages.txt"
    txt.write_text("end of page\x0cstart of the next\r\nlines\u2028joined\nnext\x85line\rlast\n", encoding="utf-8")
    assert [r["text"] for r in read_samples(txt)] == ["end of page\x0cstart of the next", "lines\u2028joined",
                                                      "next\x85line", "last"]
    mac = tmp_path / "mac.jsonl"  # read as one line, it was one bad JSON record
    mac.write_text(json.dumps({"text": "a cat"}) + "\r" + json.dumps({"text": "a dog"}) + "\r")
    assert read_samples(mac) == [{"text": "a cat"}, {"text": "a dog"}]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_samples(jsonl) == [{"text": "a\u2028b"}]


@pytest.mark.parametrize("label", [None, True, [1, 2], {"a": 1}, 1.5])
def test_a_label_that_is_no_class_name_or_number_is_refused(tmp_path, label):
    path = tmp_path / "labelled.jsonl"
    path.write_text(json.dumps({"text": "a cat", "label": "cat"}) + "\n" + json.dumps({"text": "a dog", "label": label}) + "\n")
    with pytest.raises(LmmcError, match=rf"labelled.jsonl:2: \"label\" must be a class name or a whole number, "
                                        rf"got {re.escape(json.dumps(label))}"):
        read_samples(path)
    path.write_text(json.dumps({"text": "a cat", "label": 3}) + "\n" + json.dumps({"text": "a dog", "label": "dog"}) + "\n")
    assert [r["label"] for r in read_samples(path)] == ["3", "dog"]
    # class 1 written as 1.0 (pandas' int column with a gap) is class 1, not a second class "1.0"
    path.write_text("\n".join(json.dumps({"text": t, "label": v}) for t, v in [("a cat", 1), ("a dog", 2.0),
                                                                              ("a kitten", 1.0)]))
    assert [r["label"] for r in read_samples(path)] == ["1", "2", "1"]
    path.write_text("\n".join(json.dumps({"text": t, "label": v}) for t, v in [("a cat", "cat"), ("a dog", " dog"),
                                                                              ("a kitten", "cat ")]))
    assert [r["label"] for r in read_samples(path)] == ["cat", "dog", "cat"]  # spaces around a class name are none of it
    # texts alone are scored by nearest neighbour, which compares labels as written: "A" and "a" are two ids
    path.write_text("\n".join(json.dumps({"text": t, "label": v}) for t, v in [("a cat", "A"), ("a dog", "a")]))
    assert [r["label"] for r in read_samples(path)] == ["A", "a"]
