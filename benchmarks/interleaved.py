"""Time several exported text-tower artifacts (.onnx in ONNX Runtime, .xml in OpenVINO) against each other,
timed in turns in one process (`lmmc.timing`), so machine load hits all alike; medians reported.

    python benchmarks/interleaved.py hidden/onnx/text.onnx base/onnx/text.onnx hidden/openvino/text.xml ...

`lmmc bench` compares one compile's artifacts with the teacher; this compares students of different
compiles directly."""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import numpy as np

import lmmc.runtime
from lmmc.timing import time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 30000, (args.batch, args.seq), dtype=np.int64),
            "attention_mask": np.ones((args.batch, args.seq), dtype=np.int64)}
    models = {str(p): lmmc.runtime.load(p, threads=args.threads) for p in args.artifacts}
    times = time_interleaved({k: functools.partial(m.run, feed) for k, m in models.items()}, args.repeats)
    print(f"threads {args.threads}, batch {args.batch} x {args.seq} tokens, {args.repeats} runs each, in turns")
    print("| artifact | p50 ms | p90 ms |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.1f} | {np.percentile(t, 90):.1f} |")


if __name__ == "__main__":
    main()
