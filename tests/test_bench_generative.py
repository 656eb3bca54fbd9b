"""`lmmc bench` on a generative compile: the teacher's and student's greedy generation in PyTorch and ONNX Runtime,
their agreement with the teacher and exact match against the compile's own validation, and the bad options."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from conftest import (LLAVA_IMAGE_TOKEN, TINY_DECODER, TINY_VISION, save_tiny_llava, tiny_llava_processor,
                      write_llava_pairs)

import lmmc
from lmmc.bench import BenchConfig
from lmmc.bench import bench as bench_api
from lmmc.bench import format_table
from lmmc.bench_generative import MEMORY_METHOD, best_generative, peak_memory_mib
from lmmc.cli import main
from lmmc.timing import usable_cpus


@pytest.fixture(scope="module")
def benched(compiled_llava, tmp_path_factory):
    """One bench of the shared tiny LLaVA compile (a copy), with a second image-text corpus."""
    source, result = compiled_llava
    assert result.exit_code == 0, result.output
    tmp = tmp_path_factory.mktemp("bench-generative")
    out = tmp / "out"
    shutil.copytree(source, out)
    corpus = write_llava_pairs(tmp / "second", 10, seed=1)  # other pictures than the compile's
    before = torch.get_num_threads()
    try:
        run = CliRunner().invoke(main, ["bench", str(out), "--repeats", "3", "--threads", "1", "--batch", "2",
                                        "--no-memory", "--corpus", str(corpus)])
    finally:
        torch.set_num_threads(before)
    assert run.exit_code == 0, run.output
    return out, json.loads((out / "bench.json").read_text()), run.output


def test_every_deployment_is_judged_against_the_teachers_greedy_answers(benched):
    out, bench, _ = benched
    report = json.loads((out / "report.json").read_text())
    rows = {(r["model"], r["backend"]): r for r in bench["rows"]}
    assert set(rows) == {("teacher", "pytorch"), ("teacher", "onnxruntime"), ("student", "pytorch"),
                         ("student", "onnxruntime")}
    assert bench["corpora"] == {"held-out": {"image-text pairs": 6}, "pairs.jsonl": {"image-text pairs": 10}}
    # The teacher exported as the compile exports a student generates PyTorch's tokens, on both corpora.
    assert rows["teacher", "onnxruntime"]["agreement"] == {"held-out": 1.0, "pairs.jsonl": 1.0}
    # On the held-out split, bench re-derives the figures the compile's validation recorded.
    generation, task = report["validation"]["generation"], report["validation"]["task_metric"]
    for backend in ("pytorch", "onnxruntime"):
        assert rows["student", backend]["agreement"]["held-out"] == generation["generation"]["agreement"]
        assert rows["student", backend]["prefix_mean"]["held-out"] == generation["generation"]["prefix_mean"]
        assert rows["student", backend]["exact_match"]["held-out"] == task["student"]
    assert rows["student", "onnxruntime"]["agreement"] == rows["student", "pytorch"]["agreement"]
    assert rows["teacher", "pytorch"]["exact_match"]["held-out"] == task["teacher"]


def test_rows_count_parameters_sizes_and_tokens(benched):
    out, bench, output = benched
    rows = {(r["model"], r["backend"]): r for r in bench["rows"]}
    student, teacher = rows["student", "onnxruntime"], rows["teacher", "onnxruntime"]
    assert student["parameters"] == teacher["parameters"]
    saved = lmmc.load_student(out / "student")
    assert student["nonzero_parameters"] == sum(int(p.count_nonzero()) for p in saved.parameters())
    assert student["nonzero_parameters"] < 0.7 * teacher["nonzero_parameters"]  # Wanda 50 % of the linears
    assert student["size_bytes"] == sum(f.stat().st_size for f in (out / "onnx").iterdir())
    assert teacher["size_bytes"] == pytest.approx(student["size_bytes"], rel=0.01)  # same shapes, other values
    assert rows["student", "pytorch"]["size_bytes"] is None
    assert bench["batch"] == 2 and bench["threads"] == 1 and bench["new_tokens"] == 8
    for r in bench["rows"]:
        assert len(r["latency_ms"]["runs"]) == len(r["first_token_ms"]["runs"]) == 3
        assert r["tokens_per_s"] == pytest.approx(2 * 8 / (r["latency_ms"]["p50"] / 1e3))
        assert r["next_token_ms"] == pytest.approx((r["latency_ms"]["p50"] - r["first_token_ms"]["p50"]) / 7)
    best = bench["best"]
    named = {(r["model"], r["artifact"]): r for r in bench["rows"]}
    ratio = named["student", best["student"]]["latency_ms"]["p50"] / named["teacher", best["teacher"]]["latency_ms"]["p50"]
    assert best["latency_ratio"] == pytest.approx(ratio)
    assert f"8-token latency ratio {best['latency_ratio']:.2f}" in " ".join(output.split())


def _peak_column(table: str) -> dict[tuple[str, str], str]:
    """The printed table's "peak MiB" cell of each row, by (model, deployment)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    header = re.split(r"\s{2,}", lines[start])
    cells = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        row = re.split(r"\s{2,}", line)
        cells[row[0], row[1]] = row[header.index("peak MiB")]
    return cells


