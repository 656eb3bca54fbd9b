"""The loss allocation scores are measured against, chosen from the model's adapter: contrastive for
dual encoders, two views for single encoders, teacher-forced next-token loss for generative models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmmc.adapters import Adapter, TowerModule, TowerSpec
from lmmc.data import IGNORE_INDEX, Batch, CalibData
from lmmc.errors import LmmcError

# Temperature of the two-view loss (ours; SimCSE's value).
TWO_VIEW_TEMPERATURE = 0.05


def _concat(batches: list[Batch]) -> Batch:
    """All samples of `batches` in one batch; token tensors padded on the right to the longest."""
    out: Batch = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if parts[0].dim() == 2:
            width = max(p.shape[1] for p in parts)
            fill = IGNORE_INDEX if key == "labels" else 0  # padding is never a next-token target
            parts = [F.pad(p, (0, width - p.shape[1]), value=fill) for p in parts]
        out[key] = torch.cat(parts)
    return out


def _trim(batch: Batch) -> Batch:
    """Drop token columns that are padding in every row, so re-batched text costs no extra compute."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}


def objective_batches(calib: CalibData, adapter: Adapter, samples: int, batch_size: int) -> list[dict[str, Batch]]:
    """The first `samples` calibration samples in batches of `batch_size`; each step holds one batch per
    modality, with the same samples in the same order (image-text pairs stay paired). A last batch of
    one sample is dropped: a contrastive loss needs another sample to contrast with (a next-token loss
    does not, so generative models keep it)."""
    pooled: dict[str, Batch] = {}
    for modality in dict.fromkeys(t.modality for t in adapter.towers):
        batches = calib.calib_batches(modality)
        if not batches:
            raise LmmcError(f"the allocation needs {modality} calibration samples; give calibration data "
                            f"with {modality} for this {adapter.family} model")
        pooled[modality] = _concat(batches)
    n = min(samples, *(len(next(iter(b.values()))) for b in pooled.values()))
    least = 1 if adapter.kind == "generative" else 2
    starts = [i for i in range(0, n, batch_size) if min(batch_size, n - i) >= least]
    if not starts:
        raise LmmcError(f"the allocation's contrastive loss needs at least 2 calibration samples, got {n}; "
                        f"give more calibration data or raise 'samples'")
    return [{m: _trim({k: v[i:min(i + batch_size, n)] for k, v in b.items()}) for m, b in pooled.items()}
            for i in starts]


def step_samples(step: dict[str, Batch]) -> int:
    """How many samples one step of `objective_batches` holds."""
    return len(next(iter(next(iter(step.values())).values())))


