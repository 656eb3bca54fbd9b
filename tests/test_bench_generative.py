"""`lmmc bench` on a generative compile: the teacher's and student's greedy generation in PyTorch and ONNX Runtime,
their agreement with the teacher and exact match against the compile's own validation, and the bad options."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import save_tiny_llava, write_llava_pairs

import lmmc
from lmmc.bench import BenchConfig
from lmmc.bench import bench as bench_api
from lmmc.bench_generative import best_generative
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
