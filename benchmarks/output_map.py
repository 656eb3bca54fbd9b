"""Whether a linear map after a distilled text student's pooled embedding brings it closer to the teacher's: a
least-squares fit (with a bias, ridge `--ridge`) of the teacher's normalised embeddings from the student's on
corpus sentences, judged by mean cosine on the compile's held-out split and on extra corpora. Mean pooling is
linear, so such a map costs one 384 x 384 product a text; it is worth building only if it gains here.

    .venv/bin/python benchmarks/output_map.py OUT_DIR --fit-corpus samples/calib/general_en.txt \\
        --corpus samples/heldout/austen.txt --corpus samples/heldout/reuters.txt
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

import lmmc
from lmmc import bench as B
from lmmc.data import text_key
from lmmc.export.validate import cosine
from lmmc.modelio import load_teacher, text_pad_length, text_truncation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a compile's output directory (a text student)")
    ap.add_argument("--fit-corpus", type=Path, required=True, help="sentences to fit the map on")
    ap.add_argument("--fit", type=int, default=20000, help="sentences drawn from --fit-corpus")
    ap.add_argument("--corpus", action="append", type=Path, default=[], help="an extra held-out corpus (repeatable)")
    ap.add_argument("--ridge", type=float, action="append", default=None, help="ridge weights to try")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    report = B.read_output(args.out)
    calib = B._recipe_calibration(report, B.BenchConfig(), args.out / "report.json")
    teacher, adapter, preprocessor = load_teacher(report["model"])
    student = lmmc.load_student(args.out / "student")
    data = B.load_data(calib, teacher, adapter, preprocessor)
    tower = next(t for t in adapter.towers if t.modality == "text")
    cut, pad = text_truncation(teacher.config, adapter, preprocessor), text_pad_length(teacher.config, adapter)
    lines = [line.strip() for line in args.fit_corpus.read_text().splitlines() if line.strip()]
    lines = [line for line in dict.fromkeys(lines) if text_key(line) not in data.held_out_texts]
    random.Random(1).shuffle(lines)
    run_t, run_s = B.torch_runner(teacher, tower), B.torch_runner(student, tower)

    def pair(batches) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            arrays = B._numpy(batches)
            return B.embeddings(run_s, arrays), B.embeddings(run_t, arrays)

    with tempfile.TemporaryDirectory() as tmp:
        fit_file = Path(tmp) / "fit.txt"
        fit_file.write_text("\n".join(lines[:args.fit]) + "\n")
        s, t = pair(B.corpus_batches(fit_file, adapter, preprocessor, calib, args.fit, cut, pad)["text"])
    x = np.hstack([s, np.ones((len(s), 1))]).astype(np.float64)
    maps = {}
    for ridge in args.ridge or [1e-3, 1e-2, 1e-1]:
        maps[ridge] = np.linalg.solve(x.T @ x + ridge * len(x) / 1000 * np.eye(x.shape[1]), x.T @ t)
    print(f"fitted on {len(s)} sentences (cosine before the map {cosine(s, t).mean():.4f})\n")
    print("| set | student | " + " | ".join(f"mapped, ridge {r:g}" for r in maps) + " |")
    print("|---|---:|" + "---:|" * len(maps))
    sets = {"held-out": data.eval_batches("text")}
    for path in args.corpus:
        sets[path.name] = B.corpus_batches(path, adapter, preprocessor, calib, 256, cut, pad)["text"]
    for name, batches in sets.items():
        s, t = pair(batches)
        xs = np.hstack([s, np.ones((len(s), 1))])
        print(f"| {name} | {cosine(s, t).mean():.4f} | "
              + " | ".join(f"{cosine(xs @ w, t).mean():.4f}" for w in maps.values()) + " |")


if __name__ == "__main__":
    main()
