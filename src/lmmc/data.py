"""Calibration data: read text, image folders or image-text pairs (optionally labelled with classes, or
with a prompt for generative models), split deterministically into calibration and held-out samples that
share no image (no text, for text alone), and encode them into batches."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import statistics
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from lmmc.errors import LmmcError
from lmmc.runtime.generate import generative_prompt, image_token, places_image
from lmmc.runtime.images import IMAGE_SUFFIXES, NOT_PICTURES, OTHER_PICTURES, open_image
from lmmc.runtime.texts import clip_text, clip_texts
# Random inputs say nothing about a trained model's activations; they are for tiny test models only.
RANDOM_MAX_PARAMS = 5_000_000

Batch = dict[str, torch.Tensor]


@dataclass
class Labels:
    """The classes of labelled data: the class of each held-out sample, and encoded class prompts (the
    caption template per class, or every distinct caption of the class) for zero-shot accuracy."""

    classes: list[str]
    held_out: list[int]
    prompts: list[Batch]
    prompt_class: list[int]


@dataclass
class CalibData:
    """Encoded batches per modality ("text", "image"). For image-text pairs the i-th text and image
    batches hold the same pairs in the same order."""

    calib: dict[str, list[Batch]]
    eval: dict[str, list[Batch]]
    source: str
    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    labels: Labels | None = None
    chat_template: bool = False  # generative records: whether their prompts went through the chat template
    held_out_texts: frozenset[str] = frozenset()  # held-out texts (captions) as `text_key` reads them
    short: list[Batch] = field(default_factory=list)  # the empty text and `short_texts` of calibration texts
    eval_short: list[Batch] = field(default_factory=list)  # `short_texts` of the held-out texts, none of `short`
    calibrated: frozenset[str] = frozenset()  # the calibration samples' texts and images, as `part_keys` reads them
    calibration_texts: tuple[str, ...] = ()  # the calibration samples' texts as written

    def calib_batches(self, modality: str) -> list[Batch]:
        return self.calib.get(modality, [])

    def eval_batches(self, modality: str) -> list[Batch]:
        return self.eval.get(modality, [])


def _lines(path: Path) -> list[str]:
    """A text file's lines, split at line feeds, carriage returns (classic Mac files end lines with them
    alone) and the pair: str.splitlines would also split at form feeds and U+2028, which PDF extracts and
    JSON strings hold."""
    return re.split(r"\r\n?|\n", _read_text(path))


def _read_text(path: Path) -> str:
    """UTF-8, or UTF-16 or UTF-32 with its byte-order mark (as Windows tools save text); a UTF-8 mark is
    dropped, so it is not read as part of the first sample."""
    data = path.read_bytes()
    for magic, kind, fix in ((b"\x1f\x8b", "gzip", "gunzip"), (b"PK\x03\x04", "zip", "unzip"),
                             (b"BZh", "bzip2", "bunzip2"), (b"\xfd7zXZ\x00", "xz", "unxz")):
        if data.startswith(magic):
            raise LmmcError(f"calibration data '{path}' is a {kind}-compressed file, not text; decompress it first "
                            f"({fix}) and give the text file")
    # UTF-32-LE's mark starts with UTF-16-LE's, so it is looked for first
    encoding = ("utf-32" if data[:4] in (b"\xff\xfe\0\0", b"\0\0\xfe\xff") else
                "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8")
    even, odd = (data[i::2].count(0) / max(1, len(data[i::2])) for i in (0, 1))
    if encoding == "utf-8" and len(data) >= 8 and max(even, odd) > 0.5 and abs(even - odd) > 0.3:
        # ASCII in UTF-16 or UTF-32 decodes as UTF-8 with a NUL beside each letter, on one side; lines drop NULs
        # (a file cut from a binary holds runs of them), which would keep the letters and garble the rest in silence
        raise LmmcError(f"calibration data '{path}' looks like UTF-16 or UTF-32 text without a byte-order mark (a "
                        f"zero byte beside nearly every letter); convert it to UTF-8, e.g. iconv -f UTF-16LE -t "
                        f"UTF-8 (UTF-16BE, UTF-32LE or UTF-32BE as the file was saved)")
    try:
        return data.decode(encoding + "-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1 if encoding == "utf-8" else None
        where = f"line {line}, byte {err.object[err.start]:#04x}" if line else f"at byte offset {err.start}"
        raise LmmcError(f"calibration data '{path}' is not {encoding.upper()} text ({where}"
                        + ("" if encoding == "utf-8" else f", though it starts with a {encoding.upper()} "
                                                          f"byte-order mark")
                        + "); convert it to UTF-8 from the encoding it was saved in, e.g. iconv -f cp1252 -t "
                          "utf-8 for Windows text or -f latin1 for ISO-8859-1") from None


def read_samples(path: Path, caption_template: str | None = None) -> list[dict[str, Any]]:
    """Records with a "text" and/or an "image" (absolute path) key, and a "label" where the data has
    classes, in file order. With `caption_template` an image folder is read as one subfolder per class,
    each image captioned with the template."""
    if not path.exists():
        raise LmmcError(f"calibration data '{path}' does not exist; pass --calib with a .txt, .jsonl or image folder")
    if not (path.is_dir() or path.is_file()):  # read twice (the plan, then the run): a pipe would be empty, or hang
        raise LmmcError(f"calibration data '{path}' is neither a file nor a folder (a pipe or a device); save the "
                        f"data to a file and pass that")
    if path.is_dir() and caption_template is not None:
        records = _class_folders(path, caption_template)
    elif path.is_dir():
        files = folder_files(path)
        _refuse_other_pictures(path, files)
        records = [{"image": str(p)} for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        texts = [p for p in files if p.suffix.lower() in (".txt", ".jsonl")]
        if not records and texts:
            raise LmmcError(f"calibration data '{path}' is a folder, which lmmc reads as images, and it holds none; "
                            f"for its texts pass one file" + (f" ({texts[0]})" if len(texts) == 1 else
                                                              f": join its {len(texts)} text files into one first"))
        _check_readable(path, [r["image"] for r in records])
    elif path.suffix.lower() == ".txt":
        # NUL bytes (a file cut from a binary) are no text: a line of them is blank
        records = [{"text": text} for line in _lines(path) if text_key(text := line.replace("\0", "").strip())]
    elif path.suffix.lower() == ".jsonl":
        records = []
        for n, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                why = getattr(err, "msg", "nested too deep")
                raise LmmcError(f"{path}:{n}: not valid JSON ({why}); each line must be an object") from None
            if not isinstance(obj, dict) or not ({"text", "image"} & obj.keys()):
                raise LmmcError(f"{path}:{n}: each line needs a \"text\" and/or an \"image\" key")
            # str() would quietly turn a null into the text "None"; a list or number is no path
            for key in ("text", "image", "prompt"):
                if key in obj and not isinstance(obj[key], str):
                    raise LmmcError(f"{path}:{n}: \"{key}\" must be a string, got {json.dumps(obj[key])}; write it "
                                    f"as {'a path in quotes' if key == 'image' else 'text in quotes'}")
            rec = {}
            if text_key(text := obj.get("text", "").replace("\0", "").strip()):  # as a .txt line is read
                rec["text"] = text
            if "image" in obj:
                if not obj["image"].strip() or "\0" in obj["image"]:  # the folder itself, or no path the OS takes
                    raise LmmcError(f"{path}:{n}: \"image\" {json.dumps(obj['image'])} is no file path; give the "
                                    f"image's path (relative to the .jsonl's folder, or absolute)")
                if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", obj["image"]):
                    raise LmmcError(f"{path}:{n}: \"image\" is a URL ({obj['image']}); lmmc reads image files: "
                                    f"download it, and give its path (relative to the .jsonl's folder, or absolute)")
                image = Path(os.path.expanduser(obj["image"]))
                rec["image"] = str(image if image.is_absolute() else path.parent / image)
            if "label" in obj:
                label = obj["label"]
                if isinstance(label, float) and label.is_integer():  # 1.0: pandas writes integer columns with gaps so
                    label = int(label)
                if isinstance(label, bool) or not isinstance(label, (str, int)):
                    raise LmmcError(f"{path}:{n}: \"label\" must be a class name or a whole number, got "
                                    f"{json.dumps(label)}; write the class in quotes")
                rec["label"] = str(label).strip()  # " cat" from a CSV's "a, cat" is the class cat
                if not rec["label"]:
                    raise LmmcError(f"{path}:{n}: \"label\" is empty; give the sample's class, or drop the "
                                    f"labels of every sample")
            if "prompt" in obj:  # generative models: the text before the answer, not trained on
                rec["prompt"] = obj["prompt"]
            if "text" in rec or "image" in rec:
                records.append(rec)
        check_labels(records, path)
    else:
        raise LmmcError(f"calibration data '{path}' has an unknown format; use .txt (one text per line), "
                        f".jsonl ({{\"text\": ..., \"image\": ...}} per line) or a folder of images")
    if not records:
        raise LmmcError(f"calibration data '{path}' holds no samples; give it at least a few texts or images")
    if caption_template is not None and not path.is_dir() and not any("label" in r for r in records):
        raise LmmcError(f"calibration.caption_template captions the classes of an image folder and prompts those of "
                        f"labelled data, and '{path}' is neither (no sample has a \"label\"), so it would do "
                        f"nothing; remove caption_template, or label the samples")
    return records


def _refuse_other_pictures(folder: Path, files: list[Path]) -> None:
    """Pictures in a format lmmc does not read would be left out of an image folder without a word."""
    others = [p for p in files if p.suffix.lower() in OTHER_PICTURES]
    if others:
        kinds = ", ".join(sorted({p.suffix.lower() for p in others}))
        raise LmmcError(f"image folder '{folder}' holds {len(others)} picture(s) in a format lmmc does not read "
                        f"({kinds}), e.g. '{others[0]}'; convert them to PNG or JPEG, or move them out of the folder "
                        f"(lmmc reads {', '.join(sorted(IMAGE_SUFFIXES))})")


def read_corpus(path: Path, what: str) -> list[dict[str, Any]]:
    """read_samples of a file that is not the calibration data, its errors naming it as `what`."""
    try:
        return read_samples(path)
    except LmmcError as err:
        raise LmmcError(str(err).replace(f"calibration data '{path}'", f"{what} '{path}'")
                        .replace("; pass --calib with a .txt", "; give a .txt")) from None


def folder_files(root: Path) -> list[Path]:
    """Every file under `root`, sorted, following linked subfolders (a class folder is often a link to
    where the images live) but entering each real folder once, so a link back up cannot loop. Hidden files
    and folders are no samples (macOS's ._photo.png, .ipynb_checkpoints)."""
    seen, files, top = set(), [], Path(os.path.realpath(root))
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        if Path(real) in top.parents:  # a link to a folder above: everything beside the data would be data
            raise LmmcError(f"'{folder}' is a link to '{real}', which holds the data folder '{root}' itself: every "
                            f"folder beside it would be read as data too; remove the link")
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(folder) / n for n in names if not n.startswith(".")]
    return sorted(files)


