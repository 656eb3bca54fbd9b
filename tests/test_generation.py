"""Generation fidelity metrics against hand-computed values, on a tiny LLaVA, in the validate pass, and the
digits captioner teacher's data."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from conftest import REPO
from lmmc.generation import (IGNORE_INDEX, Sample, answer_mask, exact_match, fidelity, generation_agreement, greedy,
                             samples, teacher_forced, token_kl, top1_agreement, until_eos, validate_generative)

BOS, EOS, PAD, IMAGE = 1, 2, 0, 3
IMAGE_TOKENS = 4  # 2x2 patches, CLS dropped (LLaVA's default feature selection)


def tiny_llava(seed: int = 0) -> transformers.LlavaForConditionalGeneration:
    """A tiny LLaVA: CLIP vision tower, Llama decoder with 4 query heads sharing 2 key/value heads."""
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=16, patch_size=8),
        text_config=transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS,
                                             pad_token_id=PAD),
        image_token_index=IMAGE, image_seq_length=IMAGE_TOKENS)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    # Random weights of std 0.02 give near-flat logits; larger ones make greedy outputs vary with the input.
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.generation_config.update(eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS)
    return model


def perturbed(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """A copy with noise of `scale` times each decoder matrix's std added."""
    copy = tiny_llava()
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.model.language_model.layers.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return copy.eval()


