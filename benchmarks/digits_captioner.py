"""Generation fidelity and exact-match accuracy of the digits captioner and its compiled students on the
held-out test pairs (images no compile calibrated or validated on).

    .venv/bin/python benchmarks/digits_captioner.py --teacher out/digits-captioner/model \
        --data out/digits-captioner/data out/digits-captioner-wanda50 out/digits-captioner-magnitude50 ...

Every (image, prompt) pair of test.jsonl is encoded as lmmc's calibration reader encodes it (chat template,
image tokens expanded by the processor); each student is loaded with `lmmc.load_student` and compared with
the teacher by `lmmc.generation.fidelity`: teacher-forced next-token KL and top-1 agreement on the answer
tokens, greedy agreement over the first `--tokens` tokens, and greedy exact-match accuracy. From each
compile's report.json: the sparsity per tower.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from lmmc import load_student
from lmmc.data import encode_generative
from lmmc.generation import fidelity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the captioner's model/ directory")
    parser.add_argument("--data", type=Path, required=True, help="the captioner's data/ directory (test.jsonl)")
    parser.add_argument("--tokens", type=int, default=8, help="greedy tokens compared per sample")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("outputs", nargs="*", type=Path, help="compile output directories")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    processor = transformers.AutoProcessor.from_pretrained(args.teacher)
    teacher = transformers.LlavaForConditionalGeneration.from_pretrained(args.teacher).eval()
    records = [json.loads(line) for line in (args.data / "test.jsonl").read_text().splitlines()]
    for r in records:
        r["image"] = str(args.data / r["image"])
    batches = encode_generative(processor, records, 64, None, chat_template=True)

    print(f"{len(records)} test pairs, greedy agreement over the first {args.tokens} tokens")
    print("| model | sparsity (vision / projector / language) | KL(teacher ‖ student) | top-1 agreement | "
          "greedy agreement | matching prefix | exact-match accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    same = fidelity(teacher, teacher, batches, args.tokens)
    print(f"| teacher | 0 | 0 | 1 | 1 | {args.tokens} | {same['exact_match']['teacher']:.4f} |", flush=True)
    for out in args.outputs:
        student = load_student(out / "student")
        got = fidelity(teacher, student, batches, args.tokens)
        report = json.loads((out / "report.json").read_text())
        per_tower = (report.get("sparsity") or {}).get("sparsity_per_tower") or {}
        sparsity = " / ".join(f"{per_tower[t]:.1%}" for t in ("vision", "projector", "language") if t in per_tower)
        print(f"| {out.name} | {sparsity} | {got['kl_mean']:.4f} | {got['top1_agreement']:.4f} | "
              f"{got['generation']['agreement']:.4f} | {got['generation']['prefix_mean']:.2f} | "
              f"{got['exact_match']['student']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
