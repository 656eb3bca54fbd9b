"""Fidelity of a generative student to its teacher: teacher-forced next-token KL and top-1 agreement on
the answer tokens, greedy-generation agreement, and exact-match accuracy of the greedy answers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from lmmc.data import IGNORE_INDEX  # the label of prompt, image and padding positions
from lmmc.errors import LmmcError


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) in nats of the next-token distributions, one value per row of [..., vocab]."""
    t = F.log_softmax(teacher_logits.double(), dim=-1)
    s = F.log_softmax(student_logits.double(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def top1_agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per row: whether both models rank the same token first."""
    return teacher_logits.argmax(-1) == student_logits.argmax(-1)


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq - 1]: which logits predict an answer token (the logits at t predict the token at t + 1)."""
    return labels[:, 1:] != IGNORE_INDEX


@torch.no_grad()
def teacher_forced(teacher: torch.nn.Module, student: torch.nn.Module, batches: list[dict]) -> dict[str, Any]:
    """Mean KL(teacher ‖ student) and top-1 agreement over every answer token of the held-out batches, both
    models reading the reference answer; per sample, its mean KL."""
    kl, agree, per_sample = [], [], []
    for b in batches:
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        t_logits = teacher(**inputs).logits[:, :-1]
        s_logits = student(**inputs).logits[:, :-1]
        mask = answer_mask(b["labels"])
        sample_kl = token_kl(t_logits, s_logits).masked_fill(~mask, 0.0)
        kl.append(sample_kl[mask])
        agree.append(top1_agreement(t_logits, s_logits)[mask])
        per_sample += [round(v, 6) for v in (sample_kl.sum(1) / mask.sum(1).clamp(min=1)).tolist()]
    kl_all, agree_all = torch.cat(kl), torch.cat(agree)
    if kl_all.numel() == 0:
        raise LmmcError("the held-out samples hold no answer tokens (every label is -100); give image-text "
                        "records whose \"text\" is the answer the model should produce")
    return {"answer_tokens": int(kl_all.numel()), "kl_mean": float(kl_all.mean()), "kl_max": float(kl_all.max()),
            "top1_agreement": float(agree_all.float().mean()), "kl_per_sample": per_sample}


@dataclass
class Sample:
    """One held-out sample split where the answer starts: the prompt (image tokens included) it is
    generated from, its pixels, and the reference answer."""

    prompt: list[int]
    pixel_values: torch.Tensor
    answer: list[int]


def samples(batches: list[dict]) -> list[Sample]:
    """The held-out batches as prompts and reference answers; padding is dropped."""
    out = []
    for b in batches:
        for ids, mask, labels, pixels in zip(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"]):
            keep = mask.bool()
            ids, labels = ids[keep].tolist(), labels[keep].tolist()
            start = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
            out.append(Sample(ids[:start], pixels, [y for y in labels[start:] if y != IGNORE_INDEX]))
    return out


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence token."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def by_prompt_length(items: list[Sample]) -> dict[int, list[int]]:
    """The samples' indices grouped by prompt length: prompts of one length run together, unpadded."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(items):
        groups.setdefault(len(s.prompt), []).append(i)
    return groups


def eos_ids(model: torch.nn.Module) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    return set() if ids is None else {ids} if isinstance(ids, int) else set(ids)


@torch.no_grad()
def greedy(model: torch.nn.Module, items: list[Sample], max_new_tokens: int, eos: set[int],
           batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations of every sample's prompt, each cut after its first end-of-sequence token.
    Prompts of one length run together, so no padding can change what a model generates."""
    out: list[list[int] | None] = [None] * len(items)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else next(iter(eos), 0)
    device = next(model.parameters()).device
    with _plain_greedy(model, pad, eos):
        for length, members in by_prompt_length(items).items():
            for start in range(0, len(members), batch_size):
                idx = members[start:start + batch_size]
                ids = torch.tensor([items[i].prompt for i in idx], device=device)
                generated = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids),
                    pixel_values=torch.stack([items[i].pixel_values for i in idx]).to(device), do_sample=False,
                    max_new_tokens=max_new_tokens, eos_token_id=sorted(eos) or None,
                    pad_token_id=pad)
                for i, row in zip(idx, generated[:, length:].tolist()):
                    out[i] = until_eos(row, eos)
    return out  # type: ignore[return-value]


@contextlib.contextmanager
def _plain_greedy(model: torch.nn.Module, pad: int, eos: set[int]) -> Iterator[None]:
    """generate() lays the checkpoint's own settings (repetition_penalty, no_repeat_ngram_size, ...) over any
    it is given; for plain greedy decoding, as lmmc.runtime decodes, the model holds a config without them."""
    saved = model.generation_config
    model.generation_config = transformers.GenerationConfig(bos_token_id=saved.bos_token_id, pad_token_id=pad,
                                                            eos_token_id=sorted(eos) or None)
    try:
        yield
    finally:
        model.generation_config = saved


def generation_agreement(teacher: list[list[int]], student: list[list[int]], n: int) -> dict[str, float]:
    """Fraction of samples whose first `n` generated tokens are identical, and the mean length of the
    matching prefix within those `n`. A sequence that ended (end-of-sequence) reads as ended at every later
    position, so two identical answers shorter than `n` agree on all `n`."""
    if len(teacher) != len(student) or not teacher:
        raise ValueError("teacher and student need the same, non-zero number of generations")
    ended = -1
    same, prefix = 0, 0
    for t, s in zip(teacher, student):
        t = (t[:n] + [ended] * n)[:n]
        s = (s[:n] + [ended] * n)[:n]
        k = next((i for i in range(n) if t[i] != s[i]), n)
        same += k == n
        prefix += k
    return {"agreement": same / len(teacher), "prefix_mean": prefix / len(teacher)}


def exact_match(generated: list[list[int]], answers: list[list[int]], eos: set[int]) -> float:
    """Fraction of samples whose greedy answer is exactly the reference answer, end-of-sequence tokens
    aside. A generation that never ended matches nothing when the model has an end-of-sequence token; a
    reference without one (calibration.max_length cut it) is matched by the generation's opening."""
    hits = 0
    for tokens, answer in zip(generated, answers):
        reference = [t for t in answer if t not in eos]
        if eos and len(reference) < len(answer):
            cut = until_eos(tokens, eos)
            hits += bool(cut) and cut[-1] in eos and cut[:-1] == reference
        else:
            hits += tokens[:len(reference)] == reference
    return hits / len(answers)


@torch.no_grad()
def runtime_agreement(student: torch.nn.Module, generator, items: list[Sample], pytorch: list[list[int]],
                      max_new_tokens: int, eos: set[int]) -> dict[str, float]:
    """The exported student (lmmc.runtime's greedy generator over ONNX Runtime) against the PyTorch student:
    the fraction of samples generated token for token alike, and the largest |logit difference| of the
    first step. Prompts of one length run together, as in `greedy`."""
    same, worst = 0, 0.0
    device = next(student.parameters()).device
    for idx in by_prompt_length(items).values():
        ids = torch.tensor([items[i].prompt for i in idx])
        pixels = torch.stack([items[i].pixel_values for i in idx]).cpu()
        out = generator.generate_ids(pixels.numpy(), ids.numpy(), max_new_tokens=max_new_tokens,
                                     eos_token_id=sorted(eos))
        ids, pixels = ids.to(device), pixels.to(device)
        reference = student(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits[:, -1].cpu()
        worst = max(worst, float((torch.from_numpy(out.first_logits) - reference).abs().max()))
        for i, row in zip(idx, out.tokens.tolist()):
            same += until_eos(row, eos) == pytorch[i]
    return {"greedy_identical": same / len(items), "first_logits_max_abs_diff": worst}


def onnx_greedy(generator, items: list[Sample], max_new_tokens: int, eos: set[int]) -> list[list[int]]:
    """lmmc.runtime's greedy continuations of every sample's prompt, each cut after its first end token;
    prompts of one length run together, as in `greedy`."""
    out: list[list[int]] = [[] for _ in items]
    for idx in by_prompt_length(items).values():
        ids = np.array([items[i].prompt for i in idx])
        pixels = torch.stack([items[i].pixel_values for i in idx]).cpu().numpy()
        rows = generator.generate_ids(pixels, ids, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos)).tokens
        for i, row in zip(idx, rows.tolist()):
            out[i] = until_eos(row, eos)
    return out


def fidelity(teacher: torch.nn.Module, student: torch.nn.Module, batches: list[dict], tokens: int,
             generator=None) -> dict[str, Any]:
    """Every generation metric of the student against the teacher on the held-out batches, and with a
    `generator` (the exported student) its agreement with the PyTorch student. Greedy runs generate
    `tokens` new tokens, or one more than the longest reference answer if that is longer, so an answer can
    be matched whole; agreement counts the first `tokens`."""
    teacher, student = teacher.eval(), student.eval()
    result = teacher_forced(teacher, student, batches)
    items = samples(batches)
    eos = eos_ids(teacher)
    budget = max(tokens, max(len(s.answer) for s in items) + 1)
    t_gen, s_gen = greedy(teacher, items, budget, eos), greedy(student, items, budget, eos)
    result["held_out_samples"] = len(items)
    result["generation"] = {"tokens": tokens, **generation_agreement(t_gen, s_gen, tokens)}
    result["exact_match"] = {"teacher": exact_match(t_gen, [s.answer for s in items], eos),
                             "student": exact_match(s_gen, [s.answer for s in items], eos)}
    if generator is not None:
        result["runtime"] = runtime_agreement(student, generator, items, s_gen, budget, eos)
    return result


def exported_generator(art, threads: int):
    """lmmc.runtime's greedy generator over the compile's generative export, or None when the recipe
    exported none (the 'onnx_generative' pass writes it)."""
    from lmmc.runtime.generate import SPEC, Generator

    decoder = next(iter(art.onnx.values()), None)
    if decoder is None or not (decoder.parent / SPEC).is_file():
        return None
    return Generator(decoder.parent, threads)


def validate_generative(art, cfg) -> dict[str, Any]:
    """The validate pass for generative models: fidelity on the held-out image-text samples, the task
    metric (greedy exact-match accuracy, teacher and student) and the recipe's gates."""
    from lmmc.export.validate import _gate

    batches = art.calib.eval_batches("text") if art.calib else []
    if not batches:
        raise LmmcError("validation of a generative model needs held-out image-text samples; give calibration "
                        "data (a .jsonl of {\"image\", \"prompt\", \"text\"} records) with calibration.path")
    generator = exported_generator(art, cfg.threads)
    # PyTorch's side runs where the compile runs (a VLM generates slowly on a CPU); ONNX Runtime's on the CPU.
    batches = [{k: v.to(art.device) for k, v in b.items()} for b in batches]
    result = fidelity(art.teacher.to(art.device), art.student.to(art.device), batches, cfg.generation_tokens,
                      generator)
    match = result.pop("exact_match")
    task = {"name": "exact-match accuracy of the greedy answer", "kind": "exact_match", **match,
            "value": match["student"],
            "ratio": match["student"] / match["teacher"] if match["teacher"] else float("nan")}
    n = cfg.generation_tokens
    gates = [_gate("held-out samples", result["held_out_samples"], cfg.min_held_out, ">=")]
    if generator is not None:
        # What users run must generate what was validated: every greedy token, and the logits within tolerance.
        gates.append(_gate("ONNX Runtime: greedy tokens identical to PyTorch", result["runtime"]["greedy_identical"],
                           1.0, ">="))
        gates.append(_gate("ONNX Runtime: first-step logits max abs diff to PyTorch",
                           result["runtime"]["first_logits_max_abs_diff"], cfg.max_runtime_diff, "<="))
    for key, value, threshold, op in (
            ("next-token KL(teacher ‖ student), answer tokens", result["kl_mean"], cfg.max_kl, "<="),
            ("top-1 agreement, answer tokens", result["top1_agreement"], cfg.min_top1_agreement, ">="),
            (f"greedy agreement, first {n} tokens", result["generation"]["agreement"],
             cfg.min_generation_agreement, ">="),
            (task["name"], task["value"], cfg.min_task_metric, ">="),
            (f"{task['name']}: student / teacher", task["ratio"], cfg.min_task_metric_ratio, ">=")):
        if threshold is not None:
            gates.append(_gate(key, value, threshold, op))
    art.teacher.cpu()  # where the encoders' validation leaves it
    art.student.to(art.device)
    art.validation = {"towers": {}, "generation": result, "task_metric": task, "exports": [], "gates": gates,
                      "passed": all(g["passed"] for g in gates)}
    return art.validation
