"""What NNCF's INT8 costs a compiled text student on texts of one to four words, and which quantisation
settings buy it back at what latency: the student's fp32 IR quantised as the `openvino` pass does it (NNCF's
transformer preset on the compile's calibration batches and their short openings), then with smooth quant
off, with min-max activation ranges, and with the FFN's second matrix of one block, or of every block, left
unquantised (NNCF's ignored scope).

    .venv/bin/python benchmarks/int8_short_texts.py OUT_DIR [--rounds 30]

Cosines are each variant's pooled embedding to the fp32 IR's (f32 inference), on the held-out texts and on
their opening words (`data.short_texts`, as validation measures them); latency is one batch of 8 x 128 on
2 threads, static shape, bf16 inference where the CPU has it, the variants timed in turns.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from lmmc import bench as B
from lmmc.export.validate import cosine
from lmmc.modelio import load_teacher
from lmmc.runtime.openvino import cpu_has_bf16
from lmmc.timing import time_interleaved

BATCH, SEQ = 8, 128


def second_ffn_matrices(model) -> list[str]:
    """The MatMul nodes that read an FFN's activation: each block's second FFN matrix."""
    return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
            and op.input_value(0).get_node().get_type_name() in ("Gelu", "Relu", "Swish")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a compile's output with openvino/text.xml")
    ap.add_argument("--rounds", type=int, default=30, help="timed runs per variant")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters as Params
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    report = B.read_output(args.out)
    calib = B._recipe_calibration(report, B.BenchConfig(), args.out / "report.json")
    teacher, adapter, preprocessor = load_teacher(report["model"])
    data = B.load_data(calib, teacher, adapter, preprocessor)
    names = ("input_ids", "attention_mask")
    feeds = [{n: b[n].numpy() for n in names} for b in data.calib_batches("text") + data.short]
    sets = {"held-out": [{n: b[n].numpy() for n in names} for b in data.eval_batches("text")],
            "short": [{n: b[n].numpy() for n in names} for b in data.eval_short]}
    xml = str(args.out / "openvino" / "text.xml")
    core = ov.Core()
    fp32 = core.read_model(xml)
    pooled = next(o.get_any_name() for o in fp32.outputs if "pooled" in o.get_any_name())
    ffn2 = second_ffn_matrices(fp32)
    precision = "bf16" if cpu_has_bf16() else "f32"

    def run(model, batches, hint: str) -> np.ndarray:
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                     "INFERENCE_NUM_THREADS": str(args.threads)})
        return np.concatenate([compiled(f)[pooled] for f in batches])

    reference = {k: run(fp32, v, "f32") for k, v in sets.items()}
    variants = {"transformer preset (the openvino pass)": {},
                "smooth quant off": {"advanced_parameters": Params(
                    smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))},
                "min-max activation ranges": {"advanced_parameters": Params(
                    activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)},
                **{f"block {i}'s second FFN matrix unquantised": {"ignored_scope": nncf.IgnoredScope(names=[n])}
                   for i, n in enumerate(ffn2)},
                "every second FFN matrix unquantised": {"ignored_scope": nncf.IgnoredScope(names=ffn2)}}
    rows, timed = {}, {}
    feed = {"input_ids": np.full((BATCH, SEQ), 1000, np.int64), "attention_mask": np.ones((BATCH, SEQ), np.int64)}
    for name, kwargs in variants.items():
        model = nncf.quantize(core.read_model(xml), nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(feeds), **kwargs)
        cos = {k: cosine(run(model, v, precision), reference[k]) for k, v in sets.items()}
        rows[name] = (cos["held-out"].mean(), cos["short"].mean(), cos["short"].min())
        model.reshape({n: [BATCH, SEQ] for n in names})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                     "INFERENCE_NUM_THREADS": str(args.threads)})
        timed[name] = lambda c=compiled: c(feed)
    ms = {k: statistics.median(v) for k, v in time_interleaved(timed, args.rounds).items()}
    base = ms[next(iter(ms))]
    counts = {k: sum(len(b["input_ids"]) for b in v) for k, v in sets.items()}
    print(f"{counts['held-out']} held-out texts, {counts['short']} short ones; {precision} inference, "
          f"{args.threads} threads, {BATCH} x {SEQ} static\n")
    print("| variant | held-out mean | short mean | short worst | ms | vs the pass |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (held, short, worst) in rows.items():
        print(f"| {name} | {held:.4f} | {short:.4f} | {worst:.4f} | {ms[name]:.2f} | {ms[name] / base:.2f} |")


if __name__ == "__main__":
    main()