def test_without_memory_no_row_has_a_peak_and_the_table_shows_a_dash(benched):
    _, bench, output = benched
    assert bench["memory"] is None
    assert [r["peak_rss_mib"] for r in bench["rows"]] == [None] * 4
    assert set(_peak_column(output).values()) == {"-"}
    assert not any("memory" in n for n in bench["notes"]) and "peak MiB:" not in output


needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="peak memory is measured through Linux's /proc/self/clear_refs")


# The teacher's peak as a user would measure it, with transformers and /proc alone: argv = model folder, batch .npz.
INDEPENDENT_PEAK = """
import sys
import numpy as np, torch, transformers
def vm(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) / 1024
torch.set_num_threads(1)
batch = {k: torch.from_numpy(v) for k, v in np.load(sys.argv[2]).items()}
with torch.device("meta"):  # the modelling code imported, as in a process that already serves the model family
    transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_pretrained(sys.argv[1]))
open("/proc/self/clear_refs", "w").write("5")
before = vm("VmRSS")
model = transformers.LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
with torch.inference_mode():
    model.generate(**batch, do_sample=False, max_new_tokens=int(sys.argv[3]), min_new_tokens=int(sys.argv[3]))
print(vm("VmHWM") - before)
"""


def _llava_batch(path: Path, size: int, length: int) -> Path:
    """A batch of `size` prompts of `length` tokens, the image's 16 first, for the tiny LLaVA, saved as .npz."""
    ids = np.array([[2] + [LLAVA_IMAGE_TOKEN] * 16 + [5 + i % 40 for i in range(length - 17)]] * size)
    side = TINY_VISION["image_size"]
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids),
             pixel_values=np.random.default_rng(0).standard_normal((size, 3, side, side)).astype(np.float32))
    return path


@needs_proc
def test_each_deployments_peak_memory_is_what_it_adds_to_its_runtime(compiled_llava, tmp_path):
    out, _ = compiled_llava
    bench = bench_api(out, BenchConfig(repeats=1, threads=1), tmp_path / "bench.json")
    assert bench["memory"] == MEMORY_METHOD and not any("memory" in n for n in bench["notes"])
    shown = _peak_column(format_table(bench))
    assert len(bench["rows"]) == 4
    for r in bench["rows"]:
        peak = r["peak_rss_mib"]
        assert math.isfinite(peak) and peak > 0
        # a process that loads and runs a model holds at least its weights (fp32) or its export's files
        assert peak >= (r["parameters"] * 4 if r["backend"] == "pytorch" else r["size_bytes"]) / 2**20
        assert shown[r["model"], r["artifact"]] == f"{peak:.0f}"
    # The teacher's row is what the model adds to a process that runs transformers, as measured apart with
    # transformers alone (about 21 MiB here), not that import as well (some 150 MiB more).
    batch = _llava_batch(tmp_path / "batch.npz", bench["batch"], bench["prompt_tokens"])
    apart = float(subprocess.run([sys.executable, "-c", INDEPENDENT_PEAK, str(out.parent / "teacher"), str(batch),
                                  str(bench["new_tokens"])], capture_output=True, text=True, check=True).stdout)
    teacher = next(r for r in bench["rows"] if (r["model"], r["backend"]) == ("teacher", "pytorch"))
    assert teacher["peak_rss_mib"] == pytest.approx(apart, abs=max(8.0, apart / 3))


