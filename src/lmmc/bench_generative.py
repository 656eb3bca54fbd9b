"""`lmmc bench` for generative models: the student's greedy generation against the teacher's, in PyTorch eager and
in ONNX Runtime (the teacher exported as the compile exported the student), timed in turns, with each deployment's
agreement with the teacher's greedy answers, its exact-match accuracy on held-out image-text pairs and its peak
memory."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmmc.errors import LmmcError

# A teacher deployment whose greedy answers differ from PyTorch's on more held-out samples than this is not the
# teacher any more (as an encoder's below bench.TEACHER_MIN_COSINE), so the student is not measured against it.
TEACHER_MIN_AGREEMENT = 0.99


# Untimed runs that open each visit, in seconds: a small model's generation takes a few milliseconds, less than
# the worker threads of the candidate before it (PyTorch's OpenMP, ONNX Runtime's) spin on the cores after it.
SETTLE_S = 0.3

MEMORY_METHOD = ("peak RSS increase of a fresh process that has loaded the runtime, then loads the deployment "
                 "and generates the timing batch's new tokens once (Linux VmHWM after load+generation minus VmRSS "
                 "before, the peak reset after the runtime loaded), MiB")


def check_generative_bench(cfg, where: str = "") -> None:
    """What bench refuses for a generative model before anything runs: the options that only shape an encoder's
    timing. `where` names a recipe's bench section, else the command's options are named."""
    def option(name: str) -> str:
        return f"{where}{name.replace('-', '_')}" if where else f"--{name}"

    if cfg.static:
        raise LmmcError(f"{option('static')} compiles OpenVINO IRs for one input shape, and a generative model is "
                        f"deployed through ONNX Runtime with a growing key/value cache; leave {option('static')} out")
    if cfg.seq is not None:
        raise LmmcError(f"{option('seq')} sets an encoder's text length, and a generative model is timed on its "
                        f"held-out prompts as they are; leave {option('seq')} out")
    other = [b for b in cfg.backends if b != "onnxruntime"]
    if other:
        raise LmmcError(f"{where + 'backends:' if where else '--backend'} {other[0]}: a generative model's bench times "
                        f"generation in PyTorch and ONNX Runtime only; leave it out")
    if cfg.device != "cpu":
        raise LmmcError(f"{option('device')} {cfg.device}: a generative model's export runs in ONNX Runtime on the "
                        f"CPU, and bench times it there; leave {option('device')} out")
    for corpus in cfg.corpora:
        if Path(corpus).suffix != ".jsonl":
            raise LmmcError(f"{where + 'corpora' if where else '--corpus'} '{corpus}' is not a .jsonl; a generative "
                            f"model is judged on image-text records: a .jsonl of {{\"image\", \"prompt\", \"text\"}}")


@dataclass
class _Candidate:
    """One deployment of the whole model: its timed call (a batch, a given number of new tokens) and its greedy
    answers to held-out samples."""

    model: str  # "teacher" or "student"
    artifact: str
    backend: str
    path: Path | None
    source: str  # what a fresh process loads it from: the teacher's reference, the student's or export's folder
    generate: Callable[[int], object]  # runs the timing batch for that many new tokens
    answers: Callable[[list, int, set[int]], list[list[int]]]
    parameters: tuple[int, int]


def _torch_generate(model, batch: dict[str, Any]) -> Callable[[int], None]:
    """The timed call of a PyTorch model: greedy generation of the batch for a given number of new tokens."""
    import torch

    from lmmc.generation import _plain_greedy

    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0

    def generate(tokens: int) -> None:
        # no end token, so every run generates the same number of tokens
        with torch.inference_mode(), _plain_greedy(model, pad, set()):
            model.generate(**batch, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad)

    return generate


def _onnx_generate(generator, batch: dict[str, Any]) -> Callable[[int], None]:
    """The timed call of an exported model, as `_torch_generate`."""
    pixels, ids = batch["pixel_values"].numpy(), batch["input_ids"].numpy()

    def generate(tokens: int) -> None:
        generator.generate_ids(pixels, ids, max_new_tokens=tokens, eos_token_id=[])

    return generate


def _torch_candidate(model_name: str, model, batch: dict[str, Any], source: str) -> _Candidate:
    from lmmc.generation import greedy

    params = list(model.parameters())
    counts = (sum(p.numel() for p in params), sum(int(p.count_nonzero()) for p in params))
    return _Candidate(model_name, "pytorch eager", "pytorch", None, source, _torch_generate(model, batch),
                      lambda items, budget, eos: greedy(model, items, budget, eos), counts)


def _onnx_candidate(model_name: str, folder: Path, threads: int, batch: dict[str, Any], parameters: tuple[int, int],
                    shown: str) -> _Candidate:
    from lmmc.generation import onnx_greedy
    from lmmc.runtime.generate import Generator

    generator = Generator(folder, threads)
    return _Candidate(model_name, shown, "onnxruntime", folder, str(folder), _onnx_generate(generator, batch),
                      lambda items, budget, eos: onnx_greedy(generator, items, budget, eos), parameters)


def memory_child() -> None:
    """Runs in a fresh process: argv = JSON spec. Prints the peak RSS increase of loading one deployment and
    generating the timing batch once, MiB."""
    import torch

    from lmmc.peak_memory import print_peak_increase, reset_peak

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    # The runtime is loaded before the baseline (libraries, the modelling code): what is measured is what this
    # deployment adds to a process that already runs its runtime.
    if spec["backend"] == "pytorch":
        import transformers

        import lmmc
        import lmmc.generation  # noqa: F401
        from lmmc.modelio import local_dir, resolve_config

        config, adapter = resolve_config(spec["source"], spec["trust_remote_code"])
        auto = getattr(transformers, adapter.auto_class)
        with torch.device("meta"):  # imports the modelling code without any weights
            auto.from_config(config, trust_remote_code=spec["trust_remote_code"])
    else:
        import onnxruntime  # noqa: F401

        from lmmc.runtime.generate import Generator
    batch = {k: torch.from_numpy(v) for k, v in np.load(spec["batch"]).items()}
    before = reset_peak()
    if spec["backend"] == "onnxruntime":
        generate = _onnx_generate(Generator(spec["source"], spec["threads"]), batch)
    elif spec["model"] == "student":
        generate = _torch_generate(lmmc.load_student(spec["source"]).eval(), batch)
    else:  # as load_teacher builds it, without the checks that read every weight once more
        model = auto.from_pretrained(str(local_dir(spec["source"]) or spec["source"]), dtype=torch.float32,
                                     trust_remote_code=spec["trust_remote_code"], use_safetensors=True)
        generate = _torch_generate(adapter.prepared(model).eval(), batch)
    generate(spec["tokens"])
    print_peak_increase(before)


def peak_memory_mib(model: str, backend: str, source: str | Path, batch_path: Path, tokens: int, threads: int,
                    trust_remote_code: bool = False, weights_bytes: int = 0) -> float | None:
    """What loading a deployment (`backend` "pytorch" or "onnxruntime" of the "teacher" or "student" `model`,
    from `source`) and generating `tokens` new tokens for the batch saved in `batch_path` add to the peak RSS of a
    fresh process that already runs its runtime, MiB; None where Linux's /proc is not there to measure it
    (`weights_bytes`: what the deployment's weights take, bench.memory_process)."""
    from lmmc.bench import memory_process

    spec = {"model": model, "backend": backend, "source": str(source), "batch": str(batch_path), "tokens": tokens,
            "threads": threads, "trust_remote_code": trust_remote_code}
    return memory_process("from lmmc.bench_generative import memory_child; memory_child()", spec,
                          f"the {model} in {'PyTorch' if backend == 'pytorch' else 'ONNX Runtime'} ({source})",
                          weights_bytes)


def _timing_batch(items: list, size: int) -> dict[str, Any]:
    """`size` held-out samples of the commonest prompt length (repeated when fewer), unpadded, as every
    deployment generates from them alike."""
    import torch

    from lmmc.generation import by_prompt_length

    group = max(by_prompt_length(items).values(), key=len)
    chosen = [items[group[i % len(group)]] for i in range(size)]
    ids = torch.tensor([s.prompt for s in chosen])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.stack([s.pixel_values for s in chosen]).cpu()}


