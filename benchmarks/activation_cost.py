"""What the FFN activation costs in OpenVINO INT8: a compile's student with each activation swapped in, timed in turns.

    python benchmarks/activation_cost.py out-deploy [--acts gelu,gelu_pytorch_tanh,quick_gelu,silu,relu]
                                         [--rounds 60] [--threads 2] [--batch 8] [--seq 128]

The BERT-family student of OUT/student gets each activation in every FFN (weights unchanged, so only speed is
measured, not fidelity), is converted from PyTorch and quantised by NNCF on the compile's calibration
split as the `openvino` pass does, compiled for the one input shape in bf16 inference where the CPU has
it, and timed in turns with the others. Per activation: the median wall time of a run and the median
time of the FFN's first matrix product, into which the plugin fuses the activation (OpenVINO's
PERF_COUNT)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers.activations import ACT2FN

import lmmc
from lmmc.adapters import example_inputs, input_names
from lmmc.bench import BenchConfig, _numpy, _recipe_calibration, load_data, read_output
from lmmc.export.openvino import quantize_openvino, torch_to_openvino
from lmmc.modelio import load_teacher
from lmmc.runtime.openvino import cpu_has_bf16, make_static
from lmmc.passes.activation import activation_sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--acts", default="gelu,gelu_pytorch_tanh,quick_gelu,silu,relu")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    if args.rounds <= 5:
        parser.error("--rounds must be above 5: the first 5 rounds are warm-up, not timed")
    import openvino as ov

    report = read_output(args.out_dir)
    teacher, adapter, preprocessor = load_teacher(report["model"])
    tower = adapter.tower("text")
    student = lmmc.load_student(args.out_dir / "student")
    feeds = _numpy(load_data(_recipe_calibration(report, BenchConfig(), args.out_dir / "report.json"), teacher, adapter, preprocessor)
                   .calib_batches("text"))
    feed = {n: t.numpy() for n, t in zip(input_names(tower), example_inputs(teacher, tower, args.batch, args.seq))}
    core, requests = ov.Core(), {}
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(args.threads),
              "INFERENCE_PRECISION_HINT": "bf16" if cpu_has_bf16() else "f32", "PERF_COUNT": "YES"}
    with tempfile.TemporaryDirectory() as tmp:
        for act in args.acts.split(","):
            model = copy.deepcopy(student)
            for module, attr in activation_sites(model):
                setattr(module, attr, ACT2FN[act])
            fp32, int8 = Path(tmp) / f"{act}.xml", Path(tmp) / f"{act}.int8.xml"
            with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
                torch_to_openvino(model, tower, fp32)
                quantize_openvino(fp32, int8, feeds)
            ir = core.read_model(str(int8))
            make_static(ir, (args.batch, args.seq), int8)
            requests[act] = core.compile_model(ir, "CPU", config).create_infer_request()
        walls, ffn = {a: [] for a in requests}, {a: [] for a in requests}
        for r in range(args.rounds):
            for act, request in requests.items():
                request.infer(feed)  # untimed: the previous model's worker threads settle
                start = time.perf_counter()
                request.infer(feed)
                if r < 5:
                    continue
                walls[act].append((time.perf_counter() - start) * 1e3)
                ffn[act].append(sum(op.real_time.total_seconds() * 1e3 for op in request.profiling_info
                                    if op.status == op.Status.EXECUTED and "intermediate.dense" in op.node_name))
    base = statistics.median(walls[next(iter(walls))])
    print(f"threads {args.threads}, batch {args.batch} x {args.seq}, OpenVINO NNCF INT8, static shape, "
          f"{args.rounds - 5} rounds in turns; medians")
    print("| activation | ms a run | vs first | FFN first products, ms |\n|---|---:|---:|---:|")
    for act in requests:
        wall = statistics.median(walls[act])
        print(f"| {act} | {wall:.2f} | {wall / base:.2f} | {statistics.median(ffn[act]):.2f} |")


if __name__ == "__main__":
    main()