def _halves(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention masks of the first and the second half of each text's real tokens, each position kept
    where it was (absolute position embeddings see the same positions as in the whole text)."""
    position = mask.cumsum(1)
    length = mask.sum(1, keepdim=True)
    first = (mask.bool() & (position <= (length + 1) // 2)).long()
    return first, mask * (1 - first)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, symmetric: bool = True) -> torch.Tensor:
    """InfoNCE between matching rows of two L2-normalised embedding matrices, in-batch negatives: each
    row of `a` must pick its own row of `b` and, when `symmetric`, each row of `b` its own row of `a`."""
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    if not symmetric:
        return F.cross_entropy(logits, target)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Objective:
    """The loss of one calibration step, seen from one tower: that tower's embeddings (`embed`, which
    a perturbed weight moves) against fixed targets from the unperturbed model (`targets`, computed
    once per step). A perturbation therefore re-runs only the part of the model it can change.

    Dual encoders (task metric "zero_shot"): the contrastive loss between a tower's embeddings and the
    other tower's, on image-text pairs: CLIP's symmetric cross-entropy with the model's logit scale,
    or SigLIP's sigmoid loss with its scale and bias.

    Encoders with no task head (ours): InfoNCE between two views of each sample, in-batch negatives.
    Text: the first half of each text's tokens (from [CLS] on, a natural prefix) is embedded by the
    model under test; its target is the unperturbed model's embedding of the second half. Images: the
    image against the unperturbed embedding of its mirror image. The loss must not be minimal at the
    current weights; a distance between perturbed and unperturbed outputs is, so its gradient there is
    zero and finite differences of it measure only noise, whereas telling which second half belongs to
    which first half is a task the encoder does imperfectly. Fixed targets follow the dual-encoder case
    (there the other tower is the fixed side); on MiniLM they also gave clearly better allocations than
    letting both views move (benchmarks/results/allocation.md)."""

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        self.model = model
        self.adapter = adapter
        self.paired = adapter.task_metric == "zero_shot"
        if self.paired and {t.name for t in adapter.towers} != {"text", "vision"}:
            raise LmmcError(f"the contrastive loss of a dual encoder needs a text and a vision tower; "
                            f"{adapter.family} has {[t.name for t in adapter.towers]}")

    def inputs(self, tower: TowerSpec, step: dict[str, Batch], device: torch.device) -> Batch:
        return {k: v.to(device) for k, v in step[tower.modality].items()}

    def scored_by(self, group: str) -> TowerSpec:
        """The tower through whose loss a change of `group`'s (a tower's or a bridge's) weights is measured."""
        return self.adapter.tower(group)

    def embed(self, tower: TowerSpec, batch: Batch) -> torch.Tensor:
        """The pooled, normalised embeddings of `tower` that a change of its weights moves."""
        runner = TowerModule(self.model, tower)
        if self.paired:
            return runner(*[batch[n] for n in runner.names])[1]
        if tower.modality == "text":
            first, _ = _halves(batch["attention_mask"])
            width = int(first.any(0).nonzero().max()) + 1
            return runner(batch["input_ids"][:, :width], first[:, :width])[1]
        return runner(batch["pixel_values"])[1]

    @torch.no_grad()
    def targets(self, step: dict[str, Batch], device: torch.device) -> dict[str, torch.Tensor]:
        """Tower name -> the fixed side of its loss, from the current (unperturbed) weights."""
        out = {}
        for tower in self.adapter.towers:
            batch = self.inputs(tower, step, device)
            runner = TowerModule(self.model, tower)
            if self.paired:
                out[tower.name] = runner(*[batch[n] for n in runner.names])[1]
            elif tower.modality == "text":
                out[tower.name] = runner(batch["input_ids"], _halves(batch["attention_mask"])[1])[1]
            else:
                out[tower.name] = runner(batch["pixel_values"].flip(-1))[1]
        return out

    def loss(self, tower: str, embedding: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of `tower`'s embeddings against the fixed targets."""
        if not self.paired:
            return info_nce(embedding, targets[tower], TWO_VIEW_TEMPERATURE)
        if tower == "text":
            text, image = embedding, targets["vision"]
        else:
            text, image = targets["text"], embedding
        logits = image @ text.T * self.model.logit_scale.exp()
        if self.adapter.family == "siglip":
            logits = logits + self.model.logit_bias
            signs = 2 * torch.eye(len(logits), device=logits.device) - 1
            return -F.logsigmoid(signs * logits).sum() / len(logits)
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def __call__(self, step: dict[str, Batch], device: torch.device) -> torch.Tensor:
        """The loss of every tower on one step, summed; its gradient reaches each tower's weights
        through that tower's own embeddings only."""
        targets = self.targets(step, device)
        return sum(self.loss(t.name, self.embed(t, self.inputs(t, step, device)), targets)
                   for t in self.adapter.towers)


class NextTokenObjective(Objective):
    """Generative models (task metric "generation"): the teacher-forced next-token cross-entropy of the
    calibration answers (labels; prompt, image and padding positions are -100), through the whole model.
    A weight of any tower or bridge moves it through the decoder's logits, so every group is scored by
    the language tower; there is one loss per step, not one per tower. As the contrastive losses above,
    it is not minimal at the current weights, so finite differences of it measure the weights' effect."""

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        self.model = model
        self.adapter = adapter
        self.decoder = next(t for t in adapter.towers if t.modality == "text")

    def scored_by(self, group: str) -> TowerSpec:
        return self.decoder

    def embed(self, tower: TowerSpec, batch: Batch) -> torch.Tensor:
        """The next-token logits [batch, tokens, vocabulary]."""
        return self.decoder.embed(self.model, batch)[1]

    @torch.no_grad()
    def targets(self, step: dict[str, Batch], device: torch.device) -> dict[str, torch.Tensor]:
        return {"labels": step[self.decoder.modality]["labels"].to(device)}

    def loss(self, tower: str, embedding: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        # The logits at position t predict the token at t + 1.
        logits, labels = embedding[:, :-1], targets["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def __call__(self, step: dict[str, Batch], device: torch.device) -> torch.Tensor:
        batch = self.inputs(self.decoder, step, device)
        return self.loss(self.decoder.name, self.embed(self.decoder, batch), self.targets(step, device))


def make_objective(model: nn.Module, adapter: Adapter) -> Objective:
    """The allocation loss of the adapter's kind of model."""
    return NextTokenObjective(model, adapter) if adapter.kind == "generative" else Objective(model, adapter)