def _class_folders(path: Path, template: str) -> list[dict[str, Any]]:
    """An image folder with one subfolder per class: every file in it must be a readable image."""
    real = {sub.name: Path(os.path.realpath(sub)) for sub in sorted(path.iterdir())
            if sub.is_dir() and not sub.name.startswith(".")}
    for a, b in ((a, b) for a in real for b in real if a < b):
        if real[a] == real[b] or real[a] in real[b].parents or real[b] in real[a].parents:
            raise LmmcError(f"image folder '{path}': the class folders '{a}' and '{b}' hold the same pictures (through a "
                            f"link, they are one folder or one holds the other), so those would carry two labels; "
                            f"give each class a folder of its own")
    files = folder_files(path)
    _refuse_shared_folders(path, real)
    _refuse_other_pictures(path, files)
    records, loose, strangers = [], [], []
    for p in files:
        if len(p.relative_to(path).parts) < 2:
            loose.append(p)
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            strangers.append(p)
        else:
            label = p.relative_to(path).parts[0]
            records.append({"image": str(p), "label": label, "text": template.format(label=label)})
    if loose:
        raise LmmcError(f"image folder '{path}' is read as one subfolder per class (calibration.caption_template "
                        f"is set), but {len(loose)} file(s) sit at its top, e.g. '{loose[0].name}'; move each "
                        f"into the folder of its class")
    if strangers:
        raise LmmcError(f"image folder '{path}' holds {len(strangers)} file(s) that are not images, e.g. "
                        f"'{strangers[0]}'; remove them (a class folder holds only .png/.jpg/... pictures)")
    empty = sorted(set(real) - {r["label"] for r in records})
    if empty:  # its class would be left out of zero-shot accuracy's choices without a word
        raise LmmcError(f"image folder '{path}': the class folder(s) {empty} hold no images; add pictures of the "
                        f"class, or remove the folder")
    _check_readable(path, [r["image"] for r in records])
    check_labels(records, path)
    return records