def read_corpus_records(path: Path, processor, chat_template: bool, what: str) -> list[dict[str, Any]]:
    """An image-text .jsonl's records, checked as a compile checks its calibration records."""
    from lmmc.data import check_generative_records, read_samples

    records = read_samples(path)
    check_generative_records(records, path, processor, chat_template, what)
    return records


def _corpus_items(path: Path, processor, calib_cfg, n: int, positions: int | None, end: int | None,
                  calibrated: set[tuple], distilled: frozenset[str] = frozenset()) -> tuple[list, int, int]:
    """Up to `n` records of an image-text .jsonl that the compile neither calibrated on nor distilled on (an image
    in `distilled`, by its bytes, under any prompt, as the compile's held-out split holds out whole images),
    drawn in an order the calibration seed shuffles and encoded as the compile encoded its held-out split; and how
    many calibrated records, and how many records of distilled images, were passed over."""
    from lmmc.data import encode_generative, part_keys
    from lmmc.generation import samples

    records = read_corpus_records(path, processor, calib_cfg.chat_template, "--corpus")
    random.Random(calib_cfg.seed).shuffle(records)
    kept, seen, trained, step = [], 0, 0, max(n, 64)
    for start in range(0, len(records), step):  # read a chunk at a time: a large corpus is not read whole
        unseen = [r for r in records[start:start + step]
                  if not distilled or part_keys(r, {"image"}).get("image") not in distilled]
        trained += min(step, len(records) - start) - len(unseen)
        chunk = samples(encode_generative(processor, unseen, calib_cfg.batch_size, calib_cfg.max_length,
                                          calib_cfg.chat_template, positions, end)) if unseen else []
        fresh = [s for s in chunk if _key(s) not in calibrated]
        seen += len(chunk) - len(fresh)
        kept += fresh
        if len(kept) >= n:
            break
    return kept[:n], seen, trained