def batches(n: int = 12, seed: int = 0, batch_size: int = 4) -> list[dict]:
    """Held-out batches as lmmc's data reader builds them: BOS, the image tokens, a prompt of 2 or 3
    tokens, an answer of 2 to 4 tokens and EOS; labels only on the answer; right padding."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(4, 48, (2 + i % 2,), generator=gen).tolist()
        answer = torch.randint(4, 48, (2 + i % 3,), generator=gen).tolist() + [EOS]
        head = [BOS] + [IMAGE] * IMAGE_TOKENS + prompt
        rows.append((head + answer, [IGNORE_INDEX] * len(head) + answer))
    pixels = torch.randn(n, 3, 16, 16, generator=gen)
    out = []
    for start in range(0, n, batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        out.append({
            "input_ids": torch.tensor([ids + [PAD] * (width - len(ids)) for ids, _ in chunk]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
            "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in chunk]),
            "pixel_values": pixels[start:start + batch_size],
        })
    return out


# --- pure functions on hand-made logits --------------------------------------------------------------------

def test_token_kl_matches_hand_values():
    teacher = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64).log()
    student = torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=torch.float64).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl = token_kl(teacher, student)
    assert kl[0].item() == pytest.approx(expected, abs=1e-12)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-12)
    # KL is not symmetric: KL(student || teacher) differs
    assert token_kl(student, teacher)[0].item() == pytest.approx(
        0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5), abs=1e-12)


def test_top1_agreement_counts_rows():
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 1.0, 4.0], [0.0, 3.0, 0.0]])
    assert top1_agreement(teacher, student).tolist() == [True, False, True, False]


def test_answer_mask_is_shifted_by_one():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX]])
    # the logits at positions 1 and 2 predict the answer tokens at 2 and 3
    assert answer_mask(labels).tolist() == [[False, True, True, False]]


def test_generation_agreement_by_hand():
    teacher = [[5, 6, 7], [5, 6, EOS], [9, EOS], [4, 4, 4]]
    student = [[5, 6, 8], [5, 6, EOS], [9, EOS], [3, 4, 4]]
    got = generation_agreement(teacher, student, n=3)
    assert got == {"agreement": 0.5, "prefix_mean": (2 + 3 + 3 + 0) / 4}
    # only the first n tokens count, and identical answers that ended early agree on all n
    assert generation_agreement([[5, 6, 7]], [[5, 6, 8]], n=2) == {"agreement": 1.0, "prefix_mean": 2.0}
    assert generation_agreement([[9, EOS]], [[9, EOS]], n=5) == {"agreement": 1.0, "prefix_mean": 5.0}
    assert generation_agreement([[9, EOS]], [[9, 9, EOS]], n=5) == {"agreement": 0.0, "prefix_mean": 1.0}


def test_exact_match_by_hand():
    eos = {EOS}
    answers = [[5, 6, EOS], [5, 6, EOS], [5, 6, EOS], [7, EOS]]
    generated = [[5, 6, EOS], [5, 6, 6, EOS], [5, 6], [8, EOS]]  # right, too long, never ended, wrong
    assert exact_match(generated, answers, eos) == 0.25
    assert exact_match([[5, 6, 9]], [[5, 6]], set()) == 1.0  # without EOS, the reference's length counts
    # a reference that max_length cut before its end token: a generation that says it and goes on matches
    assert exact_match([[5, 6, 7, 8, EOS], [5, 9, EOS]], [[5, 6], [5, 6]], eos) == 0.5


def test_samples_split_prompt_and_answer_without_padding():
    got = samples(batches(n=4, batch_size=4))
    b = batches(n=4, batch_size=4)[0]
    for row, s in enumerate(got):
        n = int(b["attention_mask"][row].sum())
        start = IMAGE_TOKENS + 1 + 2 + row % 2
        assert s.prompt == b["input_ids"][row, :start].tolist()
        assert s.answer == b["input_ids"][row, start:n].tolist()
        assert s.answer[-1] == EOS and PAD not in s.prompt
        assert torch.equal(s.pixel_values, b["pixel_values"][row])


# --- on a tiny LLaVA ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)
    return tiny_llava()


def test_teacher_forced_against_itself_and_a_perturbed_copy(teacher):
    data = batches()
    same = teacher_forced(teacher, tiny_llava(), data)
    n_answer = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in data)
    assert same["answer_tokens"] == n_answer
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-9) and same["top1_agreement"] == 1.0
    student = perturbed(teacher, 0.5)
    got = teacher_forced(teacher, student, data)
    assert got["kl_mean"] > 1e-3
    # recompute by hand, one sample at a time, from the models' full logits
    kls, agree = [], []
    with torch.no_grad():
        for b in data:
            for row in range(len(b["input_ids"])):
                n = int(b["attention_mask"][row].sum())
                inputs = {"input_ids": b["input_ids"][row:row + 1, :n], "pixel_values": b["pixel_values"][row:row + 1]}
                t, s = teacher(**inputs).logits[0], student(**inputs).logits[0]
                for pos in range(n - 1):
                    if b["labels"][row, pos + 1] != IGNORE_INDEX:
                        p, q = t[pos].double().softmax(-1), s[pos].double().softmax(-1)
                        kls.append(float((p * (p / q).log()).sum()))
                        agree.append(bool(t[pos].argmax() == s[pos].argmax()))
    assert got["kl_mean"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(sum(agree) / len(agree))
    assert 0 < got["top1_agreement"] < 1


def test_greedy_batches_equal_one_sample_at_a_time(teacher):
    items = samples(batches())
    together = greedy(teacher, items, 6, {EOS})
    assert len({tuple(g) for g in together}) > 3, "the tiny model's greedy outputs should differ between inputs"
    with torch.no_grad():
        for s, got in zip(items, together):
            ids = torch.tensor([s.prompt])
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   pixel_values=s.pixel_values[None], do_sample=False, max_new_tokens=6)
            alone = out[0, len(s.prompt):].tolist()
            assert got == (alone[:alone.index(EOS) + 1] if EOS in alone else alone)


def test_greedy_is_plain_greedy_whatever_the_checkpoint_sets(teacher):
    """lmmc.runtime decodes by argmax alone: a repetition_penalty in generation_config.json, which
    generate() would apply, must not change what validation compares it with."""
    items = samples(batches())
    plain = greedy(teacher, items, 12, {EOS})
    penalised = copy.deepcopy(teacher)
    penalised.generation_config.repetition_penalty = 1.5
    assert greedy(penalised, items, 12, {EOS}) == plain
    assert penalised.generation_config.repetition_penalty == 1.5  # the model's own config is put back
    with torch.no_grad():  # what generate() itself makes of the setting: other tokens
        applied = [penalised.generate(input_ids=torch.tensor([s.prompt]), pixel_values=s.pixel_values[None],
                                      do_sample=False, max_new_tokens=12)[0, len(s.prompt):].tolist() for s in items]
    assert any(until_eos(a, {EOS}) != p for a, p in zip(applied, plain))


def test_greedy_agreement_of_itself_is_one_and_of_a_perturbed_copy_less(teacher):
    data = batches()
    same = fidelity(teacher, tiny_llava(), data, tokens=8)
    assert same["generation"] == {"tokens": 8, "agreement": 1.0, "prefix_mean": 8.0}
    assert same["exact_match"]["teacher"] == same["exact_match"]["student"]
    other = fidelity(teacher, perturbed(teacher, 0.5), data, tokens=8)
    assert other["generation"]["agreement"] < 1.0
    assert other["generation"]["prefix_mean"] < 8.0
    assert other["held_out_samples"] == 12


def test_exact_match_of_a_model_on_its_own_greedy_answers_is_one(teacher):
    """Reference answers taken from the teacher's own greedy output: the teacher scores 1.0 exactly."""
    items = samples(batches())
    own = greedy(teacher, items, 12, {EOS})
    ended = [g for g in own if g and g[-1] == EOS]
    assert 0 < len(ended) < len(own)
    assert exact_match(own, own, {EOS}) == 1.0  # a reference without its end token is matched by its opening
    assert exact_match(own, [[*g[:-1], 47, EOS] for g in own], {EOS}) == 0.0


