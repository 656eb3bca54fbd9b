"""Mean cosine of compiled students to their teacher (PyTorch, no latency) on each compile's held-out split
and on extra corpora: the quick fidelity check behind the deployment recipe's choices.

    .venv/bin/python benchmarks/fidelity.py OUT_DIR [OUT_DIR ...] --corpus samples/heldout/austen.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lmmc
from lmmc import bench as B
from lmmc.modelio import load_teacher


def fidelity(out: Path, corpora: list[Path], samples: int) -> dict[str, float]:
    """Held-out split and each corpus -> mean cosine of the student's pooled embedding to the teacher's."""
    report = B.read_output(out)
    calib = B._recipe_calibration(report, B.BenchConfig())
    teacher, adapter, preprocessor = load_teacher(report["model"])
    student = lmmc.load_student(out / "student")
    data = B.load_data(calib, teacher, adapter, preprocessor)
    result = {}
    for tower in adapter.towers:
        sets = {"held-out": data.eval_batches(tower.modality)}
        for path in corpora:
            sets[path.name] = B.corpus_batches(path, adapter, preprocessor, calib, samples)[tower.modality]
        run_t, run_s = B.torch_runner(teacher, tower), B.torch_runner(student, tower)
        with torch.no_grad():
            for name, batches in sets.items():
                arrays = B._numpy(batches)
                result[f"{tower.name} {name}"] = round(B.mean_cosine(B.embeddings(run_s, arrays),
                                                                     B.embeddings(run_t, arrays)), 4)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outs", nargs="+", type=Path, help="compile output directories")
    ap.add_argument("--corpus", action="append", type=Path, default=[], help="an extra held-out corpus (repeatable)")
    ap.add_argument("--samples", type=int, default=256, help="samples drawn from each extra corpus")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for out in args.outs:
        print(out, json.dumps(fidelity(out, args.corpus, args.samples)))


if __name__ == "__main__":
    main()