def _key(sample) -> tuple:
    """What makes two encoded samples the same record: prompt, answer and image."""
    pixels = sample.pixel_values.numpy()
    return tuple(sample.prompt), tuple(sample.answer), pixels.shape, hashlib.sha256(pixels.tobytes()).hexdigest()


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _export_opset(report: dict[str, Any]) -> int:
    for step in (report.get("recipe") or {}).get("export") or []:
        if isinstance(step, dict) and isinstance(step.get("onnx_generative"), dict):
            return int(step["onnx_generative"].get("opset", 20))
    return 20


def bench_generative(out_dir: Path, cfg, report: dict[str, Any], fingerprint: str, json_path: Path) -> dict[str, Any]:
    """Time and judge every deployment of a generative compile's teacher and student; the result as bench.json
    holds it (bench.py writes it)."""
    import onnxruntime
    import torch
    from tqdm import tqdm

    import lmmc
    from lmmc.bench import (JSON_KIND, _check_outside_inputs, _check_unchanged, _recipe_calibration, _recipe_validate,
                            check_unchanged, compiled_teacher, corpus_names, distilled_records, distills_on_calibration,
                            measured_peak, model_bytes)
    from lmmc.data import generative_limits, load_generative_calibration, part_keys, random_generative_calibration
    from lmmc.export.generative import export_generative
    from lmmc.generation import eos_ids, exact_match, generation_agreement, samples
    from lmmc.modelio import load_teacher, offline_if_unreachable, resolve_config
    from lmmc.runtime import MANIFEST, _named_files, read_manifest
    from lmmc.scratch import scratch_folder
    from lmmc.timing import PER_VISIT, check_threads_start, time_interleaved, usable_cpus

    check_generative_bench(cfg)
    teacher_ref = str(cfg.teacher) if cfg.teacher else compiled_teacher(report)
    notes = [n for n in [offline_if_unreachable(teacher_ref)] if n]
    try:
        resolve_config(teacher_ref, cfg.trust_remote_code)
    except LmmcError as err:
        if cfg.teacher:
            raise LmmcError(f"cannot open --teacher '{teacher_ref}': {err}") from None
        raise LmmcError(f"cannot open the teacher '{teacher_ref}' that {out_dir} was compiled from ({err}); if it "
                        f"moved, pass --teacher with its new place") from None
    calib_cfg = _recipe_calibration(report, cfg, out_dir / "report.json")
    validate = _recipe_validate(report, out_dir / "report.json")
    _check_outside_inputs(json_path, teacher_ref, calib_cfg, list(cfg.corpora))
    check_unchanged(report, teacher_ref, calib_cfg, out_dir)
    teacher, adapter, preprocessor = load_teacher(teacher_ref, cfg.trust_remote_code)
    processor = preprocessor["processor"]
    positions, end = generative_limits(processor, adapter, teacher.config)
    if calib_cfg.path:
        data = load_generative_calibration(calib_cfg, calib_cfg.path, processor, positions, end)
    elif calib_cfg.random:
        data = random_generative_calibration(calib_cfg, teacher, adapter)
    else:
        raise LmmcError("the compile's recipe names no calibration data, so there is no held-out split to judge "
                        "generation on; pass --calib with the image-text records the student should be judged on")
    corpora = {"held-out": samples(data.eval_batches("text"))}
    calibrated = {_key(s) for s in samples(data.calib_batches("text"))}
    distilled: frozenset[str] = frozenset()
    if cfg.corpora:
        records = distilled_records(report, notes)
        distilled = frozenset(k for r in records for k in part_keys(r, {"image"}).values()) | \
            (data.calibrated if distills_on_calibration(report) else frozenset())
    for name, path in zip(corpus_names(list(cfg.corpora)), cfg.corpora):
        corpora[name], passed, trained = _corpus_items(Path(path), processor, calib_cfg, cfg.corpus_samples, positions,
                                                       end, calibrated, distilled)
        if passed:
            notes.append(f"{name}: {passed} record(s) the compile calibrated on left out")
        if trained:
            notes.append(f"{name}: {trained} record(s) of images the compile distilled on left out")
        if len(corpora[name]) < validate.min_held_out:
            raise LmmcError(f"--corpus '{path}' leaves {len(corpora[name])} image-text record(s) the compile neither "
                            f"calibrated nor distilled on, fewer than the recipe's validate.min_held_out "
                            f"({validate.min_held_out}), too few to judge on; give a corpus with more records")
    if not corpora["held-out"]:
        raise LmmcError("the compile's held-out split holds no image-text samples; compile with calibration."
                        "eval_samples of at least 1")
    student = lmmc.load_student(out_dir / "student").eval()
    teacher = teacher.eval()
    threads = cfg.threads or validate.threads
    check_threads_start(threads, "--threads" if cfg.threads else "the recipe's validate.threads")
    if threads > usable_cpus():  # PyTorch's threads and ONNX Runtime's would wait for a core, and time that
        notes.append(f"threads {threads} is above the {usable_cpus()} CPU(s) this process may use, so the timings "
                     f"include threads waiting for a core; pass --threads {usable_cpus()} or fewer")
    size = cfg.batch or 1
    tokens = validate.generation_tokens
    batch = _timing_batch(corpora["held-out"], size)
    manifest = read_manifest(out_dir) if (out_dir / MANIFEST).is_file() else {}
    spec = (manifest.get("generative") or {}).get("spec")
    _check_unchanged(out_dir, ["report.json", *([MANIFEST, *_named_files(manifest)] if manifest else [])])
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        with scratch_folder("lmmc-bench-") as tmp:
            batch_path = Path(tmp) / "timing-batch.npz"  # for the memory processes
            np.savez(batch_path, **{k: v.numpy() for k, v in batch.items()})
            candidates = [_torch_candidate("teacher", teacher, batch, teacher_ref)]
            if spec:
                folder = Path(tmp) / "teacher-onnx"
                export_generative(teacher, folder, _export_opset(report), bool(calib_cfg.chat_template))
                candidates.append(_onnx_candidate("teacher", folder, threads, batch, candidates[0].parameters,
                                                  "onnxruntime fp32"))
            else:
                notes.append("ONNX Runtime: not run, this output holds no generative export (the recipe's "
                             "'onnx_generative' pass writes one)")
            candidates.append(_torch_candidate("student", student, batch, str(out_dir / "student")))
            if spec:
                candidates.append(_onnx_candidate("student", out_dir / Path(spec).parent, threads, batch,
                                                  candidates[-1].parameters, f"{Path(spec).parent}/ (onnxruntime fp32)"))
            rounds = cfg.warmup + math.ceil(cfg.repeats / PER_VISIT)
            with tqdm(total=rounds, desc="bench generation", unit="round", leave=False) as bar:
                runs = {(i, n): (lambda c=c, n=n: c.generate(n)) for i, c in enumerate(candidates)
                        for n in (1, tokens)}
                ms = time_interleaved(runs, cfg.repeats, cfg.warmup, on_round=lambda: bar.update(1), settle_s=SETTLE_S)
            eos = eos_ids(teacher)
            budgets = {name: max(tokens, max(len(s.answer) for s in items) + 1) for name, items in corpora.items()}
            # Nothing below is timed: the memory processes run one after another beside the fidelity runs, in
            # this scratch folder's lifetime, as the teacher's export lives in it.
            with ThreadPoolExecutor(max_workers=1) as pool:
                models = {"teacher": teacher, "student": student}
                memory = [pool.submit(peak_memory_mib, c.model, c.backend, c.source, batch_path, tokens, threads,
                                      cfg.trust_remote_code, model_bytes(models[c.model]) if c.path is None
                                      else _folder_size(c.path)) for c in candidates] if cfg.memory else []
                reference = {name: candidates[0].answers(items, budgets[name], eos) for name, items in corpora.items()}
                rows = []
                for i, c in enumerate(candidates):
                    row = _timing_row(c, ms[(i, 1)], ms[(i, tokens)], size, tokens)
                    for name, items in corpora.items():
                        answers = reference[name] if i == 0 else c.answers(items, budgets[name], eos)
                        agree = generation_agreement(reference[name], answers, tokens)
                        row["agreement"][name] = agree["agreement"]
                        row["prefix_mean"][name] = agree["prefix_mean"]
                        row["exact_match"][name] = exact_match(answers, [s.answer for s in items], eos)
                    rows.append(row)
                for row, measured in zip(rows, memory):
                    measured_peak(measured, row, notes)
    finally:
        torch.set_num_threads(threads_before)
    result = {"kind": JSON_KIND, "generative": True, "lmmc_version": lmmc.__version__,
              "out_dir": str(out_dir.resolve()), "output": fingerprint, "teacher": teacher_ref, "device": "cpu",
              "threads": threads, "batch": size, "seq": None, "new_tokens": tokens, "repeats": cfg.repeats,
              "warmup": cfg.warmup,
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "system": platform.platform()},
              "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
              "memory": MEMORY_METHOD if cfg.memory else None,
              "corpora": {name: {"image-text pairs": len(items)} for name, items in corpora.items()},
              "prompt_tokens": int(batch["input_ids"].shape[1]),
              "rows": rows, "best": best_generative(rows, validate.min_generation_agreement), "notes": notes,
              "seconds": time.perf_counter() - started}
    return result