def _refuse_shared_folders(path: Path, classes: dict[str, Path]) -> None:
    """A folder reached from two class folders through links inside them: its pictures would carry the
    first class's label only, and the other class could read as empty."""
    owner: dict[str, tuple[str, str]] = {}
    for label, top in classes.items():
        for folder, dirs, _ in os.walk(top, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            real = os.path.realpath(folder)
            if real == os.path.realpath(path):  # a link back up to the data folder, which is read once
                dirs[:] = []
                continue
            first = owner.setdefault(real, (label, folder))
            if first[0] != label:
                raise LmmcError(f"image folder '{path}': '{first[1]}' and '{folder}' are one folder (through a link), "
                                f"in the class folders '{first[0]}' and '{label}', so its pictures would carry two "
                                f"labels; give each class pictures of its own")
            if first[1] != folder:
                dirs[:] = []  # a link back up inside one class: walked once


def _check_readable(folder: Path, paths: list[str]) -> None:
    """Every image of a folder opens (headers only), so a broken file fails before anything loads."""
    from PIL import Image, UnidentifiedImageError

    broken = []
    for p in paths:
        try:
            with Image.open(p):
                pass
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            broken.append((p, err))
    if broken:
        more = f"; {len(broken) - 1} more file(s) in '{folder}' are unreadable too" if len(broken) > 1 else ""
        raise LmmcError(f"cannot read image '{broken[0][0]}': {broken[0][1]}{more}; remove it or replace it with "
                        f"a PNG/JPEG picture")


def check_labels(records: list[dict[str, Any]], source: Path) -> None:
    """Labels, where given, on every record, one per image and per caption, at least two classes, and
    captions that name a class naming their own label (more than one in ten naming only others is refused)."""
    labelled = [r for r in records if "label" in r]
    if not labelled:
        return
    if len(labelled) != len(records):
        n = next(i for i, r in enumerate(records, 1) if "label" not in r)
        raise LmmcError(f"'{source}': some samples have a \"label\" and sample {n} has none; label every sample "
                        f"or none")
    classes = sorted({r["label"] for r in records})
    folded: dict[str, str] = {}
    # Where labels name classes for zero-shot (captioned images), "Cat" and "cat" would be two classes whose
    # prompts the text tower reads alike; elsewhere a label is an id, compared as written.
    for c in classes if any("image" in r and "text" in r for r in records) else []:
        if folded.setdefault(c.casefold(), c) != c:
            raise LmmcError(f"'{source}': the labels '{folded[c.casefold()]}' and '{c}' differ only in case, so they "
                            f"would count as two classes; write each class one way")
    if len(classes) < 2:
        raise LmmcError(f"'{source}': every sample has the label '{classes[0]}'; accuracy (zero-shot, or "
                        f"nearest-neighbour for a one-tower model) needs at least two classes. Give samples of "
                        f"several classes, or drop the labels")
    words = {c: re.compile(rf"\b{re.escape(c)}\b", re.IGNORECASE) for c in classes}
    # A number is a class's name only where captions use class numbers ("the number 3", right or wrong);
    # where most captions of numbered classes say none, the numbers are ids, and "a dog with 1 ball" names none.
    numbers = [c for c in classes if re.fullmatch(r"-?\d+", c)]
    numbered = [r for r in records if "text" in r and "image" in r and r["label"] in numbers]
    if 2 * sum(any(words[c].search(r["text"]) for c in numbers) for r in numbered) <= len(numbered):
        words = {c: w for c, w in words.items() if c not in numbers}
    naming, wrong = 0, []
    for r in records:
        # a caption describes its image; a text alone may name any class (a review's "1 star" labelled 0)
        named = [c for c, w in words.items() if "text" in r and "image" in r and w.search(r["text"])]
        naming += bool(named)
        if named and r["label"] not in named:
            wrong.append((r, named[0]))
    # Shifted or shuffled labels contradict many captions; a caption may also mention another class beside
    # its own under another word ("a puppy chasing a cat", labelled dog), as COCO-style captions do.
    if wrong and len(wrong) > naming / 10:
        r, other = wrong[0]
        raise LmmcError(f"'{source}': {len(wrong)} of the {naming} captions that name a class name another class "
                        f"than their label, e.g. the caption '{r['text']}' names the class '{other}' but is labelled "
                        f"'{r['label']}'; the labels do not match the captions. Fix the labels or the captions")
    for key in ("image", "text"):
        # a sample as the split knows it: an image by its bytes (a copy is the same), a text case and spaces aside
        seen: dict[str, tuple[str, str]] = {}
        for r in records:
            if key not in r:
                continue
            first, label = seen.setdefault(_image_digest(r[key]) if key == "image" else text_key(r[key]),
                                           (r[key], r["label"]))
            if label != r["label"]:
                kind = "picture" if key == "image" else "text, case, spacing and Unicode form aside,"
                same = f" (the same {kind} as '{first}')" if first != r[key] else ""
                raise LmmcError(f"'{source}': the {key} '{r[key]}'{same} carries two labels, '{label}' and "
                                f"'{r['label']}'; each {key} belongs to one class. Fix the labels")


def _group(record: dict[str, Any], modalities: set[str]) -> str | None:
    """What a held-out sample must not share with any calibration sample: its image (by its bytes, so a
    copy or a link of it is the same image) where the model reads images, else its text, read as an
    uncased tokenizer reads it (case and runs of spaces aside). None: the model reads nothing of it."""
    if "image" in record and "image" in modalities:
        return "image:" + _image_digest(record["image"])
    if "text" in record and "text" in modalities:
        return "text:" + text_key(record["text"])
    return None


def part_keys(record: dict[str, Any], modalities: Iterable[str] = ("text", "image")) -> dict[str, str]:
    """Each part of a sample a model reads (`modalities`) as samples are told apart: modality -> its text by
    text_key, or its image by its bytes."""
    return {m: g for m in modalities if (g := _group(record, {m})) is not None}


def sample_key(record: dict[str, Any]) -> str:
    """What tells samples of a judging corpus apart: an image by its bytes, a text by its text_key, a pair by
    both, so a sentence again in another case or Unicode form is not counted twice."""
    return json.dumps([_group(record, {"image"}), _group(record, {"text"})])


def text_key(text: str) -> str:
    """What tells texts apart: whatever the tokenizer keeps of them, so case, spacing, the Unicode form (NFKC: an
    "é" composed or as "e" and an accent) and invisible format characters (zero-width spaces, byte-order marks)
    aside."""
    if not text.isascii():  # ASCII is its own NFKC form and holds no format characters
        text = "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")
    return " ".join(text.split()).casefold()


@functools.cache
def _image_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:  # a missing file is reported where images are opened
        return path


