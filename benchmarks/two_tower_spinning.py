"""The two towers of a CLIP-size dual encoder run in turns in one process, as a search service embeds a query
text and then an image, with ONNX Runtime's idle worker threads spinning for work after each run or not: each
tower timed alone (runs back to back) and in turns with the other, both settings in one process, in turns."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from lmmc.adapters import example_inputs, get_adapter, input_names
from lmmc.export.onnx import export_tower
from lmmc.runtime import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each tower, per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both settings, taken in turns")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # ViT-B/32 and its text tower, untrained
    adapter = get_adapter("clip")
    towers = {t.name: t for t in adapter.towers}
    feeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tower in towers.items():
            export_tower(model, tower, Path(tmp) / f"{name}.onnx")
            inputs = example_inputs(model, tower, batch=args.batch, seq=args.seq)
            feeds[name] = {n: t.numpy() for n, t in zip(input_names(tower), inputs)}
        sessions = {spinning: {name: load(Path(tmp) / f"{name}.onnx", "onnxruntime", args.threads, spinning=spinning)
                               for name in towers} for spinning in (True, False)}
        ms: dict[tuple[bool, str, str], list[float]] = {}
        for _ in range(args.rounds):
            for spinning, models in sessions.items():
                time.sleep(0.5)  # the other setting's threads stop spinning
                for name, m in models.items():  # warm-up
                    m.run(feeds[name])
                for name, m in models.items():
                    for _ in range(args.runs):
                        start = time.perf_counter()
                        m.run(feeds[name])
                        ms.setdefault((spinning, name, "alone"), []).append((time.perf_counter() - start) * 1e3)
                for _ in range(args.runs):
                    for name, m in models.items():
                        start = time.perf_counter()
                        m.run(feeds[name])
                        ms.setdefault((spinning, name, "in turns"), []).append((time.perf_counter() - start) * 1e3)
    print(f"CLIP ViT-B/32 size, untrained; ONNX Runtime fp32, {args.threads} threads; text {args.batch} x {args.seq}, "
          f"images {args.batch} x 3 x 224 x 224; {args.rounds * args.runs} timed runs a cell; median ms (p90)")
    print("| idle threads | text alone | image alone | text in turns | image in turns |")
    print("|---|---:|---:|---:|---:|")
    for spinning in (True, False):
        cells = [f"{statistics.median(v):.1f} ({np.percentile(v, 90):.1f})"
                 for v in (ms[(spinning, n, how)] for how in ("alone", "in turns") for n in towers)]
        print(f"| {'spinning (ONNX Runtime default)' if spinning else 'not spinning'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