def _save_llava(path: Path, intermediate: int) -> float:
    """A tiny LLaVA of the given MLP width in the decoder, saved; the MiB of the decoder's MLP weights."""
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION},
                                   text_config={**TINY_DECODER, "intermediate_size": intermediate},
                                   image_token_index=LLAVA_IMAGE_TOKEN,
                                   image_seq_length=(TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    tiny_llava_processor("clip").save_pretrained(path)
    return sum(p.numel() for n, p in model.named_parameters() if "language_model" in n and ".mlp." in n) * 4 / 2**20


@needs_proc
def test_a_teacher_with_larger_weights_measures_larger_by_at_least_those_weights(tmp_path):
    narrow = _save_llava(tmp_path / "narrow", TINY_DECODER["intermediate_size"])
    wide = _save_llava(tmp_path / "wide", 65536)
    batch = _llava_batch(tmp_path / "batch.npz", 2, 21)
    peaks = {name: peak_memory_mib("teacher", "pytorch", tmp_path / name, batch, 8, 1) for name in ("narrow", "wide")}
    added = wide - narrow  # 48 MiB, every byte of it read at each generated token
    # every added weight is held, and at most once more while loading, beside the wider MLP's activations
    assert added <= peaks["wide"] - peaks["narrow"] <= 3 * added


@needs_proc
def test_a_deployment_that_cannot_be_measured_raises_with_its_error(tmp_path):
    np.savez(tmp_path / "batch.npz", input_ids=np.zeros((1, 4), np.int64))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="measuring the memory of the student in ONNX Runtime") as err:
        peak_memory_mib("student", "onnxruntime", tmp_path / "empty", tmp_path / "batch.npz", 8, 1)
    assert f"'{tmp_path / 'empty'}' has no generative.json" in str(err.value)


def _row(model, name, ms, agreement):
    return {"model": model, "artifact": name, "latency_ms": {"p50": ms}, "first_token_ms": {"p50": ms / 4},
            "agreement": {"held-out": agreement}, "exact_match": {"held-out": agreement}}


def test_best_pair_skips_teachers_that_changed_answers_and_students_below_the_gate():
    rows = [_row("teacher", "pytorch eager", 40.0, 1.0), _row("teacher", "onnxruntime fp32", 20.0, 0.9),
            _row("student", "fast", 5.0, 0.5), _row("student", "faithful", 10.0, 0.95)]
    best = best_generative(rows, 0.9)
    assert (best["teacher"], best["student"], best["latency_ratio"]) == ("pytorch eager", "faithful", 0.25)
    assert best["student_meets_min_agreement"]
    best = best_generative(rows, 0.99)  # none keeps it: the fastest is compared, and the result says so
    assert (best["student"], best["student_meets_min_agreement"]) == ("fast", False)


@pytest.mark.parametrize("args, message", [
    (["--static"], "--static compiles OpenVINO IRs for one input shape"),
    (["--seq", "16"], "--seq sets an encoder's text length"),
    (["--corpus", "TEXT"], "is not a .jsonl; a generative model is judged on image-text records"),
    (["--device", "cuda"], "a generative model's export runs in ONNX Runtime on the CPU"),
    (["--backend", "onnxruntime", "--backend", "openvino"], "--backend openvino: a generative model's bench times "
                                                            "generation in PyTorch and ONNX Runtime only"),
])
def test_options_for_encoders_are_one_clear_error_and_nothing_is_written(compiled_llava, tmp_path, args, message):
    out, _ = compiled_llava
    text = tmp_path / "corpus.txt"
    text.write_text("a sentence\n")
    args = [str(text) if a == "TEXT" else a for a in args]
    target = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(out), "--json", str(target), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not target.exists()


@pytest.mark.parametrize("bench, message", [
    ({"static": True}, "bench.static compiles OpenVINO IRs for one input shape"),
    ({"backends": ["openvino"]}, "bench.backends: openvino: a generative model's bench times generation in PyTorch"),
    ({"corpora": ["NOIMAGE"]}, "bench.corpora 'NOIMAGE': sample 1 has no image"),
    ({"corpora": ["FEW"]}, "bench.corpora: 'FEW' holds 10 image-text record(s), fewer than validate.min_held_out (32)"),
])
def test_a_recipes_bench_section_is_checked_before_a_generative_compile(tmp_path, bench, message):
    model = save_tiny_llava(tmp_path / "teacher", "clip")
    paths = {"NOIMAGE": tmp_path / "noimage.jsonl", "FEW": write_llava_pairs(tmp_path / "few", 10, seed=1)}
    paths["NOIMAGE"].write_text(json.dumps({"prompt": "is it a number ?", "text": "the water is cold"}) + "\n")
    bench = {k: [str(paths[c]) for c in v] if k == "corpora" else v for k, v in bench.items()}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"samples": 12, "eval_samples": 4, "batch_size": 4},
                                      "passes": [{"wanda": {"sparsity": 0.5}}], "validate": False, "bench": bench}))
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "--calib",
                                       str(write_llava_pairs(tmp_path)), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    for name, path in paths.items():
        message = message.replace(name, str(path))
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_the_report_page_draws_the_benched_generation(benched):
    out, bench, _ = benched
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "lmmc bench: median latency of 8 greedy tokens (the image and prompt read first), batch 2" in page
    assert "a generative model&#x27;s validation times nothing" not in page and "validation times nothing" not in page


