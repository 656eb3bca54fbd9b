"""The distillation trainer: a student learns the teacher's hidden states, pooled embeddings, (dual
encoders) similarity matrices or (generative models) next-token distributions, every module each step or
one module per step as a schedule picks (lmmc.optima), with batching, a teacher-target cache, evaluation on
a dev split and resumable checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lmmc import process_state
from lmmc.adapters import (Adapter, BridgeSpec, TowerSpec, block_linears, block_list, bridge_linears, prunable_linears,
                           tower_config)
from lmmc.artifact import Artifact
from lmmc.blockwise import StopForward, block_input, block_output, first_block_input
from lmmc.data import IGNORE_INDEX, Batch
from lmmc.distill_losses import (answer_kl, check_layer_map, closest_layer_map, contrastive_loss, fit_projection,
                                 hidden_loss, origin_layer_map, output_loss, relation_loss, uniform_layer_map)
from lmmc.errors import LmmcError
from lmmc.modelio import text_pad_length
from lmmc.generation import teacher_forced
from lmmc.int8_aware import Int8Aware
from lmmc.memory import available_bytes
from lmmc.optima import AllModules, ArmSpan, make_schedule
from lmmc.train import (Checkpoints, Distributed, all_reduce_sum, barrier, check_same_run, gather,
                        load_optimizer_tensors, lr_multiplier, optimizer_tensors, progress_multiplier, run_gathered,
                        setup_distributed, shard_copy, shard_like, unshard_into, whole)

if TYPE_CHECKING:
    from lmmc.passes.distill import DistillConfig

Sample = dict[str, dict[str, torch.Tensor]]  # modality -> input name -> one sample's unbatched tensor

# Samples (in fixed order) whose activations set loss scales, projections and the "closest" layer map.
_PROBE_SAMPLES = 32
# Fields that steer how a run is kept and shown, not what it computes: they stay out of the fingerprint.
# (ddp and fsdp compute the same steps: a checkpoint of either resumes the other, or a single process.)
_RUN_CONTROL = {"resume", "checkpoint_dir", "checkpoint_every", "checkpoint_minutes", "checkpoint_share", "keep_last",
                "progress", "parallel"}
# What a generative model's dev evaluation adds to each point of the curve.
_GENERATIVE_DEV = ("kl", "top1_agreement")


@dataclass(frozen=True)
class Segment:
    """Consecutive student blocks [first, last] of one tower."""

    tower: str
    first: int
    last: int
    last_of_tower: bool

    @property
    def name(self) -> str:
        return f"{self.tower}[{self.first}:{self.last + 1}]"


@dataclass(frozen=True)
class Arm:
    """One module of the bandit: a segment of blocks in one tower, or one in each of several towers (the
    same stage of a dual encoder's two towers, joined by the contrastive term when they end them)."""

    segments: tuple[Segment, ...]

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.segments)

    def segment(self, tower: str) -> Segment | None:
        return next((s for s in self.segments if s.tower == tower), None)

    @property
    def ends_a_tower(self) -> bool:
        return any(s.last_of_tower for s in self.segments)


@dataclass
class TowerPlan:
    spec: TowerSpec
    n_student: int
    n_teacher: int
    layer_map: list[int] = field(default_factory=list)  # 1-based teacher layer per student layer
    scales: list[float] = field(default_factory=list)  # teacher mean square per student layer's target
    skip: set[int] = field(default_factory=set)  # student blocks without a hidden-state term
    pooled_scale: float = 1.0
    relations: bool = False  # a self-attention relation term between the last blocks (encoders only)
    # The tower's output term: "pooled" (an encoder's embedding), "logits" (a generative decoder's
    # next-token distributions on answer tokens) or None (a generative model's vision tower, whose output
    # reaches the decoder only through the projector, which has a term of its own).
    output: str | None = "pooled"


@dataclass
class BridgePlan:
    """A generative model's projector: it learns the teacher's image features (its output), and its own
    arm's gradient stops at its input linear so the step changes the projector alone."""

    spec: BridgeSpec
    input_linear: str  # dotted path of the linear that reads the vision tower's features
    scale: float = 1.0  # teacher image features' mean square


@dataclass
class TowerRun:
    hidden: dict[int, torch.Tensor]  # block index (0-based) -> its output
    pooled: torch.Tensor | None  # None when the forward stopped early
    qkv: dict[str, torch.Tensor] = field(default_factory=dict)  # 'q', 'k', 'v' -> one block's projections