def split(records: list[dict[str, Any]], n_calib: int, n_eval: int, seed: int,
          modalities: set[str] | None = None, source: Path | None = None) -> tuple[list, list]:
    """Deduplicate, shuffle with `seed`, and hold out whole images (whole texts, for text alone) first,
    one sample each, so no held-out image is calibrated on under any caption. `modalities`: what the
    model reads (default: text and images)."""
    modalities = {"text", "image"} if modalities is None else modalities
    unique = list({json.dumps(r, sort_keys=True): r for r in records}.values())
    groups = [_group(r, modalities) for r in unique]
    order = [i for i in range(len(unique)) if groups[i] is not None]
    random.Random(seed).shuffle(order)
    firsts: dict[str, dict[str, Any]] = {}
    for i in order:
        firsts.setdefault(groups[i], unique[i])
    if len(firsts) < 3:
        named = "" if source is None else f" '{source}'"
        raise LmmcError(f"calibration data{named} has {len(firsts)} distinct samples; at least 3 are needed "
                        f"(some to calibrate on, two to validate on)")
    n_eval = min(n_eval, max(2, len(firsts) // 4))
    held = set(list(firsts)[:n_eval])
    held_out = [firsts[g] for g in list(firsts)[:n_eval]]
    if len(modalities) == 1:  # a copy of an image, or a text again, is the same sample to a one-tower model
        calib = [r for g, r in firsts.items() if g not in held][:n_calib]
    else:  # an image under each of its captions is a pair of its own
        calib = [unique[i] for i in order if groups[i] not in held][:n_calib]
    return calib, held_out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


DEFAULT_MAX_LENGTH = 128


def text_length(tokenizer, max_length: int | None, pad_to: int | None = None) -> int:
    """The tokens a text is cut to: `max_length`, by default 128 or the tokenizer's own limit if lower,
    and never more than a fixed length the model reads."""
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH)))
    return max_length if pad_to is None else min(max_length, pad_to)


def encode_text(tokenizer, texts: list[str], batch_size: int, max_length: int | None,
                pad_to: int | None = None) -> list[Batch]:
    """Token batches, truncated to `max_length` (default: 128 tokens or the tokenizer's own limit if
    lower) and padded to the batch's longest text, or to exactly `pad_to` tokens when the model reads
    texts at a fixed length. There the mask is the tokenizer's own: one that returns none (SigLIP's, as
    Google ships it) means the model reads its padding too, as it was trained, and the mask is all ones."""
    max_length = text_length(tokenizer, max_length, pad_to)
    out = []
    for chunk in _chunks(clip_texts(tokenizer, texts, max_length), batch_size):
        if pad_to is None:
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                            return_attention_mask=True)  # padding to a batch's longest text must change nothing
        else:
            enc = tokenizer.pad(tokenizer(chunk, truncation=True, max_length=max_length), padding="max_length",
                                max_length=pad_to, return_tensors="pt")
        mask = enc.get("attention_mask")
        out.append({"input_ids": enc["input_ids"],
                    "attention_mask": mask if mask is not None else torch.ones_like(enc["input_ids"])})
    return out


# Vocabulary entries that are placeholders rather than text: BERT's [unused0], SentencePiece's <0x0A>, T5's
# <extra_id_0>. Only names in brackets: a byte-level BPE's "<</w>" or "<>" is text.
_PLACEHOLDER = re.compile(r"^(\[[A-Za-z0-9_]+\]|<[A-Za-z0-9_|]+>)$")


def ordinary_token_ids(tokenizer) -> list[int]:
    """The tokenizer's ids that stand for text: neither special tokens nor placeholders."""
    special = set(tokenizer.all_special_ids)
    return [i for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
            if i not in special and tok and not _PLACEHOLDER.match(tok)]


def token_coverage(tokenizer, input_ids: list[torch.Tensor]) -> float:
    """The share of the tokenizer's ordinary tokens that occur at least once in `input_ids`."""
    pool = ordinary_token_ids(tokenizer)
    seen = set(torch.cat([ids.flatten() for ids in input_ids]).tolist()) if input_ids else set()
    return len(seen.intersection(pool)) / len(pool) if pool else 0.0


def vocabulary_runs(tokenizer, count: int, seed: int, shortest: int = 4, longest: int = 24) -> list[str]:
    """`count` texts, each a run of `shortest` to `longest` tokens drawn uniformly from the tokenizer's whole
    vocabulary (special tokens and placeholders never), decoded back to text so that they are encoded like
    any corpus line."""
    pool = ordinary_token_ids(tokenizer)
    if not pool:
        raise LmmcError("the tokenizer's vocabulary holds no ordinary tokens to draw from")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.tensor(pool)
    texts = []
    for _ in range(count):
        n = int(torch.randint(shortest, longest + 1, (1,), generator=gen))
        ids = picks[torch.randint(len(pool), (n,), generator=gen)].tolist()
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def encode_images(image_processor, paths: list[str], batch_size: int) -> list[Batch]:
    out = []
    for chunk in _chunks(paths, batch_size):
        images = [open_image(p) for p in chunk]
        out.append({"pixel_values": image_processor(images=images, return_tensors="pt")["pixel_values"]})
    return out


def check_images(paths: list[str]) -> None:
    """Decode each image: unreadable or truncated files and non-picture modes fail before any weight loads.
    Any size is read: the image processor resizes every picture to the model's (checked at load)."""
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            with Image.open(p) as im:
                mode = im.mode
                im.load()  # a truncated file has a whole header
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise LmmcError(f"cannot read image '{p}': {err}; remove it or replace it with a PNG/JPEG picture") from None
        if mode in NOT_PICTURES:
            raise LmmcError(f"image '{p}' has mode {mode} (integer or float pixels, e.g. a depth map or a 16-bit "
                            f"scan), not a picture; convert it to 8-bit RGB or remove it")


@dataclass
class Selection:
    """The records a compile will calibrate and validate on, and what shrank on the way."""

    calib: list[dict[str, Any]]
    held_out: list[dict[str, Any]]
    warnings: list[str]


