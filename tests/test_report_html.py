"""report.html: written by a compile beside report.json, every plot embedded and drawn, the verdict as
report.json has it, sections without data left out with a note, `lmmc report`, and the page as headless
Chromium shows it."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny
from PIL import Image

from lmmc.bench import JSON_KIND, _digest
from lmmc.cli import main
from lmmc.compile import compile_model
from lmmc.recipe import parse_recipe
from lmmc.report_html import _distill_runs, layer_structure, render

RECIPE = {
    "calibration": {"random": True, "samples": 32, "eval_samples": 32, "batch_size": 8},
    "passes": [{"antgmm": {"keep": {"text": 0.7, "vision": 0.4}, "shares": {"depth": 0.5, "ffn": 0.25, "heads": 0.25},
                           "distill": {"batch_size": 4, "dev_samples": 4, "eval_every": 2, "progress": False},
                           "distill_steps_per_segment": 4}},
               {"ecoflap": {"sparsity": 0.3}}, {"wanda": {}},
               {"distill": {"steps": 12, "batch_size": 4, "dev_samples": 4, "eval_every": 4, "lr": 3e-3,
                            "progress": False}}],
    "export": ["onnx"],
    "validate": {"min_cosine": 0.1, "latency_batch": 2, "latency_seq": 16, "repeats": 3, "threads": 1},
}
# allocation, sparsity per matrix, structure, per-sample cosine, two distillations, latency, time per pass
PLOTS = 8
_IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
VIEWPORT = (1100, 800)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """A tiny CLIP compiled with an allocation, structured pruning, Wanda and distillation."""
    root = tmp_path_factory.mktemp("report")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compile_model(str(save_tiny("clip", root / "teacher")), parse_recipe(RECIPE), root / "out")
    finally:
        torch.set_num_threads(before)
    return root / "out"


def images(page: str) -> list[tuple[str, Image.Image]]:
    return [(html.unescape(alt), Image.open(io.BytesIO(base64.b64decode(data)), formats=["PNG"]))
            for alt, data in _IMG.findall(page)]


def copy_output(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_compile_writes_every_plot_and_each_decodes_to_a_drawing(compiled):
    page = (compiled / "report.html").read_text(encoding="utf-8")
    text = _IMG.sub("", page)
    assert "<script" not in text and "http" not in text and "src=" not in text  # nothing to run or fetch
    found = images(page)
    assert len(found) == PLOTS, [alt for alt, _ in found]
    for alt, image in found:
        image.load()
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert image.width >= 300 and image.height >= 150, alt
        colours = np.unique(pixels.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))
        assert len(colours) > 20, f"{alt}: {len(colours)} colours, not a drawing"
        # mostly background, but a real share of ink: axes, bars, text
        ink = (pixels.min(1) < 200).mean()
        assert 0.01 < ink < 0.9, f"{alt}: {ink:.3f} of the pixels are ink"


def test_sections_hold_the_numbers_of_report_json(compiled):
    report = json.loads((compiled / "report.json").read_text())
    page = (compiled / "report.html").read_text(encoding="utf-8")
    alts = [alt for alt, _ in images(page)]
    assert {"ecoflap allocation", "sparsity per weight matrix", "heads and FFN width kept per layer",
            "per-sample cosine to the teacher", "latency", "time per pass"} <= set(alts)
    assert sum(a.startswith("pass 4: distill") for a in alts) == 1
    assert sum(a == "pass 1: antgmm's distillation" for a in alts) == 1
    towers = report["validation"]["towers"]
    assert set(towers) == {"text", "vision"}
    for name, t in towers.items():
        assert len(t["cosine_per_sample"]) == t["held_out_samples"] == 32
        assert t["cosine_per_sample"] == pytest.approx([float(v) for v in t["cosine_per_sample"]])
        assert np.mean(t["cosine_per_sample"]) == pytest.approx(t["cosine_mean"], abs=1e-5)
        assert min(t["cosine_per_sample"]) == pytest.approx(t["cosine_min"], abs=1e-5)
        assert f"<td>{name}</td><td class=\"num\">32</td><td class=\"num\">{t['cosine_mean']:.4f}</td>" in page
    # the table's differences are absolute, the gates' divided by the output's scale: the page says which
    assert "<th>ORT max |diff|</th>" in page and "max |diff| is absolute; the runtime gates divide it" in page
    inputs = "; ".join(f"{n}: {shape}" for t in towers.values() for n, shape in t["latency_ms"]["input"].items())
    assert "pixel_values" in inputs and f", inputs {html.escape(inputs)}. Run" in page  # both towers' inputs
    antgmm = report["passes"][0]["metrics"]
    assert antgmm["kept_per_tower"] == pytest.approx({"text": 0.7, "vision": 0.4}, abs=0.05)
    assert "(target text 70%, vision 40%)" in page
    curve = next(p for p in report["passes"] if p["name"] == "distill")["metrics"]["curve"]
    assert [c["step"] for c in curve] == [4, 8, 12]
    assert all(c["loss"] is not None and c["loss"] > 0 for c in curve)
    distill = next(p for p in report["passes"] if p["name"] == "distill")["metrics"]
    for dev in (distill["dev_before"], distill["dev_after"]):  # keep_best ranks by the towers' mean, not the worst
        assert set(dev["cosine"]) == {"text", "vision"} and dev["cosine"]["text"] != dev["cosine"]["vision"]
        assert dev["score"] == pytest.approx(np.mean(list(dev["cosine"].values())), abs=1e-12)
    for i, p in enumerate(report["passes"]):
        assert f"<td class=\"num\">{i + 1}</td><td>{p['name']}</td><td class=\"num\">{p['seconds']:.2f}</td>" in page



def test_structure_and_distillation_plots_follow_report_json(compiled):
    report = json.loads((compiled / "report.json").read_text())
    antgmm = report["passes"][0]["metrics"]
    removed = {t: layers for seg in antgmm["segments"] for t, layers in (seg.get("removed_layers") or {}).items()}
    assert sum(map(len, removed.values())) == 1, "the depth stage removes one block of the tiny CLIP"
    towers = layer_structure(report, compiled)
    for name, s in antgmm["structure"].items():
        t = towers[name]
        assert (t["layers"], t["heads"], t["ffn"]) == (2, 4, 64)  # the tiny teacher's, from student/config.json
        assert sorted(t["kept"]) == s["teacher_layers"]
        assert [t["kept"][layer] for layer in s["teacher_layers"]] == list(zip(s["heads"], s["ffn"]))
        assert set(range(2)) - set(t["kept"]) == set(removed.get(name, []))

    runs = {title: (points, boundaries) for title, _, points, boundaries, _ in _distill_runs(report)}
    assert list(runs) == ["pass 1: antgmm's distillation", "pass 4: distill (all, 12 steps)"]
    # A segment whose cut removed nothing distils nothing.
    done = [d for seg in antgmm["segments"] if "distill" in seg
            for d in (seg["distill"] if isinstance(seg["distill"], list) else [seg["distill"]])]
    points, boundaries = runs["pass 1: antgmm's distillation"]
    assert len(boundaries) == len(done) and points[-1][0] == sum(d["steps"] for d in done)
    points, boundaries = runs["pass 4: distill (all, 12 steps)"]
    distill = report["passes"][3]["metrics"]
    assert boundaries == [] and [p[0] for p in points] == [0, 4, 8, 12]
    assert [p[2] for p in points] == [distill["dev_before"]["score"], *(c["score"] for c in distill["curve"])]
    assert [p[1] for p in points[1:]] == [c["loss"] for c in distill["curve"]]


def test_a_generative_distillation_is_summarised_by_its_kl_not_by_minus_the_kl() -> None:
    """A generative student's dev score is minus its KL (higher is better for keep_best); the page shows the
    KL itself."""
    metrics = {"steps": 20, "schedule": "all", "kept_step": 20, "train_seconds": 3.0,
               "dev_before": {"kl": 0.1011, "top1_agreement": 0.97, "score": -0.1011},
               "dev_after": {"kl": 0.0010, "top1_agreement": 1.0, "score": -0.0010},
               "curve": [{"step": 10, "loss": 0.5, "kl": 0.02, "score": -0.02},
                         {"step": 20, "loss": 0.1, "kl": 0.0010, "score": -0.0010}]}
    [(title, summary, points, boundaries, measure)] = _distill_runs({"passes": [{"name": "distill", "metrics": metrics}]})
    assert summary.startswith("dev KL to the teacher 0.1011 before, 0.0010 kept (step 20 of 20)")
    assert [p[2] for p in points] == [0.1011, 0.02, 0.0010] and measure.startswith("dev KL")

def verdict(page: str) -> tuple[str, str]:
    match = re.search(r'<div id="verdict" class="verdict (\w+)" data-passed="(\w+)">(\w[\w ]*):', page)
    assert match, "no verdict"
    return match.group(2), match.group(3)


def test_verdict_matches_report_json(compiled, tmp_path):
    report = json.loads((compiled / "report.json").read_text())
    assert report["passed"] is True
    page = (compiled / "report.html").read_text()
    assert verdict(page) == ("true", "PASSED") and f"all {len(report['validation']['gates'])} gates were met" in page

    out = copy_output(compiled, tmp_path / "out")
    (out / ".lmmc-files.json").unlink()  # the reports below are drawn as an older lmmc's, whose digests none kept
    failed = {**report, "passed": False}
    gates = [dict(g) for g in report["validation"]["gates"]]
    gates[1] = {**gates[1], "passed": False, "op": ">=", "value": 0.9999836, "threshold": 0.99999}
    failed["validation"] = {**report["validation"], "gates": gates, "passed": False}
    (out / "report.json").write_text(json.dumps(failed))
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert verdict(page) == ("false", "FAILED") and f"FAILED: 1 of {len(gates)} gates missed" in page
    assert page.count("<td>MISSED</td>") == 1 and page.count("<td>ok</td>") == len(gates) - 1
    # digits enough to see the miss: at 4 both would read "1"
    assert f'<tr class="gate missed"><td>{gates[1]["name"]}</td><td class="num">0.99998</td><td>&gt;= 0.99999</td>' in page

    (out / "report.json").write_text(json.dumps({**report, "passed": None, "validated": False}))
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    assert verdict((out / "report.html").read_text()) == ("null", "NOT VALIDATED")


def test_a_gates_threshold_prints_as_given():
    from lmmc.report_html import gate_digits

    # "0.9998 >= 1 MISSED": the figures differed at 4 digits, the threshold did not print whole
    assert format(0.99999, gate_digits(0.9998, 0.99999)) == "0.99999"
    assert [format(x, gate_digits(0.91234, 0.9)) for x in (0.91234, 0.9)] == ["0.9123", "0.9"]
    # a cosine of 0.99998 against a gate of 0 read as a student identical to its teacher
    assert [format(x, gate_digits(0.9999805, 0.0)) for x in (0.9999805, 0.0)] == ["0.99998", "0"]
    assert format(1.0, gate_digits(1.0, 0.5)) == "1"


def test_small_latencies_print_their_digits_and_one_thread_is_singular():
    from lmmc.cli import _tower_table
    from lmmc.report_html import _latency_timing

    lat = {"teacher": 0.0808, "student": 0.0396, "speedup": 2.04, "threads": 1, "runtime": "onnxruntime",
           "input": {"pixel_values": [8, 3, 16, 16]}}
    towers = {"vision": {"cosine_mean": 0.99, "cosine_min": 0.9, "runtime_max_abs_diff": {"pooled_embedding": 1e-6},
                         "runtime_output_scale": {"pooled_embedding": 1.0}, "latency_ms": lat}}
    assert _tower_table(towers)[1].split()[4:6] == ["0.0808", "0.0396"]
    assert "onnxruntime, 1 thread, inputs" in _latency_timing({"validation": {"towers": towers}}, None)


def test_sections_without_data_are_notes_not_errors():
    report = {"lmmc_version": "0", "model": "m", "adapter": "bert", "recipe": {}, "passes": [],
              "validation": {}, "validated": False, "passed": None}
    page = render(report)
    assert images(page) == []
    for note in ("not validated: no teacher-student comparison", "no per-sample cosines", "no weights were zeroed",
                 "no structured pruning ran", "no distillation ran", "no latency was measured",
                 "records no passes"):
        assert note in page, note
    assert verdict(page) == ("null", "NOT VALIDATED")



def test_a_validated_generative_model_is_not_said_to_lack_validation():
    # the page said "validation did not run" and "validate.latency is off" of a validated captioner
    report = {"lmmc_version": "0", "model": "m", "adapter": "llava", "recipe": {}, "passes": [],
              "validation": {"towers": {}, "generation": {"kl_per_sample": [0.25, 0.5, 2.0]}, "gates": [],
                             "passed": True}, "validated": True, "passed": True}
    page = render(report)
    assert "validation did not run" not in page and "validate.latency is off" not in page
    assert "Per sample, over 3 samples: median 0.5, largest 2." in page
    assert "a generative model&#x27;s validation times nothing" in page


def test_a_latency_target_is_shown_in_milliseconds_with_its_outcome():
    antgmm = {"name": "antgmm", "metrics": {
        "budget": "ms", "kept": 0.343, "target_keep": 0.35, "tokens": {"text": 16},
        "blocks_before": {"text": {"ms": 0.2448}}, "blocks_after": {"text": {"ms": 0.0840}},
        "structure": {"text": {"layers": 1, "teacher_layers": [0], "heads": [1], "ffn": [64], "head_dim": 8}}}}
    target = {"deploy": "onnxruntime-fp32-cpu-threads1-batch4-seq16", "target_ms": 0.5230, "measured_ms": 0.5758,
              "predicted_ms": 0.3523, "miss": 0.1010, "prediction_error": -0.3882, "speedup_target": 1.3,
              "speedup_predicted": 1.362, "speedup_measured": 1.181}
    report = {"lmmc_version": "0", "model": "m", "adapter": "bert", "passes": [antgmm], "passed": False,
              "validated": True, "validation": {"towers": {}, "latency_target": target, "gates": []}}
    page = render(report)
    assert '<td>text</td><td class="num">0.2448</td><td class="num">0.084</td><td class="num">34.3%</td>' in page
    assert "Latency target on onnxruntime-fp32-cpu-threads1-batch4-seq16: the student measured 10.1% off" in page
    assert "prediction was -38.8% off the measurement" in page
    for row in ("<td>target</td><td class=\"num\">0.523</td><td class=\"num\">1.3</td>",
                "<td>predicted at the cut</td><td class=\"num\">0.3523</td><td class=\"num\">1.362</td>",
                "<td>measured</td><td class=\"num\">0.5758</td><td class=\"num\">1.181</td>"):
        assert row in page, row
    assert "no latency was measured" not in page


def test_non_finite_cosines_are_counted_not_drawn(compiled):
    report = json.loads((compiled / "report.json").read_text())
    towers = report["validation"]["towers"]
    towers["text"]["cosine_per_sample"] = [None] * 32  # how report.json writes NaN
    towers["vision"]["cosine_per_sample"][:5] = [None] * 5
    page = render(report, compiled)
    assert "text: 32 of 32 held-out samples have a non-finite (NaN/Inf) cosine" in page
    assert "vision: 5 of 32 held-out samples have a non-finite (NaN/Inf) cosine" in page
    cosine = dict(images(page))["per-sample cosine to the teacher"]
    assert cosine.height < dict(images((compiled / "report.html").read_text()))["per-sample cosine to the teacher"].height


def test_deployment_artifacts_and_task_metric_side_by_side():
    report = {"lmmc_version": "0", "model": "m", "adapter": "clip", "passed": True, "validated": True,
              "validation": {"towers": {"text": {"held_out_samples": 40, "cosine_mean": 0.91, "cosine_min": 0.5}},
                             "task_metric": {"name": "zero-shot accuracy", "teacher": 0.96, "value": 0.93},
                             "exports": [{"tower": "text", "backend": "openvino", "precision": "int8",
                                          "variant": "nncf", "cosine_to_teacher": 0.905, "cosine_to_student": 0.99}],
                             "gates": [{"name": "text: cosine to teacher", "value": 0.91, "threshold": 0.8,
                                        "op": ">=", "passed": True}]}}
    page = render(report)
    assert '<td>text</td><td>openvino int8 nncf</td><td class="num">0.9050</td><td class="num">0.9900</td>' in page
    assert ('<tr class=""><td>teacher</td><td class="num">0.9600</td></tr><tr class=""><td>student</td>'
            '<td class="num">0.9300</td></tr><tr class=""><td>student / teacher</td><td class="num">0.9688</td>') in page

def test_sigterm_stops_lmmc_report_as_ctrl_c_does(compiled, tmp_path, monkeypatch):
    """A supervisor's SIGTERM while the page is drawn: exit 130 and one line saying the earlier page is kept,
    as for the compile; it killed lmmc report without a word (exit 143)."""
    import os
    import signal

    import lmmc.report_html

    out = copy_output(compiled, tmp_path / "out")
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    before = (out / "report.html").read_bytes()
    monkeypatch.setattr(lmmc.report_html, "write_report_html", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 130, result.output
    assert result.output.splitlines()[-1] == ("interrupted by SIGTERM; report.html was not written, and an earlier "
                                              "one is as it was")
    assert (out / "report.html").read_bytes() == before


def test_report_command_bad_input_touches_nothing(compiled, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "holds no report.json" in result.output
    assert list(tmp_path.iterdir()) == []

    out = copy_output(compiled, tmp_path / "out")
    (out / "report.html").write_text("<html>someone's own page</html>")
    result = runner.invoke(main, ["report", str(out)])
    assert result.exit_code == 2 and "was not written by lmmc" in result.output
    assert (out / "report.html").read_text() == "<html>someone's own page</html>"
    edited = (compiled / "report.html").read_text() + "<!-- my notes -->"  # a page lmmc drew, then edited
    (out / "report.html").write_text(edited)
    result = runner.invoke(main, ["report", str(out)])
    assert result.exit_code == 2 and "was not written by lmmc, or was edited since" in result.output
    assert (out / "report.html").read_text() == edited

    # a link the user made, even to a page lmmc drew elsewhere, is theirs: neither replaced nor written through
    (out / "report.html").unlink()
    (tmp_path / "kept.html").write_text((compiled / "report.html").read_text())
    (out / "report.html").symlink_to(tmp_path / "kept.html")
    result = runner.invoke(main, ["report", str(out)])
    assert result.exit_code == 2 and "is a symbolic link, which lmmc never writes" in result.output
    assert (out / "report.html").is_symlink()
    assert (tmp_path / "kept.html").read_text() == (compiled / "report.html").read_text()

    (out / "report.html").unlink()
    for text in ("{not json", '{"a": ' * 100_000 + "1" + "}" * 100_000):
        (out / "report.json").write_text(text)
        result = runner.invoke(main, ["report", str(out)])
        assert result.exit_code == 2 and "not valid JSON" in result.output
    assert not (out / "report.html").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lmmc-files.json"]  # no partial page

    # Edited by hand: the page would show the edits as the compile's figures
    (out / "report.json").write_text('{"lmmc_version": "0.1"}')
    result = runner.invoke(main, ["report", str(out)])
    assert result.exit_code == 2 and f"'{out / 'report.json'}' is not the file the compile wrote" in result.output
    assert not (out / "report.html").exists()
    # ... into shapes no compile writes, in an output without the digests (an older lmmc's): one message, not a crash
    (out / ".lmmc-files.json").unlink()
    report = json.loads((compiled / "report.json").read_text())
    for edit in (lambda r: r["validation"].update(towers=list(r["validation"]["towers"])),
                 lambda r: r["parameters"].update(teacher="lots"),
                 lambda r: r["parameters"].update(student=10 ** 400, teacher=1),
                 lambda r: [t.update(cosine_per_sample=[float("inf")] * 32) for t in r["validation"]["towers"].values()]):
        edited = json.loads(json.dumps(report))
        edit(edited)
        (out / "report.json").write_text(json.dumps(edited))
        result = runner.invoke(main, ["report", str(out)])
        assert result.exit_code == 2, result.output
        assert f"'{out / 'report.json'}' does not hold what lmmc compile writes" in result.output
        assert not (out / "report.html").exists()



def test_report_drawn_while_a_compile_replaces_the_output_is_not_written(compiled, tmp_path, monkeypatch):
    import fcntl

    import lmmc.report_html
    from lmmc.resume import LOCK_FILE, work_path

    out = copy_output(compiled, tmp_path / "out")
    (out / "report.html").unlink()
    draw = lmmc.report_html.render

    def drawn_as_a_compile_puts_its_output_in_place(report, out_dir):
        page = draw(report, out_dir)
        newer = copy_output(compiled, tmp_path / "newer")
        (newer / ".lmmc-files.json").write_text((newer / ".lmmc-files.json").read_text() + " ")
        (newer / "report.html").unlink()
        out_dir.rename(tmp_path / "older")
        newer.rename(out_dir)
        return page

    monkeypatch.setattr(lmmc.report_html, "render", drawn_as_a_compile_puts_its_output_in_place)
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 2 and "was replaced by a compile while its report was drawn" in result.output
    assert not (out / "report.html").exists() and not (tmp_path / "older" / "report.html").exists()
    monkeypatch.setattr(lmmc.report_html, "render", draw)

    # a compile writing to the folder holds its work area's lock
    area = work_path(out)
    area.mkdir()
    with open(area / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 2 and "a compile is writing to" in result.output
    assert not (out / "report.html").exists()


def test_a_link_planted_under_the_reports_temporary_name_is_not_written_through(compiled, tmp_path):
    """The page was written to a predictable temporary name (pid-numbered) through whatever link sat there:
    a file anywhere the user can write held the page, and report.html became a link to it."""
    out = copy_output(compiled, tmp_path / "out")
    (out / "report.html").unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (out / f".report.html.tmp-{os.getpid()}").symlink_to(victim)
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "mine"
    page = out / "report.html"
    assert not page.is_symlink() and page.read_text().startswith("<!DOCTYPE html>")
    assert not (out / f".report.html.tmp-{os.getpid()}").exists()


def test_report_command_adds_every_backend_of_bench_json(compiled, tmp_path):
    out = copy_output(compiled, tmp_path / "out")
    rows = [{"model": model, "artifact": artifact, "latency_ms": {"p50": ms}}
            for model, artifact, ms in [("teacher", "PyTorch eager fp32", 4.0), ("teacher", "OpenVINO INT8", 1.5),
                                        ("student", "onnx/text.onnx", 2.0)]]
    (out / "bench.json").write_text(json.dumps({"kind": JSON_KIND, "batch": 8, "threads": 2, "machine": {"cpus": 2},
                                                "towers": {"text": {"rows": rows}, "vision": {"rows": rows[:2]}}}))
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    page = (out / "report.html").read_text()
    assert "lmmc bench: median latency per backend, batch 8, 2 threads, 2 CPUs" in page
    found, before = dict(images(page)), dict(images((compiled / "report.html").read_text()))
    assert len(found) == PLOTS and "latency" not in found
    # five bars (three text backends, two vision) instead of the teacher and student of each tower
    assert found["latency per backend"].height > before["latency"].height

def test_a_bench_json_that_cannot_be_read_is_said_not_dropped(compiled, tmp_path):
    out = copy_output(compiled, tmp_path / "out")
    signed = {"kind": JSON_KIND, "batch": 8, "threads": 2, "towers": {}}
    signed["digest"] = _digest(signed)
    for text, why in (('{"kind": ', "is not valid JSON, so its latencies are left out"),
                      (json.dumps({"rows": []}), "was not written by lmmc bench, so it is left out"),
                      (json.dumps({**signed, "threads": 99}), "was edited since lmmc bench wrote it, so its latencies "
                                                               "are left out")):
        (out / "bench.json").write_text(text)
        result = CliRunner().invoke(main, ["report", str(out)])
        assert result.exit_code == 0, result.output
        assert f"warning: '{out / 'bench.json'}' {why}" in result.output
        page = (out / "report.html").read_text()
        assert html.escape(f"'{out / 'bench.json'}' {why}", quote=True) in page
        assert "latency" in dict(images(page))  # validation's timing drawn instead

# --- the page in a browser ------------------------------------------------------------------------------

def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    return found


def _chrome(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--force-device-scale-factor=1", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120, check=True)


def _layout(page: Path, tmp_path: Path) -> dict:
    """What Chromium made of the page: its height and, per image, whether it decoded and where it lies.
    Measured on a copy with a script added, so the page itself stays without scripts."""
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load', () => { const r = {height: document.documentElement"
              ".scrollHeight, images: [...document.images].map(i => { const b = i.getBoundingClientRect(); "
              "return {alt: i.alt, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight], "
              "box: [b.left + scrollX, b.top + scrollY, b.width, b.height]}; })}; "
              "document.body.setAttribute('data-layout', JSON.stringify(r)); });</script>")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    dom = _chrome(f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "--dump-dom", probe.as_uri()).stdout
    match = re.search(r"data-layout=\"([^\"]+)\"", dom)
    assert match, "Chromium ran no layout probe"
    return json.loads(html.unescape(match.group(1)))


def _screenshot(page: Path, path: Path, height: int) -> np.ndarray:
    _chrome(f"--window-size={VIEWPORT[0]},{height}", f"--screenshot={path}", page.as_uri())
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32)


def test_chromium_shows_every_plot(compiled, tmp_path):
    page = compiled / "report.html"
    layout = _layout(page, tmp_path)
    embedded = dict(images(page.read_text(encoding="utf-8")))
    assert len(layout["images"]) == PLOTS
    for img in layout["images"]:
        assert img["complete"] and img["natural"] == list(embedded[img["alt"]].size), img
    assert layout["height"] > 3 * VIEWPORT[1], "eight plots make a page several screens tall"

    first = _screenshot(page, tmp_path / "viewport.png", VIEWPORT[1])
    assert first.shape == (VIEWPORT[1], VIEWPORT[0], 3)
    assert first.std() > 20 and (first.min(2) < 200).mean() > 0.02, "the first screen is blank"

    whole = _screenshot(page, tmp_path / "page.png", layout["height"])
    assert whole.shape[0] == layout["height"]
    for img in layout["images"]:
        left, top, width, height = (round(v) for v in img["box"])
        shown = whole[top:top + height, left:left + width]
        assert shown.shape[:2] == (height, width) and width > 300, img
        drawn = np.asarray(embedded[img["alt"]].convert("RGB").resize((width, height), Image.BILINEAR),
                           dtype=np.float32)
        # the screenshot at that place is the plot itself, not a blank or another picture
        assert shown.std() > 10, img["alt"]
        assert np.abs(shown - drawn).mean() < 4, img["alt"]  # another plot there differs by 40 or more
