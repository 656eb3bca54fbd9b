"""Peak memory per rank of the distill pass under torchrun, DDP against FSDP, on a random mid-size BERT.

    python benchmarks/fsdp_memory.py                 # 12 x 768, 2 ranks on CPU (gloo), 3 steps each way
    python benchmarks/fsdp_memory.py --layers 24 --hidden 1024 --steps 2

The driver starts `torchrun --nproc_per_node RANKS` once per mode; each rank builds the same random
teacher (BERT, vocabulary 30,522) and its student (a copy: distillation of a dense student of the same
size, the largest case), distils for a few steps on random token ids, and reports its peak resident set
(VmHWM, reset right before the pass) over its resident set before the pass (teacher and student loaded).

Memory model (per rank, over what the pipeline already holds: teacher and student, whole):
- ddp: the student's gradients (1x its weights), AdamW's two moments (2x) and DDP's gradient buckets (1x),
  plus activations.
- fsdp: the student's weights, gradients and AdamW state sharded, (1 + 1 + 2)x / world, while the whole
  student's storage is released for the run; plus the root unit (embeddings) and one block gathered
  whole at a time, plus activations. At the end every rank gathers the whole student back.
Random ids say nothing about quality, only about memory, which depends on shapes alone.

The ranks run with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_; --mmap-threshold 0
leaves glibc's default). By default glibc raises the threshold as large blocks are freed and then serves
them from its heap, which it rarely hands back: the student's storage released for the run, and every
block gathered and freed again, would stay in the resident set, which then shows what the allocator
kept rather than what the run holds. The same setting serves a real FSDP run on CPU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from lmmc.adapters import block_list, get_adapter
from lmmc.artifact import Artifact
from lmmc.data import CalibData
from lmmc.modelio import make_student
from lmmc.pipeline import get_pass, load_passes

VOCAB = 30522


def build(layers: int, hidden: int) -> transformers.BertModel:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    return transformers.BertModel(cfg).eval()


def calibration(samples: int, tokens: int) -> CalibData:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, samples, 8):
        ids = torch.randint(1000, VOCAB, (min(8, samples - start), tokens), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return CalibData({"text": batches}, {"text": []}, "random", {"calibration": samples})


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(args: argparse.Namespace) -> None:
    """One rank: build, distil, report."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    load_passes()
    teacher = build(args.layers, args.hidden)
    adapter = get_adapter("bert")
    art = Artifact(model_ref="random", adapter=adapter, teacher=teacher, student=make_student(teacher),
                   calib=calibration(args.samples, args.tokens))
    distill = get_pass("distill")
    cfg = distill.Config(steps=args.steps, batch_size=args.batch_size, lr=1e-4, dev_samples=0, eval_every=0,
                         keep_best=False, progress=False, parallel=args.parallel, samples=args.samples)
    mb = 1024 ** 2
    weights = sum(p.numel() * p.element_size() for p in art.student.parameters())
    block = sum(p.numel() * p.element_size() for p in block_list(art.student, adapter.towers[0])[1][0].parameters())
    rss_before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    start = time.perf_counter()
    metrics = distill(cfg).run(art)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    row = {"parallel": args.parallel, "rank": dist.get_rank(), "world": dist.get_world_size(),
           "parameters_M": round(sum(p.numel() for p in art.student.parameters()) / 1e6, 1),
           "student_MiB": round(weights / mb, 1), "block_MiB": round(block / mb, 1),
           "rss_before_MiB": round(rss_before / mb, 1), "peak_rss_MiB": round(peak / mb, 1),
           "peak_over_before_MiB": round((peak - rss_before) / mb, 1), "seconds": round(seconds, 1),
           "train_seconds": metrics["train_seconds"]}
    Path(args.out, f"{args.parallel}-rank{row['rank']}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split over the ranks)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the ranks in bytes; 0 = glibc's default")
    parser.add_argument("--parallel", help=argparse.SUPPRESS)  # set for the ranks the driver starts
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parallel:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="lmmc-fsdp-memory-") as out:
        for mode in args.modes:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
                   __file__, "--parallel", mode, "--out", out,
                   *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("layers", "hidden", "steps", "batch_size", "samples", "tokens", "threads"))]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            subprocess.run(cmd, check=True, env=env)
            for rank in range(args.ranks):
                print(json.dumps(json.loads(Path(out, f"{mode}-rank{rank}.json").read_text())), flush=True)


if __name__ == "__main__":
    main()
