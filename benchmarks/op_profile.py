"""Where an OpenVINO IR's milliseconds go: time per kind of operation (OpenVINO's PERF_COUNT), for a compile's
student IRs beside the teacher's fp32 and NNCF INT8 IRs built the way `lmmc bench` builds them.

    python benchmarks/op_profile.py out-deploy [--runs 30] [--threads 2] [--batch 8] [--seq 128] [--static]

One table per IR: milliseconds per run (summed over the operations of each kind), how many operations of
that kind run, and the share; then the same in three groups: matrix products (FullyConnected), attention
(the fused subgraph of scores, softmax and weighted sum a block) and the rest, memory-bound work such as
residual adds, LayerNorm, transposes and reorders, alone or fused into element-wise subgraphs."""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmmc.adapters import example_inputs, input_names
from lmmc.bench import BenchConfig, _numpy, _recipe_calibration, load_data, read_output
from lmmc.export.openvino import quantize_openvino, torch_to_openvino
from lmmc.modelio import load_teacher
from lmmc.runtime.openvino import cpu_has_bf16, make_static


def profile(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int, static: bool) -> tuple[float, dict]:
    """Median wall milliseconds of a run, and kind -> (ms per run, operations per run)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if static:
        batch, seq = next(iter(feed.values())).shape[:2]
        make_static(model, (batch, seq), path)
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads),
              "INFERENCE_PRECISION_HINT": "bf16" if cpu_has_bf16() else "f32", "PERF_COUNT": "YES"}
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    # A fused subgraph is attention when it holds a softmax; with static shapes the plugin also fuses
    # element-wise chains (residual adds, LayerNorm's scale and shift) into subgraphs of their own.
    attention = {op.get_friendly_name() for op in compiled.get_runtime_model().get_ordered_ops()
                 if op.get_rt_info()["layerType"].astype(str) == "Subgraph"
                 and "Softmax" in op.get_rt_info()["originalLayersNames"].astype(str)}
    for _ in range(5):
        request.infer(feed)
    walls, ms, count = [], collections.Counter(), collections.Counter()
    for _ in range(runs):
        start = time.perf_counter()
        request.infer(feed)
        walls.append((time.perf_counter() - start) * 1e3)
        for op in request.profiling_info:
            if op.status == op.Status.EXECUTED:
                kind = f"{'attention ' if op.node_name in attention else ''}{op.node_type} ({op.exec_type})"
                ms[kind] += op.real_time.total_seconds() * 1e3 / runs
                count[kind] += 1
    return float(np.median(walls)), {k: (v, count[k] // runs) for k, v in ms.items()}


def group(kind: str) -> str:
    if kind.startswith("FullyConnected"):
        return "matrix products"
    if kind.startswith("attention"):
        return "attention"
    return "memory-bound and small ops"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--static", action="store_true", help="compile each IR for the one input shape")
    args = parser.parse_args()
    report = read_output(args.out_dir)
    teacher, adapter, preprocessor = load_teacher(report["model"])
    tower = adapter.tower("text")
    feed = {n: t.numpy() for n, t in zip(input_names(tower), example_inputs(teacher, tower, args.batch, args.seq))}
    calib = load_data(_recipe_calibration(report, BenchConfig(), args.out_dir / "report.json"), teacher, adapter, preprocessor)
    with tempfile.TemporaryDirectory() as tmp:
        irs = {"teacher fp32": Path(tmp) / "teacher.xml", "teacher NNCF INT8": Path(tmp) / "teacher.int8.xml"}
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
            torch_to_openvino(teacher, tower, irs["teacher fp32"])
            quantize_openvino(irs["teacher fp32"], irs["teacher NNCF INT8"], _numpy(calib.calib_batches("text")))
        irs |= {f"student {p.name}": p for p in sorted((args.out_dir / "openvino").glob("text*.xml"))}
        inference = "bf16" if cpu_has_bf16() else "f32"
        print(f"threads {args.threads}, batch {args.batch} x {args.seq}, {inference} inference"
              f"{', static shape' if args.static else ''}, {args.runs} runs each; ms per run")
        for name, path in irs.items():
            wall, kinds = profile(path, feed, args.threads, args.runs, args.static)
            total = sum(v for v, _ in kinds.values())
            print(f"\n{name}: {wall:.2f} ms a run (median), {total:.2f} ms in operations")
            print("| operation (kernel) | ms | count | share |\n|---|---:|---:|---:|")
            for kind, (v, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
                if v >= 0.01:
                    print(f"| {kind} | {v:.3f} | {n} | {v / total:.1%} |")
            groups = collections.Counter()
            for kind, (v, _) in kinds.items():
                groups[group(kind)] += v
            print("groups: " + "; ".join(f"{g} {v:.2f} ms ({v / total:.0%})" for g, v in groups.most_common()))


if __name__ == "__main__":
    main()
