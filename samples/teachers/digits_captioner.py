"""Train the digits sample generative teacher: a small LLaVA-style captioner that answers questions about
scikit-learn's handwritten digits, saved as a plain Hugging Face LlavaForConditionalGeneration directory
with its processor.

    .venv/bin/python samples/teachers/digits_captioner.py --out out/digits-captioner \
        [--vision-from out/digits/model]

writes (under OUT/)
    data/images/0000.png ...   the 1,797 digits, 8x8 upscaled to 32x32 grey PNGs
    data/train.jsonl           every training image with every prompt (what the teacher saw)
    data/test.jsonl            the held-out images (a fifth, stratified by class) with every prompt
    data/calib.jsonl           each training image once with one prompt: lmmc's calibration and
                               distillation data, so a compile never sees a test image
    model/                     config.json, model.safetensors, generation_config.json, the processor
                               (word-level tokenizer, image processor, chat template)
Each jsonl line is {"image": path relative to the jsonl, "prompt": question, "text": answer, "label":
class name}. Each prompt has one answer template ("What digit is this?" -> "a handwritten seven"), so
the answer to an (image, prompt) pair is exact and greedy exact-match accuracy is the task metric.

The model: the vision tower is a CLIP vision transformer (4 blocks x 128 over 2x2 patches of 16 pixels,
all 5 positions, CLS included, handed to the projector), initialised from the digits dual-encoder teacher
(samples/teachers/digits.py) when --vision-from names it, else trained from scratch; a two-layer
projector; a Llama decoder (3 blocks x 128, 4 query heads sharing 2 key/value heads, SwiGLU MLP of 344)
over a word-level vocabulary of the prompts, answers and chat template. The split is the dual-encoder
teacher's (same function, same seed), and --vision-from refuses a teacher whose test images differ, so
no test image reaches the captioner through its vision tower either. Training is next-token
cross-entropy on the answer tokens; greedy exact-match accuracy on the test pairs is printed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent


def _dual_encoder_script():
    """samples/teachers/digits.py: its split, class words, image size and augmentation are reused, so both
    teachers hold out the same test images."""
    spec = importlib.util.spec_from_file_location("digits_teacher", HERE / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits = _dual_encoder_script()
WORDS = digits.WORDS
# Each prompt has one answer template, so the right answer to a pair is exact.
PROMPTS = {
    "What digit is this?": "a handwritten {word}",
    "Which number is written here?": "the number {digit}",
    "Describe the image.": "a small grey picture of a handwritten {word}",
}
IMAGE_TOKEN = "<image>"
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
# LLaVA-1.5's conversation format: "USER: <image> question ASSISTANT: answer</s>".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PATCH = 16
IMAGE_TOKENS = (digits.SIDE // PATCH) ** 2 + 1  # patches plus CLS ("full" feature selection)


def answer(prompt: str, label: int) -> str:
    return PROMPTS[prompt].format(word=WORDS[label], digit=label)


def write_data(root: Path, seed: int, test_fraction: float) -> dict[str, list[dict]]:
    """Write the images and the three jsonl files; return their records (image paths relative to `root`)."""
    labels = digits.write_images(root)
    train, test = digits.split_by_image(labels, test_fraction, seed)

    def record(i: int, prompt: str) -> dict:
        label = int(labels[i])
        return {"image": f"images/{i:04d}.png", "prompt": prompt, "text": answer(prompt, label),
                "label": WORDS[label]}

    rng = random.Random(seed)
    records = {"train": [record(i, p) for i in train for p in PROMPTS],
               "test": [record(i, p) for i in test for p in PROMPTS],
               "calib": [record(i, rng.choice(list(PROMPTS))) for i in train]}
    rng.shuffle(records["calib"])
    for name, recs in records.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return records


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over every word of the prompts, answers and chat template (a few dozen
    entries: a 30,000-word vocabulary would make the output layer most of the model's cost)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    words = ["USER:", "ASSISTANT:"] + [str(d) for d in range(10)] + list(WORDS)
    words += [p for p in PROMPTS] + [t.format(word="", digit="") for t in PROMPTS.values()]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left", model_max_length=64)


def build_processor(tokenizer) -> transformers.LlavaProcessor:
    # The digits are grey on black; the mean/std centre that range (as the dual-encoder teacher does).
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": digits.SIDE}, crop_size={"height": digits.SIDE, "width": digits.SIDE},
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                       vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                                       num_additional_image_tokens=1)


def build_model(tokenizer, hidden: int = 128, vision_layers: int = 4, text_layers: int = 3,
                seed: int = 0) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=128, num_attention_heads=4, intermediate_size=512,
                                           num_hidden_layers=vision_layers, image_size=digits.SIDE,
                                           patch_size=PATCH)
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 + 7) // 8 * 8,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=IMAGE_TOKENS, vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu")
    model = transformers.LlavaForConditionalGeneration(config)
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=16)
    return model


def load_vision_tower(model, source: Path, records: dict[str, list[dict]]) -> None:
    """Copy the dual-encoder teacher's vision transformer into the captioner, after checking it held out
    exactly our test images (its data/test.jsonl beside its model/)."""
    test_file = source.parent / "data" / "test.jsonl"
    if not test_file.is_file():
        raise SystemExit(f"{source}: no {test_file} beside it, so its held-out images cannot be checked; "
                         f"give the model/ directory that samples/teachers/digits.py wrote")
    theirs = {json.loads(line)["image"] for line in test_file.read_text().splitlines()}
    ours = {r["image"] for r in records["test"]}
    if theirs != ours:
        raise SystemExit(f"{source} held out other test images than this split ({len(theirs ^ ours)} differ): "
                         f"train it with the same --seed and --test-fraction")
    clip = transformers.CLIPModel.from_pretrained(source)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())


def tokens(processor, record: dict, with_answer: bool) -> tuple[list[int], list[int]]:
    """One record as LLaVA reads it: the chat-formatted prompt with the image tokens expanded, then (when
    `with_answer`) the answer and </s>; labels are the answer's tokens and -100 on the prompt."""
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["prompt"]}]}],
        add_generation_prompt=True).replace(IMAGE_TOKEN, IMAGE_TOKEN * IMAGE_TOKENS)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer = tok(record["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if with_answer else []
    return ids + answer, [-100] * len(ids) + answer


def encode(processor, recs: list[dict], pixels: torch.Tensor, index_of: dict[str, int], with_answer: bool,
           cache: dict | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch (generation continues from the right end) with padding labelled -100; `cache`
    keeps each (prompt, answer)'s tokens, since the chat template is slow to render."""
    cache = {} if cache is None else cache
    rows = []
    for r in recs:
        key = (r["prompt"], r["text"], with_answer)
        if key not in cache:
            cache[key] = tokens(processor, r, with_answer)
        rows.append(cache[key])
    width = max(len(ids) for ids, _ in rows)
    pad_id = processor.tokenizer.pad_token_id
    return {"input_ids": torch.tensor([[pad_id] * (width - len(ids)) + ids for ids, _ in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows]),
            "labels": torch.tensor([[-100] * (width - len(lab)) + lab for _, lab in rows]),
            "pixel_values": pixels[[index_of[r["image"]] for r in recs]]}


def train(model, processor, pixels, records: list[dict], index_of: dict[str, int], steps: int, batch_size: int,
          lr: float, seed: int, log_every: int = 100) -> None:
    """AdamW with warm-up and cosine decay; each step draws `batch_size` training pairs."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    cache: dict = {}
    model.train()
    for step in range(steps):
        batch = encode(processor, rng.sample(records, batch_size), pixels, index_of, with_answer=True, cache=cache)
        batch["pixel_values"] = digits.shift(batch["pixel_values"], gen)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def exact_match(model, processor, pixels, records: list[dict], index_of: dict[str, int],
                batch_size: int = 128) -> float:
    """Fraction of (image, prompt) pairs whose greedy answer, decoded, is exactly the reference answer."""
    model.eval()
    right, cache = 0, {}
    for start in range(0, len(records), batch_size):
        recs = records[start:start + batch_size]
        batch = encode(processor, recs, pixels, index_of, with_answer=False, cache=cache)
        batch.pop("labels")
        out = model.generate(**batch, do_sample=False, max_new_tokens=16)
        texts = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(t.strip() == r["text"] for t, r in zip(texts, recs))
    return right / len(records)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for data/ and model/")
    parser.add_argument("--vision-from", type=Path, help="the digits dual-encoder teacher's model/ directory "
                        "(samples/teachers/digits.py) to initialise the vision tower from; default: from scratch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="images held out for testing")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=128, help="decoder width")
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    data = args.out / "data"
    records = write_data(data, args.seed, args.test_fraction)
    processor = build_processor(build_tokenizer())
    model = build_model(processor.tokenizer, args.hidden, args.vision_layers, args.text_layers, args.seed)
    if args.vision_from:
        load_vision_tower(model, args.vision_from, records)
    pixels, index_of = digits.load_pixels(data, processor.image_processor, records["train"] + records["test"])
    train(model, processor, pixels, records["train"], index_of, args.steps, args.batch_size, args.lr, args.seed)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    accuracy = exact_match(model, processor, pixels, records["test"], index_of)
    model.save_pretrained(args.out / "model")
    processor.save_pretrained(args.out / "model")
    n_images = len({r["image"] for r in records["test"]})
    print(f"held-out greedy exact-match accuracy {accuracy:.4f} on {len(records['test'])} test pairs "
          f"({n_images} images x {len(PROMPTS)} prompts; vision tower "
          f"{'from ' + str(args.vision_from) if args.vision_from else 'from scratch'}; data and training: "
          f"{seconds:.0f} s wall, {cpu_seconds:.0f} s CPU, {args.threads} threads, {args.steps} steps); "
          f"wrote {args.out}/model")
    return accuracy


if __name__ == "__main__":
    main()