# --- the validate pass's generative branch -----------------------------------------------------------------

class _Calib:
    def __init__(self, data):
        self.data = data

    def eval_batches(self, modality: str) -> list[dict]:
        return self.data if modality == "text" else [{"pixel_values": b["pixel_values"]} for b in self.data]


class _Art:
    def __init__(self, teacher, student, data):
        self.teacher, self.student, self.calib, self.device = teacher, student, _Calib(data), torch.device("cpu")
        self.onnx = {}  # no generative export: the runtime check is left out
        self.validation = {}


def test_validate_gates(teacher):
    from lmmc.export.validate import ValidateConfig

    cfg = ValidateConfig(max_kl=1e-6, min_top1_agreement=0.99, min_generation_agreement=0.99, generation_tokens=4,
                         min_task_metric=0.0, min_held_out=12)
    good = validate_generative(_Art(teacher, tiny_llava(), batches()), cfg)
    assert good["passed"] and [g["name"] for g in good["gates"]] == [
        "held-out samples", "next-token KL(teacher ‖ student), answer tokens", "top-1 agreement, answer tokens",
        "greedy agreement, first 4 tokens", "exact-match accuracy of the greedy answer"]
    bad = validate_generative(_Art(teacher, perturbed(teacher, 0.5), batches()), cfg)
    assert not bad["passed"]
    missed = {g["name"] for g in bad["gates"] if not g["passed"]}
    assert {"next-token KL(teacher ‖ student), answer tokens", "top-1 agreement, answer tokens",
            "greedy agreement, first 4 tokens"} <= missed
    assert bad["generation"]["kl_mean"] == next(g["value"] for g in bad["gates"] if g["name"].startswith("next-token"))
    assert bad["task_metric"]["kind"] == "exact_match"

    from lmmc.report_html import render

    page = render({"model": "tiny-llava", "lmmc_version": "test", "passed": bad["passed"], "validation": bad})
    g = bad["generation"]
    for shown in (f"{g['kl_mean']:.4g}", f"{g['top1_agreement']:.4f}", f"{g['generation']['agreement']:.4f}",
                  f"{g['generation']['prefix_mean']:.2f}", "greedy agreement: first 4 tokens identical",
                  "exact-match accuracy of the greedy answer"):
        assert shown in page
    assert 'data-passed="false"' in page and "not validated" not in page


def test_validate_config_rejects_bad_gates():
    from pydantic import ValidationError

    from lmmc.export.validate import ValidateConfig

    for bad in ({"max_kl": -1}, {"min_top1_agreement": 1.5}, {"min_generation_agreement": -0.1},
                {"generation_tokens": 0}):
        with pytest.raises(ValidationError):
            ValidateConfig(**bad)


# --- the digits captioner teacher ---------------------------------------------------------------------------

