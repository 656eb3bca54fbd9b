"""Validation against the teacher on held-out samples: runtime agreement, fidelity, task metric,
latency in the same runtime, and the recipe's gates."""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import onnxruntime as ort
import torch
from pydantic import Field

from lmmc.adapters import TowerModule, TowerSpec, example_inputs, input_names
from lmmc.artifact import Artifact
from lmmc.errors import LmmcError
from lmmc.pipeline import Pass, PassConfig, register
from lmmc.export.onnx import export_tower
from lmmc.runtime import MAX_THREADS
from lmmc.runtime import load as load_artifact
from lmmc.modelio import text_positions
from lmmc.pooling import normalises
from lmmc.scratch import scratch_folder
from lmmc.timing import time_interleaved

# A task-metric gate on retrieval agreement certifies nothing once a student ranking at random would agree
# this often (agreement_k against too few held-out samples).
MAX_AGREEMENT_CHANCE = 0.5


class ValidateConfig(PassConfig):
    # Gates that read figures only one kind of model has; a gate of the other kind would be silently
    # ignored, so the plan refuses it. The rest (runtime diff, held-out floor, task metric) apply to both.
    ENCODER_GATES: ClassVar[tuple[str, ...]] = ("min_cosine", "max_norm_error", "min_cosine_int8", "min_cosine_fp16",
                                                "max_latency_miss")
    GENERATIVE_GATES: ClassVar[tuple[str, ...]] = ("max_kl", "min_top1_agreement", "min_generation_agreement")
    SHARED_GATES: ClassVar[tuple[str, ...]] = ("max_runtime_diff", "min_held_out", "min_task_metric",
                                               "min_task_metric_ratio")

    min_cosine: float | None = Field(None, ge=-1, le=1, description="gate: mean teacher-student cosine of "
                                     "pooled embeddings on held-out samples, every tower")
    max_norm_error: float | None = Field(None, gt=0, description="gate, models whose embedding is not normalised "
                                         "(sentence-transformers without a Normalize module, ranked by dot product): "
                                         "max |student norm / teacher norm - 1| over held-out samples, in PyTorch "
                                         "and in every artifact, which cosine does not see")
    min_task_metric: float | None = Field(None, ge=0, le=1, description="gate: the student's task metric "
                                          "(zero-shot or nearest-neighbour accuracy on labelled data, else "
                                          "agreement with the teacher's retrieval)")
    min_task_metric_ratio: float | None = Field(None, gt=0, le=1, description="gate: the student's task "
                                                "metric divided by the teacher's; on labelled data the teacher "
                                                "must also be told apart from chance (a second gate)")
    agreement_k: int = Field(5, gt=0, description="dual encoders on data without labels (one tower: exact "
                             "nearest-neighbour agreement): a student's best match agrees when "
                             "it is among the teacher's k best, so near-synonymous captions and look-alike "
                             "images do not count as disagreement")
    max_runtime_diff: float = Field(1e-4, gt=0, description="gate: max |ONNX Runtime - PyTorch| of the "
                                    "student's outputs, each divided by its largest |PyTorch value| where that "
                                    "exceeds 1 (also every further fp32 artifact: fused graph, OpenVINO IR); "
                                    "generative models: the first-step logits' max |diff|, not divided")
    min_cosine_int8: float | None = Field(None, ge=-1, le=1, description="gate: mean cosine of every INT8 "
                                          "artifact's pooled embeddings to the fp32 student's, held-out samples")
    min_cosine_fp16: float | None = Field(0.999, ge=-1, le=1, description="gate: mean cosine of every FP16 "
                                          "artifact's pooled embeddings to the fp32 student's, held-out samples; "
                                          "applies only where an fp16 artifact is exported")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="where ONNX Runtime runs the "
                        "further artifacts (fused, INT8, FP16): cpu, cuda or cuda:N; cuda needs onnxruntime-gpu")
    latency: bool = Field(True, description="time teacher and student in ONNX Runtime")
    latency_batch: int = Field(8, gt=0, description="samples per timed batch")
    latency_seq: int | None = Field(None, gt=0, description="tokens per text sample when timing; default: 128 "
                                    "or the model's position limit if lower (CLIP: 77)")
    threads: int = Field(2, gt=0, le=MAX_THREADS, description="ONNX Runtime intra-op threads, the same for both models")
    repeats: int = Field(15, gt=2, description="timed runs per model; medians are reported")
    min_held_out: int = Field(32, ge=2, description="floor: fewer held-out samples than this and validation "
                              "refuses to certify the student")
    max_kl: float | None = Field(None, ge=0, description="gate, generative models: mean teacher-forced "
                                 "next-token KL(teacher || student) in nats over the held-out answer tokens")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="gate, generative models: fraction "
                                             "of held-out answer tokens where both models rank the same next "
                                             "token first (teacher-forced)")
    min_generation_agreement: float | None = Field(None, ge=0, le=1, description="gate, generative models: "
                                                   "fraction of held-out samples whose first generation_tokens "
                                                   "greedy tokens equal the teacher's")
    generation_tokens: int = Field(16, gt=0, description="generative models: greedy tokens compared per sample")
    max_latency_miss: float | None = Field(None, gt=0, description="gate, when a pass set a latency target "
                                           "(antgmm's target): |measured - target| / target of the student's "
                                           "artifact on the target's runtime and precision; default 0.10 there, "
                                           "refused without a target")


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def torch_outputs(model: torch.nn.Module, tower: TowerSpec, batches: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    module = TowerModule(model, tower, deployed=True).eval()
    return [tuple(t.cpu().numpy() for t in module(*[b[n] for n in module.names])) for b in batches]


def hidden_diff(got: np.ndarray, ref: np.ndarray, batch: dict) -> float:
    """Max |got − ref| of a last hidden state over real tokens; NaN when either side is not finite there.

    A padding position's state is whatever a runtime computes for a query that may see no key at all
    (ModernBERT's sliding windows over a padded tail), and nothing downstream reads it."""
    mask = batch.get("attention_mask")
    if mask is not None:
        real = np.asarray(mask).astype(bool)
        got, ref = got[real], ref[real]
    return float(np.abs(got - ref).max()) if np.isfinite(got).all() and np.isfinite(ref).all() else float("nan")


def token_cosine(got: np.ndarray, ref: np.ndarray, batch: dict) -> np.ndarray:
    """Cosine of each real token's last hidden state to the reference's (padding aside, as in hidden_diff)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        real = np.asarray(mask).astype(bool)
        got, ref = got[real], ref[real]
    return cosine(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]))


def runtime_diff(session: ort.InferenceSession, tower: TowerSpec, batches: list[dict],
                 reference: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Max |ORT − PyTorch| per output over the held-out batches (the hidden state at real tokens); NaN when
    either side is not finite."""
    worst = {"last_hidden_state": 0.0, "pooled_embedding": 0.0}
    for batch, ref in zip(batches, reference):
        got = session.run(None, {n: batch[n].numpy() for n in input_names(tower)})
        diffs = {"last_hidden_state": hidden_diff(got[0], ref[0], batch),
                 "pooled_embedding": hidden_diff(got[1], ref[1], {})}
        for key, diff in diffs.items():
            worst[key] = float(np.maximum(worst[key], diff))  # np.maximum keeps NaN; max() would drop it
    return worst


def output_scale(reference: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The largest |value| of each PyTorch output over the held-out batches."""
    return {"last_hidden_state": max(float(np.abs(h).max()) for h, _ in reference),
            "pooled_embedding": max(float(np.abs(p).max()) for _, p in reference)}


def scaled_diff(diff: dict[str, float], scale: dict[str, float]) -> float:
    """The gated runtime difference: each output's max |runtime - PyTorch| divided by its largest |PyTorch
    value| where that exceeds 1, the worst output's. fp32 rounding grows with the activations, which long
    distillations enlarge (a MiniLM student at 75 % of the FLOPs differed by 5.1e-4 on a last hidden state
    whose values reach about 6), while a faulty export differs by the size of the output itself. NaN stays NaN."""
    values = [d / max(1.0, scale[k]) for k, d in diff.items()]
    return float("nan") if any(np.isnan(values)) else max(values)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two embedding matrices, in float64: float32 put identical embeddings at
    1.0000001 and a mean above its own minimum."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return (a * b).sum(1).clip(-1.0, 1.0)


def neighbour_agreement(teacher: np.ndarray, student: np.ndarray) -> float:
    """Fraction of held-out samples whose nearest other sample is the same under both models, ties within
    float noise shared as in `_tied_hits`; NaN when an embedding is not finite."""
    if not (np.isfinite(teacher).all() and np.isfinite(student).all()):
        return float("nan")
    return _mean_share([_shares(s, _best(t, 1)) for (_, t), (_, s) in zip(_row_blocks(teacher, teacher, True),
                                                                           _row_blocks(student, student, True))])


def dominant_channels(embeddings: np.ndarray, most: int = 3) -> dict[str, Any] | None:
    """The few channels (at most `most`, and at most a tenth of them) that hold half or more of the embeddings'
    squared length, averaged over the samples as cosine weighs them (each sample at unit length), or None.
    Cosine to such an embedding mostly measures those channels: a model with outlier features keeps it and
    loses what ranks neighbours."""
    share = (_unit(embeddings.astype(np.float64)) ** 2).mean(axis=0)
    order = np.argsort(share)[::-1][:min(most, len(share) // 10)]
    held = np.cumsum(share[order])
    if not len(held) or not np.isfinite(held[-1]) or held[-1] < 0.5:
        return None
    k = int(np.argmax(held >= 0.5)) + 1
    return {"channels": [int(c) for c in order[:k]], "share": float(held[k - 1]), "of": int(len(share))}


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-12)


def _finite(*embeddings: np.ndarray) -> bool:
    return all(np.isfinite(e).all() for e in embeddings)


def zero_shot_accuracy(images: np.ndarray, prompts: np.ndarray, prompt_class: list[int], truth: list[int],
                       n_classes: int) -> float:
    """Fraction of images whose closest class is their own, among the classes a prompt names (an image of
    another class has no right answer and is not scored); a class is the mean of its normalised prompt
    embeddings (CLIP's prompt ensembling). NaN when an embedding is not finite or no image is scored."""
    owner, truth = np.asarray(prompt_class), np.asarray(truth)
    named = np.array([c for c in range(n_classes) if (owner == c).any()])
    rows = np.isin(truth, named)
    if not _finite(images, prompts) or not rows.any():
        return float("nan")
    classes = _unit(np.stack([_unit(prompts)[owner == c].mean(0) for c in named]))
    return _tied_hits(_unit(images[rows]) @ classes.T, named, truth[rows])


def scored(kind: str, truth: list[int], prompt_class: list[int] | None = None) -> np.ndarray:
    """Which held-out samples a labelled task metric can score: for zero-shot accuracy those of a class some
    prompt names, for nearest-neighbour accuracy those whose class another held-out sample holds."""
    truth = np.asarray(truth, dtype=int)
    if kind == "zero_shot_accuracy":
        return np.isin(truth, np.asarray(prompt_class or [], dtype=int))
    return np.bincount(truth)[truth] >= 2


def _tied_hits(sim: np.ndarray, candidates: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of the share of a row's best candidates (ties within float noise) whose class is
    the row's: a model that cannot tell candidates apart scores chance, not the class of the first one."""
    return _shared_best(sim, candidates[None, :] == truth[:, None])


def _best(sim: np.ndarray, k: int) -> np.ndarray:
    """Each row's k best candidates, and any within float noise (1e-6) of the k-th: which of tied
    candidates comes first is decided by rounding, not by the model."""
    kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1:k]
    return sim >= kth - 1e-6


def _shares(sim: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Per row, the share of its best candidates (ties within float noise) that are right."""
    best = _best(sim, 1)
    return (best & right).sum(1) / best.sum(1)


def _shared_best(sim: np.ndarray, right: np.ndarray) -> float:
    """Mean over rows of the share of a row's best candidates (ties within float noise) that are right."""
    return float(_shares(sim, right).mean())


# Rows of a similarity matrix held at once: the whole held-out set against itself is 10 GB at 50,000 samples.
_ROWS = 1024


def _row_blocks(query: np.ndarray, keys: np.ndarray, same: bool) -> Iterator[tuple[slice, np.ndarray]]:
    """The queries' cosine similarities to every key, _ROWS queries at a time, with the rows they are; with
    `same` (queries and keys the same samples) a sample's similarity to itself is -inf, never its own match."""
    query, keys = _unit(query), _unit(keys)
    for start in range(0, len(query), _ROWS):
        sim = query[start:start + _ROWS] @ keys.T
        if same:
            rows = np.arange(len(sim))
            sim[rows, start + rows] = -np.inf
        yield slice(start, start + len(sim)), sim


def _mean_share(blocks: list[np.ndarray]) -> float:
    return float(np.concatenate(blocks).mean()) if blocks else float("nan")


def chance_accuracy(kind: str, truth: list[int]) -> tuple[float, float]:
    """(chance level, the accuracy a model must reach to be told apart from it) of a labelled task metric
    on these held-out labels. Chance is the accuracy of always naming the most common class (zero-shot),
    or of a random other sample sharing a sample's class (nearest neighbour); the bound adds three binomial
    standard errors over the held-out samples. Embeddings drawn at random clear it in about 1 % of tries for
    nearest neighbour (pairs of samples are not independent draws) and almost never for zero-shot (24 to 200
    samples, 2 to 10 classes)."""
    counts = np.bincount(np.asarray(truth))
    n = int(counts.sum())
    if kind == "zero_shot_accuracy":
        chance = float(counts.max() / n)
    else:  # over the samples scored, those whose class another sample holds
        n_scored = int(counts[counts >= 2].sum())
        chance = float((counts * (counts - 1)).sum() / max(n_scored * (n - 1), 1))
        n = max(n_scored, 1)
    return chance, min(1.0, chance + 3 * math.sqrt(chance * (1 - chance) / n))


def nearest_neighbour_accuracy(embeddings: np.ndarray, truth: list[int]) -> float:
    """Fraction of samples whose nearest other sample has their class, over the samples whose class another
    sample holds (one alone in its class has no right answer). NaN when an embedding is not finite or no
    sample is scored."""
    labels = np.asarray(truth)
    rows_scored = scored("nearest_neighbour_accuracy", truth)
    if not _finite(embeddings) or not rows_scored.any():
        return float("nan")
    return _mean_share([_shares(sim, labels[None, :] == labels[rows, None])[rows_scored[rows]]
                        for rows, sim in _row_blocks(embeddings, embeddings, True)])


def top_k_agreement(t_query: np.ndarray, t_keys: np.ndarray, s_query: np.ndarray, s_keys: np.ndarray,
                    k: int, same: bool = False) -> float:
    """Fraction of queries whose best key under the student is among the teacher's k best (ties within float
    noise shared as in `_tied_hits`); `same` when queries and keys are the same samples (a sample is never
    its own match). NaN when not finite."""
    if not _finite(t_query, t_keys, s_query, s_keys):
        return float("nan")
    k = max(min(k, len(t_keys) - (2 if same else 1)), 1)  # never every candidate, which would always agree
    return _mean_share([_shares(s, _best(t, k)) for (_, t), (_, s) in zip(_row_blocks(t_query, t_keys, same),
                                                                          _row_blocks(s_query, s_keys, same))])


def agreement_chance(k: int, candidates: int, same: bool = False) -> tuple[int, float]:
    """The k `top_k_agreement` uses among `candidates` keys, and the agreement of a student whose best match
    is drawn at random: k of the candidates (the query itself aside when `same`)."""
    pool = candidates - (1 if same else 0)
    used = max(min(k, pool - 1), 1)
    return used, used / max(pool, 1)


def distinct_texts(batches: list[dict]) -> list[int]:
    """Index of the first of each distinct text among the batches' samples, by its tokens (padding aside):
    a caption held out under several images is one caption to retrieve, not several copies."""
    seen: set[tuple[int, ...]] = set()
    first, index = [], 0
    for b in batches:
        mask = b.get("attention_mask")
        for row, ids in enumerate(b["input_ids"]):
            key = tuple((ids if mask is None else ids[mask[row].bool()]).tolist())
            if key not in seen:
                seen.add(key)
                first.append(index)
            index += 1
    return first


def median_latency_ms(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    """Median ms per session, the sessions timed in turns (`time_interleaved`)."""
    times = time_interleaved({k: functools.partial(s.run, None, feed) for k, s in sessions.items()}, repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def latency_feed(model: torch.nn.Module, tower: TowerSpec, batch: int, seq: int) -> dict[str, np.ndarray]:
    inputs = example_inputs(model, tower, batch=batch, seq=seq)
    return {n: t.numpy() for n, t in zip(input_names(tower), inputs)}


@register
class ValidatePass(Pass):
    """Compare the exported student with PyTorch and with the teacher on held-out samples.

    Recipe: ``validate: {min_cosine: 0.8, max_runtime_diff: 1.0e-4}``. A missed gate fails the compile."""

    name = "validate"
    kind = "validate"
    generative = True  # generative models are validated by lmmc.generation
    Config = ValidateConfig
    needs = frozenset({"teacher", "student", "calib", "onnx"})
    provides = frozenset({"validation"})

    def check(self, available: set[str]) -> None:
        """An ONNX Runtime without the device's execution provider is refused before any pass runs."""
        if "onnx" not in available:
            raise LmmcError("validation compares the student's ONNX export with PyTorch and the teacher, and the "
                            "recipe exports no ONNX: add 'onnx' to its export section (before openvino or ort), or "
                            "switch validation off with 'validate: false'")
        super().check(available)
        if self.config.device != "cpu":
            import onnxruntime

            from lmmc.runtime.onnxruntime import check_available, providers_for

            check_available(providers_for(self.config.device), onnxruntime.get_available_providers())

    def run(self, art: Artifact) -> dict[str, Any]:
        cfg = self.config
        if art.adapter.kind == "generative":
            from lmmc.generation import validate_generative  # it reads this module's gates

            return validate_generative(art, cfg)
        teacher, student = art.teacher.cpu().eval(), art.student.cpu().eval()
        towers: dict[str, Any] = {}
        pooled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        gates: list[dict[str, Any]] = []
        with scratch_folder("lmmc-teacher-") as tmp:
            for tower in art.adapter.towers:
                batches = art.calib.eval_batches(tower.modality)
                s_ref = torch_outputs(student, tower, batches)
                t_ref = torch_outputs(teacher, tower, batches)
                session = ort_session(art.onnx[tower.name], cfg.threads)
                diff = runtime_diff(session, tower, batches, s_ref)
                t_emb = np.concatenate([o[1] for o in t_ref])
                s_emb = np.concatenate([o[1] for o in s_ref])
                cos = cosine(t_emb, s_emb)
                pooled[tower.name] = (t_emb, s_emb)
                result: dict[str, Any] = {
                    "held_out_samples": int(len(cos)),
                    "runtime_max_abs_diff": diff,
                    "runtime_output_scale": output_scale(s_ref),
                    "cosine_mean": float(cos.mean()),
                    "cosine_min": float(cos.min()),
                    "cosine_per_sample": [round(float(c), 6) for c in cos],  # for the report's histogram
                }
                if not normalises(student.config):
                    _norm_ratio(result, s_emb, t_emb, tower.name, cfg, gates)
                if (dominant := dominant_channels(t_emb)) is not None:
                    result["dominant_channels"] = dominant
                if cfg.latency:
                    teacher_path = Path(tmp) / f"{tower.name}.onnx"
                    export_tower(teacher, tower, teacher_path)
                    feed = latency_feed(teacher, tower, cfg.latency_batch, latency_seq(cfg, teacher, tower))
                    ms = median_latency_ms({"teacher": ort_session(teacher_path, cfg.threads), "student": session},
                                           feed, cfg.repeats)
                    result["latency_ms"] = {
                        "runtime": f"onnxruntime {ort.__version__} CPU", "threads": cfg.threads,
                        "input": {n: list(v.shape) for n, v in feed.items()},
                        "teacher": ms["teacher"], "student": ms["student"],
                        "speedup": ms["teacher"] / ms["student"],
                    }
                towers[tower.name] = result
                gates.append(_gate(f"{tower.name}: runtime max diff", scaled_diff(diff, result["runtime_output_scale"]),
                                   cfg.max_runtime_diff, "<="))
                if cfg.min_cosine is not None:
                    gates.append(_gate(f"{tower.name}: cosine to teacher", result["cosine_mean"], cfg.min_cosine, ">="))
                gates.append(_gate(f"{tower.name}: held-out samples", int(len(cos)), cfg.min_held_out, ">="))
        task = task_metric(art, cfg, pooled)
        if task["kind"] == "retrieval_agreement" and (cfg.min_task_metric, cfg.min_task_metric_ratio) != (None, None):
            # a k near the number of held-out samples agrees whatever the student ranks first
            gates.append(_gate(f"{task['name']}: agreement by chance", task["chance"], MAX_AGREEMENT_CHANCE, "<="))
        if cfg.min_task_metric is not None:
            gates.append(_gate(task["name"], task["value"], cfg.min_task_metric, ">="))
        if cfg.min_task_metric_ratio is not None:
            if "chance_bound" in task:
                # A teacher no better than chance on these labels makes any ratio to it meaningless: a broken
                # student would pass as readily as a faithful one.
                gates.append(_gate(f"{task['name']}: teacher above chance", task["teacher"], task["chance_bound"], ">="))
            gates.append(_gate(f"{task['name']}: student / teacher", task["ratio"], cfg.min_task_metric_ratio, ">="))
        exports = validate_exports(art, cfg, pooled, gates)
        latency_target = latency_target_gate(art, cfg, gates)
        art.student.to(art.device)
        art.validation = {"towers": towers, "task_metric": task, "exports": exports,
                          **({"latency_target": latency_target} if latency_target else {}), "gates": gates,
                          "passed": all(g["passed"] for g in gates)}
        return art.validation


def latency_seq(cfg: ValidateConfig, model: torch.nn.Module, tower: TowerSpec) -> int:
    """The recipe's timing length, or 128 capped at the model's position limit."""
    if cfg.latency_seq is not None or tower.modality != "text":
        return cfg.latency_seq or 128
    return min(128, text_positions(model.config, tower))


def _gate(name: str, value: float, threshold: float, op: str) -> dict[str, Any]:
    """A gate; a NaN or Inf value always fails it."""
    passed = math.isfinite(value) and (value <= threshold if op == "<=" else value >= threshold)
    return {"name": name, "value": value, "threshold": threshold, "op": op, "passed": bool(passed)}


def task_metric(art: Artifact, cfg: ValidateConfig, pooled: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The task metric of teacher and student on the held-out samples, side by side.

    Labelled data: zero-shot accuracy (dual encoders: each image against the class prompts) or
    nearest-neighbour accuracy (one tower). Without labels the teacher is the reference (1.0): dual
    encoders score the lowest of image->image, text->image and image->text agreement (the last is how
    zero-shot classification ranks captions), the student's best match counted as agreeing when it is among
    the teacher's `agreement_k` best; one tower, nearest-neighbour agreement."""
    labels = art.calib.labels if art.calib else None
    dual = art.adapter.task_metric == "zero_shot"
    if labels is not None and dual:
        text = art.adapter.tower("text")
        t_prompts = np.concatenate([o[1] for o in torch_outputs(art.teacher, text, labels.prompts)])
        s_prompts = np.concatenate([o[1] for o in torch_outputs(art.student, text, labels.prompts)])
        t_img, s_img = pooled["vision"]
        score = {who: zero_shot_accuracy(img, prompts, labels.prompt_class, labels.held_out, len(labels.classes))
                 for who, img, prompts in (("teacher", t_img, t_prompts), ("student", s_img, s_prompts))}
        out = {"name": "zero-shot accuracy (image -> class prompt)", "kind": "zero_shot_accuracy",
               "classes": len(labels.classes), **score}
    elif labels is not None:
        (t, s), = pooled.values()
        out = {"name": "nearest-neighbour accuracy", "kind": "nearest_neighbour_accuracy",
               "classes": len(labels.classes), "teacher": nearest_neighbour_accuracy(t, labels.held_out),
               "student": nearest_neighbour_accuracy(s, labels.held_out)}
    elif dual:
        (t_txt, s_txt), (t_img, s_img) = pooled["text"], pooled["vision"]
        # Captions repeated under several images are ranked once: copies would fill the teacher's top k
        # and a student ranking the same caption first through another copy would count as disagreeing.
        keys = distinct_texts(art.calib.eval_batches("text")) if art.calib else list(range(len(t_txt)))
        parts = {"image -> image": top_k_agreement(t_img, t_img, s_img, s_img, cfg.agreement_k, same=True),
                 "text -> image": top_k_agreement(t_txt, t_img, s_txt, s_img, cfg.agreement_k),
                 "image -> text": top_k_agreement(t_img, t_txt[keys], s_img, s_txt[keys], cfg.agreement_k)}
        # k as top_k_agreement caps it, and how often a student ranking at random would agree
        ks, chance = zip(*(agreement_chance(cfg.agreement_k, n, same) for n, same in
                           ((len(t_img), True), (len(t_img), False), (len(keys), False))))
        k = f"{cfg.agreement_k}" if max(ks) == cfg.agreement_k else f"{max(ks)} of the {cfg.agreement_k} asked"
        out = {"name": f"retrieval agreement with the teacher (top-1 in its top {k})",
               "kind": "retrieval_agreement", "k": cfg.agreement_k, "parts": parts, "teacher": 1.0,
               "student": min(parts.values()) if all(map(math.isfinite, parts.values())) else float("nan"),
               "chance": max(chance)}
    else:
        (t, s), = pooled.values()
        out = {"name": "nearest-neighbour agreement", "kind": "nearest_neighbour_agreement", "teacher": 1.0,
               "student": neighbour_agreement(t, s)}
    if labels is not None:
        rows = scored(out["kind"], labels.held_out, labels.prompt_class)
        truth = np.asarray(labels.held_out)
        # the zero-shot chance over the images scored; nearest neighbour's counts every sample as a candidate
        out["chance"], out["chance_bound"] = chance_accuracy(
            out["kind"], truth[rows] if out["kind"] == "zero_shot_accuracy" else truth)
        out["scored"] = int(rows.sum())
        if out["scored"] < len(truth):
            why = ("of classes no class prompt names (no caption of theirs outside the held-out images)"
                   if out["kind"] == "zero_shot_accuracy" else "alone in their class among the held-out samples")
            out["note"] = (f"{len(truth) - out['scored']} of the {len(truth)} held-out samples are {why}, with no "
                           f"right answer, and are not scored")
    if dual and (probabilities := match_probabilities(getattr(art, "teacher", None), getattr(art, "student", None),
                                                      pooled)) is not None:
        out["match_probability"] = probabilities
    ratio = out["student"] / out["teacher"] if out["teacher"] else float("nan")
    return {**out, "value": out["student"], "ratio": ratio}


def match_probabilities(teacher: torch.nn.Module | None, student: torch.nn.Module | None,
                        pooled: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float] | None:
    """How far the student moves each held-out image-text pair's match probability σ(scale · cos + bias), and
    apart (`unmatched`) that of each image with the other captions, for models that score pairs one at a time
    (SigLIP; None for others): rankings, which the task metric judges, stay where every similarity shifts
    alike, and a threshold on the probability does not."""
    if not all(isinstance(getattr(m, "logit_bias", None), torch.Tensor) for m in (teacher, student)) or \
            not {"text", "vision"} <= pooled.keys():
        return None

    def probability(model: torch.nn.Module, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        scale = float(model.logit_scale.detach().float().exp())
        bias = float(model.logit_bias.detach().float().reshape(-1)[0])
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)  # noqa: E731
        return 1.0 / (1.0 + np.exp(-(scale * unit(image) @ unit(text).T + bias)))
    def moved(p_t: np.ndarray, p_s: np.ndarray) -> dict[str, float]:
        diff = np.abs(p_t - p_s)
        return {"pairs": int(diff.size), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
                "decision_agreement": float(((p_t > 0.5) == (p_s > 0.5)).mean())}

    (t_txt, s_txt), (t_img, s_img) = pooled["text"], pooled["vision"]
    p_t, p_s = probability(teacher, t_img, t_txt), probability(student, s_img, s_txt)
    if p_t.shape[0] != p_t.shape[1]:  # not one caption per image: no pairs to tell apart
        return moved(p_t, p_s)
    # The i-th image with its own caption, apart from the other combinations: those are nearly all far below
    # 0.5 for both models, and averaged in they hid a student whose every true pair had crossed it.
    own = np.eye(len(p_t), dtype=bool)
    return {**moved(p_t[own], p_s[own]), "unmatched": moved(p_t[~own], p_s[~own])}


def _norm_ratio(result: dict[str, Any], emb: np.ndarray, t_emb: np.ndarray, label: str, cfg: ValidateConfig,
                gates: list[dict[str, Any]]) -> None:
    """Record each embedding's norm against the teacher's, and gate the worst: a model whose embedding is not
    normalised (a dot-product model) ranks results by its norms too, and cosine does not see them."""
    ratio = np.linalg.norm(emb, axis=1) / np.linalg.norm(t_emb, axis=1).clip(1e-12)
    result["norm_ratio"] = {"mean": float(ratio.mean()), "min": float(ratio.min()), "max": float(ratio.max())}
    if cfg.max_norm_error is not None:
        gates.append(_gate(f"{label}: norm to teacher's, max error", float(np.abs(ratio - 1).max()),
                           cfg.max_norm_error, "<="))


def validate_exports(art: Artifact, cfg: ValidateConfig, pooled: dict[str, tuple[np.ndarray, np.ndarray]],
                     gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run every further artifact (fused, INT8, OpenVINO) through lmmc.runtime on the held-out batches:
    max |diff| to PyTorch for fp32 ones, cosine to the fp32 student and to the teacher for all, with
    their gates appended to `gates`. `pooled` holds each tower's (teacher, student) embeddings."""
    results = []
    hidden: dict[str, list[np.ndarray]] = {}  # tower -> the PyTorch student's last hidden states
    short_pooled: dict[str, np.ndarray] = {}  # tower -> the PyTorch student's pooled embeddings of the short texts
    for rec in art.exports:
        tower = art.adapter.tower(rec.tower)
        batches = art.calib.eval_batches(tower.modality)
        # OpenVINO IRs and TensorRT engines run where their backend runs; only ONNX files move to the GPU
        model = load_artifact(rec.path, rec.backend, cfg.threads, cfg.device if rec.backend == "onnxruntime" else None)
        outs = [model.run({n: b[n].numpy() for n in input_names(tower)}) for b in batches]
        t_emb, s_emb = pooled[rec.tower]
        emb = np.concatenate([o["pooled_embedding"] for o in outs])
        to_student, to_teacher = cosine(s_emb, emb), cosine(t_emb, emb)
        label = f"{rec.tower}: {rec.backend} {rec.precision} {rec.variant}"
        result: dict[str, Any] = {
            "tower": rec.tower, "backend": rec.backend, "precision": rec.precision, "variant": rec.variant,
            "path": str(rec.path.relative_to(art.workdir)), "device": model.device,
            **({"providers": list(model.providers)} if model.providers else {}),
            "cosine_to_student": float(to_student.mean()), "cosine_to_student_min": float(to_student.min()),
            "cosine_to_teacher": float(to_teacher.mean()), "cosine_to_teacher_min": float(to_teacher.min()),
        }
        if rec.tower not in hidden:
            hidden[rec.tower] = [h for h, _ in torch_outputs(art.student, tower, batches)]
        if rec.precision != "fp32":
            # the gates judge the pooled embedding; users of the token states get their own figure
            tokens = np.concatenate([token_cosine(o["last_hidden_state"], h, b)
                                     for o, h, b in zip(outs, hidden[rec.tower], batches)])
            result["hidden_cosine_to_student"] = {"mean": float(tokens.mean()), "min": float(tokens.min())}
        short = art.calib.eval_short if tower.modality == "text" else []
        if short and rec.precision in ("int8", "mixed") and rec.backend != "tensorrt":
            # a search box's queries: one to four words, mostly [CLS] and [SEP] (an engine's profile may not take them)
            if rec.tower not in short_pooled:
                short_pooled[rec.tower] = np.concatenate([p for _, p in torch_outputs(art.student, tower, short)])
            got = np.concatenate([model.run({n: b[n].numpy() for n in input_names(tower)})["pooled_embedding"]
                                  for b in short])
            texts = cosine(short_pooled[rec.tower], got)
            result["short_cosine_to_student"] = {"mean": float(texts.mean()), "min": float(texts.min()),
                                                 "texts": len(texts)}
        if rec.precision == "fp32":
            # np.max keeps a NaN that the builtin max() would drop when it is not first
            last = float(np.max([hidden_diff(o["last_hidden_state"], h, b)
                                 for o, h, b in zip(outs, hidden[rec.tower], batches)]))
            result["max_abs_diff"] = {"last_hidden_state": last,
                                      "pooled_embedding": float(np.abs(emb - s_emb).max())}
            result["output_scale"] = {"last_hidden_state": max(float(np.abs(h).max()) for h in hidden[rec.tower]),
                                      "pooled_embedding": float(np.abs(s_emb).max())}
            gates.append(_gate(f"{label}: max diff to PyTorch", scaled_diff(result["max_abs_diff"], result["output_scale"]),
                               cfg.max_runtime_diff, "<="))
        elif rec.precision == "fp16":
            if cfg.min_cosine_fp16 is not None:
                gates.append(_gate(f"{label}: cosine to fp32 student", result["cosine_to_student"], cfg.min_cosine_fp16, ">="))
        elif cfg.min_cosine_int8 is not None:  # int8, and mixed (INT8 with some matrices kept fp32)
            gates.append(_gate(f"{label}: cosine to fp32 student", result["cosine_to_student"], cfg.min_cosine_int8, ">="))
        if cfg.min_cosine is not None:
            gates.append(_gate(f"{label}: cosine to teacher", result["cosine_to_teacher"], cfg.min_cosine, ">="))
        if rec.max_cosine_drop is not None and 1 - result["cosine_to_student"] > rec.max_cosine_drop:
            # its matrices were chosen on calibration batches, which its INT8 ranges were fitted to as well
            result["warnings"] = [f"{result['path']}: its cosine drop to the fp32 student on the held-out samples, "
                                  f"{1 - result['cosine_to_student']:.4g}, is above the max_cosine_drop of "
                                  f"{rec.max_cosine_drop} its fp32 matrices were chosen for on the calibration "
                                  f"batches; " + ("every block matrix is fp32 already, and the drop left is the "
                                                  "quantisation outside them: raise max_cosine_drop" if rec.all_fp32
                                                  else "lower max_cosine_drop to keep more matrices fp32")]
        if not normalises(art.student.config):
            _norm_ratio(result, emb, t_emb, label, cfg, gates)
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------
# The latency target's gate


def latency_target_gate(art: Artifact, cfg: ValidateConfig, gates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Time the student's artifact on the latest latency target a pass set (its runtime, precision,
    threads and shape), interleaved with the teacher's deployments on that runtime when the target is a
    speed-up, whose target is then re-derived from the teacher timed in this same run. Appends the gate
    |measured - target| / target <= max_latency_miss (default 0.10) and reports the latency model's
    prediction error. None when no pass set a target."""
    from lmmc.export.ort import calibration_feeds
    from lmmc.latency_budget import time_deployments
    from lmmc.latency_model import Target

    planned = next((r.metrics["latency_target"] for r in reversed(art.records)
                    if isinstance(r.metrics, dict) and r.metrics.get("latency_target")), None)
    if planned is None:
        return None
    deploy = planned["deploy_config"]
    target = Target(**deploy)
    students = {}
    for tower in art.adapter.towers:
        path = target_artifact(art, tower.name, target.runtime, target.precision)
        students[tower.name] = (str(path.relative_to(art.workdir)) if art.workdir else str(path),
                                load_artifact(path, target.runtime, target.threads).run)
    speedup = planned.get("speedup")
    with scratch_folder("lmmc-latency-") as tmp:
        feeds = {t.name: calibration_feeds(art, t) for t in art.adapter.towers}
        timing = time_deployments(art.teacher.cpu().eval(), art.adapter, target, Path(tmp), feeds,
                                  deploy_teacher=speedup is not None, students=students, repeats=cfg.repeats)
    measured = timing["student_ms"]
    goal = timing["teacher_ms"] / speedup if speedup is not None else planned["target_ms"]
    miss = abs(measured - goal) / goal
    threshold = cfg.max_latency_miss if cfg.max_latency_miss is not None else 0.10
    predicted = planned["predicted_ms"]
    result = {"deploy": planned["deploy"], "target_ms": goal, "measured_ms": measured, "predicted_ms": predicted,
              "miss": miss, "prediction_error": (predicted - measured) / measured, "timing": timing}
    if speedup is not None:
        # Against the teacher timed beside it: the predicted speed-up is a ratio of two predictions, so a
        # machine slower or faster now than during the fit leaves it comparable with the measured one.
        predicted_speedup = planned["teacher_ms"] / predicted
        measured_speedup = timing["teacher_ms"] / measured
        result.update(speedup_target=speedup, teacher_ms=timing["teacher_ms"], teacher_predicted_ms=planned["teacher_ms"],
                      speedup_measured=measured_speedup, speedup_predicted=predicted_speedup,
                      prediction_error=(measured_speedup - predicted_speedup) / predicted_speedup,
                      prediction_error_absolute=(predicted - measured) / measured)
    # the gate is two-sided (a student far faster than asked kept less than it could); the name says which side
    side = "faster" if measured < goal else "slower"
    gates.append(_gate(f"latency on {planned['deploy']}: |measured - target| / target ({measured:.3g} ms, {side} "
                       f"than the {goal:.3g} ms target)", miss, threshold, "<="))
    return result


def target_artifact(art: Artifact, tower: str, runtime: str, precision: str) -> Path:
    """The artifact a latency target is measured on, the kind its latency model was fitted on: the OpenVINO
    IR in that precision, ONNX Runtime's static INT8 graph, or the plain ONNX export."""
    found = {(r.backend, r.precision, r.variant): r.path for r in art.exports if r.tower == tower}
    if runtime == "openvino":
        path = next((p for (backend, prec, _), p in found.items() if backend == "openvino" and prec == precision),
                    None)
        fix = "add 'openvino: {int8: true}' under export" if precision == "int8" else "add 'openvino' under export"
    elif precision == "int8":
        path = found.get(("onnxruntime", "int8", "static"))
        fix = "add 'ort: {int8: [static]}' under export"
    else:
        path = art.onnx.get(tower)
        fix = "add 'onnx' under export"
    if path is None:
        raise LmmcError(f"validate: the latency target is set on {runtime} {precision}, but the recipe exports no "
                        f"{runtime} {precision} artifact of the {tower} tower to measure it on; {fix}")
    return path
