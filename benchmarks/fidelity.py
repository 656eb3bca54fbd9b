"""Mean cosine of compiled students to their teacher (PyTorch, no latency) on each compile's held-out split
and on extra corpora: the quick fidelity check behind the deployment recipe's choices.

    .venv/bin/python benchmarks/fidelity.py OUT_DIR [OUT_DIR ...] --corpus samples/heldout/austen.txt

`--by-length` adds, for text, the mean cosine of the sentences in each band of token counts (with [CLS] and
[SEP]), which shows where a student's losses lie.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import lmmc
from lmmc import bench as B
from lmmc.export.validate import cosine
from lmmc.modelio import load_teacher, text_pad_length, text_truncation


BANDS = (0, 16, 32, 64)  # token counts at which the --by-length bands start


def by_length(cosines: np.ndarray, lengths: np.ndarray) -> dict[str, str]:
    """Mean cosine and sentence count per band of token counts, e.g. {"16-31": "0.9267 (199)"}."""
    out = {}
    for lo, hi in zip(BANDS, (*BANDS[1:], None)):
        sel = (lengths >= lo) & (lengths < (hi or np.inf))
        if sel.any():
            out[f"{lo}-{hi - 1}" if hi else f"{lo}+"] = f"{cosines[sel].mean():.4f} ({int(sel.sum())})"
    return out


def fidelity(out: Path, corpora: list[Path], samples: int, bands: bool = False) -> dict[str, float | dict]:
    """Held-out split and each corpus -> mean cosine of the student's pooled embedding to the teacher's
    (with `bands`, for text also per band of token counts)."""
    report = B.read_output(out)
    calib = B._recipe_calibration(report, B.BenchConfig(), out / "report.json")
    teacher, adapter, preprocessor = load_teacher(report["model"])
    student = lmmc.load_student(out / "student")
    data = B.load_data(calib, teacher, adapter, preprocessor)
    result = {}
    for tower in adapter.towers:
        sets = {"held-out": data.eval_batches(tower.modality)}
        for path in corpora:
            sets[path.name] = B.corpus_batches(path, adapter, preprocessor, calib, samples,
                                               text_truncation(teacher.config, adapter, preprocessor),
                                               text_pad_length(teacher.config, adapter))[tower.modality]
        run_t, run_s = B.torch_runner(teacher, tower), B.torch_runner(student, tower)
        with torch.no_grad():
            for name, batches in sets.items():
                arrays = B._numpy(batches)
                cos = cosine(B.embeddings(run_s, arrays), B.embeddings(run_t, arrays))
                result[f"{tower.name} {name}"] = round(float(cos.mean()), 4)
                if bands and "attention_mask" in arrays[0]:
                    lengths = np.concatenate([b["attention_mask"].sum(1) for b in arrays])
                    result[f"{tower.name} {name} by length"] = by_length(cos, lengths)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outs", nargs="+", type=Path, help="compile output directories")
    ap.add_argument("--corpus", action="append", type=Path, default=[], help="an extra held-out corpus (repeatable)")
    ap.add_argument("--samples", type=int, default=256, help="samples drawn from each extra corpus")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--by-length", action="store_true", help="text: mean cosine per band of token counts too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for out in args.outs:
        print(out, json.dumps(fidelity(out, args.corpus, args.samples, args.by_length)))


if __name__ == "__main__":
    main()
