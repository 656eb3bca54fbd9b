"""Greedy generation of a compile's generative export with the vision session's threads spinning or not: each
setting in its own fresh process, in turns, so no other session's threads share the cores."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np


def _child(out_dir: str, spinning: bool, threads: int, tokens: int, runs: int) -> None:
    from pathlib import Path

    from lmmc.runtime import load
    from lmmc.runtime.generate import Generator

    folder = Path(out_dir) / "onnx"
    generator = Generator(folder, threads)
    if spinning:  # as the generator opened it before: ONNX Runtime's default
        generator.vision = load(folder / generator.spec["vision"], "onnxruntime", threads)
    spec = generator.spec
    shape = generator.vision.inputs[0].shape
    dims = [1, *(d if isinstance(d, int) else 1 for d in shape[1:])]
    pixels = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    ids = np.array([[1] * 3 + [spec["image_token_index"]] * spec["image_tokens_per_image"] + [5] * 7])
    result = {}
    for n in (1, tokens):
        ms = []
        for _ in range(runs + runs // 10):  # the first tenth warms up
            start = time.perf_counter()
            generator.generate_ids(pixels, ids, max_new_tokens=n, eos_token_id=[])
            ms.append((time.perf_counter() - start) * 1e3)
        ms = ms[runs // 10:]
        result[n] = (statistics.median(ms), float(np.percentile(ms, 90)))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="an lmmc compile output with a generative export (onnx/generative.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=300, help="timed runs per length and process")
    parser.add_argument("--turns", type=int, default=3, help="processes per setting, in turns")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.out_dir, args.child == "on", args.threads, args.tokens, args.runs)
        return
    print(f"vision spinning  turn  first token p50 / p90 ms  {args.tokens} tokens p50 / p90 ms")
    for turn in range(args.turns):
        for setting in ("on", "off"):
            done = subprocess.run([sys.executable, __file__, args.out_dir, "--child", setting, "--threads",
                                   str(args.threads), "--tokens", str(args.tokens), "--runs", str(args.runs)],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            first, whole = result["1"], result[str(args.tokens)]
            print(f"{setting:<15}  {turn + 1:>4}  {first[0]:>10.2f} / {first[1]:<10.2f}  "
                  f"{whole[0]:>9.2f} / {whole[1]:.2f}")


if __name__ == "__main__":
    main()