def run_tower(model: nn.Module, spec: TowerSpec, inputs: Batch, keep: set[int], stop_after: int | None = None,
              detach_before: int | None = None, qkv_block: int | None = None) -> TowerRun:
    """Run one tower, keeping the outputs of the blocks in `keep`.

    `stop_after` ends the forward after that block (nothing later is needed). `detach_before` cuts the
    gradient at that block's input: the blocks below are not being distilled this step. `qkv_block`: also
    keep that block's query, key and value projections."""
    _, blocks = block_list(model, spec)
    hidden: dict[int, torch.Tensor] = {}
    qkv: dict[str, torch.Tensor] = {}
    handles = []

    def qkv_hook(role: str):
        def hook(_mod, _args, output):
            qkv[role] = output
        return hook

    if qkv_block is not None:
        linears = block_linears(blocks[qkv_block], spec)
        handles += [linears[role][1].register_forward_hook(qkv_hook(role)) for role in ("q", "k", "v")]

    def out_hook(index: int):
        def hook(_mod, _args, output):
            if index in keep:
                hidden[index] = block_output(output)
            if index == stop_after:
                raise StopForward
        return hook

    def detach_hook(_mod, args, kwargs):
        if args:
            return (block_input(args, kwargs).detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": block_input(args, kwargs).detach()}

    for i, block in enumerate(blocks):
        if i in keep or i == stop_after:
            handles.append(block.register_forward_hook(out_hook(i)))
    if detach_before is not None:
        handles.append(blocks[detach_before].register_forward_pre_hook(detach_hook, with_kwargs=True))
    try:
        _, pooled = spec.embed(model, inputs)
    except StopForward:
        pooled = None
    finally:
        for h in handles:
            h.remove()
    return TowerRun(hidden, pooled, qkv)


def check_arms_have_losses(arms: list[Arm], hidden: float, schedule: str) -> None:
    """A schedule that trains one module at a time needs a loss on each: without hidden-state terms only a
    module that ends its tower has one (the output's)."""
    inner = [a.name for a in arms if not a.ends_a_tower]
    if hidden == 0 and schedule != "all" and inner:
        raise LmmcError(f"distill: with hidden: 0 only the last module of a tower has a loss, but modules "
                        f"{inner} do not end their tower; set blocks_per_arm: null (one module per tower)")


def make_arms(plans: dict[str, TowerPlan], blocks_per_arm: int | None, span: ArmSpan = "tower") -> list[Arm]:
    """The bandit's arms. span "tower": each tower's student blocks cut into runs of `blocks_per_arm`
    (the last run may be shorter), one arm per run. span "towers": every tower cut into the same number
    of runs, as many as the deepest tower needs, and arm k holds the k-th run of every tower (a shallower
    tower is cut at the same fractions of its depth). A segment whose blocks all go without a hidden-state
    term, and which does not end its tower, has no loss and is left out."""
    def segment(name: str, first: int, end: int) -> Segment:
        return Segment(name, first, end - 1, end == plans[name].n_student)

    if span == "tower":
        arms = [Arm((segment(name, f, min(f + (blocks_per_arm or p.n_student), p.n_student)),))
                for name, p in plans.items() for f in range(0, p.n_student, blocks_per_arm or p.n_student)]
    else:
        deepest = max(p.n_student for p in plans.values())
        runs = -(-deepest // (blocks_per_arm or deepest))
        arms = [Arm(tuple(segment(name, round(k * p.n_student / runs), round((k + 1) * p.n_student / runs))
                          for name, p in plans.items()))
                for k in range(runs)]
    out = []
    for arm in arms:
        kept = tuple(s for s in arm.segments if s.last >= s.first and
                     (s.last_of_tower or set(range(s.first, s.last + 1)) - plans[s.tower].skip))
        if kept:
            out.append(Arm(kept))
    return out


def micro_batch(batch_size: int, grad_accum: int, world: int) -> int:
    """Samples per micro-batch, which the ranks share evenly."""
    micro = batch_size // grad_accum
    if micro % world:
        raise LmmcError(f"distill: batch_size / grad_accum = {micro} samples per micro-batch cannot be split evenly "
                        f"over {world} ranks; make batch_size a multiple of grad_accum × ranks")
    return micro


def distilled_towers(cfg: DistillConfig, adapter: Adapter) -> list[TowerSpec]:
    """The towers the config distils (`towers`, default all), in the model's order."""
    return [t for t in adapter.towers if cfg.towers is None or t.name in cfg.towers]


def modality_key(spec: TowerSpec) -> str:
    return "text" if spec.modality == "text" else "image"


def sample_length(sample: Sample) -> int:
    """Tokens of a sample's text (0 for images, which all have one size)."""
    return len(sample["text"]["input_ids"]) if "text" in sample else 0


def stack_rows(rows: list[torch.Tensor], length: int | None, left: bool = False) -> torch.Tensor:
    """fp32 [B, length, d] of [tokens, d] rows, zero-padded to `length` tokens on the side the batch pads (None:
    rows of one length), each row converted as it is copied in."""
    if length is None:
        return torch.stack(rows).float()
    out = torch.zeros(len(rows), length, rows[0].shape[-1])
    for k, row in enumerate(rows):
        (out[k, length - row.shape[0]:] if left else out[k, :row.shape[0]]).copy_(row)
    return out


def collate(samples: list[Sample], modality: str, pad_id: int, multiple: int = 1, length: int | None = None,
            left: bool = False) -> Batch:
    """Stack samples of one modality; text is padded (on the left with `left`, else the right) to the longest
    sample, rounded up to a `multiple` of tokens, or to exactly `length` tokens (a generative model's labels
    with -100, its pixels stacked)."""
    if modality != "text":
        return {"pixel_values": torch.stack([s[modality]["pixel_values"] for s in samples])}
    if length is None:
        length = -(-max(len(s["text"]["input_ids"]) for s in samples) // multiple) * multiple
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {k: torch.full((len(samples), length), v, dtype=torch.long) for k, v in fill.items()
           if k in samples[0]["text"]}
    for i, s in enumerate(samples):
        n = len(s["text"]["input_ids"])
        for k in out:
            (out[k][i, length - n:] if left else out[k][i, :n]).copy_(s["text"][k])
    for k in samples[0]["text"].keys() - fill.keys():
        out[k] = torch.stack([s["text"][k] for s in samples])
    return out


def _rank(score: float) -> float:
    """A dev score as keep_best ranks it: a NaN one (training that diverged) below every other, where a
    comparison with NaN is always false and kept the NaN student."""
    return float("-inf") if math.isnan(score) else score


class DistillLoss(nn.Module):
    """The student plus the training-only projections; its forward is the distillation loss, so one
    DistributedDataParallel wrapper covers every trainable tensor."""

    def __init__(self, student: nn.Module, plans: dict[str, TowerPlan], cfg: DistillConfig,
                 ctx: Distributed, logit_scale: float, bridge: BridgePlan | None = None,
                 image_features=None, logit_bias: float | None = None) -> None:
        super().__init__()
        self.student = student
        self.proj = nn.ModuleDict()
        self.plans = plans
        self.bridge = bridge
        self.image_features = image_features
        self.cfg = cfg
        self.ctx = ctx
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias or 0.0
        # unset: the model's own objective, SigLIP's pairwise sigmoid where it has a bias, else the softmax
        self.contrastive_kind = cfg.contrastive_loss or ("sigmoid" if logit_bias is not None else "kl")

    def project(self, tower: str, key: str, x: torch.Tensor) -> torch.Tensor:
        name = f"{tower}_{key}"
        return self.proj[name](x) if name in self.proj else x

    def forward(self, inputs: dict[str, Batch], targets: dict[str, dict[str, Any]], focus: Arm | None,
                norm: float, teacher_pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.per_sample_loss(inputs, targets, focus, teacher_pooled).sum() * norm

    def per_sample_loss(self, inputs: dict[str, Batch], targets: dict[str, dict[str, Any]], focus: Arm | None,
                        teacher_pooled: dict[str, torch.Tensor], sharded: bool = True) -> torch.Tensor:
        """The loss of the focused module (or of everything, without focus) per local sample: its blocks'
        hidden-state terms, plus the output and contrastive terms when it ends its tower. `sharded`: the
        samples are this rank's share of a batch, whose other shares the contrastive term gathers."""
        cfg = self.cfg
        per_sample: torch.Tensor | float = 0.0
        pooled: dict[str, torch.Tensor] = {}
        for name, plan in self.plans.items():
            seg = None if focus is None else focus.segment(name)
            if focus is not None and seg is None:
                continue
            batch = inputs[modality_key(plan.spec)]
            # the relation term belongs to the tower's last block, like the output term
            relations = plan.relations and (seg is None or seg.last_of_tower)
            qkv_block = plan.n_student - 1 if relations else None
            if seg is None:
                run = run_tower(self.student, plan.spec, batch, set(range(plan.n_student)) - plan.skip,
                                stop_after=None if plan.output else plan.n_student - 1, qkv_block=qkv_block)
            else:
                train_below = seg.first == 0 and cfg.train_embeddings
                run = run_tower(self.student, plan.spec, batch, set(range(seg.first, seg.last + 1)) - plan.skip,
                                stop_after=None if seg.last_of_tower and plan.output else seg.last,
                                detach_before=None if train_below else seg.first, qkv_block=qkv_block)
            mask = batch.get("attention_mask")
            if relations:
                per_sample = per_sample + cfg.relations * relation_loss(run.qkv, targets[name]["qkv"],
                                                                        cfg.relation_heads, mask)
            for i, h in run.hidden.items():
                # Each layer weighs 1/L_s, so the modules' losses add up to the tower's mean layer loss.
                term = hidden_loss(self.project(name, str(i), h), targets[name]["hidden"][plan.layer_map[i]],
                                   mask, plan.scales[i])
                per_sample = per_sample + (cfg.hidden / plan.n_student) * term
            if run.pooled is not None and plan.output == "logits":
                if cfg.output:
                    per_sample = per_sample + cfg.output * answer_kl(run.pooled, targets[name]["pooled"],
                                                                     batch["labels"], cfg.temperature)
            elif run.pooled is not None:
                pooled[name] = run.pooled
                if cfg.output:
                    p = self.project(name, "pooled", run.pooled)
                    per_sample = per_sample + cfg.output * output_loss(p, targets[name]["pooled"], cfg.output_loss,
                                                                       plan.pooled_scale)
        if cfg.contrastive and len(self.plans) == 2 and pooled:
            per_sample = per_sample + cfg.contrastive * self.contrastive(inputs, pooled, teacher_pooled, sharded)
        if self.bridge is not None and cfg.hidden and (focus is None or focus.segment(self.bridge.spec.name)):
            per_sample = per_sample + cfg.hidden * self.bridge_loss(inputs["image"]["pixel_values"],
                                                                    targets[self.bridge.spec.name]["features"],
                                                                    alone=focus is not None)
        return per_sample

    def bridge_loss(self, pixel_values: torch.Tensor, teacher: torch.Tensor, alone: bool) -> torch.Tensor:
        """Per-sample MSE of the projector's image features to the teacher's (scaled like a hidden-state
        term). `alone`: the gradient stops at the projector's input, so only the projector learns."""
        handle = None
        if alone:
            linear = self.student.get_submodule(self.bridge.input_linear)
            handle = linear.register_forward_pre_hook(lambda _mod, args: (args[0].detach(), *args[1:]))
        try:
            student = self.image_features(self.student, pixel_values)
        finally:
            if handle is not None:
                handle.remove()
        n = len(pixel_values)
        # Several images per sample (an images axis) make one sample's row of features.
        return hidden_loss(student.reshape(n, -1, student.shape[-1]), teacher.reshape(n, -1, teacher.shape[-1]),
                           None, self.bridge.scale)

    def contrastive(self, inputs: dict[str, Batch], pooled: dict[str, torch.Tensor],
                    teacher_pooled: dict[str, torch.Tensor], sharded: bool = True) -> torch.Tensor:
        """Per-pair similarity-matrix loss; a tower not being distilled this step joins without gradient."""
        text = next(n for n, p in self.plans.items() if p.spec.modality == "text")
        image = next(n for n in self.plans if n != text)
        for name in (text, image):
            if name not in pooled:
                with torch.no_grad():
                    spec = self.plans[name].spec
                    pooled[name] = spec.embed(self.student, inputs[modality_key(spec)])[1]
        s_txt, s_img = self.project(text, "pooled", pooled[text]), self.project(image, "pooled", pooled[image])
        t_txt, t_img = teacher_pooled[text], teacher_pooled[image]
        def every(x: torch.Tensor) -> torch.Tensor:
            return gather(x, self.ctx) if sharded else x

        return contrastive_loss(s_img, s_txt, t_img, t_txt, every(s_img), every(s_txt), every(t_img), every(t_txt),
                                self.contrastive_kind, self.logit_scale, self.logit_bias)


def input_side_params(model: nn.Module, spec: TowerSpec, batch: Batch) -> set[str]:
    """Parameters the tower uses before its first block (its embeddings), found by differentiating the
    first block's input, which needs no per-architecture list of names."""
    with torch.enable_grad():
        inp = first_block_input(model, spec, lambda: spec.embed(model, batch))
    seen = None if inp is None else block_input(*inp)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if seen is None or not seen.requires_grad:
        return set()
    grads = torch.autograd.grad(seen.float().sum(), [p for _, p in named], allow_unused=True)
    return {n for (n, _), g in zip(named, grads) if g is not None}


def image_side_params(model: nn.Module, image_features, pixel_values: torch.Tensor) -> set[str]:
    """Parameters that compute a generative model's image features (vision tower and projector): they lie
    on the decoder's input side, yet are modules of their own, not the decoder's embeddings."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        out = image_features(model, pixel_values)
        grads = torch.autograd.grad(out.float().sum(), [p for _, p in named], allow_unused=True)
    return {n for (n, _), g in zip(named, grads) if g is not None}


def set_aside(samples: list[Sample], n: int) -> tuple[list[Sample], list[Sample]]:
    """The first `n` samples, and the rest without any that shows one of their images under another
    caption: a sample set aside must not be fitted through its image either."""
    def image(s: Sample) -> str | None:
        return hashlib.sha1(s["image"]["pixel_values"].float().numpy().tobytes()).hexdigest() if "image" in s else None

    aside = samples[:n]
    images = {image(s) for s in aside} - {None}
    return aside, [s for s in samples[n:] if image(s) not in images]


class Trainer:
    """One distillation run: set-up from the artifact, the training loop, evaluation and checkpoints."""

    def __init__(self, cfg: DistillConfig, art: Artifact, train: list[Sample], dev: list[Sample],
                 started: float | None = None) -> None:
        """`train` and `dev`: the samples to train on and to evaluate (and keep the best step) on; `started`:
        the perf_counter the pass began at, from which its `minutes` count (default: now)."""
        self.started = time.perf_counter() if started is None else started
        self.cfg = cfg
        self.art = art
        self.ctx = setup_distributed(art.device)
        self.device = torch.device("cuda", self.ctx.local_rank) if self.ctx.enabled and art.device.type == "cuda" \
            else art.device
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda"
                                                and torch.cuda.is_bf16_supported())
        # Ours: oneDNN builds a bf16 CPU kernel for every matrix shape it meets, and length-sorted batches
        # bring a new token count nearly every step; rounding the length up to 16 keeps the shapes few.
        self.pad_multiple = 16 if self.bf16 and self.device.type == "cpu" else 1
        self.teacher = art.teacher.to(self.device).eval()
        self.student = art.student.to(self.device).eval()
        self.towers = distilled_towers(cfg, art.adapter)
        self.generative = art.adapter.kind == "generative"
        self.bandit = cfg.schedule == "optima"
        # The bandit's reward is measured on samples of its own, so a step is never judged on what it fitted.
        self.reward_set, self.train = set_aside(train, cfg.reward_samples) if self.bandit else ([], train)
        self.dev = dev
        self.lengths = [sample_length(s) for s in self.train]
        if len(self.train) < cfg.batch_size:
            reward = f" (of {len(train)}, after the bandit's reward_samples = {cfg.reward_samples})" \
                if self.bandit else ""
            raise LmmcError(f"distill: {len(self.train)} training samples{reward} are fewer than batch_size "
                            f"({cfg.batch_size}); lower batch_size{' or reward_samples' if self.bandit else ''} "
                            f"or give more samples (a corpus, or calibration.samples)")
        self.micro = micro_batch(cfg.batch_size, cfg.grad_accum, self.ctx.world)
        # The tokenizer's pad id, which the encoded corpus was padded with; a model read at a fixed length
        # (SigLIP) sees its pads, so the re-padded batches must hold the very same ids.
        tokenizer = (art.preprocessor or {}).get("tokenizer")
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad = {t.name: pad_id if pad_id is not None else getattr(tower_config(self.student, t), "pad_token_id", None)
                    or 0 for t in self.towers}
        self.pad_to = text_pad_length(art.teacher.config, art.adapter)
        # Padded as the tokenizer pads, as validation and deployment read the texts: a model read at a fixed
        # length (SigLIP pools its last position) or whose positions count pads computes another embedding.
        self.left = getattr(tokenizer, "padding_side", "right") == "left" and not self.generative
        if set(cfg.skip_hidden) - {t.name for t in art.adapter.towers}:
            raise LmmcError(f"skip_hidden names towers {sorted(cfg.skip_hidden)}, but the model's towers are "
                            f"{[t.name for t in art.adapter.towers]}; name blocks of those towers")
        self.plans = {t.name: self._plan(t) for t in self.towers}
        if not self.generative:  # checked again here: a pass before may have removed blocks
            cfg.check_terms({name: plan.n_student for name, plan in self.plans.items()})
        self.arms = make_arms(self.plans, cfg.blocks_per_arm, cfg.arm_span)
        self.bridge = self._bridge()
        if self.bridge is not None:
            # The projector is an arm of its own, between the vision tower's arms and the decoder's: its
            # output (the image features) has a teacher target of its own, and joined to the last vision
            # arm its term would pull on the vision blocks through their output as well.
            after = max(k for k, a in enumerate(self.arms) if a.segment(self.bridge.spec.after))
            self.arms.insert(after + 1, Arm((Segment(self.bridge.spec.name, 0, 0, False),)))
        if cfg.schedule == "optima" and cfg.window < len(self.arms):
            raise LmmcError(f"distill: window ({cfg.window}) must be at least the number of modules "
                            f"({len(self.arms)}: {', '.join(a.name for a in self.arms)})")
        self._check_weights()
        self.masks = self._masks()
        self.fingerprint = self._fingerprint()
        check_same_run(self.ctx, f"{self.fingerprint} {cfg.parallel}")
        projections = self._probe()
        logit_scale, logit_bias = (getattr(self.teacher, name, None) for name in ("logit_scale", "logit_bias"))
        self.objective = DistillLoss(self.student, self.plans, cfg, self.ctx,
                                   float(logit_scale.detach().exp()) if logit_scale is not None else 1.0,
                                   self.bridge, art.adapter.image_features,
                                   float(logit_bias.detach().reshape(-1)[0]) if logit_bias is not None else None)
        for name, weight in projections.items():
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            lin.weight.data.copy_(weight)
            self.objective.proj[name] = lin.to(self.device)
        # Ours: key biases shift every score of a query by the same amount, which the softmax ignores, so
        # their gradient is rounding noise that Adam's normalisation would turn into drift; they stay put.
        self.frozen = {pl.param[:-len("weight")] + "bias" for pl in prunable_linears(self.student, art.adapter)
                       if pl.role == "k" and pl.module.bias is not None}
        self.frozen |= {n for n, _ in self.student.named_parameters() if n.startswith(art.adapter.fixed)}
        if not cfg.train_embeddings:
            for t in self.towers:
                side = input_side_params(self.student, t, self._collate(self.train[:2], t))
                if self.generative and t.modality == "text":
                    # The decoder's input side also holds the vision tower and projector, which are trained.
                    side -= image_side_params(self.student, art.adapter.image_features,
                                              self._collate(self.train[:2], t)["pixel_values"])
                self.frozen |= side
        self.flags = {n: p.requires_grad for n, p in self.student.named_parameters()}
        for n, p in self.student.named_parameters():
            p.requires_grad_(self.flags[n] and n not in self.frozen)
        self.engine: nn.Module = self.objective
        # fsdp: the objective, student and masks the run started from; their weights wait in the shards.
        self.plain: tuple[DistillLoss, nn.Module, dict[str, torch.Tensor]] | None = None
        if self.ctx.enabled and cfg.parallel == "fsdp":
            self._shard()
        elif self.ctx.enabled:
            # Modules distilled one at a time leave the others without gradients on most steps.
            self.engine = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        distilled = {t.name for t in self.towers}
        self.int8 = Int8Aware({pl.param: pl.module for pl in prunable_linears(self.student, art.adapter)
                               if pl.tower in distilled}) if cfg.int8_aware else None
        self.int8_from: int | None = None  # the step the INT8-aware part of the run began at
        # On the CPU the fused AdamW updates every tensor in one kernel instead of a dozen each; FSDP's
        # sharded tensors take the default.
        fused = True if self.device.type == "cpu" and self.plain is None else None
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        self.schedule = make_schedule(cfg.schedule, len(self.arms), cfg.window, cfg.prior_weight, cfg.seed)
        self.checkpoints = Checkpoints(Path(cfg.checkpoint_dir), self.fingerprint, cfg.keep_last) \
            if cfg.checkpoint_dir else None
        self.dev_teacher = self._dev_teacher()
        self.cache_skipped: str | None = None  # why targets that would fit were not cached
        self.cache = self._cache_teacher()
        self.reward_batch = self._reward_batch()
        self.reward_loss: float | None = None  # the whole loss on the reward samples at the current weights
        self.epochs: dict[int, list[list[int]]] = {}
        self.step = 0
        self.train_seconds = 0.0
        # With `minutes`: the seconds the training loop may run (what the budget leaves after the set-up) and
        # the seconds it has run, the same on every rank.
        self.horizon: float | None = None
        self.elapsed = 0.0
        self.loop_before = 0.0
        self.saved_at = 0.0  # `elapsed` at the newest step checkpoint (checkpoint_minutes)
        self.save_seconds = 0.0  # what writing it took, agreed between the ranks (checkpoint_share)
        self.picks = [0] * len(self.arms)
        self.rewards = [0.0] * len(self.arms)  # each arm's rewards summed, to report what the bandit learnt from
        self.losses: list[float] = []
        self.curve: list[dict[str, Any]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.dev_before: dict[str, Any] | None = None
        self.resumed_from: int | str | None = None
        self.final_metrics: dict[str, Any] = {}
        self.seconds_before_resume = 0.0  # what the pass had run in the process a resume continues

    # --- set-up -------------------------------------------------------------------------------------

    def _plan(self, spec: TowerSpec) -> TowerPlan:
        layer_map = self.cfg.layer_map
        n_s, n_t = len(block_list(self.student, spec)[1]), len(block_list(self.teacher, spec)[1])
        plan = TowerPlan(spec, n_s, n_t)
        if self.generative:
            plan.output = "logits" if spec.modality == "text" else None
        plan.relations = self.cfg.relations > 0 and plan.output == "pooled"
        if isinstance(layer_map, dict):
            if spec.name not in layer_map:
                raise LmmcError(f"layer_map names towers {sorted(layer_map)} but not '{spec.name}', which "
                                f"this distill trains; give one list of teacher layers per distilled tower")
            plan.layer_map = check_layer_map(layer_map[spec.name], n_s, n_t, spec.name)
        elif isinstance(layer_map, list):
            if len(self.towers) > 1:
                raise LmmcError(f"layer_map is one list, but the model has towers "
                                f"{[t.name for t in self.towers]}; give {{tower: [teacher layers]}} per tower")
            plan.layer_map = check_layer_map(layer_map, n_s, n_t, spec.name)
        plan.skip = set(self.cfg.skip_hidden.get(spec.name, ()))
        if any(i >= n_s for i in plan.skip):
            raise LmmcError(f"skip_hidden names blocks {sorted(plan.skip)} of the {spec.name} tower, which has "
                            f"blocks 0..{n_s - 1}; give 0-based indices of the student's blocks")
        return plan

    def _bridge(self) -> BridgePlan | None:
        """The projector of a generative model (the bridge whose output the decoder reads as image
        features), or None."""
        if not self.generative or not self.art.adapter.bridges:
            return None
        spec = self.art.adapter.bridges[0]
        return BridgePlan(spec, next(iter(bridge_linears(self.student, spec).values())))

    def _check_weights(self) -> None:
        """Every module the schedule can pick must have a loss term."""
        cfg = self.cfg
        dual = len(self.towers) == 2 and cfg.contrastive > 0
        if cfg.hidden == 0 and cfg.output == 0 and not dual and not any(p.relations for p in self.plans.values()):
            raise LmmcError("distill: all loss weights are 0 (contrastive counts only where both towers of a dual "
                            "encoder are distilled); give hidden or output a positive weight")
        check_arms_have_losses(self.arms, cfg.hidden, cfg.schedule)

    def _masks(self) -> dict[str, torch.Tensor]:
        params = dict(self.student.named_parameters())
        out = {}
        for name, mask in self.art.masks.items():
            if name not in params or params[name].shape != mask.shape:
                shape = tuple(params[name].shape) if name in params else "absent"
                raise LmmcError(f"distill: the pruning mask for '{name}' ({tuple(mask.shape)}) does not fit the "
                                f"student ({shape}); a pass changed the student after the mask was made "
                                f"without updating it")
            out[name] = mask.to(self.device, torch.bool)
        return out

    def _fingerprint(self) -> str:
        """Config, starting student and the samples it trains and picks checkpoints on, hashed: checkpoints of
        another run never resume this one (a corpus file rewritten in place keeps its path in the config)."""
        digest = hashlib.sha1()
        config = {k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in _RUN_CONTROL}
        digest.update(json.dumps(config, sort_keys=True).encode())
        for name, tensor in [*self.student.state_dict().items(), *sorted(self.masks.items())]:
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        for part, samples in (("train", self.train), ("reward", self.reward_set), ("dev", self.dev)):
            digest.update(f"{part}{len(samples)}".encode())
            for sample in samples:
                for m in sorted(sample):
                    for key in sorted(sample[m]):
                        digest.update(sample[m][key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def _collate(self, samples: list[Sample], spec: TowerSpec, multiple: int | None = None) -> Batch:
        batch = collate(samples, modality_key(spec), self.pad[spec.name], multiple or self.pad_multiple, self.pad_to,
                        self.left)
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def _probe(self) -> dict[str, torch.Tensor]:
        """Layer map, loss scales and projection starting points, from the first training samples."""
        probe = self.train[:_PROBE_SAMPLES]
        projections = {}
        for name, plan in self.plans.items():
            batch = self._collate(probe, plan.spec)
            mask = batch.get("attention_mask")
            t_run = run_tower(self.teacher, plan.spec, batch, set(range(plan.n_teacher)))
            s_run = run_tower(self.student, plan.spec, batch, set(range(plan.n_student)))

            def tokens(h: torch.Tensor) -> torch.Tensor:
                return (h[mask.bool()] if mask is not None else h.reshape(-1, h.shape[-1])).float().cpu()

            t_tok = [tokens(t_run.hidden[j]) for j in range(plan.n_teacher)]
            s_tok = [tokens(s_run.hidden[i]) for i in range(plan.n_student)]
            origin = getattr(tower_config(self.student, plan.spec), "lmmc_teacher_layers", None)
            if self.cfg.layer_map == "closest":
                plan.layer_map = closest_layer_map(s_tok, t_tok)
            elif self.cfg.layer_map == "origin" and origin and len(origin) == plan.n_student:
                plan.layer_map = origin_layer_map(list(origin), plan.n_teacher)
            elif isinstance(self.cfg.layer_map, str):
                plan.layer_map = uniform_layer_map(plan.n_student, plan.n_teacher)
            plan.scales = [float(t_tok[j - 1].pow(2).mean()) for j in plan.layer_map]
            plan.pooled_scale = float(t_run.pooled.float().pow(2).mean())
            for i, j in enumerate(plan.layer_map):
                if s_tok[i].shape[1] != t_tok[j - 1].shape[1]:
                    projections[f"{name}_{i}"] = fit_projection(s_tok[i], t_tok[j - 1])
            if plan.output == "pooled" and s_run.pooled.shape[-1] != t_run.pooled.shape[-1]:
                projections[f"{name}_pooled"] = fit_projection(s_run.pooled.float().cpu(), t_run.pooled.float().cpu())
        if self.bridge is not None:
            pixels = self._collate(probe, self.art.adapter.tower(self.bridge.spec.after))["pixel_values"]
            features = self.art.adapter.image_features(self.teacher, pixels)
            self.bridge.scale = float(features.float().pow(2).mean())
        return projections

    @torch.no_grad()
    def _dev_teacher(self) -> dict[str, torch.Tensor]:
        if not self.dev or self.generative:
            return {}
        return {name: self._embed(self.teacher, plan.spec) for name, plan in self.plans.items()}

    def _autocast(self):
        if not self.bf16:
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.device.type == "cpu":
            # Ours: on the CPU the fused bf16 attention's backward runs several times slower than the plain
            # matrix products it replaces, which AMX runs at bf16 speed; its forward alone is faster (the
            # teacher's forward over the shipped corpus: 68 s against 80 s, BENCHMARKS.md run 25), so the
            # kernel follows whether gradients are recorded when the context is entered.
            backends = SDPBackend.MATH if torch.is_grad_enabled() else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
            stack.enter_context(sdpa_kernel(backends))
        return stack

    def _embed(self, model: nn.Module, spec: TowerSpec) -> torch.Tensor:
        out = []
        for k in range(0, len(self.dev), 64):
            with self._autocast():
                out.append(spec.embed(model, self._collate(self.dev[k:k + 64], spec))[1].float())
        return torch.cat(out)

    # --- one step -----------------------------------------------------------------------------------

    def batch_indices(self, step: int) -> list[int]:
        """The global batch of a step: a function of the step alone, so a resumed run sees exactly the
        batches the uninterrupted one would. Each epoch is a seeded shuffle cut into whole batches (the
        remainder waits for a later epoch's shuffle)."""
        per_epoch = len(self.train) // self.cfg.batch_size
        epoch, index = divmod(step, per_epoch)
        if epoch not in self.epochs:
            self.epochs = {epoch: self._epoch_batches(epoch, per_epoch)}
        return self.epochs[epoch][index]

    def _epoch_batches(self, epoch: int, count: int) -> list[list[int]]:
        """Ours: inside each run of 32 batches' worth of shuffled samples, samples are sorted by length
        before they are cut into batches, and the batches are shuffled again. A batch then pads little
        (on the shipped corpus random batches of 16 pad to twice the mean sentence length), while every
        sample still lands in a random batch position from epoch to epoch."""
        size = self.cfg.batch_size
        gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + epoch) % 2**63)  # a seed torch takes
        order = torch.randperm(len(self.train), generator=gen).tolist()[:count * size]
        batches = []
        for k in range(0, len(order), 32 * size):
            group = sorted(order[k:k + 32 * size], key=self.lengths.__getitem__)
            batches += [group[j:j + size] for j in range(0, len(group), size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def _needs(self, name: str, focus: Arm | None) -> tuple[set[int], bool]:
        """The teacher layers (1-based) a step's losses read in one tower, and whether they read its
        output (pooled embedding or logits, which take the whole tower)."""
        plan = self.plans[name]
        if focus is None:
            return set(plan.layer_map), plan.output is not None
        seg = focus.segment(name)
        if seg is not None:
            return {plan.layer_map[i] for i in range(seg.first, seg.last + 1)}, \
                seg.last_of_tower and plan.output is not None
        return set(), focus.ends_a_tower and bool(self.cfg.contrastive) and len(self.plans) == 2

    @torch.no_grad()
    def teacher_targets(self, inputs: dict[str, Batch], focus: Arm | None, local: list[int]) -> tuple[dict, dict]:
        """Per tower the teacher hidden states the step reads ({layer: [B, T, d]}) and its output (pooled
        embeddings, or a decoder's logits [B, T, V]); for a projector, the image features. From the cache
        when there is one."""
        if self.cache is None:
            return self._run_teacher(inputs, focus)
        targets, pooled = {}, {}
        for name, plan in self.plans.items():
            layers, full = self._needs(name, focus)
            if not layers and not full:
                continue
            batch = inputs[modality_key(plan.spec)]
            length = batch["input_ids"].shape[1] if "input_ids" in batch else None
            rows = [self.cache[name][i] for i in local]
            # The cache keeps each sample's real tokens: they go where the batch put them.
            hidden = {j: stack_rows([r["hidden"][j] for r in rows], length, self.left) for j in layers}
            out = None
            if plan.output == "logits":
                out = stack_rows([r["pooled"] for r in rows], length, self.left)
            elif plan.output == "pooled":
                out = torch.stack([r["pooled"] for r in rows]).float()
            targets[name] = {"hidden": hidden, "pooled": out}
            if full and plan.relations:
                targets[name]["qkv"] = {r: stack_rows([row["qkv"][r] for row in rows], length, self.left)
                                        for r in ("q", "k", "v")}
            if full:
                pooled[name] = out
        if self._needs_bridge(focus):
            name = self.bridge.spec.name
            targets[name] = {"features": torch.stack([self.cache[name][i] for i in local]).float()}
        return targets, pooled

    def _needs_bridge(self, focus: Arm | None) -> bool:
        return self.bridge is not None and bool(self.cfg.hidden) and \
            (focus is None or focus.segment(self.bridge.spec.name) is not None)

    @torch.no_grad()
    def _run_teacher(self, inputs: dict[str, Batch], focus: Arm | None) -> tuple[dict, dict]:
        """teacher_targets computed by running the teacher."""
        targets, pooled = {}, {}
        for name, plan in self.plans.items():
            layers, full = self._needs(name, focus)
            if not layers and not full:
                continue
            keep = {j - 1 for j in layers}
            relations = full and plan.relations
            run = run_tower(self.teacher, plan.spec, inputs[modality_key(plan.spec)], keep,
                            stop_after=None if full else max(keep), qkv_block=plan.n_teacher - 1 if relations else None)
            targets[name] = {"hidden": {j: run.hidden[j - 1] for j in layers}, "pooled": run.pooled}
            if relations:
                targets[name]["qkv"] = run.qkv
            if full:
                pooled[name] = run.pooled
        if self._needs_bridge(focus):
            targets[self.bridge.spec.name] = {
                "features": self.art.adapter.image_features(self.teacher, inputs["image"]["pixel_values"])}
        return targets, pooled

    def _padding_invariant(self, plan: TowerPlan, order: list[int]) -> bool:
        """Whether the teacher's hidden states of a text's tokens stay the same under more left padding: the
        shortest training text alone against it padded to the longest's length, in fp32 (bf16 products of two
        shapes differ by rounding alone). Called under _cache_teacher's no_grad."""
        short, long = self.train[order[0]], self.train[order[-1]]
        if sample_length(short) == sample_length(long):
            return True  # no batch pads any text
        layers = {j - 1 for j in plan.layer_map} | {plan.n_teacher - 1}
        alone, padded = (run_tower(self.teacher, plan.spec, self._collate(samples, plan.spec, multiple=1), layers,
                                   stop_after=max(layers)) for samples in ([short], [short, long]))
        n = sample_length(short)
        return all(torch.allclose(alone.hidden[j][0, -n:], padded.hidden[j][0, -n:], rtol=1e-3, atol=1e-4)
                   for j in layers)

    @torch.no_grad()
    def _cache_teacher(self) -> dict[str, dict[int, dict[str, Any]]] | None:
        """Ours: the teacher is fixed, so its targets for every training sample are computed once, in
        length-sorted batches of fixed make-up (so a resumed run reads the very same numbers), and each
        step then runs the student alone. Skipped when the targets would not fit the memory budget, or the
        memory this machine has available."""
        budget = self.cfg.teacher_cache_mb * 2 ** 20
        # Filling the cache costs one teacher pass over the corpus, which a run shorter than an epoch
        # would not spend.
        if not budget or self.cfg.steps * self.cfg.batch_size < len(self.train):
            return None
        order = sorted(range(len(self.train)), key=self.lengths.__getitem__)
        moved = next((name for name, plan in self.plans.items() if self.left and modality_key(plan.spec) == "text"
                      and not self._padding_invariant(plan, order)), None)
        if moved is not None:
            self.cache_skipped = (f"the teacher's targets were not cached: its {moved} tower reads a left-padded text "
                                  f"at other positions under more padding (its position numbers count the pads), so "
                                  f"a target cached in one batch would not be the target of the same text in another; "
                                  f"every step runs the teacher")
            return None
        # Under bf16 the targets come from bf16 products, so bf16 storage halves the memory for little
        # loss; a step reads them back as fp32.
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        size = dtype.itemsize
        cache: dict[str, dict[int, Any]] = {name: {} for name in self.plans}
        if self.bridge is not None:
            cache[self.bridge.spec.name] = {}
        # Targets grow with a sample's tokens and the order is shortest first, so the memory they will
        # take is extrapolated per token (per sample for images), not per sample.
        weight = [max(self.lengths[i], 1) for i in order]
        total, done, used = sum(weight) * len(self.plans), 0, 0
        # Past what the machine has, the kernel's out-of-memory killer would end the compile. A quarter is left
        # for training's own buffers (the optimiser's moments come at its first step) and the rest of the
        # machine, and ranks started on one machine share it.
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.ctx.enabled else 1
        available = available_bytes()
        room = None if available is None else available * 3 // 4 // ranks
        bar = tqdm(total=len(order) * len(self.plans), desc="teacher targets", unit="sample",
                   disable=not (self.cfg.progress and self.ctx.main))
        for name, plan in self.plans.items():
            layers = sorted(set(plan.layer_map))
            for k in range(0, len(order), 64):
                chunk = order[k:k + 64]
                # Length-sorted chunks pad little by themselves; the multiple of 16 that keeps training's
                # shapes few would add up to 15 tokens a sample here.
                batch = self._collate([self.train[i] for i in chunk], plan.spec, multiple=1)
                with self._autocast():
                    run = run_tower(self.teacher, plan.spec, batch, {j - 1 for j in layers},
                                    stop_after=None if plan.output else plan.n_teacher - 1,
                                    qkv_block=plan.n_teacher - 1 if plan.relations else None)
                mask = batch.get("attention_mask")
                for row, i in enumerate(chunk):
                    real = mask[row].bool() if mask is not None else slice(None)
                    entry = {"hidden": {j: run.hidden[j - 1][row][real].to(dtype) for j in layers}}
                    if run.qkv:
                        entry["qkv"] = {r: t[row][real].to(dtype) for r, t in run.qkv.items()}
                        used += size * sum(t.numel() for t in entry["qkv"].values())
                    if plan.output is not None:
                        # A decoder's logits have a token axis: only the real tokens are kept.
                        entry["pooled"] = run.pooled[row][real if plan.output == "logits" else slice(None)].to(dtype)
                    used += size * (sum(t.numel() for t in entry["hidden"].values())
                                    + (entry["pooled"].numel() if "pooled" in entry else 0))
                    cache[name][i] = entry
                done += sum(weight[k:k + 64])
                bar.update(len(chunk))
                if used / done * total > budget:
                    bar.close()
                    return None
                if room is not None and used / done * total > room:
                    bar.close()
                    self.cache_skipped = (f"the teacher's targets were not cached: they would take about "
                                          f"{used / done * total / 2 ** 30:.1f} GiB, more than three quarters of the "
                                          f"{available / 2 ** 30:.1f} GiB this machine had available"
                                          f"{f' shared by {ranks} ranks' if ranks > 1 else ''}; every step runs the "
                                          f"teacher instead, which is slower: free memory to cache them")
                    return None
        bar.close()
        if self._needs_bridge(None):
            spec = self.art.adapter.tower(self.bridge.spec.after)
            for k in range(0, len(order), 64):
                chunk = order[k:k + 64]
                pixels = self._collate([self.train[i] for i in chunk], spec)["pixel_values"]
                with self._autocast():
                    features = self.art.adapter.image_features(self.teacher, pixels).to(dtype)
                features = features.reshape(len(chunk), -1, features.shape[-1])
                for row, i in enumerate(chunk):
                    cache[self.bridge.spec.name][i] = features[row]
                used += size * features.numel()
                if used > budget:
                    return None
        return cache

    @torch.no_grad()
    def _reward_batch(self) -> tuple[dict[str, Batch], dict[str, dict[str, Any]], dict[str, torch.Tensor]] | None:
        """The reward samples as one batch, with every teacher target the whole loss reads."""
        if not self.reward_set:
            return None
        inputs = {modality_key(t): self._collate(self.reward_set, t) for t in self.towers}
        with self._autocast():
            targets, pooled = self._run_teacher(inputs, None)
        return inputs, targets, pooled

    @torch.no_grad()
    def _whole_loss(self) -> float:
        """OPTIMA's measure: the whole distillation loss (every module's terms, the output and contrastive
        terms) on the reward samples, which every rank holds in full."""
        inputs, targets, pooled = self.reward_batch
        with self._autocast():
            return float(self.objective.per_sample_loss(inputs, targets, None, pooled, sharded=False).float().mean())

    def _progress(self) -> float:
        """The share of the run done when this step ends: of its steps, or of its horizon, whichever is further."""
        done = (self.step + 1) / max(1, self.cfg.steps)
        return done if self.horizon is None else max(done, self.elapsed / self.horizon)

    def train_step(self) -> float:
        cfg, ctx = self.cfg, self.ctx
        if self.int8 is not None and not self.int8.attached and self._progress() > 1 - cfg.int8_aware:
            # From here on the dev scores are of the fake-quantised student, so the best step is picked
            # among these alone: an earlier one scored without the quantisation noise it will meet.
            self.int8.attach()
            self.int8_from, self.best = self.step, None
        picked = self.schedule.pick()
        focus = None if isinstance(self.schedule, AllModules) else self.arms[picked[0]]
        indices = self.batch_indices(self.step)
        norm = ctx.world / cfg.batch_size
        if self.bandit and self.reward_loss is None:
            self.reward_loss = run_gathered(self.objective, self._whole_loss)
        loss_sum = torch.zeros((), device=self.device)
        for k in range(cfg.grad_accum):
            chunk = indices[k * self.micro:(k + 1) * self.micro]
            share = self.micro // ctx.world
            local = chunk[ctx.rank * share:(ctx.rank + 1) * share]
            inputs = {modality_key(t): self._collate([self.train[i] for i in local], t) for t in self.towers}
            with torch.no_grad(), self._autocast():  # no_grad first: an uncached teacher gets the fused kernel
                targets, t_pooled = self.teacher_targets(inputs, focus, local)
            # DDP sums a step's micro-batches locally and all-reduces once; FSDP reduce-scatters each
            # micro-batch, so its gradients accumulate sharded and are never whole.
            ddp = isinstance(self.engine, DistributedDataParallel)
            sync = self.engine.no_sync() if ddp and k + 1 < cfg.grad_accum else nullcontext()
            with sync:
                with self._autocast():
                    loss = self.engine(inputs, targets, focus, norm, t_pooled)
                loss.backward()
            loss_sum += loss.detach().float()
        with torch.no_grad():
            for name, mask in self.masks.items():
                param = self._param(name)
                if param.grad is not None:
                    param.grad.masked_fill_(~mask, 0.0)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], cfg.max_grad_norm)
            if self.horizon is None:
                multiplier = lr_multiplier(self.step, cfg.steps, int(cfg.warmup * cfg.steps), cfg.final_lr_ratio)
            else:
                multiplier = progress_multiplier(self._progress(), cfg.warmup, cfg.final_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * multiplier
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.apply_masks()
        reward = 0.0
        if self.bandit:
            # The weights only change in steps, so this step's "after" is the next step's "before".
            before, self.reward_loss = self.reward_loss, run_gathered(self.objective, self._whole_loss)
            drop = before - self.reward_loss
            reward = drop / max(before, 1e-12) if cfg.reward == "relative" else drop
        for arm in picked:
            self.picks[arm] += 1
        self.rewards[picked[0]] += reward
        self.schedule.update(picked[0], reward)
        return float(all_reduce_sum(loss_sum, ctx)) / ctx.world

    def _param(self, name: str) -> nn.Parameter:
        return self.student.get_parameter(name)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self._param(name).masked_fill_(~mask, 0.0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out fidelity on the dev samples: mean cosine of pooled embeddings per tower and, for dual
        encoders, the similarity-matrix loss over every dev pair; for generative models teacher-forced
        next-token KL and top-1 agreement on the answer tokens (lmmc.generation)."""
        if not self.dev:
            return {}
        if self.generative:
            return self._evaluate_generative()
        student = {}
        cosine = {}
        for name, plan in self.plans.items():
            student[name] = self.objective.project(name, "pooled", self._embed(self.student, plan.spec))
            cosine[name] = float(torch.nn.functional.cosine_similarity(student[name], self.dev_teacher[name]).mean())
        out: dict[str, Any] = {"step": self.step, "train_seconds": round(self.train_seconds, 2),
                               "seconds": round(time.perf_counter() - self.started, 2), "cosine": cosine,
                               "score": sum(cosine.values()) / len(cosine)}
        if len(self.plans) == 2:
            text = next(n for n, p in self.plans.items() if p.spec.modality == "text")
            image = next(n for n in self.plans if n != text)
            s_t, s_i, t_t, t_i = student[text], student[image], self.dev_teacher[text], self.dev_teacher[image]
            out["similarity_loss"] = float(contrastive_loss(s_i, s_t, t_i, t_t, s_i, s_t, t_i, t_t,
                                                            self.objective.contrastive_kind,
                                                            self.objective.logit_scale,
                                                            self.objective.logit_bias).mean())
        return out

    def _evaluate_generative(self) -> dict[str, Any]:
        """The score is minus the mean KL: it moves with every step, where top-1 agreement on a few dev
        answers moves in coarse jumps and would keep an early checkpoint over a better later one."""
        spec = next(t for t in self.towers if t.modality == "text")
        batches = [self._collate(self.dev[k:k + 64], spec) for k in range(0, len(self.dev), 64)]
        result = teacher_forced(self.teacher, self.student, batches)
        return {"step": self.step, "train_seconds": round(self.train_seconds, 2),
                "seconds": round(time.perf_counter() - self.started, 2), "kl": result["kl_mean"],
                "top1_agreement": result["top1_agreement"], "answer_tokens": result["answer_tokens"],
                "score": -result["kl_mean"]}

    # --- checkpoints --------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "step": self.step, "schedule": self.schedule.state_dict(),
                "train_seconds": self.train_seconds, "picks": self.picks, "rewards": self.rewards, "losses": self.losses,
                "curve": self.curve, "dev_before": self.dev_before, "reward_loss": self.reward_loss,
                "loop_seconds": self.elapsed, "horizon": self.horizon,
                "pass_seconds": time.perf_counter() - self.started,
                "best": None if self.best is None else {"score": self.best[0], "step": self.best[1]},
                "int8": None if self.int8 is None else {**self.int8.state_dict(), "from": self.int8_from},
                "config": self.cfg.model_dump(mode="json")}

    def save_step(self) -> None:
        # Sharded weights and optimiser state are gathered by every rank, one tensor at a time, and kept by
        # rank 0 alone, which writes them whole: the checkpoint of a sharded run is a plain one.
        main = self.ctx.main
        self.saved_at = self.elapsed
        started = time.perf_counter()
        files = {"weights": whole(self.objective.state_dict(), main),
                 "optimizer": optimizer_tensors(self.optimizer, main)}
        if self.best is not None and self.best[1] != self.step:
            files["best"] = whole(self.best[2], main)
        if main:
            self.checkpoints.save(f"step-{self.step:06d}", files, self._state())
        barrier(self.ctx)
        self.save_seconds = self._agreed(time.perf_counter() - started)

    def resume(self) -> str | int | None:
        """Load the finished run or the newest step checkpoint of this run, if there is one."""
        final = self.checkpoints.find("final")
        path = final or self.checkpoints.latest()
        if path is None:
            return None
        try:
            return self._load(path, final is not None)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:  # a truncated or edited file
            raise LmmcError(f"checkpoint '{path}' is damaged ({type(err).__name__}: {err}); delete that folder to "
                            f"resume from the one before it, or run without --resume to start afresh") from None

    def _load(self, path: Path, final: bool) -> str | int:
        files, state = Checkpoints.load(path)
        self.seconds_before_resume = state.get("pass_seconds", 0.0)
        try:
            self.objective.load_state_dict(self._local(files["weights"]))
        except RuntimeError as err:
            raise LmmcError(f"checkpoint '{path}' does not fit this student ({err}); delete it to start afresh") \
                from None
        if final:
            self.final_metrics = state["metrics"]
            return "final"
        load_optimizer_tensors(self.optimizer, files["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        self.started -= self.seconds_before_resume  # the dev curve's seconds go on from where they stopped
        self.picks, self.rewards, self.losses, self.curve = state["picks"], state["rewards"], state["losses"], state["curve"]
        self.dev_before = state["dev_before"]
        self.reward_loss = state["reward_loss"]
        # A resumed run keeps its first horizon, so its learning rate goes on along the same schedule.
        self.loop_before, self.horizon = state["loop_seconds"], state["horizon"]
        self.saved_at = self.loop_before
        if self.int8 is not None:
            self.int8.load_state_dict(state["int8"])
            self.int8_from = state["int8"]["from"]
        if state["best"] is not None:
            weights = self._local(files["best"]) if "best" in files else self._student_state()
            self.best = (state["best"]["score"], state["best"]["step"],
                         {k: v.to(self.device) for k, v in weights.items()})
        return self.step

    def _student_state(self) -> dict[str, torch.Tensor]:
        """The objective's weights (under fsdp this rank's shards: a kept best costs 1/world of the model)."""
        return {k: v.detach().clone() for k, v in self.objective.state_dict().items()}

    def _local(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole weights (a checkpoint's) cut to this rank's shards where the objective is sharded; a
        tensor that does not fit is left for load_state_dict to report."""
        current = self.objective.state_dict()
        return {k: shard_like(v, current[k]) if k in current and v.shape == current[k].shape else v
                for k, v in tensors.items()}

    # --- sharding (parallel: fsdp) ---------------------------------------------------------------------

    def _shard(self) -> None:
        """Train a copy of the objective sharded with torch's FSDP2, one unit per block of every tower, the
        rest (embeddings, heads, projector, projections) in the root unit.

        The teacher stays whole and frozen on every rank: it runs forward only (no gradients, no optimiser
        state), its targets are often cached before the first step, and sharding it would add one gather
        per teacher block per step to save (world − 1)/world of its weights."""
        names = {id(m): n for n, m in self.objective.named_modules()}
        units = [names[id(b)] for t in self.towers for b in block_list(self.student, t)[1]]
        self.plain = (self.objective, self.student, self.masks)
        self.objective = shard_copy(self.objective, units, self.device, self.ctx.group)
        self.engine, self.student = self.objective, self.objective.student
        # A sparse student's masks are cut like its weights: each rank zeroes its own shard of each matrix.
        self.masks = {n: shard_like(m, self._param(n)) for n, m in self.masks.items()}

    def _unshard(self) -> None:
        """fsdp: the trained weights, whole, back into the objective and student the run started from, on
        every rank (as a ddp run ends: every rank goes on with the whole student)."""
        if self.plain is None:
            return
        objective, student, masks = self.plain
        # The sharded run is over: its optimiser state goes before the whole weights come back, so the
        # end of a run does not raise its peak memory.
        self.optimizer.state.clear()
        unshard_into(objective, self.objective)
        self.objective = self.engine = objective
        self.student, self.masks, self.plain = student, masks, None

    # --- the run ------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        # rank 0 alone writes checkpoints, and holds their folder while it trains
        try:
            with self.checkpoints.held() if self.checkpoints and self.ctx.main else nullcontext():
                return self._fit()
        finally:
            if self.int8 is not None:
                self.int8.detach()  # the student leaves as plain linears, for validation and export

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.resumed_from = self.resume() if cfg.resume and self.checkpoints else None
        if self.resumed_from == "final":
            self._unshard()
            return {**self.final_metrics, "resumed_from": "final",
                    "seconds_before_resume": round(self.seconds_before_resume, 2)}
        if self.resumed_from is None:
            self.dev_before = run_gathered(self.objective, self.evaluate)
            if self.dev_before:
                self.best = (self.dev_before["score"], 0, self._student_state())
        if cfg.minutes is not None and self.horizon is None:
            self.horizon = self._agreed(cfg.minutes * 60 - (time.perf_counter() - self.started))
            if self.horizon <= 0:
                raise LmmcError(f"pass 'distill': its {cfg.minutes:g} minutes were spent before the first step "
                                f"(filling the teacher's cache and the first dev evaluation); raise minutes, or "
                                f"lower teacher_cache_mb or dev_samples")
        self.loop_start = time.perf_counter()
        self.elapsed = self._clock()
        bar = tqdm(total=cfg.steps if self.horizon is None else None, initial=self.step,
                   desc=f"distill ({cfg.schedule})", unit="step", disable=not (cfg.progress and self.ctx.main))
        while not self._done():
            started = time.perf_counter()
            loss = self.train_step()
            self.step += 1
            self.train_seconds += time.perf_counter() - started
            self.elapsed = self._clock()
            self.losses.append(loss)
            postfix = {"loss": f"{loss:.4f}", "samples/s": f"{self.step * cfg.batch_size / self.train_seconds:.1f}"}
            if self.horizon is not None:
                postfix["left"] = f"{max(0.0, self.horizon - self.elapsed):.0f}s"
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not self._done():
                self._record(run_gathered(self.objective, self.evaluate))
                if self.generative:
                    postfix["dev kl"] = f"{-self.curve[-1]['score']:.4f}" if self.curve else "-"
                else:
                    postfix["dev cos"] = f"{self.curve[-1]['score']:.4f}" if self.curve else "-"
            bar.set_postfix(postfix, refresh=False)
            bar.update()
            if self.checkpoints and self._checkpoint_due() and not self._done():
                self.save_step()
            process_state.raise_lost_interrupt()
        bar.close()
        final_eval = run_gathered(self.objective, self.evaluate)
        self._record(final_eval)
        kept = self.step
        if cfg.keep_best and self.best is not None and \
                _rank(self.best[0]) > _rank(final_eval.get("score", float("-inf"))):
            self.objective.load_state_dict(self.best[2])
            kept = self.best[1]
        self._unshard()
        self.apply_masks()
        metrics = self._metrics(kept)
        if self.checkpoints:
            if self.ctx.main:
                path = self.checkpoints.save("final", {"weights": self.objective.state_dict()},
                                             {**self._state(), "metrics": metrics})
                metrics["checkpoint"] = str(path)
            barrier(self.ctx)
        return metrics

    def _agreed(self, seconds: float) -> float:
        """The ranks' mean of a time each read on its own clock, so that all of them stop at the same step."""
        if not self.ctx.enabled:
            return seconds
        return float(all_reduce_sum(torch.tensor([seconds], device=self.device), self.ctx)) / self.ctx.world

    def _clock(self) -> float:
        """Seconds spent in the training loop, over resumes, agreed between the ranks."""
        return self._agreed(self.loop_before + time.perf_counter() - self.loop_start)

    def _checkpoint_due(self) -> bool:
        cfg = self.cfg
        # on the agreed clock, so that every rank saves at the same step
        since = self.elapsed - self.saved_at
        due = (bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0) or \
            (bool(cfg.checkpoint_minutes) and since >= cfg.checkpoint_minutes * 60)
        if due and cfg.checkpoint_share:
            # A large student on a slow disk, with steps that are few and slow, would otherwise spend more time
            # writing checkpoints than training: `since` counts the previous save itself.
            return since >= self.save_seconds / cfg.checkpoint_share
        return due

    def _done(self) -> bool:
        return self.step >= self.cfg.steps or (self.horizon is not None and self.elapsed >= self.horizon)

    def _record(self, result: dict[str, Any]) -> None:
        if not result:
            return
        # The mean training loss since the previous evaluation, so the curve shows loss beside dev fidelity.
        since = self.curve[-1]["step"] if self.curve else 0
        window = self.losses[since:self.step]
        result["loss"] = sum(window) / len(window) if window else None
        self.curve.append(result)
        if self.best is None or _rank(result["score"]) > _rank(self.best[0]):
            self.best = (result["score"], self.step, self._student_state())

    def _metrics(self, kept: int) -> dict[str, Any]:
        tail = self.losses[-10:]
        dev_after = self.dev_before if kept == 0 else \
            next((c for c in reversed(self.curve) if c["step"] == kept), None)
        nonzero = sum(int(self._param(n)[~m].count_nonzero()) for n, m in self.masks.items())
        return {
            "steps": self.step, "schedule": self.cfg.schedule, "world_size": self.ctx.world,
            "stopped_by": "minutes" if self.step < self.cfg.steps else "steps",
            "precision": "bf16" if self.bf16 else "fp32",
            "train_samples": len(self.train), "dev_samples": len(self.dev),
            "towers": [t.name for t in self.towers],
            "arms": [a.name for a in self.arms],
            "arm_picks": {a.name: n for a, n in zip(self.arms, self.picks)},
            # the bandit's reward per pick: the whole loss's drop on the reward samples (relative by default)
            **({"arm_reward_mean": {a.name: r / n if n else None for a, r, n in zip(self.arms, self.rewards, self.picks)}}
               if self.bandit else {}),
            "layer_map": {name: plan.layer_map for name, plan in self.plans.items()},
            "skip_hidden": {name: sorted(plan.skip) for name, plan in self.plans.items() if plan.skip},
            "projections": sorted(self.objective.proj.keys()),
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": sum(tail) / len(tail) if tail else None,
            "diverged_at": next((i + 1 for i, loss in enumerate(self.losses) if not math.isfinite(loss)), None),
            "dev_before": self.dev_before, "dev_after": dev_after, "kept_step": kept,
            **({"int8_aware_from": self.int8_from} if self.int8 is not None else {}),
            "curve": [{k: c.get(k) for k in ("step", "train_seconds", "seconds", "score", "loss", *_GENERATIVE_DEV)
                       if k in c or k not in _GENERATIVE_DEV} for c in self.curve],
            "train_seconds": round(self.train_seconds, 2),
            "samples_per_second": round(self.step * self.cfg.batch_size / max(self.train_seconds, 1e-9), 2),
            "teacher_cached": self.cache is not None, "masked_weights_nonzero": nonzero,
            **({"teacher_cache_skipped": self.cache_skipped} if self.cache_skipped else {}),
            "resumed_from": self.resumed_from, "seconds_before_resume": round(self.seconds_before_resume, 2),
            "checkpoint": None,
        }

    def restore_flags(self) -> None:
        for n, p in self.student.named_parameters():
            p.requires_grad_(self.flags[n])