def _captioner():
    spec = importlib.util.spec_from_file_location("digits_captioner", REPO / "samples" / "teachers" / "digits_captioner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The whole script, shrunk: a one-block decoder of width 32 trained for two steps."""
    captioner = _captioner()
    out = tmp_path_factory.mktemp("captioner")
    captioner.main(["--out", str(out), "--steps", "2", "--batch-size", "8", "--hidden", "32", "--vision-layers",
                    "1", "--text-layers", "1", "--threads", "1"])
    return captioner, out


def test_captioner_data_schema_and_split(short_run):
    captioner, out = short_run
    data = out / "data"
    files = {name: _read(data / f"{name}.jsonl") for name in ("train", "test", "calib")}
    for recs in files.values():
        for r in recs:
            assert set(r) == {"image", "prompt", "text", "label"}
            assert (data / r["image"]).is_file()
            digit = captioner.WORDS.index(r["label"])
            assert r["text"] == captioner.PROMPTS[r["prompt"]].format(word=r["label"], digit=digit)
    images = {name: {r["image"] for r in recs} for name, recs in files.items()}
    assert not images["train"] & images["test"]
    assert images["calib"] == images["train"] and len(files["calib"]) == len(images["train"])
    assert len(images["train"]) + len(images["test"]) == 1797
    assert len(files["test"]) == len(images["test"]) * len(captioner.PROMPTS)
    # the dual-encoder teacher's split: same function, same seed
    train, test = captioner.digits.split_by_image(__import__("sklearn.datasets").datasets.load_digits().target, 0.2, 0)
    assert images["test"] == {f"images/{i:04d}.png" for i in test}


def test_captioner_saves_a_llava_that_lmmc_reads_as_it_was_trained(short_run):
    from lmmc import data as lmmc_data

    captioner, out = short_run
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out / "model")
    processor = transformers.AutoProcessor.from_pretrained(out / "model")
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    assert processor.chat_template
    recs = _read(out / "data" / "test.jsonl")[:6]
    pixels, index_of = captioner.digits.load_pixels(out / "data", processor.image_processor, recs)
    ours = captioner.encode(processor, recs, pixels, index_of, with_answer=True)
    for r in recs:
        r["image"] = str(out / "data" / r["image"])
    lmmc_batch, = lmmc_data.encode_generative(processor, recs, 8, None, chat_template=True)
    for row in range(len(recs)):
        keep, theirs = ours["attention_mask"][row].bool(), lmmc_batch["attention_mask"][row].bool()
        assert ours["input_ids"][row][keep].tolist() == lmmc_batch["input_ids"][row][theirs].tolist()
        assert ours["labels"][row][keep].tolist() == lmmc_batch["labels"][row][theirs].tolist()
    assert torch.allclose(ours["pixel_values"], lmmc_batch["pixel_values"])
    assert (ours["input_ids"] == model.config.image_token_index).sum(1).tolist() == [captioner.IMAGE_TOKENS] * 6


# --- compile end to end ------------------------------------------------------------------------------------

def test_compile_validates_a_pruned_llava_through_its_onnx_export(compiled_llava):
    """Wanda 50 % on a saved tiny LLaVA, the KV-cache export, validation: the fidelity figures and gates
    land in report.json and report.html, and the exported student generates what PyTorch does."""
    out, result = compiled_llava
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    validation = report["validation"]
    g = validation["generation"]
    assert g["held_out_samples"] == 6 and g["generation"]["tokens"] == 8
    assert g["kl_mean"] > 0 and 0 <= g["top1_agreement"] <= 1
    assert g["runtime"]["greedy_identical"] == 1.0 and g["runtime"]["first_logits_max_abs_diff"] <= 1e-4
    names = [gate["name"] for gate in validation["gates"]]
    assert names == ["held-out samples", "ONNX Runtime: greedy tokens identical to PyTorch",
                     "ONNX Runtime: first-step logits max abs diff to PyTorch",
                     "next-token KL(teacher ‖ student), answer tokens", "top-1 agreement, answer tokens",
                     "greedy agreement, first 8 tokens"]
    assert report["passed"] is True and all(gate["passed"] for gate in validation["gates"])
    page = (out / "report.html").read_text()
    assert f"{g['kl_mean']:.4g}" in page and "ONNX Runtime vs PyTorch student: greedy outputs identical" in page
    # The summary prints the generation figures and per-tower sparsity, not an empty encoder table.
    assert f"generative fidelity on 6 held-out samples ({g['answer_tokens']} answer tokens): next-token KL " \
           f"{g['kl_mean']:.3f} nats" in result.output
    assert "ONNX Runtime vs PyTorch student: greedy tokens identical 1.000" in result.output
    assert "50.0% (vision 50.0%, language 50.0%, projector 50.0%)" in result.output
    assert "tower  cosine" not in result.output


def test_captioner_refuses_a_vision_tower_that_held_out_other_images(short_run, tmp_path):
    """A dual-encoder teacher split another way would have trained on some of the captioner's test images."""
    captioner, out = short_run
    records = {name: _read(out / "data" / f"{name}.jsonl") for name in ("train", "test")}
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    first = records["test"][0]["image"]
    moved = [r for r in records["test"] if r["image"] != first] + records["train"][:1]  # one image swapped
    (tmp_path / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in moved))
    with pytest.raises(SystemExit, match="held out other test images than this split \\(2 differ\\)"):
        captioner.load_vision_tower(None, tmp_path / "model", records)
    with pytest.raises(SystemExit, match="no .*test.jsonl beside it"):
        captioner.load_vision_tower(None, tmp_path / "elsewhere" / "model", records)
