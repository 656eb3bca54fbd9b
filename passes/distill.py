"""Distillation fine-tuning of the student against the teacher (the trainer is lmmc.distiller): the
pass's config, its corpus (held-out validation samples removed) and its run."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from lmmc.adapters import Adapter, get_adapter
from lmmc.artifact import Artifact
from lmmc.data import (Batch, check_generative_records, encode_generative, encode_images, encode_text,
                       generative_limits, read_corpus, text_key, token_coverage, tower_batches, vocabulary_runs)
from lmmc.distill_losses import ContrastiveLoss, OutputLoss, check_layer_map, check_layer_range
from lmmc.distiller import (Sample, TowerPlan, Trainer, check_arms_have_losses, distilled_towers, make_arms,
                            modality_key, sample_length)
from lmmc.errors import LmmcError
from lmmc.modelio import text_pad_length, text_positions
from lmmc.optima import ArmSpan, ScheduleName
from lmmc.pipeline import Pass, PassConfig, register

LayerMap = Literal["origin", "uniform", "closest"] | list[PositiveInt] | dict[str, list[PositiveInt]]

# Tokens kept per text sample when recognising held-out samples in a corpus: a shared prefix this long
# is treated as the same sentence, whatever truncation length either side used.
_KEY_TOKENS = 24
# Per-token inputs of a text batch, trimmed to the real tokens when a batch is split into samples.
_TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


class DistillConfig(PassConfig):
    steps: int = Field(500, ge=0, description="optimiser steps (0 leaves the student as it is); with minutes, "
                       "the most steps to run")
    minutes: float | None = Field(None, gt=0, description="wall-clock budget of the pass, the teacher's cache "
                                  "and the dev evaluations included: training ends when it is spent or at steps, "
                                  "whichever comes first, and the learning-rate schedule runs its course over the "
                                  "same span, so a faster machine trains more steps in the same minutes")
    batch_size: int = Field(16, gt=0, description="samples per optimiser step, over all ranks and micro-batches")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimiser step (divides batch_size); a "
                            "dual encoder's similarity-matrix loss compares the samples of one micro-batch "
                            "(gathered over torchrun's ranks), so it sees batch_size / grad_accum of them")
    lr: float = Field(3e-4, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay; off because it pulls away from the teacher")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming the learning rate up")
    final_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decay ends at this fraction of lr")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 disables")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast or fp32; auto = bf16 on GPUs that support it, fp32 on CPU. On a CPU "
        "with AMX, bf16 trains faster at batch 32 and up (text batches are then padded to multiples of 16 tokens)")
    seed: int = Field(0, ge=0, lt=2**63, description="seeds the data order and the bandit")
    corpus: str | list[str] | None = Field(None, description="distillation data (.txt, .jsonl, image folder; "
                                           "generative models: a .jsonl of {image, prompt?, text} records), or a "
                                           "list of them read as one; default: the calibration samples. Held-out "
                                           "validation samples are always removed")
    samples: int | None = Field(None, gt=0, description="use at most this many corpus samples for training")
    vocabulary: float = Field(0.0, ge=0, le=1, description="text encoders: add this share of the corpus's "
                              "training samples again as runs of 4 to 24 tokens drawn at random from the whole "
                              "vocabulary, so the student also learns the teacher on tokens the corpus lacks "
                              "(names, figures, other domains' terms); the dev samples stay corpus text")
    max_length: int = Field(128, gt=1, description="token limit for corpus text (generative models: prompt and "
                            "answer, image tokens aside)")
    chat_template: bool | None = Field(None, description="generative models: put corpus prompts in the processor's "
                                       "chat template; default: as calibration.chat_template does for the "
                                       "calibration records, so both reach the model in one form")
    dev_samples: int = Field(64, ge=0, description="corpus samples set aside to pick the best checkpoint "
                             "(never trained on, disjoint from the compile's held-out set)")
    eval_every: int = Field(100, ge=0, description="steps between evaluations on the dev samples; 0 = only at the end")
    keep_best: bool = Field(True, description="end with the weights that scored best on the dev samples")
    int8_aware: float = Field(0.0, ge=0, le=1, description="the last share of the run (of its steps, or of its "
                              "minutes) in which every block linear's input is fake-quantised to 8 bits "
                              "(per tensor, ranges tracked over the batches), so the student learns weights that "
                              "keep their fidelity once the ort or openvino pass quantises it; its dev scores, "
                              "and the best step, are then of the quantised student; 0 = off (on the MiniLM "
                              "deployment recipe it cost steps and gained nothing: BENCHMARKS.md, run 36)")
    hidden: float = Field(1.0, ge=0, description="weight of the layerwise hidden-state loss (generative models: "
                          "also of the projector's image-feature loss)")
    output: float = Field(1.0, ge=0, description="weight of the pooled-embedding loss; for generative models the "
                          "weight of the token-level KL(teacher ‖ student) on the answer tokens")
    temperature: float = Field(1.0, gt=0, description="generative models: softmax temperature of the token-level "
                               "KL (the loss is scaled by its square)")
    contrastive: float = Field(1.0, ge=0, description="weight of the similarity-matrix loss (dual encoders only)")
    relations: float = Field(0.0, ge=0, description="encoders: weight of MiniLMv2's self-attention relation loss, "
                             "KL between the query-query, key-key and value-value relations of the student's "
                             "last block and the teacher's")
    relation_heads: int = Field(8, gt=0, description="relation heads the query, key and value channels are cut "
                                "into for the relation loss; divides the attention head width")
    output_loss: OutputLoss = Field("cosine", description="pooled-embedding loss: cosine or mse")
    contrastive_loss: ContrastiveLoss | None = Field(None, description="kl on the teacher's softmax over each "
                                                     "similarity row (CLIP's objective), sigmoid on each pair's "
                                                     "match probability (SigLIP's), or mse on the cosine "
                                                     "similarities; default: the teacher's own objective, sigmoid "
                                                     "for a model with a logit bias, else kl")
    layer_map: LayerMap = Field("origin", description="origin (the teacher layer each block was cut from; "
                                "uniform when the student has no such record), uniform, closest, or teacher "
                                "layers (1-based) per student layer: a list, or {tower: list} for dual encoders")
    skip_hidden: dict[str, list[NonNegativeInt]] = Field(
        {}, description="student blocks (0-based, per tower) that get no hidden-state term; "
        "antgmm sets it for the blocks it is fading out, whose output is turning into the previous block's "
        "and would otherwise pull that block toward the teacher layer the faded block is about to stop "
        "producing")
    schedule: ScheduleName = Field("all", description="all (every module every step: plain layerwise "
                                   "distillation, the best on MiniLM in benchmarks/distill.py), optima "
                                   "(OPTIMA's bandit picks one module per step) or round_robin")
    blocks_per_arm: int | None = Field(2, gt=0, description="consecutive student blocks per module (arm); "
                                       "null = one module per tower")
    arm_span: ArmSpan = Field("tower", description="tower: a module's blocks lie in one tower; towers: module "
                              "k is the k-th run of blocks of every tower at once (dual encoders)")
    window: int = Field(50, gt=0, description="bandit: steps of reward history the posterior sees")
    prior_weight: float = Field(1.0, gt=0, description="bandit: pseudo-observations of the prior")
    reward_samples: int = Field(16, gt=1, description="bandit: corpus samples set aside (never trained on) "
                                "on which the whole distillation loss is measured before and after each step")
    reward: Literal["relative", "absolute"] = Field(
        "relative", description="bandit reward: the drop of the whole distillation loss on the reward "
        "samples over that loss before the step (relative), or the drop per sample (absolute)")
    train_embeddings: bool = Field(False, description="also train the token/patch embeddings; off because a "
                                   "small corpus covers few tokens and pruning leaves them intact")
    teacher_cache_mb: int = Field(2048, ge=0, description="keep the teacher's targets for the whole corpus "
                                  "in memory (bf16 under bf16 precision) when they fit in this many MB, so a "
                                  "run of more than one epoch runs the teacher once; 0 = run it every step")
    checkpoint_dir: str | None = Field(None, description="directory for resumable checkpoints; default in "
                                       "`lmmc compile`: the compile's work area beside --out")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only the final one "
                                  "(in `lmmc compile`: every tenth of the steps)")
    checkpoint_minutes: float | None = Field(None, gt=0, description="minutes of training between checkpoints, "
                                             "besides checkpoint_every (in `lmmc compile` with `minutes`: a "
                                             "tenth of them)")
    checkpoint_share: float | None = Field(None, gt=0, le=1, description="the most of the training time that "
                                           "writing step checkpoints may take: a due checkpoint waits until the "
                                           "previous one is that far behind (in `lmmc compile`, unless the recipe "
                                           "gives checkpoint_every or checkpoint_minutes: 0.1)")
    keep_last: int = Field(2, ge=1, description="resumable step checkpoints kept")
    resume: bool = Field(False, description="continue from the newest checkpoint of this same run "
                         "(`lmmc compile --resume` sets it)")
    progress: bool = Field(True, description="show a progress bar")
    towers: list[str] | None = Field(
        None, min_length=1, description="distil only these towers (default: every tower); a dual encoder's other "
        "tower stays as it is, the contrastive term needs both and is dropped, and the corpus needs only these "
        "towers' inputs (an image folder for the vision tower alone)")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (every rank holds the whole student, its gradients and AdamW "
        "state) or fsdp (torch's FSDP2 shards them over the ranks, one unit per block; the teacher stays whole). "
        "A single process runs unsharded either way")

    def check_model(self, adapter: Adapter, config: Any = None, unchanged_depth: bool = False) -> None:
        """What this model's distillation cannot take, refused before anything runs; `unchanged_depth`: no
        pass before this one removes blocks, so the student's are the teacher's."""
        if self.chat_template is not None and adapter.kind != "generative":
            raise LmmcError(f"distill: chat_template applies to generative models, and this {adapter.family} "
                            f"model is an encoder that reads plain text; remove chat_template")
        if self.chat_template is not None and not self.corpus:  # else it would be ignored, silently
            raise LmmcError("distill: chat_template applies to corpus prompts, and this distill has no corpus: it "
                            "trains on the calibration records, in the form calibration.chat_template gives them; "
                            "remove chat_template, or set calibration.chat_template")
        names = [t.name for t in adapter.towers]
        if self.towers is not None:
            unknown = sorted(set(self.towers) - set(names))
            if unknown:
                raise LmmcError(f"distill: towers names {unknown}, but this {adapter.family} model has the towers "
                                f"{names}; name some of those")
            if adapter.kind == "generative" and set(self.towers) != set(names):
                raise LmmcError(f"distill: towers cannot leave out part of a generative model ({adapter.family}): its "
                                f"decoder reads the vision tower's features; remove towers")
        distilled = distilled_towers(self, adapter)
        if adapter.kind != "generative" and self.hidden == 0 and self.output == 0 and self.relations == 0 and not (
                len(distilled) == 2 and self.contrastive > 0):
            raise LmmcError("distill: all loss weights are 0 (contrastive counts only where both towers of a dual "
                            "encoder are distilled); give hidden or output a positive weight")
        if self.arm_span == "towers" and adapter.kind != "generative" and len(distilled) < 2:
            raise LmmcError(f"distill: arm_span: towers pairs the stages of a dual encoder's two towers, and this "
                            f"distill trains one ({distilled[0].name}); use arm_span: tower")
        if len(distilled) == 2 and self.contrastive > 0 and self.batch_size // self.grad_accum < 2:
            raise LmmcError(f"distill: the similarity-matrix loss compares the samples of one micro-batch, and "
                            f"batch_size {self.batch_size} / grad_accum {self.grad_accum} leaves one: the term is 0. "
                            f"Raise batch_size or lower grad_accum, or set contrastive: 0")
        depths = {}
        for tower in distilled if config is not None else []:
            layers = getattr(getattr(config, tower.config_key) if tower.config_key else config, "num_hidden_layers")
            depths[tower.name] = layers
            if isinstance(self.layer_map, (list, dict)):
                if isinstance(self.layer_map, dict) and tower.name not in self.layer_map:
                    raise LmmcError(f"layer_map names towers {sorted(self.layer_map)} but not '{tower.name}', which "
                                    f"this distill trains; give one list of teacher layers per distilled tower")
                mapping = self.layer_map[tower.name] if isinstance(self.layer_map, dict) else self.layer_map
                if unchanged_depth:  # the student has the teacher's blocks, one entry each
                    check_layer_map(mapping, layers, layers, tower.name)
                else:
                    check_layer_range(mapping, layers, tower.name)
            skip = sorted(self.skip_hidden.get(tower.name, ()))
            if unchanged_depth and skip and skip[-1] >= layers:
                raise LmmcError(f"skip_hidden names blocks {skip} of the {tower.name} tower, which has blocks "
                                f"0..{layers - 1}; give 0-based indices of the student's blocks")
        if unchanged_depth and depths and adapter.kind != "generative":
            self.check_terms({t.name: depths[t.name] for t in distilled})
        if isinstance(self.layer_map, list) and len(distilled) > 1:
            raise LmmcError(f"distill: layer_map is one list, but this distill trains the towers "
                            f"{[t.name for t in distilled]}; give {{tower: [teacher layers]}} per tower")
        if unchanged_depth and depths and self.schedule != "all":
            plans = {t.name: TowerPlan(t, depths[t.name], depths[t.name], skip=set(self.skip_hidden.get(t.name, ())))
                     for t in distilled}
            made = make_arms(plans, self.blocks_per_arm, self.arm_span)
            check_arms_have_losses(made, self.hidden, self.schedule)
            arms = [a.name for a in made]
            if adapter.kind == "generative" and adapter.bridges:  # the projector is an arm of its own
                arms.append(f"{adapter.bridges[0].name}[0:1]")
            if self.schedule == "optima" and self.window < len(arms):
                raise LmmcError(f"distill: window ({self.window}) must be at least the number of modules "
                                f"({len(arms)}: {', '.join(arms)})")
        if self.relations and adapter.kind == "generative":
            raise LmmcError(f"distill: relations compares an encoder's last blocks, and this {adapter.family} model "
                            f"is generative, distilled on its next-token distributions; remove relations")
        for tower in distilled if config is not None and self.relations else []:
            sizes = getattr(config, tower.config_key) if tower.config_key else config
            width = getattr(sizes, "head_dim", None) or sizes.hidden_size // sizes.num_attention_heads
            if width % self.relation_heads:
                raise LmmcError(f"distill: relation_heads = {self.relation_heads} does not divide the {tower.name} "
                                f"tower's attention head width ({width}), so a student's channels would not split "
                                f"into equal relation heads; choose a divisor of {width}")
        read = sorted({t.modality for t in distilled})
        if self.vocabulary and (adapter.kind == "generative" or read != ["text"]):
            pairs = adapter.kind != "generative" and "text" in read
            raise LmmcError(f"distill: vocabulary adds samples of text alone, but the {adapter.family} model's "
                            f"distillation reads {' and '.join(read)}: "
                            f"{'distil the text tower alone (towers: [text])' if pairs else 'remove vocabulary'}")
        if adapter.kind != "generative":
            if self.given("temperature"):
                raise LmmcError(f"distill: temperature softens a generative model's token-level KL, and this "
                                f"{adapter.family} model is an encoder, distilled on its embeddings; remove "
                                f"temperature")
            both = len(distilled) == 2
            unused = [k for k in ("contrastive", "contrastive_loss") if self.given(k)] if not both else []
            if unused:
                raise LmmcError(f"distill: {', '.join(unused)} set the similarity-matrix term of a dual encoder whose "
                                f"two towers are both distilled, and this distill trains one tower of a "
                                f"{adapter.family} model; remove {', '.join(unused)}")
            return
        for path in self.corpus_paths():
            if path.suffix == ".jsonl":
                continue
            raise LmmcError(f"distill: corpus '{path}' is not a .jsonl, but this generative image-text model "
                            f"({adapter.family}) distils on image-text records: give a .jsonl with "
                            f"{{\"image\": ..., \"prompt\": ... (optional), \"text\": the answer or caption}} per line")
        if self.arm_span == "towers":
            raise LmmcError("distill: arm_span: towers pairs the stages of a dual encoder's two towers; a generative "
                            "model's arms are runs of vision blocks, the projector and runs of decoder blocks: "
                            "use arm_span: tower")
        if self.contrastive_loss not in (None, "kl") or self.output_loss != "cosine":
            raise LmmcError("distill: output_loss and contrastive_loss apply to encoders; a generative model's output "
                            "term is the token-level KL (weight: output, softness: temperature): remove them")

    def check_terms(self, depths: dict[str, int]) -> None:
        """An encoder's distillation of towers with these block counts has a loss term left to train on:
        skip_hidden over every block with output 0 left none, and the loss was a number, not a tensor."""
        hidden = self.hidden > 0 and any(set(range(n)) - set(self.skip_hidden.get(t, ())) for t, n in depths.items())
        if not hidden and self.output == 0 and self.relations == 0 and not (len(depths) == 2 and self.contrastive > 0):
            raise LmmcError("distill: skip_hidden leaves no block a hidden-state term and output is 0, so no loss "
                            "term is left to train on; give output a positive weight, or skip fewer blocks")

    @field_validator("corpus")
    @classmethod
    def _corpus_exists(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not v:
            raise ValueError("corpus is an empty list; give at least one .txt, .jsonl or image folder, or leave "
                             "corpus out to distil on the calibration samples")
        for path in [v] if isinstance(v, str) else v or []:
            if not Path(path).exists():
                raise ValueError(f"corpus '{path}' does not exist; give a .txt, .jsonl or image folder")
        return v

    def corpus_paths(self) -> list[Path]:
        """The corpus files, in the order given (none: distil on the calibration samples)."""
        return [Path(p) for p in ([self.corpus] if isinstance(self.corpus, str) else self.corpus or [])]

    @model_validator(mode="after")
    def _consistent(self) -> "DistillConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir, the directory the interrupted run wrote to; a compile "
                             "killed mid-run continues with `lmmc compile --resume` and no resume in the recipe")
        if self.minutes is not None and "steps" not in self.model_fields_set:
            raise ValueError("minutes needs steps too, as a ceiling (e.g. steps: 100000): the default of 500 "
                             "would end the run long before its minutes")
        return self


def _split_samples(batches: dict[str, list[Batch]], modalities: list[str]) -> list[Sample]:
    """Pre-encoded batches back into single samples, text trimmed to its real tokens (a generative model's
    labels with them; its pixels kept whole). For pairs the i-th text and image batches hold the same
    pairs, so samples are zipped by position."""
    per: dict[str, list[dict[str, torch.Tensor]]] = {}
    for m in modalities:
        rows = []
        for b in batches.get(m, []):
            if m == "text":
                for row in range(len(b["input_ids"])):
                    keep = b["attention_mask"][row].bool()
                    rows.append({k: v[row][keep] if k in _TOKEN_KEYS else v[row] for k, v in b.items()})
            else:
                rows += [{"pixel_values": pv} for pv in b["pixel_values"]]
        per[m] = rows
    n = min(len(v) for v in per.values()) if per else 0
    return [{m: per[m][i] for m in modalities} for i in range(n)]


class _TextCorpus:
    """An encoder's text samples as one flat int32 array per input, cut at row ends; a sample is made (int64, as
    the tokenizer gives it) when read. Tensors of their own cost some 3 KB a sentence besides its tokens: a
    20 MB corpus took 800 MB before `samples` kept a few thousand of its sentences."""

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {"input_ids": [], "attention_mask": []}
        self._flat: dict[str, np.ndarray] = {}
        self._ends = [0]

    def extend(self, batches: list[Batch]) -> None:
        """Append padded text batches, each row trimmed to its real tokens as `_split_samples` trims them."""
        for b in batches:
            keep = b["attention_mask"].bool()
            for name, parts in self._parts.items():
                parts.append(b[name][keep].to(torch.int32).numpy())
            self._ends += (self._ends[-1] + keep.sum(1).cumsum(0)).tolist()
        self._flat = {}

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if not self._flat:
            self._flat = {name: np.concatenate(parts) if parts else np.zeros(0, np.int32)
                          for name, parts in self._parts.items()}
            self._parts = {name: [flat] for name, flat in self._flat.items()}
        a, b = self._ends[i], self._ends[i + 1]
        return {"text": {name: torch.from_numpy(flat[a:b]).long() for name, flat in self._flat.items()}}


class _ImageCorpus:
    """Image or image-text samples whose pixels are made when a sample is read, once an image file for all its
    captions: pixels cost 600 KB an image at 224 x 224, and every image of a corpus was decoded before `samples`
    kept a few thousand. What tells images apart, their pixels' digest, is taken a chunk of files at a time."""

    def __init__(self, processor, paths: list[str], texts: _TextCorpus | None, keep: bool) -> None:
        """`keep`: every sample will be read (no `samples` cap), so pixels are kept rather than decoded twice."""
        self._processor, self._paths, self._texts = processor, paths, texts
        distinct, digests = list(dict.fromkeys(paths)), {}
        self._pixels: dict[str, torch.Tensor] = {}
        for start in range(0, len(distinct), 64):
            chunk = distinct[start:start + 64]
            for path, pixels in zip(chunk, encode_images(processor, chunk, 64)[0]["pixel_values"]):
                digests[path] = _pixels_digest(pixels)
                if keep:
                    self._pixels[path] = pixels
        self._digests = [digests[path] for path in paths]

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int) -> Sample:
        path = self._paths[i]
        if path not in self._pixels:
            self._pixels[path] = encode_images(self._processor, [path], 1)[0]["pixel_values"][0]
        return {"image": {"pixel_values": self._pixels[path]}, **(self._texts[i] if self._texts else {})}

    def image_key(self, i: int) -> tuple:
        """`_sample_key` of sample i's image alone, without its pixels."""
        return (self._digests[i],)

    def key(self, i: int) -> tuple:
        """`_sample_key` of sample i, without its pixels."""
        return (self._digests[i], *(_sample_key(self._texts[i]) if self._texts else ()))