def _timing_row(c: _Candidate, first: list[float], whole: list[float], size: int, tokens: int) -> dict[str, Any]:
    """A deployment's row before its fidelity: the first token's and the whole run's latency, what follows from them,
    its files' size and its parameters."""
    p50 = statistics.median(whole)
    return {"model": c.model, "artifact": c.artifact, "backend": c.backend, "precision": "fp32",
            "first_token_ms": {"p50": statistics.median(first), "p90": float(np.percentile(first, 90)), "runs": first},
            "latency_ms": {"p50": p50, "p90": float(np.percentile(whole, 90)), "runs": whole},
            "next_token_ms": (p50 - statistics.median(first)) / max(tokens - 1, 1),
            "tokens_per_s": size * tokens / (p50 / 1e3),
            "size_bytes": None if c.path is None else _folder_size(c.path),
            "parameters": c.parameters[0], "nonzero_parameters": c.parameters[1], "peak_rss_mib": None,
            "agreement": {}, "prefix_mean": {}, "exact_match": {}}


def best_generative(rows: list[dict[str, Any]], min_agreement: float | None = None) -> dict[str, Any]:
    """The fastest student deployment against the fastest teacher deployment, by the median time of the timed
    tokens. A teacher deployment competes while its greedy answers stay the teacher's (TEACHER_MIN_AGREEMENT);
    with the recipe's `min_agreement` only student deployments that keep it on the held-out split compete, and
    when none does the fastest one is compared and the result says so."""
    def fastest(candidates: list[dict[str, Any]]) -> dict[str, Any]:
        return min(candidates, key=lambda r: r["latency_ms"]["p50"])

    students = [r for r in rows if r["model"] == "student"]
    passing = [r for r in students if min_agreement is None or r["agreement"]["held-out"] >= min_agreement]
    teachers = [r for r in rows if r["model"] == "teacher"]
    t = fastest([r for r in teachers if r["agreement"]["held-out"] >= TEACHER_MIN_AGREEMENT] or teachers)
    s = fastest(passing or students)
    return {"student": s["artifact"], "teacher": t["artifact"], "min_agreement": min_agreement,
            "student_meets_min_agreement": bool(passing),
            "latency_ratio": s["latency_ms"]["p50"] / t["latency_ms"]["p50"],
            "first_token_ratio": s["first_token_ms"]["p50"] / t["first_token_ms"]["p50"],
            "agreement": s["agreement"], "student_exact_match": s["exact_match"],
            "teacher_exact_match": t["exact_match"]}


