"""Train the shapes sample teacher: a small SiglipModel on drawn coloured shapes with compositional captions,
saved with a SentencePiece tokenizer and image processor as a plain Hugging Face directory that lmmc compiles.

    .venv/bin/python samples/teachers/shapes.py --out out/shapes

writes (under out/shapes/)
    data/images/0000.png ...   IMAGES pictures of SIDE x SIDE pixels, each one shape on a noisy background
    data/train.jsonl           every training image with each of its captions (what the teacher saw)
    data/test.jsonl            the held-out images (a fifth, stratified by class) with their captions
    data/calib.jsonl           each training image once with one caption: lmmc's calibration and
                               distillation data, so a compile never sees a test image either
    model/                     config.json, model.safetensors, spiece.model and the tokenizer files,
                               preprocessor_config.json
Each jsonl line is {"image": path relative to the jsonl, "text": caption, "label": class name}.

A class is one of 192 combinations of size, colour, shape and corner ("large red triangle top-left"), and a
caption names all four in one of several word orders, so neither tower can be cut down to a lookup of one
attribute: the digits teacher's ten classes let a student keep its accuracy with 15 % of the text tower.
The model is laid out as Google's SigLIP checkpoints are: a vision tower pooled by attention (the MAP head),
a text tower pooled at its last position and read at its full length (every caption padded with </s> to
MAX_POSITIONS tokens, no attention mask), a SentencePiece tokenizer that lower-cases and drops punctuation,
and SigLIP's pairwise sigmoid loss with a learnt scale and bias (every pair of the same class a positive).
Zero-shot accuracy on the test images (each image against one prompt per class, "a photo of a large red
triangle in the top left corner") is printed at the end; chance is 1 in 192.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

_spec = importlib.util.spec_from_file_location("digits_teacher", Path(__file__).with_name("digits.py"))
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)

SIZES = {"small": 4.5, "large": 8.5}  # the shape's radius in pixels, before jitter
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 235), "yellow": (230, 210, 40),
           "purple": (150, 60, 200), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "cross")
CORNERS = {"top-left": (0.28, 0.28), "top-right": (0.72, 0.28), "bottom-left": (0.28, 0.72),
           "bottom-right": (0.72, 0.72)}  # the shape's centre as a fraction of the side
ATTRIBUTES = ("size", "colour", "shape", "corner")  # a class's parts, in order
PROMPT = "a photo of a {size} {colour} {shape} in the {corner} corner"
# Synonymous captions in other word orders; each image gets CAPTIONS_PER_IMAGE of them, drawn with the seed.
TEMPLATES = (
    PROMPT,
    "a {size} {colour} {shape} in the {corner}",
    "the {corner} corner holds a {size} {shape} coloured {colour}",
    "{colour} {shape}, {size}, {corner}",
    "there is a {size} {shape} at the {corner}, and it is {colour}",
    "a {shape} drawn in {colour}, {size}, near the {corner} corner",
)
CAPTIONS_PER_IMAGE = 3
SIDE = 32
IMAGES = 4800  # 25 per class
MAX_POSITIONS = 24  # the text tower's positions; every caption is padded to them, as SigLIP reads its texts


def classes() -> list[tuple[str, str, str, str]]:
    """Every (size, colour, shape, corner), in label order."""
    return [(s, c, h, k) for s in SIZES for c in COLOURS for h in SHAPES for k in CORNERS]


def label_name(cls: tuple[str, str, str, str]) -> str:
    return " ".join(cls)


LABELS = {label_name(cls): i for i, cls in enumerate(classes())}  # class name -> label, in label order


def caption(template: str, cls: tuple[str, str, str, str]) -> str:
    size, colour, shape, corner = cls
    return template.format(size=size, colour=colour, shape=shape, corner=corner.replace("-", " "))


def class_prompts() -> list[str]:
    """The 192 prompts zero-shot accuracy chooses among, in label order."""
    return [caption(PROMPT, cls) for cls in classes()]


def draw(cls: tuple[str, str, str, str], rng: random.Random):
    """One picture of `cls`: the shape with its centre, size and colour jittered, on grey noise."""
    from PIL import Image, ImageDraw

    size, colour, shape, corner = cls
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(40, 12, (SIDE, SIDE, 3))
    image = Image.fromarray(noise.clip(0, 255).astype(np.uint8), mode="RGB")
    r = SIZES[size] * rng.uniform(0.85, 1.15)
    x, y = (f * SIDE + rng.uniform(-2, 2) for f in CORNERS[corner])
    fill = tuple(int(np.clip(v + rng.uniform(-20, 20), 0, 255)) for v in COLOURS[colour])
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        pen.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
    elif shape == "triangle":
        pen.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=fill)
    else:
        w = 0.35 * r
        pen.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        pen.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    return image


def write_data(root: Path, seed: int, test_fraction: float) -> dict[str, list[dict]]:
    """Draw the images and write the three jsonl files; return their records (image paths relative to `root`)."""
    rng = random.Random(seed)
    every = classes()
    labels = np.array([i % len(every) for i in range(IMAGES)])
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        draw(every[label], rng).save(root / f"images/{i:04d}.png")
    train, test = digits.split_by_image(labels, test_fraction, seed, len(every))
    return digits.write_records(root, train, test, lambda i: [(caption(t, every[labels[i]]), label_name(every[labels[i]]))
                                                              for t in rng.sample(TEMPLATES, CAPTIONS_PER_IMAGE)], rng)


def label_of(record: dict) -> int:
    return LABELS[record["label"]]


def train_tokenizer(path: Path) -> transformers.SiglipTokenizer:
    """A SentencePiece unigram model over the captions' words, read by SiglipTokenizer as Google's SigLIP
    checkpoints are: lower-cased, punctuation dropped, </s> ending each text and padding it, no attention mask."""
    import sentencepiece as spm

    lines = [caption(t, cls) for t in TEMPLATES for cls in classes()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
                                   vocab_size=128, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "spiece.model").write_bytes(model.getvalue())
    tokenizer = transformers.SiglipTokenizer(str(path / "spiece.model"), model_input_names=["input_ids"],
                                             model_max_length=MAX_POSITIONS)
    tokenizer.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def build_model(tokenizer, hidden: int = 128, vision_layers: int = 4, text_layers: int = 4, patch: int = 8,
                seed: int = 0) -> transformers.SiglipModel:
    torch.manual_seed(seed)
    blocks = dict(hidden_size=hidden, num_attention_heads=4, intermediate_size=4 * hidden)
    config = transformers.SiglipConfig(
        text_config=dict(blocks, num_hidden_layers=text_layers, vocab_size=len(tokenizer),
                         max_position_embeddings=MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
        vision_config=dict(blocks, num_hidden_layers=vision_layers, image_size=SIDE, patch_size=patch),
    )
    model = transformers.SiglipModel(config)
    with torch.no_grad():
        # transformers starts both at 0, where a cosine moves a logit by at most 1 and the pairs barely separate;
        # SigLIP's own start is scale 10 and bias -10, and -5 suits a batch of 64 with one positive a row.
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-5.0)
    return model


def encode_texts(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=MAX_POSITIONS, truncation=True,
                     return_tensors="pt")["input_ids"]


@torch.no_grad()
def evaluate(model, tokenizer, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    prompt_emb = model.get_text_features(input_ids=encode_texts(tokenizer, class_prompts())).pooler_output
    image_emb = torch.cat([model.get_image_features(pixel_values=chunk).pooler_output for chunk in pixels.split(256)])
    return digits.zero_shot_accuracy(image_emb, prompt_emb, labels)


def sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: each image-text pair of the batch a binary match, every same-class pair a positive."""
    logits = logit_scale.exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T + logit_bias
    sign = 2.0 * (labels[:, None] == labels[None, :]).float() - 1.0
    return -F.logsigmoid(sign * logits).sum() / len(labels)