def select(cfg, source: Path, records: list[dict[str, Any]], modalities: set[str],
           generative: bool = False) -> Selection:
    """Split the records and keep what the model's towers can use. Every count that ends below what the
    recipe asked for is said in a warning; too few to work with is an error. `generative`: the texts are
    answers a decoder writes about each image, not a text tower's inputs."""
    dual = "text" in modalities and "image" in modalities
    if dual:
        # Dual encoders need pairs so both towers see matched samples and zero-shot agreement is defined.
        has = {k: sum(k in r for r in records) for k in ("text", "image")}
        if not has["text"] or not has["image"]:
            lacking, held = ("texts", "images") if not has["text"] else ("images", "texts")
            raise LmmcError(f"calibration data '{source}' holds {has['image'] or has['text']} {held} but no "
                            f"{lacking}; this model has a text and an image tower and calibrates on image-text "
                            f"pairs: give a .jsonl with {{\"text\": ..., \"image\": ...}} per line, or an image folder "
                            f"with one subfolder per class and calibration.caption_template")
        # before the split, so a sample neither tower can use takes no held-out place
        paired = [r for r in records if "text" in r and "image" in r]
        lost = sorted({r["label"] for r in records if "label" in r} - {r["label"] for r in paired if "label" in r})
        if lost and cfg.caption_template is None:  # its prompts are the captions: it would drop out of zero-shot
            raise LmmcError(f"calibration data '{source}': class(es) {', '.join(map(repr, lost[:5]))} have no record "
                            f"with both a text and an image, so zero-shot accuracy would leave them out of its "
                            f"choices; give their records a \"text\", or set calibration.caption_template")
        unpaired = len(records) - len(paired)
        records = paired
    else:
        unpaired = 0
        (modality,) = modalities
        if not any(modality in r for r in records):
            other = "images" if modality == "text" else "texts"
            raise LmmcError(f"calibration data '{source}' holds {len(records)} {other} and no {modality}s; this "
                            f"model reads {modality}s only: give "
                            + ("a .txt with one text per line" if modality == "text" else "a folder of images"))
    calib_recs, eval_recs = split(records, cfg.samples, cfg.eval_samples, cfg.seed, modalities, source)
    for modality in sorted(modalities):
        key = "text" if modality == "text" else "image"
        c = [r for r in calib_recs if key in r]
        e = [r for r in eval_recs if key in r]
        if not c or len(e) < 2:
            kinds = "image-text pairs (.jsonl with \"text\" and \"image\")" if dual else f"{modality} samples"
            raise LmmcError(f"calibration data '{source}' has too few usable {modality} samples for this model "
                            f"({len(c)} to calibrate on, {len(e)} held out); it needs {kinds}")
    warnings = []
    if unpaired:
        warnings.append(f"{unpaired} record(s) of '{source}' lack a text or an image and were left out: a model "
                        f"with a text and an image tower calibrates and validates on image-text pairs")
    if dual and not generative:
        # The split keeps held-out images apart; a caption shared by several images (a caption_template's,
        # one per class) can be a calibration caption too, and then the text tower is judged on what it fitted.
        # Held-out captions that only repeat each other are unseen text all the same.
        calibrated = {text_key(r["text"]) for r in calib_recs}
        texts = {text_key(r["text"]) for r in eval_recs}
        shared = sum(text_key(r["text"]) in calibrated for r in eval_recs)
        if shared:
            template = " (a caption_template gives each class one)" if cfg.caption_template else ""
            warnings.append(f"{shared} of the {len(eval_recs)} held-out pairs have a caption the compile calibrated "
                            f"on ({len(texts & calibrated)} of the {len(texts)} distinct held-out captions are among "
                            f"the {len(calibrated)} distinct calibration captions{template}): the text tower's "
                            f"figures, the gates of its INT8 artifacts "
                            f"(quantised on those captions) included, measure texts the compile calibrated on, and "
                            f"distils on if distill reads this data, more than unseen text; give pairs with captions "
                            f"of their own to measure that")
    if modalities == {"image"} and source.is_dir() and not any("label" in r for r in records):
        places = [Path(os.path.relpath(r["image"], source)).parts for r in records]
        folders = {p[0] for p in places if len(p) == 2}
        if len(folders) > 1 and all(len(p) == 2 for p in places):
            warnings.append(f"calibration data '{source}' holds its images in {len(folders)} subfolders, as classes "
                            f"are laid out, and is read unlabelled: the task metric is nearest-neighbour agreement "
                            f"with the teacher. To measure nearest-neighbour accuracy on those classes, set "
                            f"calibration.caption_template (e.g. '{{label}}'), which labels each image by its folder")
    unit = "pairs" if dual else "samples"
    for what, got, asked in (("calibration", len(calib_recs), cfg.samples),
                             ("held-out", len(eval_recs), cfg.eval_samples)):
        if got < asked:
            warnings.append(f"calibration data '{source}' gives {got} {what} {unit}, not the {asked} the recipe "
                            f"asks for ({len(records)} records; held-out samples are capped at a quarter of "
                            f"the distinct ones so calibration keeps the rest)")
    return Selection(calib_recs, eval_recs, warnings)


def check_held_out_classes(chosen: Selection, source: Path) -> None:
    """Labelled held-out samples of one class only: every accuracy on them reads 1.0, chance is 1.0, and
    no gate can tell a student from a constant."""
    labels = {r["label"] for r in chosen.held_out if "label" in r}
    if len(labels) == 1:
        raise LmmcError(f"'{source}': all {len(chosen.held_out)} held-out samples have the label '{labels.pop()}', "
                        f"so their accuracy is 1.0 for any model; raise calibration.eval_samples, change "
                        f"calibration.seed, or give more samples of the other classes")


def drop_token_twins(chosen: Selection, tokenizer, max_length: int) -> Selection:
    """A text model's held-out texts that read, cut to `max_length` tokens, as the same tokens as a text
    calibrated on (or held out before): texts that share a long opening and differ only past the cut. The
    split tells texts apart by their words; validating on such a twin would measure a calibrated input."""
    kept = unseen_texts(tokenizer, [r["text"] for r in chosen.held_out],
                        set(token_ids(tokenizer, [r["text"] for r in chosen.calib], max_length)), max_length)
    held_out = [chosen.held_out[i] for i in kept]
    if len(held_out) == len(chosen.held_out):
        return chosen
    twins = len(chosen.held_out) - len(held_out)
    warning = (f"{twins} held-out text(s) read as the same {max_length} tokens as a calibration text or another "
               f"held-out one (they differ only past the cut, or in characters the tokenizer drops) and were not held out; {len(held_out)} remain")
    return Selection(chosen.calib, held_out, [*chosen.warnings, warning])