def format_generative(result: dict[str, Any]) -> str:
    """The bench table of a generative model, with the comparison that matters last."""
    from lmmc.bench import _megabytes, _times
    from lmmc.timing import PER_VISIT

    timed = math.ceil(result["repeats"] / PER_VISIT) * PER_VISIT
    n = result["new_tokens"]
    lines = [f"threads {result['threads']}, batch {result['batch']}, prompts of {result['prompt_tokens']} tokens "
             f"(the image's included), {n} new tokens a run; {result['warmup']} warm-up round"
             f"{'s' * (result['warmup'] != 1)} + {timed} timed runs a candidate and length, in turns; agreement: "
             f"greedy answers identical to the teacher's (PyTorch) over their first {n} tokens, per corpus",
             f"{result['machine']['cpus']} CPUs ({result['machine']['processor']}); "
             + ", ".join(f"{k} {v.split('-')[0]}" for k, v in result["versions"].items()),
             "samples: " + "; ".join(f"{c} {counts['image-text pairs']} image-text pairs"
                                     for c, counts in result["corpora"].items())]
    if result.get("memory"):
        lines.insert(2, f"peak MiB: {result['memory']}")
    corpora = list(result["rows"][0]["agreement"])
    header = ("model", "deployment", "first token ms", f"{n} tokens p50 ms", "p90 ms", "next token ms", "tokens/s",
              "peak MiB", "MB", "params", *[f"agree {c}" for c in corpora], *[f"exact {c}" for c in corpora])
    table = [header]
    for r in result["rows"]:
        table.append((r["model"], r["artifact"], f"{r['first_token_ms']['p50']:.2f}", f"{r['latency_ms']['p50']:.2f}",
                      f"{r['latency_ms']['p90']:.2f}", f"{r['next_token_ms']:.2f}", f"{r['tokens_per_s']:.1f}",
                      # a bench JSON of an earlier lmmc has no figure
                      "-" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}",
                      "-" if r["size_bytes"] is None else _megabytes(r["size_bytes"]),
                      f"{r['nonzero_parameters'] / 1e6:.2f}M nonzero of {r['parameters'] / 1e6:.2f}M",
                      *[f"{r['agreement'][c]:.3f}" for c in corpora], *[f"{r['exact_match'][c]:.3f}" for c in corpora]))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines += [f"note: {note}" for note in result["notes"]]
    b = result["best"]
    which = "fastest student" if b["min_agreement"] is None else (
        f"fastest student with held-out agreement >= {b['min_agreement']}" if b["student_meets_min_agreement"]
        else f"fastest student (none keeps the recipe's min_generation_agreement {b['min_agreement']})")
    lines.append(f"\n{which} {b['student']} vs fastest teacher {b['teacher']}: {n}-token latency ratio "
                 f"{b['latency_ratio']:.2f} (the student is {_times(b['latency_ratio'])}), first token "
                 f"{b['first_token_ratio']:.2f}; agreement " + ", ".join(f"{c} {v:.3f}" for c, v in b["agreement"].items())
                 + "; exact match " + ", ".join(f"{c} {v:.3f} (teacher {b['teacher_exact_match'][c]:.3f})"
                                                for c, v in b["student_exact_match"].items()))
    return "\n".join(lines)