def _pixels_digest(pixels: torch.Tensor) -> str:
    return hashlib.sha1(pixels.float().numpy().tobytes()).hexdigest()


def _sample_key(sample: Sample, special: frozenset[int] = frozenset(), tokens: int = _KEY_TOKENS) -> tuple:
    """What tells samples apart: an image's pixels, a generative sample's whole sequence, and an encoder
    text's first `tokens` content tokens (its special tokens left out, since a text cut short ends in one)."""
    parts = []
    for m in sorted(sample):
        if m == "text":
            # A generative sample's tokens start with its image and prompt: only the whole sequence tells
            # two answers to one image apart.
            ids = sample[m]["input_ids"].tolist()
            if "labels" not in sample[m]:
                ids = [i for i in ids if i not in special][:tokens]
            parts.append(np.array(ids, dtype=np.int32).tobytes())  # a tenth of a tuple's memory
        else:
            parts.append(_pixels_digest(sample[m]["pixel_values"]))
    return tuple(parts)


def _key_tokens(special: frozenset[int], *sides: list[Sample]) -> int:
    """How many content tokens the keys compare: no more than either side kept of its longest text. The
    held-out split and the corpus may be cut at different max_length, and a text is the same text when one
    side holds only the start of it."""
    longest = [max(sum(i not in special for i in s["text"]["input_ids"].tolist()) for s in side)
               for side in sides if side and "text" in side[0] and "labels" not in side[0]["text"]]
    return max(1, min([_KEY_TOKENS, *longest]))


