"""OpenVINO IRs converted from PyTorch against IRs converted from the ONNX export, for the teacher and a
compile's student, each in fp32 and NNCF INT8 and each run with f32 and bf16 inference, timed interleaved
in one process; prints one table with medians and each row's ratio to the fastest teacher deployment.

    python benchmarks/openvino_frontend.py OUT_DIR [--threads 2] [--batch 8] [--seq 128] [--repeats 20]

Run it from where the compile ran (its calibration file is read through the recipe); the IRs go to a
temporary directory."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

import lmmc
import lmmc.runtime
from lmmc import bench as B
from lmmc.adapters import example_inputs, input_names
from lmmc.export.onnx import export_tower
from lmmc.export.openvino import quantize_openvino, to_openvino, torch_to_openvino
from lmmc.modelio import load_teacher
from lmmc.runtime.openvino import cpu_has_bf16
from lmmc.timing import time_interleaved


def build(model, tower, folder: Path, name: str, feeds) -> dict[str, Path]:
    """fp32 and INT8 IRs of one model by both frontends."""
    onnx_path = folder / f"{name}.onnx"
    export_tower(model, tower, onnx_path)
    irs = {"onnx": to_openvino(onnx_path, folder / f"{name}-onnx.xml"),
           "pytorch": torch_to_openvino(model, tower, folder / f"{name}-pytorch.xml")}
    out = {}
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
        for frontend, xml in irs.items():
            out[f"{frontend} fp32"] = xml
            out[f"{frontend} int8"] = quantize_openvino(xml, folder / f"{name}-{frontend}.int8.xml", feeds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    report = json.loads((args.out_dir / "report.json").read_text())
    teacher, adapter, preprocessor = load_teacher(report["model"])
    student = lmmc.load_student(args.out_dir / "student")
    tower = adapter.towers[0]
    data = B.load_data(B._recipe_calibration(report, B.BenchConfig(), args.out_dir / "report.json"), teacher, adapter, preprocessor)
    feeds = B._numpy(data.calib_batches(tower.modality))
    inputs = example_inputs(teacher, tower, batch=args.batch, seq=args.seq)
    feed = {n: t.numpy() for n, t in zip(input_names(tower), inputs)}
    hints = ["f32", "bf16"] if cpu_has_bf16() else ["f32"]
    with tempfile.TemporaryDirectory(prefix="lmmc-ovfe-") as tmp:
        models = {}
        for name, model in [("teacher", teacher), ("student", student)]:
            for key, xml in build(model, tower, Path(tmp), name, feeds).items():
                for hint in hints:
                    models[(name, key, hint)] = lmmc.runtime.load(xml, threads=args.threads, inference_precision=hint)
        times = time_interleaved({k: functools.partial(m.run, feed) for k, m in models.items()}, args.repeats)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    best_teacher = min(v for k, v in p50.items() if k[0] == "teacher")
    print(f"threads {args.threads}, batch {args.batch} x {args.seq} tokens, {args.repeats} runs each, in turns "
          f"(lmmc.timing); ratio: to the fastest teacher row")
    print("| model | converted from | weights | inference | p50 ms | p90 ms | ratio |\n|---|---|---|---|---:|---:|---:|")
    for (name, key, hint), v in p50.items():
        frontend, weights = key.split()
        print(f"| {name} | {'PyTorch' if frontend == 'pytorch' else 'ONNX'} | {weights} | {hint} | {v:.2f} | "
              f"{np.percentile(times[(name, key, hint)], 90):.2f} | {v / best_teacher:.3f} |")


if __name__ == "__main__":
    main()