def load_calibration(cfg, path: str | None, modalities: set[str], preprocessor: dict[str, Any],
                     positions: int | None = None, pad_to: int | None = None) -> CalibData:
    """Read, split and encode real calibration data for the modalities the model's towers need.
    `positions` (the text tower's limit) caps the default token length; `pad_to`: see `encode_text`."""
    source = Path(path)
    max_length = cfg.max_length or (min(DEFAULT_MAX_LENGTH, positions) if positions else None)
    records = read_samples(source, cfg.caption_template)
    chosen = select(cfg, source, records, modalities)
    if modalities == {"text"} and preprocessor.get("tokenizer") is not None:
        chosen = drop_token_twins(chosen, preprocessor["tokenizer"], text_length(preprocessor["tokenizer"],
                                                                                 max_length, pad_to))
    calib: dict[str, list[Batch]] = {}
    held: dict[str, list[Batch]] = {}
    short: list[Batch] = []
    eval_short: list[Batch] = []
    for modality in sorted(modalities):
        key = "text" if modality == "text" else "image"
        c = [r[key] for r in chosen.calib if key in r]
        e = [r[key] for r in chosen.held_out if key in r]
        if modality == "text":
            tok = preprocessor.get("tokenizer")
            if tok is None:
                raise LmmcError("the model directory has no tokenizer; save one beside the model to calibrate on text")
            calib[modality] = encode_text(tok, c, cfg.batch_size, max_length, pad_to)
            held[modality] = encode_text(tok, e, cfg.batch_size, max_length, pad_to)
            cut = [""] + short_texts(c[:len(c) // 4], cfg.seed, tok)
            short = encode_text(tok, cut, cfg.batch_size, max_length, pad_to)
            openings = short_texts(e, cfg.seed, tok)
            length = text_length(tok, max_length, pad_to)
            kept = unseen_texts(tok, openings, set(token_ids(tok, cut, length)), length)
            eval_short = encode_text(tok, [openings[i] for i in kept], cfg.batch_size, max_length, pad_to)
        else:
            proc = preprocessor.get("image_processor")
            if proc is None:
                raise LmmcError("the model directory has no image processor config; save one beside the model")
            calib[modality] = encode_images(proc, c, cfg.batch_size)
            held[modality] = encode_images(proc, e, cfg.batch_size)
    check_held_out_classes(chosen, source)
    counts = {"calibration": len(chosen.calib), "held_out": len(chosen.held_out)}
    labels = None
    if chosen.held_out and "label" in chosen.held_out[0]:
        labels = _labels(cfg, records, chosen.held_out, preprocessor.get("tokenizer") if "text" in modalities
                         else None, max_length, pad_to)
    texts = frozenset(text_key(r["text"]) for r in chosen.held_out if "text" in r)
    if modalities != {"text"}:
        # A dual encoder's held-out caption is kept out of a distillation corpus under any image, unless it is a
        # calibration caption too (a class's templated caption), which select() warns of.
        texts -= {text_key(r["text"]) for r in chosen.calib if "text" in r}
    calibrated = frozenset(k for r in chosen.calib for k in part_keys(r, modalities).values())
    return CalibData(calib, held, str(source), counts, chosen.warnings, labels, held_out_texts=texts, short=short,
                     eval_short=eval_short, calibrated=calibrated,
                     calibration_texts=tuple(r["text"] for r in chosen.calib if "text" in r and "text" in modalities))


def short_texts(texts: list[str], seed: int, tokenizer) -> list[str]:
    """The first one to four words of each text (tokens, in a script written without spaces): queries as
    short as a search box sends. In a text of two or three tokens the [CLS] and [SEP] states, whose outlier
    channels set the INT8 ranges, make most of the mean; calibrated on 64 sentences alone, NNCF's INT8 MiniLM
    kept 0.871 cosine to fp32 on the empty text, 0.981 with these (tests/test_openvino.py). Repeats are dropped."""
    gen = random.Random(seed)
    out = []
    for text in texts:
        count, words = gen.randint(1, 4), text.split()
        if len(words) > 1 or not getattr(tokenizer, "is_fast", False):
            out.append(" ".join(words[:count]))
        else:  # the text up to the end of its count-th token, as the user wrote it (an [UNK] keeps its letter)
            spans = tokenizer(clip_text(tokenizer, text, count), add_special_tokens=False,
                              return_offsets_mapping=True)["offset_mapping"]
            out.append(text[:spans[min(count, len(spans)) - 1][1]] if spans else text)
    return list(dict.fromkeys(out))


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[tuple[int, ...]]:
    """Each text's token ids, cut to `max_length` (its opening first: a line may be megabytes)."""
    if not texts:  # a tokenizer given no texts fails
        return []
    return [tuple(ids) for ids in tokenizer(clip_texts(tokenizer, texts, max_length), truncation=True,
                                            max_length=max_length)["input_ids"]]


def unseen_texts(tokenizer, texts: list[str], seen: set[tuple[int, ...]], max_length: int) -> list[int]:
    """The indices of `texts` whose tokens, cut to `max_length`, are neither in `seen` (`token_ids` of texts
    read before) nor those of an earlier one: an uncased tokenizer reads "What is" as "what is"."""
    known, kept = set(seen), []
    for i, ids in enumerate(token_ids(tokenizer, texts, max_length)):
        if ids not in known:
            known.add(ids)
            kept.append(i)
    return kept


def _labels(cfg, records: list[dict[str, Any]], held_out: list[dict[str, Any]], tokenizer,
            max_length: int | None, pad_to: int | None) -> Labels:
    """Classes of the whole data set; prompts from the caption template, else every distinct caption of an
    image that is not held out (a held-out image's own captions would name its class for it; a class left
    with no prompt is not scored)."""
    prompted = tokenizer is not None and cfg.caption_template is None
    classes = sorted({r["label"] for r in records if "text" in r or not prompted})
    index = {c: i for i, c in enumerate(classes)}
    if cfg.caption_template is not None:
        prompts = {cfg.caption_template.format(label=c): c for c in classes}
    else:
        # one prompt per caption, case and spacing aside as in the split: a copy would weigh twice in its class
        firsts: dict[str, dict[str, Any]] = {}
        held_images = {_group(r, {"image"}) for r in held_out} - {None}
        for r in records:
            if "text" in r and _group(r, {"image"}) not in held_images:
                firsts.setdefault(text_key(r["text"]), r)
        prompts = {r["text"]: r["label"] for r in sorted(firsts.values(), key=lambda r: r["text"])}
    encoded = encode_text(tokenizer, list(prompts), cfg.batch_size, max_length, pad_to) if tokenizer else []
    return Labels(classes, [index[r["label"]] for r in held_out], encoded, [index[c] for c in prompts.values()])


def text_tokens(calib: CalibData | None, positions: int, deployment: int | None = None) -> int:
    """Tokens of one text sequence for counting FLOPs: the deployment length when the recipe gives one,
    else the calibration texts' mean real length; never more than the model's positions."""
    if deployment is not None:
        return min(deployment, positions)
    lengths = [int(n) for b in (calib.calib_batches("text") if calib else []) for n in b["attention_mask"].sum(1)]
    return min(positions, round(statistics.mean(lengths)) if lengths else DEFAULT_MAX_LENGTH)


def check_random_allowed(model: torch.nn.Module) -> None:
    """Refuse random inputs for anything but a tiny model (works on a meta-device model too)."""
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > RANDOM_MAX_PARAMS:
        raise LmmcError(f"random calibration inputs are only for tiny test models (≤ {RANDOM_MAX_PARAMS:,} "
                        f"parameters; this one has {n_params:,}); give real data with --calib")


def random_calibration(cfg, model: torch.nn.Module, adapter) -> CalibData:
    """Random token ids and pixels, for tiny random-weight test models only."""
    from lmmc.adapters import tower_config
    from lmmc.modelio import text_pad_length

    check_random_allowed(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    # a model read at one length (SigLIP) gets every text at that length, as load_calibration pads them
    fixed = text_pad_length(model.config, adapter)
    calib, held = {}, {}
    for tower in adapter.towers:
        tcfg = tower_config(model, tower)

        def batches(n: int) -> list[Batch]:
            out = []
            for size in [len(c) for c in _chunks(list(range(n)), cfg.batch_size)]:
                if tower.modality == "text":
                    seq = fixed or min(cfg.max_length or 16, 16, getattr(tcfg, "max_position_embeddings", 16))
                    ids = torch.randint(0, tcfg.vocab_size, (size, seq), generator=gen)
                    mask = torch.ones_like(ids)
                    if not fixed:
                        mask[size // 2:, seq * 3 // 4:] = 0  # some padding, so masks are exercised
                    out.append({"input_ids": ids, "attention_mask": mask})
                else:
                    shape = (size, getattr(tcfg, "num_channels", 3), tcfg.image_size, tcfg.image_size)
                    out.append({"pixel_values": torch.randn(shape, generator=gen)})
            return out

        calib[tower.modality] = batches(cfg.samples)
        held[tower.modality] = batches(cfg.eval_samples)
    return CalibData(calib, held, "random", {"calibration": cfg.samples, "held_out": cfg.eval_samples})


# Generative image-text models (LLaVA): one batch holds input_ids with the image tokens already expanded
# as the model's processor expands them, attention_mask, pixel_values and labels (the answer's tokens;
# -100 on the prompt, the image tokens and padding, so a loss on them is teacher-forced next-token loss).
IGNORE_INDEX = -100


def check_generative_records(records: list[dict[str, Any]], source: Path, processor: Any = None,
                             chat_template: bool = False, what: str = "calibration data") -> None:
    """Every record of an image-text generative model needs an image and the text it should produce; the
    processor's image token (`<image>`) may stand once in a prompt, where the picture goes, and nowhere else."""
    token = image_token(processor)
    for n, r in enumerate(records, 1):
        lacking = [k for k in ("image", "text") if k not in r]
        if lacking:
            raise LmmcError(f"{what} '{source}': sample {n} has no {' and no '.join(lacking)}; this "
                            f"generative image-text model reads image-text records: give a .jsonl with "
                            f"{{\"image\": ..., \"prompt\": ... (optional), \"text\": the answer or caption}} per line")
        if not token:
            continue
        if token in r["text"]:
            raise LmmcError(f"{what} '{source}': the text of sample {n} holds the image token {token!r}, "
                            f"which stands for the picture; an answer is words only: remove it")
        uses = (r.get("prompt") or "").count(token)
        placed = chat_template or places_image(processor)
        if uses > 1 or (uses and placed):
            raise LmmcError(f"{what} '{source}': the prompt of sample {n} holds the image token {token!r} "
                            f"{uses} time(s); " + ("with chat_template the template places the picture: remove it"
                                                   if chat_template else "the model's processor writes the picture's "
                                                   "tokens before the prompt itself: remove it" if placed else
                                                   "each sample has one picture: keep one"))


def _answer_room(prompt_ids: list[int], image_id: int, limit: int, positions: int | None, image: str) -> int:
    """Tokens left for the answer after a prompt: within `limit` text tokens and the decoder's `positions`
    (the image's tokens included); none left is an error naming the prompt's image."""
    text_tokens = sum(i != image_id for i in prompt_ids)
    room = limit - text_tokens
    if positions is not None and positions - len(prompt_ids) < room:
        room = positions - len(prompt_ids)
        if room <= 0:
            raise LmmcError(f"the prompt of image '{image}' takes {len(prompt_ids)} positions with its image's "
                            f"tokens, leaving none of the decoder's {positions} for its answer; shorten the prompt")
    if room <= 0:
        raise LmmcError(f"the prompt of image '{image}' takes {text_tokens} text tokens, leaving none of "
                        f"calibration.max_length = {limit} for its answer; raise calibration.max_length or shorten "
                        f"the prompt")
    return room


def check_prompts(processor, records: list[dict[str, Any]], max_length: int | None, chat_template: bool,
                  positions: int | None) -> dict[str, tuple[int, int, int]]:
    """What encode_generative refuses of the prompts, found without reading the images: the processor
    expands the image token by the model's config alone, so a blank picture stands in. Returns, per prompt,
    the answer's room, the prompt's text tokens and the positions it takes."""
    from PIL import Image

    blank = Image.new("RGB", (64, 64))
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token(processor))
    rooms: dict[str, tuple[int, int, int]] = {}
    for r in records:
        prompt = generative_prompt(processor, r.get("prompt"), chat_template)
        if prompt not in rooms:
            ids = processor(images=[[blank]], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
            rooms[prompt] = (_answer_room(ids, image_id, max_length or DEFAULT_MAX_LENGTH, positions, r["image"]),
                             sum(i != image_id for i in ids), len(ids))
    return rooms


def check_answers(processor, held_out: list[dict[str, Any]], rooms: dict[str, tuple[int, int, int]],
                  max_length: int | None, chat_template: bool, positions: int | None) -> None:
    """Held-out answers encode_generative would cut to fit: validation scores the answers as encoded, and a
    cut one is matched by any generation that starts like it (exact match 1.000 on two-token stubs).
    `rooms` is what check_prompts returned for these records."""
    tok = processor.tokenizer
    cut, needed, beyond = 0, 0, False
    for r in held_out:
        room, text_tokens, taken = rooms[generative_prompt(processor, r.get("prompt"), chat_template)]
        answer = len(tok(r["text"], add_special_tokens=False)["input_ids"]) + (tok.eos_token_id is not None)
        if answer > room:
            cut, needed = cut + 1, max(needed, text_tokens + answer)
            beyond |= positions is not None and taken + answer > positions
    if cut:
        fix = (f"shorten the answers or prompts: the decoder's {positions} positions, the image's tokens among them, "
               f"hold no more" if beyond else
               f"raise calibration.max_length to {needed}, or shorten the answers or prompts")
        raise LmmcError(f"{cut} of the {len(held_out)} held-out answers do not fit calibration.max_length = "
                        f"{max_length or DEFAULT_MAX_LENGTH} text tokens with their prompts (or the decoder's "
                        f"positions) and would be cut, and validation would score the cut answers: {fix}")


def check_generation_room(processor, held_out: list[dict[str, Any]], rooms: dict[str, tuple[int, int, int]],
                          tokens: int, chat_template: bool, positions: int | None) -> None:
    """Validation's greedy runs generate `tokens` new tokens after each held-out prompt, or one more than the
    longest answer: a prompt that leaves the decoder fewer positions stopped the compile after every pass.
    `rooms` is what check_prompts returned for these records."""
    if positions is None or not held_out:
        return
    tok = processor.tokenizer
    longest = max(len(tok(r["text"], add_special_tokens=False)["input_ids"]) + (tok.eos_token_id is not None)
                  for r in held_out)
    budget = max(tokens, longest + 1)
    taken = max(rooms[generative_prompt(processor, r.get("prompt"), chat_template)][2] for r in held_out)
    if taken + budget > positions:
        fix = (f"lower validate.generation_tokens to {positions - taken} or less, or shorten the prompts"
               if positions - taken > longest else "shorten the prompts or the answers")
        raise LmmcError(f"validation generates {budget} new tokens after each held-out prompt (validate."
                        f"generation_tokens = {tokens}, or one more than the longest answer), and the longest prompt "
                        f"takes {taken} positions with its image's tokens: {taken + budget}, past the decoder's "
                        f"{positions}; {fix}")


def answer_end(processor, adapter, config) -> int | None:
    """The token every answer ends with: the adapter's where it names one, else the tokenizer's eos."""
    return adapter.answer_end(config) if adapter.answer_end is not None else processor.tokenizer.eos_token_id


def generative_limits(processor, adapter, config) -> tuple[int, int | None]:
    """What `encode_generative` reads of a model: the decoder's positions and the token that ends answers."""
    from lmmc.modelio import text_positions

    positions = min(text_positions(config, t) for t in adapter.towers if t.modality == "text")
    return positions, answer_end(processor, adapter, config)


def encode_generative(processor, records: list[dict[str, Any]], batch_size: int, max_length: int | None,
                      chat_template: bool, positions: int | None = None, end: int | None = None) -> list[Batch]:
    """Batches of image-prompt-answer records. The prompt (with its image) goes through the processor,
    which expands the image token; the answer is tokenized alone and appended, so the boundary between
    them, where labels start, is exact. `max_length` caps the text tokens (prompt and answer, not the
    image tokens); the answer is cut to fit, and to fit the decoder's `positions` with the image's tokens.
    `end` ends every answer (`answer_end`; the tokenizer's eos when None)."""
    tok = processor.tokenizer
    end = tok.eos_token_id if end is None else end
    limit = max_length or DEFAULT_MAX_LENGTH
    image_id = tok.convert_tokens_to_ids(image_token(processor))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out = []
    for chunk in _chunks(records, batch_size):
        ids, labels, pixels = [], [], []
        for r in chunk:
            image = open_image(r["image"])
            # Images nested per text: processors of models with several images per sample require it.
            enc = processor(images=[[image]], text=[generative_prompt(processor, r.get("prompt"), chat_template)],
                            return_tensors="pt")
            prompt_ids = enc["input_ids"][0].tolist()
            text = clip_text(tok, r["text"], limit)
            if places_image(processor) and r.get("prompt") and not r["prompt"][-1].isspace() and text[:1] != " ":
                text = " " + text  # "Answer:" then " a house", as BLIP-2's prompts read (no newline ends them)
            answer = tok(text, add_special_tokens=False)["input_ids"]
            if end is not None:
                answer = answer + [end]
            answer = answer[:_answer_room(prompt_ids, image_id, limit, positions, r["image"])]
            ids.append(prompt_ids + answer)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + answer)
            pixels.append(enc["pixel_values"])
        width = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "pixel_values": torch.cat(pixels),
            "labels": torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for y in labels]),
        }
        out.append(batch)
    return out


