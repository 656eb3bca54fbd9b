"""AntGMM's multi-stage structured pruning: depth, FFN width, attention heads, hidden size, physically removed."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from lmmc.adapters import Adapter, block_linears, block_list, head_dim
from lmmc.artifact import Artifact
from lmmc.blockwise import capture_block_inputs
from lmmc.cost import Cost, block_cost, blocks_cost, channel_cost, head_cost, hidden_channel_cost, restore_cost
from lmmc.config import explain
from lmmc.data import text_tokens
from lmmc.errors import LmmcError
from lmmc.export.ort import calibration_feeds
from lmmc.hidden import fit_restore_, hidden_importance, pooled_cosine
from lmmc.importance import Importance, add_gate, importance
from lmmc.joint_selection import BlockUnits, block_loss_change, select_joint
from lmmc.latency_budget import DeployConfig, LatencyCosts, LatencyTargetConfig, cover, ffn_floor, head_floor
from lmmc.latency_model import fit_latency_model
from lmmc.modelio import text_pad_length, text_positions
from lmmc.pipeline import Pass, PassConfig, get_pass, register
from lmmc.reconstruct import compensate_, input_gram
from lmmc.selection import Unit, select_units
from lmmc.student import read_structure
from lmmc.surgery import (feature_blocks, find_restore, group_size, hidden_width, keep_blocks_, keep_channels_,
                           keep_heads_, keep_hidden_)

Stage = Literal["depth", "ffn", "heads", "hidden"]
STAGE_ORDER: tuple[Stage, ...] = ("depth", "ffn", "heads", "hidden")
WIDTH_STAGES = ("ffn", "heads", "hidden")
# Ours: the residual updates of blocks chosen for removal are faded out in these steps, a quarter of
# the segment's distillation each, so the rest of the network learns to do without them before they go.
FADE = (0.25, 0.5, 0.75, 1.0)
# A latency model off by more than this on the structures it held out is warned of: on an idle machine
# MiniLM's is 2.2 % off at most (BENCHMARKS.md, "Latency targets").
POOR_FIT = 0.15
# A student predicted this much faster than its target is warned of (validation's default max_latency_miss).
OVERSHOOT = 0.10


class AntGMMConfig(PassConfig):
    keep: float | dict[str, float] | None = Field(
        None, description="fraction of the transformer blocks' cost kept (all towers together; embeddings and "
        "heads are not counted), or one per tower ({text: 1.0, vision: 0.5}: each tower cut to its own "
        "fraction, 1.0 leaves it whole); 0.5 when neither keep nor target is given")
    budget: Literal["flops", "params"] = Field("flops", description="what `keep` measures: FLOPs of one "
                                               "sequence per tower, or parameters")
    target: LatencyTargetConfig | None = Field(None, description="instead of keep: a latency the student must "
                                               "reach on `deploy`, {latency_ms: X} per batch (all towers) or "
                                               "{speedup: S} over the teacher's fastest deployment on the same "
                                               "runtime, timed in the same run; units are chosen by importance "
                                               "per predicted millisecond of a latency model measured there")
    deploy: DeployConfig | None = Field(None, description="with target: where the student runs (runtime "
                                        "openvino|onnxruntime, precision int8|fp32, threads, batch, seq); "
                                        "default OpenVINO INT8, 2 threads, 8 x 128")
    latency_cache: Path | None = Field(None, description="with target: folder that keeps fitted latency models "
                                       "for reuse by later compiles on this machine (a model is reused only for "
                                       "the same CPU, runtime version, target and architecture); default: the "
                                       "compile's output, 'latency-model/'")
    shares: dict[Stage, float] | Literal["auto"] | None = Field(
        None, description="share of the removed cost each stage takes, e.g. {depth: 0.5, ffn: 0.25, heads: "
        "0.25}; stages run in AntGMM's order depth → ffn → heads → hidden. Default with keep: ffn and heads in "
        "proportion to their cost, so both shrink alike. 'auto' (the default with a target): no stages; heads, "
        "FFN channels and whole blocks of every tower compete in one ranking by loss change per unit of the "
        "budget (predicted millisecond, FLOP or parameter; Taylor importance; a block's loss change is measured)")
    importance: Literal["taylor", "activation"] = Field("taylor", description="heads, FFN and hidden channels: "
                                                        "first-order Taylor (needs backward; of the contrastive "
                                                        "loss below, of the next-token loss for generative "
                                                        "models) or gradient-free activation scores")
    depth_importance: Literal["taylor", "activation"] = Field("activation", description="blocks: first-order "
                                                              "Taylor of a gate on the block, or its measured "
                                                              "influence on the residual stream (1 - cos)")
    temperature: float = Field(0.1, gt=0.0, description="temperature of the Taylor loss (in-batch "
                               "contrastive distance to the teacher's embeddings)")
    seq_len: int | None = Field(None, gt=0, description="tokens per text sequence when counting FLOPs (the "
                                "deployment shape); default: the calibration texts' mean length; capped at "
                                "the model's positions (CLIP: 77)")
    segments: int = Field(1, ge=1, description="cuts per stage; importance is rescored before each cut "
                          "and distillation (if set) runs after each")
    min_layers: int = Field(1, ge=1, description="floor: blocks every tower keeps")
    min_heads: int = Field(1, ge=1, description="floor: attention (query) heads every block keeps; under "
                           "grouped-query attention heads go in whole groups, so rounded up to whole groups")
    min_ffn: int = Field(1, ge=1, description="floor: FFN channels every block keeps")
    ffn_multiple: int = Field(1, ge=1, description="each cut block keeps a multiple of this many FFN "
                              "channels (blocks narrower than it are left as they are): 64 suits the "
                              "INT8 matrix kernels of x86 CPUs; rounded to the nearest multiple "
                              "under a keep budget, down under a latency target (a ceiling)")
    min_hidden: int = Field(1, ge=1, description="floor: hidden (residual-stream) channels every tower keeps")
    reconstruct: float | None = Field(None, ge=0.0, description="refit each cut block's output projection by "
                                      "least squares on the calibration tokens so its kept heads or FFN "
                                      "channels stand in for the removed ones; the value is the ridge "
                                      "strength (relative to the mean diagonal of the Gram matrix); off "
                                      "when omitted")
    distill: dict[str, Any] | None = Field(None, description="config of the 'distill' pass run after "
                                           "each segment; without it the schedule runs one-shot")
    distill_steps_per_segment: int = Field(0, ge=0, description="distillation steps after each segment")

    @property
    def uses_taylor(self) -> bool:
        """Whether some stage scores units by Taylor importance (a contrastive loss's gradient)."""
        if not isinstance(self.shares, dict):  # ffn and heads with keep; the joint ranking (Taylor) with a target
            return self.importance == "taylor" or self.target is not None
        stages = {stage for stage, share in self.shares.items() if share > 0}
        return (self.importance == "taylor" and bool(stages - {"depth"})) or (
            self.depth_importance == "taylor" and "depth" in stages)

    def check_model(self, adapter: Adapter, config: Any = None) -> None:
        """The hidden stage narrows BERT-family text encoders only (their towers' HiddenLayout), and not
        one whose embeddings are narrower than its blocks (ELECTRA's embedding_size)."""
        hidden = isinstance(self.shares, dict) and self.shares.get("hidden")
        if hidden and any(t.hidden is None for t in adapter.towers):
            raise LmmcError(f"pass 'antgmm': the hidden stage removes residual-stream channels of BERT-family "
                            f"text encoders only, not of this {adapter.family} model; drop 'hidden' from the shares")
        width = getattr(config, "embedding_size", None)
        if hidden and width is not None and width != config.hidden_size:
            raise LmmcError(f"pass 'antgmm': the hidden stage removes residual-stream channels, and this "
                            f"{config.model_type} model's embeddings are {width} wide, projected to its blocks' "
                            f"{config.hidden_size} (a factorised embedding); drop 'hidden' from the shares")

    @field_validator("keep")
    @classmethod
    def _keep_is_a_fraction(cls, v: float | dict[str, float] | None) -> float | dict[str, float] | None:
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(not 0 < x <= 1 for x in values):
            raise ValueError(f"keep is a fraction of the blocks' cost in (0, 1], per tower or for all, got {v}")
        return v

    @field_validator("shares")
    @classmethod
    def _shares_sum_to_one(cls, v: dict[str, float] | str | None) -> dict[str, float] | str | None:
        if v is None or v == "auto":
            return v
        if any(x < 0 for x in v.values()) or abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"shares must be non-negative and sum to 1, got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _keep_or_target(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("keep") is not None and data.get("target") is not None:
            raise ValueError("give either keep (a fraction of the blocks' cost) or target (a latency: "
                             "{latency_ms: X} or {speedup: S}), not both")
        if data.get("target") is None:
            if data.get("shares") == "auto" and data.get("importance", "taylor") != "taylor":
                raise ValueError("shares: auto ranks heads, channels and blocks together by loss change, which only "
                                 "Taylor importance estimates: use importance: taylor, or give shares (e.g. "
                                 "{ffn: 0.5, heads: 0.5}) to keep activation scores")
            if data.get("deploy") is not None or data.get("latency_cache") is not None:
                raise ValueError("deploy and latency_cache serve a latency target; give target too, or drop them")
            return {**data, "keep": data.get("keep") if data.get("keep") is not None else 0.5}
        # A saved recipe writes the default budget back; only another budget contradicts the target.
        if data.get("budget", "flops") != "flops":
            raise ValueError("budget says what keep measures; with a latency target the budget is milliseconds: "
                             "drop budget")
        shares = data.get("shares")
        if shares in (None, "auto") and data.get("importance", "taylor") != "taylor":
            raise ValueError("with a target and no shares, heads, channels and blocks are ranked together by "
                             "loss change, which only Taylor importance estimates: use importance: taylor, or give "
                             "shares (e.g. {depth: 0.5, ffn: 0.25, heads: 0.25}) to keep activation scores")
        if isinstance(shares, dict) and shares.get("hidden"):
            raise ValueError("a latency target cannot drive the hidden stage (the latency model has no term for "
                             "the residual width); drop 'hidden' from the shares or use keep")
        return data

    @model_validator(mode="after")
    def _distill_needs_steps(self) -> "AntGMMConfig":
        if (self.distill is not None) != (self.distill_steps_per_segment > 0):
            raise ValueError("give both 'distill' (the distill pass's config) and 'distill_steps_per_segment' "
                             "> 0 to distil between segments, or neither for one-shot pruning")
        # Each cut distils for distill_steps_per_segment steps (split over a fading block's ramp); a steps
        # or a clock of its own would be overwritten, or spent again by every one of those runs.
        for key in ("steps", "minutes"):
            if isinstance(self.distill, dict) and self.distill.get(key) is not None:
                raise ValueError(f"distill.{key} is not read between segments: distill_steps_per_segment sets the "
                                 f"steps after each cut; drop distill.{key}")
        # A listed map names one teacher layer per block, and the blocks a depth cut (or the joint ranking)
        # removes leave the later runs with fewer: the list fits the first run only.
        removes_blocks = (self.shares.get("depth", 0) > 0 if isinstance(self.shares, dict)
                          else self.target is not None)
        if removes_blocks and isinstance(self.distill, dict) and isinstance(self.distill.get("layer_map"), (list, dict)):
            raise ValueError("distill.layer_map lists a teacher layer per student block, but this pass removes "
                             "whole blocks between its distillations, so the list fits none after the first cut; "
                             "use layer_map: origin (each block learns from the teacher layer it was cut from) or "
                             "uniform")
        return self

    def distill_config(self, steps: int | None = None, **extra: Any) -> Any:
        """The distill pass's config of the runs between segments: the towers this pass cuts, unless it names
        its own (a tower kept at 1.0 is left whole: distilled, it changed while its structure stayed)."""
        towers = {}
        if isinstance(self.keep, dict) and "towers" not in self.distill:
            cut = [t for t, k in self.keep.items() if k < 1.0]
            towers = {"towers": cut} if len(cut) < len(self.keep) else {}
        return get_pass("distill").Config(**{**self.distill, **towers, "steps": steps or self.distill_steps_per_segment,
                                             **extra})


def _tokens(art: Artifact, cfg: AntGMMConfig) -> dict[str, int]:
    """Tokens of one sequence per tower: the text length it is deployed at (see `text_tokens`; a latency
    target's deploy.seq unless seq_len says otherwise); an image tower's patch count."""
    out = {}
    seq_len = cfg.seq_len or ((cfg.deploy or DeployConfig()).seq if cfg.target is not None else None)
    for tower in art.adapter.towers:
        if tower.modality == "text":
            # A model read at a fixed length (SigLIP) computes every position, whatever the text.
            fixed = text_pad_length(art.student.config, art.adapter)
            out[tower.name] = text_tokens(art.calib, text_positions(art.student.config, tower), fixed or seq_len)
            continue
        (args, kwargs), = capture_block_inputs(art.student, tower, art.calib.calib_batches("image")[:1], art.device)
        out[tower.name] = (args[0] if args else kwargs["hidden_states"]).shape[1]
    return out


class CountCosts:
    """Unit costs in FLOPs of one sequence or in parameters (`lmmc.cost`), at the pass's token counts."""

    def __init__(self, metric: str, head_dims: dict[str, int], tokens: dict[str, int]) -> None:
        self.metric, self.head_dims, self.tokens = metric, head_dims, tokens

    def head(self, tower: Any, block: torch.nn.Module) -> float:
        return head_cost(block, tower, self.head_dims[tower.name], self.tokens[tower.name]).get(self.metric)

    def channel(self, tower: Any, block: torch.nn.Module) -> float:
        return channel_cost(block, tower, self.tokens[tower.name]).get(self.metric)

    def block(self, tower: Any, block: torch.nn.Module) -> float:
        return block_cost(block, tower, self.head_dims[tower.name], self.tokens[tower.name]).get(self.metric)

    def overhead(self, tower: Any) -> float:
        """What a block costs beyond its heads and channels, for the joint ranking: no FLOPs (residual adds and
        norms are not counted); a few hundred parameters of norms and output biases, left out."""
        return 0.0

    def blocks(self, model: torch.nn.Module, adapter: Adapter) -> dict[str, float]:
        return {k: float(c.get(self.metric)) for k, c in blocks_cost(model, adapter, self.head_dims, self.tokens).items()}


def _lopsided(per_tower: dict[str, float], kept: float, metric: str) -> list[str]:
    """A warning for each tower that one budget ranked across towers cut to under half the share the model
    kept: its heads and channels scored lowest beside the other tower's, which may not be what the user wants."""
    if len(per_tower) < 2:
        return []
    return [f"one budget ranked across towers kept {share:.0%} of the {tower} tower's blocks' {metric} against "
            f"{kept:.0%} of the model's: its heads and channels scored lowest beside the other tower's; if it must "
            f"keep more, give antgmm a keep per tower, e.g. keep: {{{', '.join(f'{t}: {kept:.2g}' for t in per_tower)}}}"
            for tower, share in per_tower.items() if share < 0.5 * kept]


def _one_head(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    """A warning for each tower the cut left with one attention head in every block, where it had more.

    Ours: the shapes SigLIP at a quarter of its FLOPs, distilled alike, kept 70 % zero-shot accuracy with one
    head in every block and 85 % with min_heads: 2; the best split between its towers by hand, and one ranking of
    every unit (shares: auto), kept three heads in the image tower's first block and 91 % (BENCHMARKS.md, "Shapes")."""
    more = "this tower a larger keep of its own" if len(after) > 1 else "a larger budget"
    return [f"every block of the {tower} tower is down to one attention head (from up to {max(before[tower]['heads'])}): "
            f"its tokens mix through one attention map per block, where cut students lost the most accuracy; if "
            f"it suffers, give min_heads: 2, or {more}"
            for tower, shape in after.items()
            if shape["heads"] and max(shape["heads"]) == 1 and max(before[tower]["heads"]) > 1]


@register
class AntGMMPass(Pass):
    """AntGMM (Ant Group, WWW 2024): multi-stage structured pruning with distillation between segments.

    Stages run in the paper's order, depth → FFN width → attention heads → hidden size, each in
    `segments` cuts; units are ranked globally across layers and towers under one budget (`keep` of the
    blocks' FLOPs or parameters) with per-layer floors, and removed physically, so the student is smaller
    and faster in every runtime. Blocks chosen for removal are faded out during distillation before they
    go. The hidden stage (a `hidden` share; BERT-family text encoders) removes one set of residual-stream
    channels from the whole tower — embeddings, every block's readers and writers of the stream, every
    LayerNorm over it — and ends the tower in a linear map back to the teacher's width, fitted by least
    squares on the calibration data, so the pooled embedding stays comparable with the teacher's.
    With `reconstruct`, each block losing heads or FFN channels has its output projection refitted by
    least squares on the calibration tokens first, so the kept units stand in for the removed ones.

    Recipe::

        - antgmm: {keep: 0.5, budget: flops, importance: taylor}
        - antgmm: {keep: 0.5, shares: {depth: 0.5, ffn: 0.25, heads: 0.25}, segments: 2,
                   distill: {lr: 1.0e-4}, distill_steps_per_segment: 200}
        - antgmm: {keep: 0.5, shares: {depth: 0.4, ffn: 0.2, heads: 0.2, hidden: 0.2}}
        - antgmm: {keep: 0.42, shares: {depth: 0.5, ffn: 0.25, heads: 0.25}, reconstruct: 0.01}
        - antgmm: {keep: 0.25, shares: auto}   # heads, channels and blocks in one ranking per FLOP
    """

    name = "antgmm"
    Config = AntGMMConfig
    needs = frozenset({"teacher", "student", "calib"})
    provides = frozenset({"student"})

    def check(self, available: set[str]) -> None:
        super().check(available)
        if self.config.distill is not None:
            try:
                self.config.distill_config()
            except ValidationError as err:
                raise LmmcError(f"pass 'antgmm': bad 'distill' config for the distill pass:\n{explain(err)}") from None

    def run(self, art: Artifact) -> dict[str, Any]:
        cfg = self.config
        if art.masks:
            raise LmmcError("pass 'antgmm' removes whole units and would leave the unstructured masks of an "
                            "earlier pass pointing at the wrong weights; put antgmm before magnitude/wanda")
        if art.calib is None:
            raise LmmcError("pass 'antgmm' needs calibration data; give --calib or 'calibration.path'")
        model, adapter = art.student.to(art.device), art.adapter
        self.tokens = _tokens(art, cfg)
        fixed = text_pad_length(model.config, adapter)
        unused = ([f"seq_len {cfg.seq_len} is not used: the model reads every text at its fixed length of {fixed} "
                   f"tokens, so the FLOPs are counted at {fixed}"] if cfg.seq_len and fixed and cfg.seq_len != fixed
                  else [])
        self.head_dims = {t.name: head_dim(model, t) for t in adapter.towers}
        cfg.check_model(adapter, model.config)
        start_shape = read_structure(model, adapter)
        shape = start_shape.values()
        for floor, value, most in (("min_heads", cfg.min_heads, max(h for t in shape for h in t["heads"])),
                                   ("min_ffn", cfg.min_ffn, max(w for t in shape for w in t["ffn"])),
                                   ("min_layers", cfg.min_layers, max(t["layers"] for t in shape))):
            if value > most:  # a floor meant for a larger model, or a typo: its stage can remove nothing
                unused.append(f"{floor} {value} is above what any block or tower has ({most}), so it keeps them all")
        latency: dict[str, Any] | None = None
        if cfg.target is None:
            self.costs: CountCosts | LatencyCosts = CountCosts(cfg.budget, self.head_dims, self.tokens)
        else:
            self.costs, latency = self._latency_budget(art)
        metric = cfg.budget if latency is None else "ms"
        start = blocks_cost(model, adapter, self.head_dims, self.tokens)
        start_blocks = self.costs.blocks(model, adapter)
        total0 = sum(start_blocks.values())
        # Each round cuts the towers of its adapter to its keep: one round over all towers under one budget,
        # or one per tower under its own. Every round is planned before the first cut, so an impossible
        # budget fails before any scoring.
        rounds: list[tuple[Adapter, dict[str, float]]] = []
        if latency is None:
            rounds = self._keep_rounds(model, adapter)
        else:
            joint = not isinstance(cfg.shares, dict)
            shares = {s: 1.0 for s in ("depth", "ffn", "heads")} if joint else self._shares(model, adapter)
            self._check_reachable(model, adapter, shares, latency)
            remove = latency["start_ms"] - latency["target_ms"]
            if remove <= 0:  # nothing would be cut, and validation would then miss the target from below
                teacher = latency.get("teacher_ms")
                asked = (f"a speed-up of {cfg.target.speedup:g}x over the teacher ({latency['target_ms']:.4g} ms)"
                         if teacher is not None else f"its latency_ms of {latency['target_ms']:.4g}")
                more = (f"a speedup above {teacher / latency['start_ms']:.3g}" if teacher is not None
                        else f"a latency_ms below {latency['start_ms']:.4g}")
                raise LmmcError(f"pass 'antgmm': the model already runs at {latency['start_ms']:.4g} ms on the "
                                f"target (predicted), within {asked}; nothing needs removing: give {more}")
            if joint:
                plan = {"joint": remove} if remove > 0 else {}
            else:
                plan = self._plan(model, adapter, shares, remove, total0) if remove > 0 else {}
            rounds.append((adapter, plan))
        history: list[dict[str, Any]] = []
        for view, plan in rounds:
            self.adapter = view
            total = self._cost(model, view)
            removed = 0.0
            if plan.get("joint"):
                for seg in range(1, cfg.segments + 1):
                    history.append(self._joint_segment(art, seg, total - seg / cfg.segments * plan["joint"]))
            for stage in (s for s in STAGE_ORDER if plan.get(s)):
                removed += plan[stage]
                stage_start = self._cost(model, view)
                # Goals are cumulative, so what one stage's whole units miss carries into the next.
                stage_goal = total - removed
                for seg in range(1, cfg.segments + 1):
                    goal = stage_start - seg / cfg.segments * (stage_start - stage_goal)
                    history.append(self._segment(art, stage, seg, goal))
        self.adapter = adapter
        end = blocks_cost(model, adapter, self.head_dims, self.tokens)
        end_blocks = self.costs.blocks(model, adapter)
        art.student = model.to(art.device)
        before, after = {k: vars(v) for k, v in start.items()}, {k: vars(v) for k, v in end.items()}
        if latency is not None:
            for k in before:
                before[k]["ms"], after[k]["ms"] = start_blocks[k], end_blocks[k]
            predicted = self.costs.model.predict(model, adapter)
            latency.update(predicted_ms=sum(predicted.values()), predicted_ms_per_tower=predicted)
        out = {
            "budget": metric,
            "tokens": self.tokens,
            "kept": sum(end_blocks.values()) / total0,
            "kept_per_tower": {k: end_blocks[k] / v for k, v in start_blocks.items() if v},
            "target_keep": cfg.keep if latency is None else (latency["target_ms"] - self.costs.fixed()) / total0,
            # Each round's stages as fractions of the cost it started from (the whole model's, or its tower's).
            "plan": {"+".join(t.name for t in view.towers): {k: v / sum(start_blocks[t.name] for t in view.towers)
                                                             for k, v in plan.items()} for view, plan in rounds},
            "blocks_before": before,
            "blocks_after": after,
            "parameters": sum(p.numel() for p in model.parameters()),
            "structure": read_structure(model, adapter),
            "segments": history,
        }
        warnings = unused + (_lopsided(out["kept_per_tower"], out["kept"], metric)
                             if not isinstance(cfg.keep, dict) else []) + _one_head(start_shape, out["structure"])
        if latency is None:
            asked = cfg.keep if isinstance(cfg.keep, dict) else {"all towers": cfg.keep}
            got = out["kept_per_tower"] if isinstance(cfg.keep, dict) else {"all towers": out["kept"]}
            missed = [f"{t}: {got[t]:.3f} against keep {k:g}" for t, k in asked.items() if got.get(t, 0) > k + 0.02]
            under = [f"{t}: {got[t]:.3f} against keep {k:g}" for t, k in asked.items() if got.get(t, 1) < k - 0.02]
            if under:  # a block or a wide unit removed whole overshoots the budget
                warnings.append(f"the student kept less of the blocks' {metric} than asked ({'; '.join(under)}): "
                                f"whole units removed more than the budget; give the smaller units (ffn, heads) "
                                f"the shares, or a larger keep")
            if missed:
                warnings.append(f"the student kept more of the blocks' {metric} than asked ({'; '.join(missed)}): "
                                f"whole units" + (f" and FFN widths in multiples of {cfg.ffn_multiple}"
                                                  if cfg.ffn_multiple > 1 else "")
                                + " could not meet it; give other stages a share"
                                + (", or a smaller ffn_multiple" if cfg.ffn_multiple > 1 else ""))
            return {**out, **({"warnings": warnings} if warnings else {})}
        held_out = (latency["model"]["fit"] or {}).get("held_out_rel_error") or {}
        poor = {t: e["max"] for t, e in held_out.items() if e.get("max", 0) > POOR_FIT}
        if poor:
            warnings.append(f"the latency model predicts the structures it held out up to "
                            f"{', '.join(f'{e:.0%} off ({t})' for t, e in poor.items())}, so the cut may miss the "
                            f"target; fit it again on an idle machine (remove its cache), or time a larger batch")
        if latency["predicted_ms"] > latency["target_ms"] * (1 + 1e-9):
            # the ranking removes whole units and ffn_multiple rounds widths; the validation gate has the last word
            rounded = f" and FFN widths in multiples of {cfg.ffn_multiple}" if cfg.ffn_multiple > 1 else ""
            warnings.append(f"the student is predicted at {latency['predicted_ms']:.4g} ms, above the target "
                            f"{latency['target_ms']:.4g} ms: the stages' whole units{rounded} did not meet it "
                            f"exactly; ask for a lower target" + (", or a smaller ffn_multiple" if rounded else ""))
        elif latency["predicted_ms"] < latency["target_ms"] * (1 - OVERSHOOT):
            # validation's latency gate allows a 10 % miss by default, either way
            warnings.append(f"the student is predicted at {latency['predicted_ms']:.4g} ms, "
                            f"{1 - latency['predicted_ms'] / latency['target_ms']:.0%} below the target "
                            f"{latency['target_ms']:.4g} ms: a stage's whole units (a block, say) removed more than "
                            f"the target needs, and fidelity with it; give the smaller units (ffn, heads) the shares, "
                            f"or ask for a nearer target")
        return {**out, **({"warnings": warnings} if warnings else {}), "latency_target": latency}

    def check_keep(self, art: Artifact) -> None:
        """Plan a keep budget as run() does before any scoring, so that the compile's dry run refuses what the
        floors do not allow; shapes are all it reads (a meta-device student will do)."""
        self.tokens = _tokens(art, self.config)
        self.head_dims = {t.name: head_dim(art.student, t) for t in art.adapter.towers}
        self.costs = CountCosts(self.config.budget, self.head_dims, self.tokens)
        if self.config.target is None:
            self._keep_rounds(art.student, art.adapter)
            return
        # a target's milliseconds are known only once the latency model is fitted, minutes in; that the
        # floors leave nothing to remove is known from the shapes
        stages = set(self._shares(art.student, art.adapter)) if isinstance(self.config.shares, dict) \
            else {"depth", "ffn", "heads"}
        cap = self._capacity(art.student, art.adapter)
        if not any(cap[s] > 0 for s in stages):
            self._refuse_nothing_removable(stages)

    def _floor_fixes(self, stages: set[str]) -> tuple[list[str], list[str]]:
        """The floors of `stages` that can be lowered (only those above their least value), and the stages
        without a share."""
        cfg = self.config
        floors = {"depth": [f"min_layers={cfg.min_layers}"] if cfg.min_layers > 1 else [],
                  "heads": [f"min_heads={cfg.min_heads}"] if cfg.min_heads > 1 else [],
                  "ffn": ([f"min_ffn={cfg.min_ffn}"] if cfg.min_ffn > 1 else [])
                  + ([f"ffn_multiple={cfg.ffn_multiple}"] if cfg.ffn_multiple > 1 else [])}
        return ([f for s in ("depth", "heads", "ffn") if s in stages for f in floors[s]],
                [s for s in ("depth", "heads", "ffn") if s not in stages])

    def _refuse_nothing_removable(self, stages: set[str]) -> None:
        lower, idle = self._floor_fixes(stages)
        raise LmmcError(f"pass 'antgmm': the floors leave nothing to remove from this model for a target: the "
                        f"fastest structure they allow is the model as it is"
                        + (f"; lower {', '.join(lower)}" if lower else "")
                        + (f"{', or' if lower else ';'} give {', '.join(idle)} a share" if idle else ""))

    def _keep_rounds(self, model: torch.nn.Module, adapter: Adapter) -> list[tuple[Adapter, dict[str, float]]]:
        """One round over all towers under one keep, or one per tower under its own, each with its plan."""
        keep = self.config.keep
        views = [(dataclasses.replace(adapter, towers=(t,)), keep[t.name]) for t in adapter.towers
                 if keep[t.name] < 1] if isinstance(keep, dict) else [(adapter, keep)]
        rounds = []
        for view, kept in views:
            total = sum(self.costs.blocks(model, view).values())
            if self.config.shares == "auto":  # planned as if by stages only to refuse what the floors forbid
                self._plan(model, view, {"depth": 1.0, "ffn": 1.0, "heads": 1.0}, total - kept * total, total, kept)
                rounds.append((view, {"joint": total - kept * total}))
                continue
            rounds.append((view, self._plan(model, view, self._shares(model, view), total - kept * total, total,
                                            kept)))
        return rounds

    def _shares(self, model: torch.nn.Module, adapter: Adapter) -> dict[str, float]:
        if self.config.shares is not None:
            return {k: v for k, v in self.config.shares.items() if v > 0}
        heads = ffn = 0.0
        for tower in adapter.towers:
            for block in block_list(model, tower)[1]:
                lin = block_linears(block, tower)
                hd = self.head_dims[tower.name]
                heads += self.costs.head(tower, block) * (lin["q"][1].out_features // hd)
                ffn += self.costs.channel(tower, block) * lin["fc1"][1].out_features
        return {"ffn": ffn / (heads + ffn), "heads": heads / (heads + ffn)}

    def _cost(self, model: torch.nn.Module, adapter: Adapter) -> float:
        return sum(self.costs.blocks(model, adapter).values())

    def _latency_budget(self, art: Artifact) -> tuple[LatencyCosts, dict[str, Any]]:
        """The latency model of the deployment target (fitted on the teacher, or read from the work area's
        cache) and the target in ms; for a speed-up, the teacher's predicted ms over the speed-up."""
        cfg, adapter = self.config, art.adapter
        target = (cfg.deploy or DeployConfig()).target()
        feeds = {t.name: calibration_feeds(art, t) for t in adapter.towers}
        teacher = art.teacher.cpu().eval()
        latency: dict[str, Any] = {"deploy": target.key(), "deploy_config": (cfg.deploy or DeployConfig()).model_dump()}
        try:
            with contextlib.ExitStack() as stack:
                if cfg.latency_cache is not None:
                    cache = cfg.latency_cache
                elif art.workdir is not None:
                    cache = art.workdir / "latency-model"
                else:
                    cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmmc-latency-")))
                model = fit_latency_model(teacher, adapter, target, cache, feeds)
        finally:
            art.teacher.to(art.device)
        costs = LatencyCosts(model, self.head_dims)
        student = art.student
        if cfg.target.speedup is not None:
            # The teacher as the model predicts it, not a fresh timing: the fit timed the teacher among its
            # variants, and a ratio of two predictions is immune to the machine's load changing between
            # the fit and now. Validation times teacher and student side by side for the measured figure.
            latency.update(speedup=cfg.target.speedup, teacher_ms=sum(model.predict(teacher, adapter).values()))
        latency.update(
            target_ms=cfg.target.latency_ms or latency["teacher_ms"] / cfg.target.speedup,
            start_ms=costs.fixed() + sum(costs.blocks(student, adapter).values()),
            fixed_ms=costs.fixed(),
            model={"towers": {k: vars(v) for k, v in model.towers.items()}, "fit": model.fit},
            # the default cache moves with the output: named where it will be, not in the work area
            cache=str(cache) if cfg.latency_cache is not None else
            "latency-model" if art.workdir is not None else None,
        )
        return costs, latency

    def _check_reachable(self, model: torch.nn.Module, adapter: Adapter, shares: dict[str, float],
                         latency: dict[str, Any]) -> None:
        """Refuse, before any scoring, a target faster than the fastest structure the floors allow."""
        cfg = self.config
        floor = self.costs.floor_ms(model, adapter, set(shares), cfg.min_layers, cfg.min_heads, cfg.min_ffn,
                                    cfg.ffn_multiple)
        latency["floor_ms"] = floor
        if latency["target_ms"] >= floor:
            return
        if floor >= latency["start_ms"] * (1 - 1e-9):  # no target below the model itself is reachable
            self._refuse_nothing_removable(set(shares))
        teacher = latency.get("teacher_ms")
        asked = f"{latency['target_ms']:.3g} ms per batch on {latency['deploy']}"
        # rounded towards what can be reached, so asking for the figure printed is not refused again
        digits = max(2 - math.floor(math.log10(floor)), 0)
        least = f"{math.ceil(floor * 10**digits) / 10**digits:.{digits}f}"
        most = f"{math.floor(teacher / floor * 100) / 100:.2f}" if teacher is not None else None
        best = f"{least} ms"
        if teacher is not None:
            asked = f"a speed-up of {cfg.target.speedup:g}x over the teacher's {teacher:.3g} ms ({asked})"
            best += f", a speed-up of {most}x"
        lower, idle = self._floor_fixes(set(shares))
        raise LmmcError(f"pass 'antgmm': target {asked} cannot be reached: the fastest structure the floors allow "
                        f"is predicted at {best}. Ask for at least {least} ms"
                        + (f" (a speed-up of at most {most})" if teacher is not None else "")
                        + (f", or lower {', '.join(lower)}" if lower else "")
                        + (f", or give {', '.join(idle)} a share" if idle else "")
                        # the fit (minutes on a real model) is in the work area this error discards
                        + ("; set the pass's latency_cache: DIR so the next compile reuses the latency model "
                           "fitted for this one" if cfg.latency_cache is None else ""))

    def _capacity(self, model: torch.nn.Module, adapter: Adapter) -> dict[str, float]:
        """The most each stage could remove from the model as it is, given the floors."""
        cfg, cap = self.config, {"depth": 0.0, "ffn": 0.0, "heads": 0.0, "hidden": 0.0}
        for tower in adapter.towers:
            hd, tok = self.head_dims[tower.name], self.tokens[tower.name]
            if tower.hidden is not None:
                width = hidden_width(model, tower)
                channel = hidden_channel_cost(block_list(model, tower)[1], tower, tok, self._teacher_width(model, tower))
                removable = max(width - cfg.min_hidden, 0) * channel.get(cfg.budget) - self._restore_to_add(model, tower)
                cap["hidden"] += max(removable, 0.0)
            per_block = []
            for block in block_list(model, tower)[1]:
                lin = block_linears(block, tower)
                per_block.append(self.costs.block(tower, block))
                heads, width = lin["q"][1].out_features // hd, lin["fc1"][1].out_features
                cap["heads"] += (heads - head_floor(heads, cfg.min_heads, group_size(block, tower, hd))) \
                    * self.costs.head(tower, block)
                floor = ffn_floor(width, cfg.min_ffn, cfg.ffn_multiple)
                cap["ffn"] += max(width - floor, 0) * self.costs.channel(tower, block)
            cap["depth"] += sum(sorted(per_block)[cfg.min_layers:])
        return cap

    def _plan(self, model: torch.nn.Module, adapter: Adapter, shares: dict[str, float], remove: float,
              total: float, keep: float | None = None) -> dict[str, float]:
        """Cost each stage removes: its share of `remove`, moved to the other stages where floors cap it.

        Checked before any scoring, so an impossible budget fails at once. Removing blocks takes their
        heads and channels with it; the width stages' room is scaled down accordingly (ours)."""
        cfg, cap = self.config, self._capacity(model, adapter)
        width = [s for s in WIDTH_STAGES if shares.get(s)]
        depth = min(shares.get("depth", 0.0) * remove, cap["depth"])
        for _ in range(50):
            room = {s: cap[s] * (1 - depth / total) for s in width}
            alloc = _water_fill(remove - depth, {s: shares[s] for s in width}, room)
            short = remove - depth - sum(alloc.values())
            if short <= 1e-6 * total or "depth" not in shares or depth >= cap["depth"]:
                break
            depth = min(depth + short, cap["depth"])
        if short > 1e-6 * total:
            where = f" of the {adapter.towers[0].name} tower" if isinstance(cfg.keep, dict) else ""
            asked = f"keep={keep} of the blocks' {cfg.budget}{where}" if cfg.target is None else \
                f"keeping {1 - remove / total:.3f} of the blocks' predicted ms"
            grouped = any(group_size(b, t, self.head_dims[t.name]) > 1 for t in adapter.towers
                          for b in block_list(model, t)[1])
            raise LmmcError(f"pass 'antgmm': {asked} is below what the floors "
                            f"allow (about {1 - (remove - short) / total:.3f} with min_layers={cfg.min_layers}, "
                            f"min_heads={cfg.min_heads}{' in whole query-head groups' if grouped else ''}, "
                            f"min_ffn={cfg.min_ffn}"
                            + (f", ffn_multiple={cfg.ffn_multiple}" if cfg.ffn_multiple > 1 else "")
                            + (f", min_hidden={cfg.min_hidden}" if "hidden" in shares else "")
                            + f" and stages {sorted(shares)}); "
                            f"raise {'keep' if cfg.target is None else 'the target'}, lower the floors or give "
                            f"other stages a share")
        return {"depth": depth, **alloc} if "depth" in shares else alloc

    def _segment(self, art: Artifact, stage: str, seg: int, goal: float) -> dict[str, Any]:
        cfg, model, adapter = self.config, art.student, self.adapter
        if stage == "hidden":
            return self._hidden_segment(art, seg, goal)
        before = self._cost(model, adapter)
        # Ours: a whole block is too large a change for a first-order estimate. On MiniLM at 50 % FLOPs
        # with shares depth 0.5 / ffn 0.25 / heads 0.25 and Taylor widths, the Taylor gate removed
        # block 0 (held-out cosine 0.55); measured influence removed block 2 (0.69).
        method = cfg.depth_importance if stage == "depth" else cfg.importance
        scores = importance(method, model, art.teacher, adapter, art.calib, art.device, cfg.temperature)
        units, floors = self._units(model, adapter, stage, scores)
        chosen = self._select(units, before - goal, floors)
        record: dict[str, Any] = {"stage": stage, "segment": seg, "removed": len(chosen)}
        if stage == "depth":
            drop: dict[str, set[int]] = {}
            for u in chosen:
                drop.setdefault(u.group, set()).add(u.index)
            origin = read_structure(model, adapter)
            record["removed_layers"] = {t: [origin[t]["teacher_layers"][i] for i in sorted(idx)]
                                        for t, idx in drop.items()}
            if cfg.distill is not None and drop:
                record["distill"] = self._fade_out(art, drop)
            for tower in adapter.towers:
                n = len(block_list(model, tower)[1])
                if drop.get(tower.name):
                    keep_blocks_(model, tower, [i for i in range(n) if i not in drop[tower.name]])
        else:
            drop_units: dict[tuple[str, int], set[int]] = {}
            for u in chosen:
                drop_units.setdefault(u.group, set()).add(u.index)
            if stage == "ffn":
                drop_units = self._aligned(drop_units, scores.channels)
                record["removed"] = sum(map(len, drop_units.values()))
            left: dict[str, float] = {}
            for key, idx in self._in_order(adapter, drop_units):
                n = len((scores.heads if stage == "heads" else scores.channels)[key])
                self._cut(art, stage, key, n, idx, left)
            if left:
                record["reconstruction_left"] = left
            if cfg.distill is not None and chosen:
                record["distill"] = self._distill(art, cfg.distill_steps_per_segment)
        record["cost"] = self._cost(model, adapter)
        record["goal"] = goal
        return record

    def _joint_segment(self, art: Artifact, seg: int, goal: float) -> dict[str, Any]:
        """One cut of the joint ranking (no stage shares): heads, FFN channels and whole blocks of every
        tower by loss change per unit of the budget, until the blocks' cost (predicted ms, FLOPs or
        parameters) reaches `goal`.
        Widths are cut first, then the chosen blocks are faded out (with distillation) and removed."""
        cfg, model, adapter = self.config, art.student, self.adapter
        before = self._cost(model, adapter)
        # Taylor scores of heads and channels are per batch first-order loss changes of zeroing the unit,
        # summed as absolute values over the calibration batches: one scale for both, no normalising.
        # A block's is the loss change measured over the same batches (block_loss_change).
        scores = importance("taylor", model, art.teacher, adapter, art.calib, art.device, cfg.temperature)
        whole = block_loss_change(model, art.teacher, adapter, art.calib, art.device, cfg.temperature)
        candidates = []
        for tower in adapter.towers:
            for i, block in enumerate(block_list(model, tower)[1]):
                key = (tower.name, i)
                g = group_size(block, tower, self.head_dims[tower.name])
                candidates.append(BlockUnits(
                    group=key, tower=tower.name, overhead=self.costs.overhead(tower),
                    head_ms=self.costs.head(tower, block) * g, channel_ms=self.costs.channel(tower, block),
                    heads=scores.heads[key].reshape(-1, g).sum(1).tolist(), channels=scores.channels[key].tolist(),
                    block=whole[key], min_heads=-(-cfg.min_heads // g), min_channels=cfg.min_ffn))
        chosen = select_joint(candidates, before - goal, cfg.min_layers)
        origin = read_structure(model, adapter)
        record: dict[str, Any] = {
            "stage": "joint", "segment": seg, f"removed_{'ms' if cfg.target else cfg.budget}": chosen.removed_ms,
            "removed_heads": {f"{t}.{i}": len(v) for (t, i), v in chosen.heads.items()},
            "block_loss_change": {f"{t}.{i}": v for (t, i), v in whole.items()},
        }
        left: dict[str, float] = {}
        for key, idx in self._in_order(adapter, chosen.heads):
            self._cut(art, "heads", key, len(scores.heads[key]), set(idx), left)
        channels = self._aligned({k: set(v) for k, v in chosen.channels.items()}, scores.channels)
        record["removed_channels"] = {f"{t}.{i}": len(v) for (t, i), v in channels.items()}
        for key, idx in self._in_order(adapter, channels):
            self._cut(art, "ffn", key, len(scores.channels[key]), idx, left)
        if left:
            record["reconstruction_left"] = left
        drop: dict[str, set[int]] = {}
        for tname, i in chosen.blocks:
            drop.setdefault(tname, set()).add(i)
        record["removed_layers"] = {t: [origin[t]["teacher_layers"][i] for i in sorted(idx)] for t, idx in drop.items()}
        if cfg.distill is not None and drop:
            record["distill"] = self._fade_out(art, drop)
        elif cfg.distill is not None and (chosen.heads or chosen.channels):
            record["distill"] = self._distill(art, cfg.distill_steps_per_segment)
        for tname, idx in drop.items():
            tower = adapter.tower(tname)
            n = len(block_list(model, tower)[1])
            keep_blocks_(model, tower, [i for i in range(n) if i not in idx])
        record["cost"] = self._cost(model, adapter)
        record["goal"] = goal
        return record

    def _aligned(self, drop: dict[tuple[str, int], set[int]],
                 scores: dict[tuple[str, int], torch.Tensor]) -> dict[tuple[str, int], set[int]]:
        """The FFN channels to remove per block, moved so that each cut block keeps a multiple of
        `ffn_multiple`: the best-scored removed channels come back, or the worst-scored kept ones go.
        Ours: on MiniLM students in OpenVINO INT8, FFN widths rounded to the nearest 64 ran 3-7 % faster
        than the widths the ranking left (BENCHMARKS.md, "FFN widths in multiples of 64")."""
        m = self.config.ffn_multiple
        if m == 1:
            return drop
        out = {}
        for key, idx in drop.items():
            n = len(scores[key])
            kept = n - len(idx)
            if n < m or kept == 0:
                out[key] = idx
                continue
            target = kept // m * m if self.config.target is not None else round(kept / m) * m
            target = min(max(target, ffn_floor(n, self.config.min_ffn, m)), n)
            order = sorted(range(n), key=lambda j: (-float(scores[key][j]), j))  # best first
            out[key] = set(order[target:])
        return {k: v for k, v in out.items() if v}

    @staticmethod
    def _in_order(adapter: Adapter, units: dict[tuple[str, int], Any]) -> list[tuple[tuple[str, int], Any]]:
        """Blocks from the input on, tower by tower: each refit then sees what its cut predecessors give."""
        order = {t.name: k for k, t in enumerate(adapter.towers)}
        return sorted(units.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))

    def _cut(self, art: Artifact, stage: str, key: tuple[str, int], n: int, idx: set[int],
             left: dict[str, float]) -> None:
        """Remove the units `idx` (of `n`) of one block: heads (whole key/value groups) or FFN channels.
        With `reconstruct`, the block's output projection is refitted first and the share of the removed
        units' contribution it cannot replace goes into `left`."""
        tname, i = key
        tower, hd = art.adapter.tower(tname), self.head_dims[tname]
        block = block_list(art.student, tower)[1][i]
        if stage == "heads":
            g = group_size(block, tower, hd)
            kept = [h for h in range(n) if h // g not in idx]
            columns = [h * hd + d for h in kept for d in range(hd)]
        else:
            kept = columns = [c for c in range(n) if c not in idx]
        if self.config.reconstruct is not None:
            role = "o" if stage == "heads" else "fc2"
            gram = input_gram(art.student, tower, i, role, art.calib, art.device)
            left[f"{tname}.{i}"] = compensate_(block_linears(block, tower)[role][1], gram, columns,
                                                 self.config.reconstruct)
        if stage == "heads":
            keep_heads_(block, tower, hd, kept)
        else:
            keep_channels_(block, tower, kept)

    def _select(self, units: list[Unit], remove: float, floors: dict[Any, int]) -> list[Unit]:
        """A cost budget is met as closely as whole units allow; a latency target is a ceiling."""
        if self.config.target is None:
            return select_units(units, remove, floors).removed
        return cover(units, remove, floors)

    def _units(self, model: torch.nn.Module, adapter: Adapter, stage: str,
               scores: Importance) -> tuple[list[Unit], dict[Any, int]]:
        cfg, units, floors = self.config, [], {}
        for tower in adapter.towers:
            blocks = block_list(model, tower)[1]
            if stage == "depth":
                # LLaVA's projector reads a vision block's output (vision_feature_layer, -2 by default): that
                # block stays, and the blocks after the deepest one read are dead compute, removed first.
                read = feature_blocks(model, tower) or set()
                floors[tower.name] = max(cfg.min_layers - len(read), 0)  # the read blocks count toward the floor
                units += [Unit(tower.name, i, float("-inf") if read and i > max(read) else
                               scores.blocks[(tower.name, i)], self.costs.block(tower, b))
                          for i, b in enumerate(blocks) if i not in read]
                continue
            for i, block in enumerate(blocks):
                key = (tower.name, i)
                if stage == "heads":
                    # A unit is a head group: a key/value head with the query heads sharing it (one head
                    # without grouped-query attention), scored by the sum over its query heads.
                    g = group_size(block, tower, self.head_dims[tower.name])
                    s = scores.heads[key].reshape(-1, g).sum(1)
                    cost, floors[key] = self.costs.head(tower, block) * g, -(-cfg.min_heads // g)
                else:
                    cost, s, floors[key] = self.costs.channel(tower, block), scores.channels[key], cfg.min_ffn
                units += [Unit(key, j, float(v), cost) for j, v in enumerate(s.tolist())]
        return units, floors

    def _teacher_width(self, model: torch.nn.Module, tower: Any) -> int:
        restore = find_restore(model, tower)
        return restore.proj.out_features if restore is not None else hidden_width(model, tower)

    def _restore_to_add(self, model: torch.nn.Module, tower: Any) -> float:
        """The cost of the map back to the teacher's width that a first cut of hidden channels adds."""
        if find_restore(model, tower) is not None:
            return 0.0
        width = hidden_width(model, tower)
        return restore_cost(width, width, self.tokens[tower.name]).get(self.config.budget)

    def _hidden_segment(self, art: Artifact, seg: int, goal: float) -> dict[str, Any]:
        """Remove hidden channels, one shared set per tower, ranked globally; refit the map back to the
        teacher's width by least squares, then distil.

        The first cut adds that map (its cost counts against the budget, so the stage removes more
        channels to pay for it). The kept channels' LayerNorms now normalise over fewer channels, which
        shifts their statistics; nothing rescales them: the least-squares map and the distillation that
        follows absorb the shift. The record gives the pooled cosine to the teacher on the calibration
        data before the cut, right after it and after the fit, which measures that shift."""
        cfg, model, adapter = self.config, art.student, self.adapter
        before = self._cost(model, adapter) + sum(self._restore_to_add(model, t) for t in adapter.towers)
        scores = hidden_importance(cfg.importance, model, art.teacher, adapter, art.calib, art.device, cfg.temperature)
        units, floors = [], {}
        for tower in adapter.towers:
            channel = hidden_channel_cost(block_list(model, tower)[1], tower, self.tokens[tower.name],
                                          self._teacher_width(model, tower)).get(cfg.budget)
            floors[tower.name] = cfg.min_hidden
            units += [Unit(tower.name, j, float(v), channel) for j, v in enumerate(scores[tower.name].tolist())]
        chosen = select_units(units, before - goal, floors)
        drop: dict[str, set[int]] = {}
        for u in chosen.removed:
            drop.setdefault(u.group, set()).add(u.index)
        record: dict[str, Any] = {"stage": "hidden", "segment": seg, "removed": len(chosen.removed), "towers": {}}
        for tname, idx in drop.items():
            tower = adapter.tower(tname)
            width = hidden_width(model, tower)
            cos_before = pooled_cosine(model, art.teacher, tower, art.calib, art.device)
            keep_hidden_(model, tower, [c for c in range(width) if c not in idx])
            cos_cut = pooled_cosine(model, art.teacher, tower, art.calib, art.device)
            fit = fit_restore_(model, art.teacher, tower, art.calib, art.device)
            record["towers"][tname] = {
                "hidden": hidden_width(model, tower),
                "calib_cosine_before": cos_before,
                "calib_cosine_cut": cos_cut,
                "calib_cosine_fitted": pooled_cosine(model, art.teacher, tower, art.calib, art.device),
                "restore_fit": fit,
            }
        if cfg.distill is not None and chosen.removed:
            record["distill"] = self._distill(art, cfg.distill_steps_per_segment)
        record["cost"] = self._cost(model, adapter)
        record["goal"] = goal
        return record

    def _distill(self, art: Artifact, steps: int, **extra: Any) -> dict[str, Any]:
        distill = get_pass("distill")
        return distill(self.config.distill_config(steps, **extra)).run(art) or {}

    def _fade_out(self, art: Artifact, drop: dict[str, set[int]]) -> list[dict[str, Any]]:
        """Distil while the chosen blocks' residual updates shrink to nothing (AntGMM's depth ramp)."""
        steps = self.config.distill_steps_per_segment
        gates, handles = [], []
        for tower in art.adapter.towers:
            blocks = block_list(art.student, tower)[1]
            for i in sorted(drop.get(tower.name, ())):
                gate = torch.ones((), device=art.device)
                gates.append(gate)
                handles.append(add_gate(blocks[i], gate))
        out = []
        try:
            for k, t in enumerate(FADE):
                for gate in gates:
                    gate.fill_(1.0 - t)
                # the remainder goes to the last levels: with fewer steps than levels, the block gone at last
                # (gate 0) is the one the student must still be distilled without
                n = steps // len(FADE) + (1 if k >= len(FADE) - steps % len(FADE) else 0)
                if n:
                    # A fading block's output is turning into its input: its hidden-state term would pull
                    # the block before it toward the teacher layer the fading block is to stop producing.
                    skip = {name: sorted(idx) for name, idx in drop.items() if idx}
                    out.append({"fade": t, **self._distill(art, n, skip_hidden=skip)})
        finally:
            for h in handles:
                h.remove()
        return out


def _water_fill(amount: float, weights: dict[str, float], room: dict[str, float]) -> dict[str, float]:
    """Split `amount` in proportion to `weights`, none above its `room`; what is capped goes to the rest."""
    alloc = {k: 0.0 for k in weights}
    open_ = {k for k, w in weights.items() if w > 0}
    while amount > 1e-12 and open_:
        total_w = sum(weights[k] for k in open_)
        full = {k for k in open_ if alloc[k] + amount * weights[k] / total_w >= room[k]}
        if not full:
            for k in open_:
                alloc[k] += amount * weights[k] / total_w
            return alloc
        for k in full:
            amount -= room[k] - alloc[k]
            alloc[k] = room[k]
        open_ -= full
    return alloc
