"""Distillation losses (layerwise hidden states, pooled outputs, dual-encoder similarity matrices,
generative models' next-token distributions on answer tokens) and the teacher-student layer mapping, as
per-sample functions so any batch split sums to the same objective; the similarity-matrix loss's samples
are compared with the others of their micro-batch, which the distiller gathers over torchrun's ranks."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from lmmc.data import IGNORE_INDEX
from lmmc.errors import LmmcError

OutputLoss = Literal["cosine", "mse"]
ContrastiveLoss = Literal["kl", "mse", "sigmoid"]


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Student layer i (1-based) learns teacher layer round(i · L_t / L_s), halves rounded up.

    The last student layer always meets the last teacher layer, whose output is what users consume;
    with equal depths this is the identity. A student made shallower by removing blocks therefore
    learns to cover the teacher's depth at a proportionally faster pace."""
    return [min(n_teacher, max(1, math.floor(i * n_teacher / n_student + 0.5))) for i in range(1, n_student + 1)]


def origin_layer_map(origin: list[int], n_teacher: int) -> list[int]:
    """Student block i learns the teacher layer it was cut from (`origin`: 0-based teacher block per
    student block, as recorded by depth pruning); the last student block learns the teacher's last
    layer, whose output is what users consume. Blocks removed from the middle leave a gap that the next
    kept block closes, instead of shifting every later block's target as the uniform rule would."""
    for o in origin:
        if not 0 <= o < n_teacher:
            raise LmmcError(f"the student records teacher block {o} as the origin of one of its blocks, but the "
                            f"teacher has blocks 0..{n_teacher - 1}; the student was not cut from this teacher")
    return [o + 1 for o in origin[:-1]] + [n_teacher]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two token matrices [N, d1] and [N, d2]: 1 for representations
    equal up to rotation and scale. It compares layers of different widths without a fitted projection."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (x.T @ y).pow(2).sum()
    return float(cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()).clamp(min=1e-30))