def check_towers(art: Artifact) -> None:
    """The student must be the teacher's kind of model, with the same towers."""
    t_type = art.teacher.config.model_type
    s_type = getattr(getattr(art.student, "config", None), "model_type", None)
    try:
        s_towers = [(t.name, t.modality) for t in get_adapter(s_type).towers] if s_type else []
    except LmmcError:
        s_towers = []
    t_towers = [(t.name, t.modality) for t in art.adapter.towers]
    if s_type != t_type or s_towers != t_towers:
        raise LmmcError(f"distill: the student ({s_type}, towers {s_towers}) does not match the teacher "
                        f"({t_type}, towers {t_towers}); distil into a student made from this teacher "
                        f"(pruned or shrunk), which has the same towers")


def build_corpus(cfg: DistillConfig, art: Artifact, modalities: list[str]) -> tuple[list[Sample], list[Sample]]:
    """Training and dev samples: the corpus minus the compile's held-out samples, shuffled with the seed;
    dev comes first, so changing `samples` never moves a sample between the two."""
    if cfg.corpus:
        source = "corpus " + ", ".join(f"'{p}'" for p in cfg.corpus_paths())
        template = cfg.chat_template if cfg.chat_template is not None else bool(art.calib and art.calib.chat_template)
        length = cfg.max_length
        text = [t for t in art.adapter.towers if t.modality == "text"]
        if not cfg.given("max_length") and text and art.adapter.kind != "generative":
            length = min(length, *(text_positions(art.teacher.config, t) for t in text))  # CLIP: 77, not 128
        samples = encode_corpus(art, cfg.corpus_paths(), modalities, length, template, keep=cfg.samples is None)
    else:
        if art.calib is None:
            raise LmmcError("distill needs data: give 'corpus' in its config, or calibration data (--calib)")
        source = f"the calibration samples of '{art.calib.source}'"
        samples = _split_samples(art.calib.calib, modalities)
    # Pairs are held out by their image: a held-out image under another caption is still held out.
    held = _split_samples(art.calib.eval, modalities) if art.calib else []
    special = frozenset(getattr((art.preprocessor or {}).get("tokenizer"), "all_special_ids", None) or ())
    lazy = isinstance(samples, _ImageCorpus)  # its keys come without decoding its images
    if "image" in modalities:
        held_out = {_sample_key({"image": s["image"]}) for s in held}
        image_keys = [samples.image_key(i) if lazy else _sample_key({"image": samples[i]["image"]})
                      for i in range(len(samples))]
        kept = [i for i, k in enumerate(image_keys) if k not in held_out]
    else:
        n = _key_tokens(special, held, samples)
        held_out = {_sample_key(s, special, n) for s in held}
        kept = [i for i, s in enumerate(samples) if _sample_key(s, special, n) not in held_out]
    unique: dict[tuple, int] = {}
    for i in kept:
        unique.setdefault(samples.key(i) if lazy else _sample_key(samples[i]), i)
    index = list(unique.values())
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    index = [index[i] for i in order]
    if "image" in modalities:  # dev images, like held-out ones, are not trained on under another caption
        keys = [image_keys[i] for i in index]
        firsts = dict(zip(reversed(keys), reversed(index)))  # each image's first sample in the shuffled order
        chosen = list(dict.fromkeys(keys))[:min(cfg.dev_samples, len(firsts) // 4)]
        dev, taken = [firsts[k] for k in chosen], set(chosen)
        train = [i for i, k in zip(index, keys) if k not in taken]
    else:
        n_dev = min(cfg.dev_samples, len(index) // 4)
        dev, train = index[:n_dev], index[n_dev:]
    if index and not dev and cfg.dev_samples and cfg.keep_best and cfg.steps:  # none at all: refused below
        # nothing would pick the checkpoint that keep_best promises, and the report would have no dev figure
        raise LmmcError(f"distill: the {'corpus' if cfg.corpus else 'calibration data'} gives {len(index)} distinct "
                        f"sample(s) once the held-out ones and repeats are left out, too few to set a quarter aside "
                        f"as the dev samples that pick the best checkpoint; give more distinct samples, or set "
                        f"dev_samples: 0 to keep the last step")
    # only the samples kept become tensors of their own
    dev = sorted((samples[i] for i in dev), key=sample_length)  # pads little when evaluated in batches
    train = [samples[i] for i in train[:cfg.samples]]
    if cfg.vocabulary and train:
        tokenizer = (art.preprocessor or {}).get("tokenizer")
        if tokenizer is None:
            raise LmmcError("distill: vocabulary draws from the model's tokenizer, and the model has none")
        texts = vocabulary_runs(tokenizer, round(cfg.vocabulary * len(train)), cfg.seed)
        train += _split_samples({"text": encode_text(tokenizer, texts, 256, cfg.max_length,
                                                      text_pad_length(art.teacher.config, art.adapter))}, ["text"])
    if not train:
        need = "image-text pairs" if len(modalities) > 1 else f"{modalities[0]} samples"
        raise LmmcError(f"distill: {source} has no usable samples for this model (it needs {need} that are "
                        f"not among the held-out validation samples); give a corpus with more {need}")
    return train, dev


def encode_corpus(art: Artifact, paths: list[Path], modalities: list[str], max_length: int,
                  chat_template: bool = False, keep: bool = False) -> list[Sample] | _TextCorpus | _ImageCorpus:
    """The records of the corpus files, in order, that have every modality the model needs, encoded one
    sample at a time (a generative model's: every record, which must be an image-text record; an encoder's
    texts packed, its images decoded when read unless `keep`)."""
    if art.adapter.kind == "generative":
        files = {path: read_corpus(path, "distill.corpus") for path in paths}
        processor = (art.preprocessor or {}).get("processor")
        if processor is None:
            raise LmmcError("distill: the model has no processor to encode the image-text corpus with; compile "
                            "from a model directory that holds its processor")
        for path, records in files.items():
            check_generative_records(records, path, processor, chat_template, "distill.corpus")
        records = [r for file in files.values() for r in file]
        batches = encode_generative(processor, records, 64, max_length, chat_template,
                                    *generative_limits(processor, art.adapter, art.teacher.config))
        return _split_samples(tower_batches(batches), modalities)
    records = [r for path in paths for r in read_corpus(path, "distill.corpus")
               if all(m in r for m in modalities)]
    if "text" in modalities and art.calib is not None and art.calib.held_out_texts:  # "The" is "the", whatever the tokenizer
        records = [r for r in records if text_key(r["text"]) not in art.calib.held_out_texts]
    if not records:
        return []
    proc = art.preprocessor or {}
    if "image" in modalities and proc.get("image_processor") is None:
        raise LmmcError("distill: the model has no image processor to encode the image corpus with")
    if "text" in modalities and proc.get("tokenizer") is None:
        raise LmmcError("distill: the model has no tokenizer to encode the text corpus with")
    texts = None
    if "text" in modalities:  # a few thousand texts' batches at once
        texts, lines = _TextCorpus(), [r["text"] for r in records]
        for start in range(0, len(lines), 256 * 16):
            texts.extend(encode_text(proc["tokenizer"], lines[start:start + 256 * 16], 256, max_length,
                                     text_pad_length(art.teacher.config, art.adapter)))
    if "image" not in modalities:
        return texts
    return _ImageCorpus(proc["image_processor"], [r["image"] for r in records], texts, keep)


@register
class DistillPass(Pass):
    """Distil the teacher into the (pruned) student on a small unlabeled corpus.

    Losses: per-layer hidden-state MSE (normalised by the teacher layer's mean square, through a fitted
    projection where widths differ) with an origin, uniform, closest (linear CKA) or explicit layer map;
    1 − cosine (or MSE) on pooled embeddings; for dual encoders, the teacher's image-text similarity
    matrix (KL per row of CLIP's logits, or MSE). Schedules: plain layerwise (every module every step),
    or OPTIMA (Liang et al., NeurIPS 2023, "Module-wise Adaptive Distillation for Multimodality
    Foundation Models"): modules are bandit arms (blocks of a tower, or a stage of both towers), the
    reward is the drop of the whole distillation loss on samples set aside over the step spent on a
    module, and sliding-window Thompson sampling picks the next module (lmmc.optima), with round-robin
    as its non-adaptive ablation. Generative image-text models (LLaVA, Idefics3) learn the teacher's
    next-token distributions on the answer tokens (token-level KL at a temperature), the hidden states of
    the vision and decoder blocks, and the projector's image features; their arms are runs of vision
    blocks, the projector, and runs of decoder blocks, and the dev score is teacher-forced KL (top-1
    agreement reported beside it). Pruning masks hold after every step. AdamW, warm-up and cosine decay,
    clipping, accumulation; checkpoints that resume exactly; under torchrun (gloo on CPU, NCCL on GPU)
    DistributedDataParallel, or torch's FSDP2 with ``parallel: fsdp`` (the student, its gradients and
    AdamW state sharded over the ranks, one unit per block). The trainer is lmmc.distiller.

    Recipe: ``- distill: {steps: 1200, lr: 1.0e-3, corpus: samples/calib/python_docs.txt,
    schedule: all, checkpoint_dir: .lmmc-checkpoints/run, checkpoint_every: 200}``
    (``schedule: optima`` for the bandit)."""

    name = "distill"
    Config = DistillConfig
    needs = frozenset({"teacher", "student"})

    def check(self, available: set[str]) -> None:
        super().check(available)
        if self.config.corpus is None and "calib" not in available:  # refused before any weight loads
            raise LmmcError("distill needs data: give 'corpus' in its config, or calibration data (--calib)")

    def run(self, art: Artifact) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = self.config
        if art.scratch is not None:
            # In a compile's work area the checkpoints survive a kill, and `lmmc compile --resume` continues
            # from the newest one; a checkpoint_dir named by the recipe is kept.
            # Unless the recipe says how often, a kill loses at most a tenth of the steps, or of the minutes
            # (a run on the clock, whose steps are a cap it may be far from reaching), and writing the
            # checkpoints takes at most a tenth of the time.
            often = cfg.checkpoint_every or cfg.checkpoint_minutes
            cfg = cfg.model_copy(update={"checkpoint_dir": cfg.checkpoint_dir or str(art.scratch),
                                         "checkpoint_every": cfg.checkpoint_every or max(1, cfg.steps // 10),
                                         "checkpoint_minutes": cfg.checkpoint_minutes or
                                         (cfg.minutes / 10 if cfg.minutes and not often else None),
                                         "checkpoint_share": cfg.checkpoint_share or (None if often else 0.1),
                                         "resume": cfg.resume or art.resume})
        check_towers(art)
        cfg.check_model(art.adapter)
        modalities = sorted({modality_key(t) for t in distilled_towers(cfg, art.adapter)})
        train, dev = build_corpus(cfg, art, modalities)
        trainer = Trainer(cfg, art, train, dev, started)
        try:
            metrics = trainer.fit()
        finally:
            trainer.restore_flags()
        if not self.config.checkpoint_dir:
            metrics.pop("checkpoint", None)  # in the work area, which the finished compile removes
        warnings = []
        if cfg.steps and len(dev) < cfg.dev_samples:  # no step trained, no checkpoint picked
            source, fix = (("the corpus gives", "give a larger corpus") if cfg.corpus else
                           ("the calibration samples (distill has no corpus) give",
                            "raise calibration.samples or give a corpus"))
            warnings.append(f"{source} {len(dev)} dev samples, not the {cfg.dev_samples} of "
                            f"dev_samples (they are capped at a quarter of the distinct samples), so the best "
                            f"checkpoint is picked on fewer; {fix}")
        if metrics.get("teacher_cache_skipped"):
            warnings.append(metrics["teacher_cache_skipped"])
        if metrics.get("diverged_at"):
            warnings.append(f"training diverged: the loss was NaN or infinite from step {metrics['diverged_at']} on "
                            f"(step {metrics['kept_step']} was kept); lower lr or max_grad_norm")
        if metrics.get("steps") and metrics.get("kept_step") == 0:
            warnings.append(f"no evaluation after training scored better on the dev samples than the student before "
                            f"it, so keep_best kept the student as it was and the {metrics['steps']} steps are lost; "
                            f"lower lr, or train longer")
        tokenizer = (art.preprocessor or {}).get("tokenizer")
        if modalities == ["text"] and art.adapter.kind != "generative" and tokenizer is not None:
            trained = trainer.train  # the bandit's reward samples are measured on, never trained on
            metrics["token_coverage"] = round(token_coverage(tokenizer, [s["text"]["input_ids"] for s in trained]), 4)
            if metrics["token_coverage"] < 0.5 and not cfg.vocabulary:
                # Measured on MiniLM: distilled on Python's documentation alone (14 % of its tokens), a
                # student kept 0.04-0.06 less on fiction and newswire than with vocabulary: 0.25.
                warnings += [
                    f"the training text holds {metrics['token_coverage']:.0%} of the tokenizer's ordinary tokens, so "
                    "the student learns the teacher on that text's domain alone and follows it less elsewhere; "
                    "vocabulary: 0.25 adds runs of tokens from the whole vocabulary (or distil on broader text)"]
        if warnings:
            metrics["warnings"] = warnings
        return metrics
