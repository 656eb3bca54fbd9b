"""The compile driver: check everything it can before loading weights, run the passes, and move the
complete output into place only at the end."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import lmmc
from lmmc.artifact import Artifact
from lmmc.data import load_calibration, random_calibration, read_samples
from lmmc.errors import GateFailed, LmmcError
from lmmc.modelio import load_teacher, make_student, resolve_config, save_student
from lmmc.pipeline import run_pass
from lmmc.recipe import Recipe
from lmmc.sparsity import sparsity_summary


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmmcError(f"--device {name} asked for a GPU, but torch sees none; use --device cpu")
    return torch.device(name)


def plan(model_ref: str, recipe: Recipe, trust_remote_code: bool = False) -> dict[str, Any]:
    """Everything checkable without weights: the model's config and adapter, the data, the pass order."""
    _, adapter = resolve_config(model_ref, trust_remote_code)
    calib = recipe.calibration.path
    if calib:
        read_samples(Path(calib))  # a missing or empty file fails here, before any weight loads
    elif not recipe.calibration.random and any("calib" in s.needs for s in recipe.steps()):
        raise LmmcError("the recipe's passes need calibration data; give --calib PATH or 'calibration.path'")
    return {
        "model": model_ref,
        "adapter": adapter.family,
        "towers": [f"{t.name} ({t.modality})" for t in adapter.towers],
        "calibration": calib or ("random" if recipe.calibration.random else None),
        "steps": [{"pass": s.name, "kind": s.kind, "config": s.config.model_dump(mode="json"),
                   "needs": sorted(s.needs), "provides": sorted(s.provides)} for s in recipe.steps()],
    }


def compile_model(model_ref: str, recipe: Recipe, out: Path, force: bool = False,
                  device: str = "auto", trust_remote_code: bool = False) -> dict[str, Any]:
    """Compile `model_ref` with `recipe` into `out`. Raises LmmcError on bad input, GateFailed when the
    complete output was written but a validation gate was missed."""
    out = Path(out)
    if out.exists() and not force:
        raise LmmcError(f"output directory '{out}' already exists; choose another --out or pass --force to replace it")
    dev = resolve_device(device)
    the_plan = plan(model_ref, recipe, trust_remote_code)
    calib = recipe.calibration.path
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        started = time.perf_counter()
        teacher, adapter, preprocessor = load_teacher(model_ref, trust_remote_code)
        teacher.to(dev)
        art = Artifact(model_ref=model_ref, adapter=adapter, teacher=teacher, student=make_student(teacher),
                       preprocessor=preprocessor, device=dev, workdir=tmp)
        if calib:
            modalities = {t.modality for t in adapter.towers}
            art.calib = load_calibration(recipe.calibration, calib, modalities, preprocessor)
        elif recipe.calibration.random:
            art.calib = random_calibration(recipe.calibration, teacher, adapter)
        for step in recipe.steps():
            run_pass(step, art)
        report = build_report(art, recipe, the_plan, time.perf_counter() - started)
        save_student(art.student.cpu(), preprocessor, tmp / "student",
                     {"lmmc_version": lmmc.__version__, "teacher": model_ref, "recipe": recipe.to_dict()})
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not report["passed"]:
        missed = [g for g in report["validation"]["gates"] if not g["passed"]]
        raise GateFailed("; ".join(f"{g['name']} = {g['value']:.4g}, needs {g['op']} {g['threshold']}" for g in missed))
    return report


def build_report(art: Artifact, recipe: Recipe, the_plan: dict[str, Any], seconds: float) -> dict[str, Any]:
    n_teacher = sum(p.numel() for p in art.teacher.parameters())
    n_student = sum(p.numel() for p in art.student.parameters())
    return {
        "lmmc_version": lmmc.__version__,
        "model": art.model_ref,
        "adapter": art.adapter.family,
        "recipe": recipe.to_dict(),
        "calibration": {"source": the_plan["calibration"], **(art.calib.counts if art.calib else {})},
        "parameters": {"teacher": n_teacher, "student": n_student},
        "sparsity": sparsity_summary(art.student, art.adapter),
        "passes": [asdict(r) for r in art.records],
        "onnx": {k: str(v.relative_to(art.workdir)) for k, v in art.onnx.items()},
        "validation": art.validation,
        "passed": art.validation.get("passed", True),
        "seconds": seconds,
    }