def closest_layer_map(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[int]:
    """Each student layer learns the teacher layer most similar to it now (linear CKA over the same
    tokens); the last student layer keeps the last teacher layer, as in the uniform rule."""
    out = [1 + max(range(len(teacher)), key=lambda j: linear_cka(s, teacher[j])) for s in student[:-1]]
    return [*out, len(teacher)]


def check_layer_map(mapping: list[int], n_student: int, n_teacher: int, tower: str) -> list[int]:
    """An explicit mapping must name one teacher layer in 1..L_t per student layer."""
    if len(mapping) != n_student:
        raise LmmcError(f"layer_map for the {tower} tower has {len(mapping)} entries, but the student has "
                        f"{n_student} layers; give one teacher layer (1..{n_teacher}) per student layer")
    check_layer_range(mapping, n_teacher, tower)
    return list(mapping)


def check_layer_range(mapping: list[int], n_teacher: int, tower: str) -> None:
    """Every teacher layer a mapping names lies in 1..L_t (the part of check_layer_map a recipe's dry run
    can check before an earlier pass sets the student's depth)."""
    for i, j in enumerate(mapping, 1):
        if not 1 <= j <= n_teacher:
            raise LmmcError(f"layer_map for the {tower} tower maps student layer {i} to teacher layer {j}, "
                            f"which is out of range; the teacher's {tower} tower has layers 1..{n_teacher}")


def fit_projection(student: torch.Tensor, teacher: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Least-squares map [d_t, d_s] taking student features to teacher features (ridge-regularised),
    the starting point of the trainable projection used when widths differ. A random start would make
    the first steps chase the projection instead of the student."""
    s, t = student.double(), teacher.double()
    gram = s.T @ s
    gram += ridge * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, s.T @ t).T.float()


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """Per-sample MSE between hidden states [B, T, d] over real tokens, divided by the teacher layer's
    mean square `scale` so deep layers with large activations do not drown the shallow ones."""
    err = (student.float() - teacher.float()).pow(2).mean(-1)
    if token_mask is None:
        per_sample = err.mean(1)
    else:
        m = token_mask.to(err.dtype)
        per_sample = (err * m).sum(1) / m.sum(1).clamp(min=1)
    return per_sample / scale


def relation_scores(x: torch.Tensor, heads: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """The scaled dot products [B, R, T, T] of token vectors [B, T, d] cut into `heads` relation heads of
    d / R channels each; padding keys get a large negative score (weight 0). The head count is the loss's
    own, not the model's: a student with fewer attention heads than the teacher gives relations of the
    same shape."""
    b, t, d = x.shape
    if d % heads:
        raise LmmcError(f"distill: relation_heads = {heads} does not divide a block's {d} query, key or value "
                        f"channels; choose a relation_heads that divides the attention head width")
    x = x.float().view(b, t, heads, d // heads).transpose(1, 2).reshape(b * heads, t, d // heads)
    bias = torch.zeros(b, 1, t, device=x.device)
    if key_mask is not None:
        # finite, so a masked key's term is 0 · finite rather than 0 · (-inf + inf)
        bias = bias.masked_fill(~key_mask.bool()[:, None, :], -1e4)
    # Each elementwise pass over the [B, R, T, T] scores costs about what the product does (memory, not
    # arithmetic), so the scale and the mask ride in the product.
    scores = torch.baddbmm(bias.repeat_interleave(heads, 0), x, x.transpose(1, 2), alpha=1 / math.sqrt(d // heads))
    return scores.view(b, heads, t, t)


def relation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], heads: int,
                  token_mask: torch.Tensor | None) -> torch.Tensor:
    """MiniLMv2's self-attention relation distillation, per sample: KL(teacher ‖ student) between the
    query-query, key-key and value-value relations (softmax of the scaled dot products) of one block,
    averaged over the three, the relation heads and the real query tokens. It transfers how tokens attend
    to each other, whatever either model's width or head count."""
    total: torch.Tensor | float = 0.0
    for role in ("q", "k", "v"):
        with torch.no_grad():
            t = relation_scores(teacher[role], heads, token_mask)
            p = t.softmax(-1)
            own = (p * t.log_softmax(-1)).sum(-1)  # the teacher's negative entropy: the KL's part without a gradient
        s = relation_scores(student[role], heads, token_mask)
        n = s.shape[-1]
        cross = F.cross_entropy(s.reshape(-1, n), p.reshape(-1, n), reduction="none").view(s.shape[:-1])
        kl = (own + cross).mean(1)  # [B, T]
        if token_mask is None:
            total = total + kl.mean(1)
        else:
            m = token_mask.to(kl.dtype)
            total = total + (kl * m).sum(1) / m.sum(1).clamp(min=1)
    return total / 3


def output_loss(student: torch.Tensor, teacher: torch.Tensor, kind: OutputLoss, scale: float = 1.0) -> torch.Tensor:
    """Per-sample distance between pooled embeddings [B, d]: 1 − cosine, or MSE divided by `scale`."""
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return (student.float() - teacher.float()).pow(2).mean(-1) / scale


def kl_logits(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row KL(teacher ‖ student) of the softmax over the last axis of the logits."""
    t = F.log_softmax(teacher.float(), dim=-1)
    s = F.log_softmax(student.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def answer_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """Per-sample token-level distillation of a generative model: the mean over the sample's answer tokens
    of KL(teacher ‖ student) between the next-token distributions softened by `temperature`, times
    temperature² so the gradient keeps its size whatever the temperature (Hinton et al.). Logits [B, T, V];
    the logits at t predict the token at t + 1, an answer token where labels[t + 1] is not -100."""
    mask = (labels[:, 1:] != IGNORE_INDEX).to(torch.float32)
    kl = kl_logits(student[:, :-1] / temperature, teacher[:, :-1] / temperature)
    return temperature ** 2 * (kl * mask).sum(1) / mask.sum(1).clamp(min=1)


def similarity_loss(s_a: torch.Tensor, s_b_all: torch.Tensor, t_a: torch.Tensor, t_b_all: torch.Tensor,
                    kind: ContrastiveLoss, logit_scale: float, logit_bias: float = 0.0) -> torch.Tensor:
    """Per-row loss of this side's rows of the similarity matrix: embeddings `s_a`/`t_a` [b, d] of this
    shard's samples against every sample's embeddings of the other tower [B, d].

    "kl" matches the teacher's softmax over each row of logit_scale · cos (CLIP's retrieval
    distribution); "sigmoid" matches each pair's match probability σ(logit_scale · cos + logit_bias), the
    sum over the row of KL between the two Bernoullis (SigLIP's pairwise objective, which a softmax cannot
    see: it ignores a shift of the whole row); "mse" matches the raw cosine similarities."""
    s = F.normalize(s_a.float(), dim=-1) @ F.normalize(s_b_all.float(), dim=-1).T
    t = F.normalize(t_a.float(), dim=-1) @ F.normalize(t_b_all.float(), dim=-1).T
    if kind == "kl":
        return kl_logits(logit_scale * s, logit_scale * t)
    if kind == "sigmoid":
        s_logit, t_logit = logit_scale * s + logit_bias, logit_scale * t + logit_bias
        p = torch.sigmoid(t_logit)
        # cross-entropy to the teacher's probabilities less their own entropy: zero where the two agree
        return (F.binary_cross_entropy_with_logits(s_logit, p, reduction="none")
                - F.binary_cross_entropy_with_logits(t_logit, p, reduction="none")).sum(-1)
    return (s - t).pow(2).mean(-1)


def contrastive_loss(s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor,
                     s_img_all: torch.Tensor, s_txt_all: torch.Tensor, t_img_all: torch.Tensor,
                     t_txt_all: torch.Tensor, kind: ContrastiveLoss, logit_scale: float,
                     logit_bias: float = 0.0) -> torch.Tensor:
    """Per-pair contrastive distillation: the mean of the pair's image->text row and text->image row of
    the student's similarity matrix against the teacher's. `*_all` hold every pair of the global batch
    (gathered across ranks), the others this shard's pairs."""
    i2t = similarity_loss(s_img, s_txt_all, t_img, t_txt_all, kind, logit_scale, logit_bias)
    t2i = similarity_loss(s_txt, s_img_all, t_txt, t_img_all, kind, logit_scale, logit_bias)
    return 0.5 * (i2t + t2i)