def test_records_the_compile_calibrated_on_are_left_out_of_a_corpus(compiled_llava, tmp_path):
    out, _ = compiled_llava
    own = out.parent / "pairs.jsonl"  # the compile's 24 records: 12 calibrated on, 6 held out, 6 unused
    target = tmp_path / "bench.json"
    over = usable_cpus() + 1
    result = CliRunner().invoke(main, ["bench", str(out), "--quick", "--threads", str(over), "--json", str(target),
                                       "--corpus", str(own)])
    assert result.exit_code == 0, result.output
    bench = json.loads(target.read_text())
    assert bench["corpora"]["pairs.jsonl"] == {"image-text pairs": 12}
    assert "pairs.jsonl: 12 record(s) the compile calibrated on left out" in bench["notes"]
    assert any(n.startswith(f"threads {over} is above the {usable_cpus()} CPU(s)") for n in bench["notes"])
    # A draw of 12 takes 12 records the compile did not calibrate on, not 12 records less the calibrated ones.
    cfg = BenchConfig(corpora=(own,), corpus_samples=12, repeats=1, threads=1, memory=False)
    assert bench_api(out, cfg, tmp_path / "drawn.json")["corpora"]["pairs.jsonl"] == {"image-text pairs": 12}


def test_an_edited_export_is_refused_before_anything_runs(compiled_llava, tmp_path):
    source, _ = compiled_llava
    out = tmp_path / "out"
    shutil.copytree(source, out)
    table = out / "onnx" / "embed_tokens.npy"
    table.write_bytes(table.read_bytes()[:-4] + b"\x01\x02\x03\x04")
    result = CliRunner().invoke(main, ["bench", str(out), "--json", str(tmp_path / "bench.json")])
    assert result.exit_code == 2, result.output
    assert f"'{table}' is not the file the compile wrote" in " ".join(result.output.split())
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("own_corpus", [True, False])
def test_records_of_images_the_compile_distilled_on_are_left_out_of_a_corpus(tmp_path, own_corpus):
    """A picture the student was distilled on is no held-out picture under any prompt: with a corpus of its own the
    distill pass trains on that corpus's images, without one on the calibration split's."""
    model = save_tiny_llava(tmp_path / "teacher", "clip")
    calib = write_llava_pairs(tmp_path / "calib", 16)
    trained = write_llava_pairs(tmp_path / "trained", 8, seed=2)
    distill = {"steps": 2, "batch_size": 4, "dev_samples": 2, "progress": False,
               **({"corpus": str(trained)} if own_corpus else {})}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "calibration": {"path": str(calib), "samples": 10, "eval_samples": 4, "batch_size": 4, "chat_template": True},
        "passes": [{"wanda": {"sparsity": 0.5}}, {"distill": distill}],
        "validate": {"min_held_out": 4, "generation_tokens": 4, "max_kl": 100.0, "min_top1_agreement": 0.0,
                     "min_generation_agreement": 0.0}}))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
        # The images it trained on under another prompt and answer, then six pictures it never saw.
        source = trained if own_corpus else calib
        seen = [json.loads(line) for line in source.read_text().splitlines()]
        mixed = [{"image": str(source.parent / r["image"]), "prompt": "what is on the road ?", "text": "the water"}
                 for r in seen]
        fresh = write_llava_pairs(tmp_path / "fresh", 6, seed=3)
        mixed += [{**r, "image": str(fresh.parent / r["image"])} for r in map(json.loads, fresh.read_text().splitlines())]
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in mixed))
        target = tmp_path / "bench.json"
        result = CliRunner().invoke(main, ["bench", str(tmp_path / "out"), "--quick", "--no-memory", "--threads", "1",
                                           "--json", str(target), "--corpus", str(corpus)])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    bench = json.loads(target.read_text())
    left_out = 8 if own_corpus else 10  # every trained image; without a corpus, the ten calibrated ones of sixteen
    assert f"corpus.jsonl: {left_out} record(s) of images the compile distilled on left out" in bench["notes"]
    assert bench["corpora"]["corpus.jsonl"] == {"image-text pairs": len(mixed) - left_out}


@needs_proc
def test_a_deployment_with_no_room_to_load_once_more_is_not_measured_and_said(compiled_llava, tmp_path, monkeypatch):
    out, _ = compiled_llava
    monkeypatch.setattr("lmmc.bench.available_bytes", lambda: 1024)  # a machine with 1 KiB free
    bench = bench_api(out, BenchConfig(repeats=1, threads=1), tmp_path / "bench.json")
    assert [r["peak_rss_mib"] for r in bench["rows"]] == [None] * 4
    said = [n for n in bench["notes"] if " is not measured: loading it once more in a fresh process takes about " in n]
    assert [n.split(" (")[0] for n in said] == [f"peak memory of the {m} in {b}" for m in ("teacher", "student")
                                                for b in ("PyTorch", "ONNX Runtime")]
    assert all("0.0 GiB are available beside the bench's own models" in n for n in said)