def train(model, tokenizer, pixels: torch.Tensor, records: list[dict], index_of: dict[str, int], steps: int,
          batch_size: int, lr: float, seed: int, log_every: int = 100) -> None:
    """AdamW with warm-up and cosine decay; each step draws `batch_size` training pairs."""
    rng = random.Random(seed)
    opt, sched = digits.optimiser(model, lr, steps)
    model.train()
    for step in range(steps):
        batch = rng.sample(records, batch_size)
        labels = torch.tensor([label_of(r) for r in batch])
        images = pixels[[index_of[r["image"]] for r in batch]]
        out = model(input_ids=encode_texts(tokenizer, [r["text"] for r in batch]), pixel_values=images)
        loss = sigmoid_loss(out.image_embeds, out.text_embeds, labels, model.logit_scale, model.logit_bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.3f}", flush=True)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for data/ and model/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="images held out for testing")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--patch", type=int, default=8, help="vision patch side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    data = args.out / "data"
    records = write_data(data, args.seed, args.test_fraction)
    tokenizer = train_tokenizer(args.out / "model")
    processor = transformers.SiglipImageProcessor(size={"height": SIDE, "width": SIDE})
    model = build_model(tokenizer, args.hidden, args.vision_layers, args.text_layers, args.patch, args.seed)
    pixels, index_of = digits.load_pixels(data, processor, records["train"] + records["test"])
    train(model, tokenizer, pixels, records["train"], index_of, args.steps, args.batch_size, args.lr, args.seed)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    test_images = sorted({r["image"]: label_of(r) for r in records["test"]}.items())
    accuracy = evaluate(model, tokenizer, pixels[[index_of[p] for p, _ in test_images]],
                        torch.tensor([label for _, label in test_images]))
    model.save_pretrained(args.out / "model")
    processor.save_pretrained(args.out / "model")
    print(f"held-out zero-shot accuracy {accuracy:.4f} on {len(test_images)} test images "
          f"(data and training: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU, {args.threads} threads, {args.steps} "
          f"steps); wrote {args.out}/model")
    return accuracy


if __name__ == "__main__":
    main()