def tower_batches(batches: list[Batch]) -> dict[str, list[Batch]]:
    """Generative batches per modality: the decoder ("text") reads them whole; the vision tower reads only
    the pixels, so no text mask is ever applied to its patch tokens."""
    return {"text": batches, "image": [{"pixel_values": b["pixel_values"]} for b in batches]}


def load_generative_calibration(cfg, path: str, processor, positions: int | None = None,
                                end: int | None = None) -> CalibData:
    """Read, split and encode image-text records for a generative model within the decoder's `positions`."""
    source = Path(path)
    records = read_samples(source)
    check_generative_records(records, source, processor, cfg.chat_template)
    chosen = select(cfg, source, records, {"text", "image"}, generative=True)
    calib = encode_generative(processor, chosen.calib, cfg.batch_size, cfg.max_length, cfg.chat_template, positions, end)
    held = encode_generative(processor, chosen.held_out, cfg.batch_size, cfg.max_length, cfg.chat_template, positions,
                             end)
    counts = {"calibration": len(chosen.calib), "held_out": len(chosen.held_out)}
    # images alone: a generative record is held out by its image, and its answers repeat across images
    calibrated = frozenset(k for r in chosen.calib for k in part_keys(r, {"image"}).values())
    return CalibData(tower_batches(calib), tower_batches(held), str(source), counts, chosen.warnings,
                     chat_template=cfg.chat_template, calibrated=calibrated)


