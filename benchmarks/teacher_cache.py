"""How long the distill pass takes to fill its teacher cache with the attention kernel it uses now (PyTorch's
fused CPU kernel once no gradient is recorded) and with the plain products that training's backward needs,
on a compile's student and its recipe's corpus, in one run.

    python benchmarks/teacher_cache.py out-deploy [--repeats 2]

Reads the compile's report (its recipe, as resolved) and student from OUT; prints the seconds spent in the
teacher's forward and in the trainer's whole set-up, alternating the two kernels `--repeats` times."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lmmc.distiller as distiller
from lmmc.artifact import Artifact
from lmmc.bench import read_output
from lmmc.data import load_calibration
from lmmc.modelio import load_preprocessor, load_teacher
from lmmc.passes.distill import build_corpus
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig
from lmmc.student import load_student


def fill_seconds(cfg, art: Artifact, train, dev, plain: bool) -> tuple[float, float]:
    """(seconds in the teacher's forward, seconds of the whole set-up) of one Trainer, which fills its cache
    (and runs the teacher once over the dev sentences) as it is built."""
    run_tower, kernel = distiller.run_tower, distiller.sdpa_kernel
    forward = [0.0]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return run_tower(*args, **kwargs)
        finally:
            forward[0] += time.perf_counter() - start

    distiller.run_tower = timed
    if plain:
        distiller.sdpa_kernel = lambda _backends: sdpa_kernel(SDPBackend.MATH)
    try:
        start = time.perf_counter()
        trainer = distiller.Trainer(cfg, art, train, dev)
        total = time.perf_counter() - start
    finally:
        distiller.run_tower, distiller.sdpa_kernel = run_tower, kernel
    trainer.restore_flags()
    if trainer.cache is None:
        sys.exit("nothing was cached: the recipe's distillation is shorter than one pass over its corpus (steps x "
                 "batch_size), or its teacher_cache_mb is too small for the corpus")
    return forward[0], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    report = read_output(args.out)
    step = next(p for p in report["passes"] if p["name"] == "distill")
    teacher, adapter, _ = load_teacher(report["model"])
    pre = load_preprocessor(report["model"])
    calib_cfg = CalibrationConfig(**report["recipe"]["calibration"])
    calib = load_calibration(calib_cfg, calib_cfg.path, {"text"}, pre)
    art = Artifact(model_ref=report["model"], adapter=adapter, teacher=teacher,
                   student=load_student(args.out / "student"), calib=calib, preprocessor=pre)
    cfg = get_pass("distill").Config(**{**step["config"], "progress": False, "checkpoint_dir": None})
    train, dev = build_corpus(cfg, art, ["text"])
    runs: dict[str, list[tuple[float, float]]] = {"plain products": [], "fused kernel": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(fill_seconds(cfg, art, train, dev, plain=name == "plain products"))
    print(f"{len(train):,} sentences, {torch.get_num_threads()} threads; medians of {args.repeats}")
    print("| attention | teacher forward (s) | whole set-up (s) |\n|---|---:|---:|")
    for name, seconds in runs.items():
        print(f"| {name} | {statistics.median(s[0] for s in seconds):.1f} | "
              f"{statistics.median(s[1] for s in seconds):.1f} |")


if __name__ == "__main__":
    main()