def random_generative_calibration(cfg, model: torch.nn.Module, adapter) -> CalibData:
    """Random pixels and token ids around a block of image tokens, for tiny random-weight test models:
    the image tokens first, then a random prompt and answer, some rows padded."""
    check_random_allowed(model)
    config = model.config
    gen = torch.Generator().manual_seed(cfg.seed)
    vcfg, tcfg = config.vision_config, config.text_config
    image_id, image_tokens = adapter.image_tokens.token_id(config), adapter.image_tokens.count(config)
    text = min(cfg.max_length or 16, 16)
    low = image_id + 1  # random ids above the image token's (special tokens come first) are plain words

    def batches(n: int) -> list[Batch]:
        out = []
        for size in [len(c) for c in _chunks(list(range(n)), cfg.batch_size)]:
            ids = torch.cat([torch.full((size, image_tokens), image_id),
                             torch.randint(low, tcfg.vocab_size, (size, text), generator=gen)], 1)
            mask = torch.ones_like(ids)
            mask[size // 2:, -text // 4:] = 0
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            labels[:, :image_tokens + text // 4] = IGNORE_INDEX  # the image and a short prompt
            shape = (getattr(vcfg, "num_channels", 3), vcfg.image_size, vcfg.image_size)
            pixels = torch.randn((size, *((1,) if adapter.image_tokens.images_axis else ()), *shape), generator=gen)
            out.append({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels})
        return out

    return CalibData(tower_batches(batches(cfg.samples)), tower_batches(batches(cfg.eval_samples)), "random",
                     {"calibration": cfg.samples, "held_out": cfg.eval_samples})
