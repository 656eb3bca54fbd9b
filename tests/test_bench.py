"""`lmmc bench` on a tiny compiled model: rows and JSON against the artifacts, fidelity against the
compile's own validation and an independent computation, the latency ratio against an independent
timing loop, and bad input -> one clear error, exit 2, nothing written."""

import html
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner

from lmmc import load_student
from lmmc.adapters import TowerModule, example_inputs
from lmmc.bench import ENCODER_CHILD, NoRoom, best_pair, format_table, memory_process, student_artifacts
from lmmc.cli import main
from lmmc.compile import FILE_LIST
from lmmc.errors import LmmcError
from lmmc.export.onnx import export_tower
from lmmc.modelio import load_teacher
from lmmc.resume import hash_files
from lmmc.runtime.openvino import cpu_has_bf16
from tests.conftest import CORPUS, TINY_TEXT, lmmc_short_of_threads, save_preprocessors, save_tiny, spelled

BF16 = cpu_has_bf16()  # every IR is also run in bf16 where the CPU has the units


def ir_rows(label: str, bf16_label: str, static: bool) -> list[str]:
    """The rows of one OpenVINO IR: run in f32, in bf16 where the CPU can, and each compiled for the
    timed shape with --static."""
    rows = [label, *([bf16_label] if BF16 else [])]
    return rows + [f"{r} static" for r in rows] if static else rows


def teacher_rows(static: bool = False) -> list[str]:
    return ["PyTorch eager fp32", "onnxruntime fp32", "onnxruntime fused fp32", "onnxruntime INT8 dynamic",
            *ir_rows("openvino fp32", "openvino bf16", static),
            *ir_rows("openvino INT8 (NNCF)", "openvino INT8 (NNCF) bf16", static)]


TEACHER_ROWS = teacher_rows()
BATCH, SEQ = 8, 64
# Sentences the tiny tokenizer reads word by word; a corpus the compile never saw.
EXTRA = ["the man was on the road", "cold water in the house", "a picture of a number", "the text of the data",
         "python is a function", "the house on the road", "a man and a picture", "the data is cold",
         "water to the house", "a number in the text"]
EXTRA += [f"{a} and {b}" for a, b in zip(EXTRA, EXTRA[3:] + EXTRA[:3])] + \
         [f"{a} of {b}" for a in EXTRA[:4] for b in EXTRA[4:7]]  # 32: bench's floor of distinct samples


TEACHER_CACHE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _one_teacher_cache(tmp_path_factory):
    """The benches of this file keep the teacher's deployments in one folder (`--teacher-cache`): building them
    takes most of a short bench, and the tests bench the same few teachers again and again. The tests of the
    cache itself pass folders of their own."""
    TEACHER_CACHE[:] = [tmp_path_factory.mktemp("teacher-cache")]


def run(*args):
    if args and args[0] == "bench" and "--teacher-cache" not in args:
        args = (*args, "--teacher-cache", TEACHER_CACHE[0])
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A small BERT (hidden 128: big enough that timings measure compute, not call overhead), with its
    FFN channels and heads cut by AntGMM to 40 % of the blocks' FLOPs on real text, exported to ONNX, ONNX
    Runtime fused and INT8, OpenVINO fp32 and INT8: five student artifacts in the manifest."""
    tmp = tmp_path_factory.mktemp("bench")
    model_dir = tmp / "teacher"
    torch.manual_seed(0)
    teacher = transformers.BertModel(transformers.BertConfig(**{**TINY_TEXT, "hidden_size": 128,
                                                                "intermediate_size": 512}))
    with torch.no_grad():  # weights at a trained model's scale, so the blocks (and pruning them) matter
        for module in teacher.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(4)
    teacher.save_pretrained(model_dir)
    save_preprocessors("bert", model_dir)
    recipe = {
        "calibration": {"path": str(CORPUS), "samples": 16, "eval_samples": 32, "batch_size": 8, "max_length": 32},
        "passes": [{"antgmm": {"keep": 0.4, "importance": "activation", "seq_len": SEQ}}],
        "export": ["onnx", {"ort": {"fuse": "on", "int8": ["dynamic"], "threads": 1}}, {"openvino": {"int8": True}}],
        "validate": {"latency": False, "latency_batch": BATCH, "latency_seq": SEQ, "threads": 1},
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp / "out"
    result = run("compile", model_dir, "--recipe", tmp / "recipe.yaml", "--out", out)
    assert result.exit_code == 0, result.output
    return tmp, model_dir, out


def bench_compiled(compiled, *options) -> tuple[str, dict]:
    tmp, _, out = compiled
    extra = tmp / "extra.txt"
    extra.write_text("\n".join(EXTRA) + "\n")
    torch.set_num_threads(1)
    result = run("bench", out, "--threads", 1, "--corpus", extra, "--static", *options)
    assert result.exit_code == 0, result.output
    return result.stdout, json.loads((out / "bench.json").read_text())


@pytest.fixture(scope="module")
def benched(compiled):
    """The timed bench. Peak memory, one fresh process a row, is measured apart (`measured`): it takes most
    of a bench's time, and here it would hold the cores the timing needs alone."""
    return bench_compiled(compiled, "--repeats", 30, "--no-memory")


@pytest.fixture(scope="module")
def measured(compiled):
    """A bench of one timed run a row, with peak memory; it times nothing a test relies on."""
    return bench_compiled(compiled, "--repeats", 1, "--warmup", 1)


def test_each_rows_peak_memory_holds_at_least_its_weights(compiled, measured):
    """First in the file and not timed, so the compile and the memory processes share the cores."""
    _, model_dir, out = compiled
    _, bench = measured
    assert bench["memory"]
    rows = bench["towers"]["text"]["rows"]
    assert [r["artifact"] for r in rows if r["model"] == "teacher"] == teacher_rows(static=True)
    assert len(rows) == len(teacher_rows(static=True)) + 3 + 4 * len(ir_rows("", "", static=False))
    models = {"teacher": load_teacher(str(model_dir))[0], "student": load_student(out / "student")}
    weights = {k: sum(p.numel() for n, p in m.named_parameters() if not n.startswith("pooler."))
               for k, m in models.items()}
    for r in rows:  # a fresh process that loads and runs the model holds at least its weights
        assert r["peak_rss_mib"] >= weights[r["model"]] * {"int8": 1, "bf16": 2}.get(r["precision"], 4) / 2**20


@pytest.mark.parametrize("artifact, backend", [("onnx/text.onnx", "onnxruntime"), ("openvino/text.int8.xml", "openvino")])
def test_a_memory_process_of_a_runtime_imports_neither_torch_nor_transformers(compiled, tmp_path, artifact, backend):
    """They take seconds to import, in one fresh process for each row of the table."""
    _, model_dir, out = compiled
    teacher, adapter, _ = load_teacher(str(model_dir))
    ids, mask = example_inputs(teacher, adapter.tower("text"), batch=2, seq=8)
    np.savez(tmp_path / "feed.npz", input_ids=ids.numpy(), attention_mask=mask.numpy())
    spec = {"backend": backend, "inference": None, "static": None, "path": str(out / artifact), "model": None,
            "tower": "text", "feed": str(tmp_path / "feed.npz"), "threads": 1, "trust_remote_code": False}
    code = f"{ENCODER_CHILD}; import json, sys; print(json.dumps(sorted({{'torch', 'transformers'}} & set(sys.modules))))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=True)
    peak, imported = done.stdout.strip().splitlines()[-2:]
    assert json.loads(imported) == [] and json.loads(peak)["peak_rss_increase_mib"] > 0


@pytest.mark.timed
def test_rows_and_json_match_the_artifacts(compiled, benched):
    _, model_dir, out = compiled
    output, bench = benched
    assert bench["kind"] == "lmmc bench" and bench["threads"] == 1
    held_out = bench["corpora"]["held-out"]["text"]
    assert f"samples: held-out {held_out} texts; extra.txt {len(EXTRA)} texts" in output.splitlines()
    assert (bench["batch"], bench["seq"]) == (BATCH, SEQ)
    tower = bench["towers"]["text"]
    assert tower["input"] == {"input_ids": [BATCH, SEQ], "attention_mask": [BATCH, SEQ]}
    rows = tower["rows"]
    assert [r["artifact"] for r in rows if r["model"] == "teacher"] == teacher_rows(static=True)
    students = [r for r in rows if r["model"] == "student"]
    manifest = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert len(manifest) == 5
    expected_rows = []
    for a in manifest:
        if a["backend"] != "openvino":
            expected_rows.append((a["path"], a["backend"], a["precision"]))
            continue
        for label in ir_rows(a["path"], a["path"] + " bf16", static=True):
            expected_rows.append((label, "openvino", "bf16" if a["precision"] == "fp32" and "bf16" in label else a["precision"]))
    assert [(r["artifact"], r["backend"], r["precision"]) for r in students] == expected_rows
    for r in rows:
        assert r["static_shape"] == ([BATCH, SEQ] if r["artifact"].endswith(" static") else None)
    for r in students:
        path = out / r["artifact"].removesuffix(" static").removesuffix(" bf16")
        companion = [path.with_suffix(".bin")] if path.suffix == ".xml" else []
        assert r["size_bytes"] == sum(f.stat().st_size for f in [path, *companion])
    # parameters: every weight the exported tower uses (BERT's pooler is not part of the embedding)
    models = {"teacher": load_teacher(str(model_dir))[0], "student": load_student(out / "student")}
    expected = {k: sum(p.numel() for n, p in m.named_parameters() if not n.startswith("pooler."))
                for k, m in models.items()}
    assert expected["student"] < 0.6 * expected["teacher"]
    nonzero = {k: sum(int(p.count_nonzero()) for n, p in m.named_parameters() if not n.startswith("pooler."))
               for k, m in models.items()}
    assert nonzero["teacher"] < expected["teacher"]  # its biases start at zero
    for r in rows:
        assert r["parameters"] == expected[r["model"]] and r["nonzero_parameters"] == nonzero[r["model"]]
        assert len(r["latency_ms"]["runs"]) == 30
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p90"]
        assert r["throughput_per_s"] == pytest.approx(BATCH / r["latency_ms"]["p50"] * 1e3)
        assert r["peak_rss_mib"] is None
    # the table names every row, and ends with the comparison that matters
    for r in rows:
        assert r["artifact"] in output
    fastest = min(students, key=lambda r: r["latency_ms"]["p50"])
    best_teacher = min((r for r in rows if r["model"] == "teacher" and r["cosine_to_teacher"]["held-out"] >= 0.99),
                       key=lambda r: r["latency_ms"]["p50"])
    assert tower["best"]["student"] == fastest["artifact"] and tower["best"]["teacher"] == best_teacher["artifact"]
    assert tower["best"]["latency_ratio"] == pytest.approx(fastest["latency_ms"]["p50"] / best_teacher["latency_ms"]["p50"])
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert last.startswith(f"text: fastest student {fastest['artifact']} vs fastest teacher {best_teacher['artifact']}")


@pytest.mark.timed
def test_fidelity_matches_the_compile_and_an_independent_computation(compiled, benched):
    tmp, model_dir, out = compiled
    _, bench = benched
    report = json.loads((out / "report.json").read_text())
    rows = {(r["model"], r["artifact"]): r for r in bench["towers"]["text"]["rows"]}
    student = rows[("student", "onnx/text.onnx")]
    # the held-out split is re-derived from the recipe: the compile's own validation measured the same
    assert student["cosine_to_teacher"]["held-out"] == pytest.approx(
        report["validation"]["towers"]["text"]["cosine_mean"], abs=1e-4)
    assert student["cosine_to_teacher"]["held-out"] < 0.99  # pruning shows; the comparison above means something
    for fp32 in ("onnxruntime fp32", "onnxruntime fused fp32", "openvino fp32"):
        assert rows[("teacher", fp32)]["cosine_to_teacher"]["held-out"] > 0.9999
    if BF16:  # bf16 inference: close to the fp32 IR run in f32, yet not the same numbers
        for model, fp32, bf16 in [("teacher", "openvino fp32", "openvino bf16"),
                                  ("student", "openvino/text.xml", "openvino/text.xml bf16")]:
            a, b = (rows[(model, k)]["cosine_to_teacher"]["held-out"] for k in (fp32, bf16))
            assert a != b and abs(a - b) < 0.01
    # an IR compiled for the timed shape pads the held-out batches up to it: the same embeddings in f32
    for model, ir in [("teacher", "openvino fp32"), ("student", "openvino/text.xml"),
                      ("teacher", "openvino INT8 (NNCF)"), ("student", "openvino/text.int8.xml")]:
        a, b = (rows[(model, k)]["cosine_to_teacher"] for k in (ir, f"{ir} static"))
        for corpus in a:
            assert b[corpus] == pytest.approx(a[corpus], abs=2e-3 if "int8" in ir.lower() else 1e-5)
    # the extra corpus: every line (fewer than the samples drawn), student in ONNX Runtime vs teacher in PyTorch
    teacher, adapter, pre = load_teacher(str(model_dir))
    enc = pre["tokenizer"](EXTRA, padding=True, truncation=True, max_length=32, return_tensors="pt")  # the recipe's
    with torch.no_grad():
        t = TowerModule(teacher, adapter.tower("text"))(enc["input_ids"], enc["attention_mask"])[1].numpy()
    session = ort.InferenceSession(str(out / "onnx" / "text.onnx"), providers=["CPUExecutionProvider"])
    s = session.run(["pooled_embedding"], {"input_ids": enc["input_ids"].numpy(),
                                           "attention_mask": enc["attention_mask"].numpy()})[0]
    expected = float((t * s).sum(1).mean())  # both L2-normalised
    assert bench["corpora"]["extra.txt"] == {"text": len(EXTRA)}
    assert student["cosine_to_teacher"]["extra.txt"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.timed
def test_latency_ratio_agrees_with_an_independent_loop(compiled, benched, tmp_path):
    """bench's student/teacher ratio of medians (both ONNX Runtime fp32) against a plain loop timed here,
    same sizes, same thread. Loose (factor 1.5) because the CPUs are shared, but it fails when bench
    times the wrong model, feed or thread count: the pruned student is about twice as fast."""
    _, model_dir, out = compiled
    _, bench = benched
    rows = {(r["model"], r["artifact"]): r["latency_ms"]["p50"] for r in bench["towers"]["text"]["rows"]}
    reported = rows[("student", "onnx/text.onnx")] / rows[("teacher", "onnxruntime fp32")]

    teacher, adapter, _ = load_teacher(str(model_dir))
    tower = adapter.tower("text")
    export_tower(teacher, tower, tmp_path / "teacher.onnx")
    ids, mask = example_inputs(teacher, tower, batch=BATCH, seq=SEQ)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for p in (tmp_path / "teacher.onnx", out / "onnx" / "text.onnx")]
    times: list[list[float]] = [[], []]
    for i in range(45):
        for k, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            if i >= 5:
                times[k].append(time.perf_counter() - start)
    independent = statistics.median(times[1]) / statistics.median(times[0])
    assert independent < 0.75, independent  # the pruned student is clearly faster: the check below can fail
    assert 1 / 1.5 <= reported / independent <= 1.5, (reported, independent)


def test_each_deployment_is_let_go_once_its_rows_are_measured(compiled, monkeypatch):
    """Every deployment stays loaded while they are timed in turns; after that, each one's runtime, with the
    buffers its fidelity batches grew, goes before the next one's fidelity runs."""
    import weakref

    import lmmc.bench

    loaded, alive = [], []
    load, embeddings = lmmc.bench.load, lmmc.bench.embeddings

    def tracked_load(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    def counted_embeddings(*args):
        alive.append(sum(ref() is not None for ref in loaded))
        return embeddings(*args)

    monkeypatch.setattr(lmmc.bench, "load", tracked_load)
    monkeypatch.setattr(lmmc.bench, "embeddings", counted_embeddings)
    bench_compiled(compiled, "--repeats", 1, "--warmup", 1, "--no-memory")
    # the first call is the PyTorch teacher's reference; the loaded deployments are the other rows
    assert alive[0] == len(loaded) >= 12
    # one call per deployment and corpus (held-out split, EXTRA): each deployment's pair sees one fewer
    # loaded than the pair before; the newest student artifact stays the bench's own until the tower ends
    per_row = alive[2::2]
    assert per_row == list(range(len(loaded), len(loaded) - len(per_row), -1))
    assert per_row[-1] <= 2


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_bench_of_one_runtime_builds_holds_and_times_only_its_deployments(compiled, benched, monkeypatch, backend):
    """--backend: the teacher in PyTorch eager (fidelity's reference) and that runtime's deployments, the
    teacher's and the student's; nothing of another runtime is built, imported or loaded, and the rows it
    keeps measure what the full bench measured."""
    import lmmc.bench

    _, _, out = compiled
    other = "openvino" if backend == "onnxruntime" else "onnxruntime"

    def refused(*args, **kwargs):
        raise AssertionError(f"a teacher deployment of {other} was built")
    if backend == "onnxruntime":  # the bench runs without the OpenVINO extra
        monkeypatch.setitem(sys.modules, "openvino", None)
        monkeypatch.setitem(sys.modules, "nncf", None)
        monkeypatch.setattr("lmmc.export.openvino.torch_to_openvino", refused)
    else:
        monkeypatch.setattr("lmmc.export.onnx.export_tower", refused)
    loaded = []
    load = lmmc.bench.load
    monkeypatch.setattr(lmmc.bench, "load", lambda path, which, *a, **k: loaded.append(which) or load(path, which, *a, **k))
    output, bench = bench_compiled(compiled, "--repeats", 3, "--no-memory", "--backend", backend)
    assert set(loaded) == {backend}
    assert bench["backends"] == [backend] and f"runtimes: {backend} only (--backend)" in output
    rows = bench["towers"]["text"]["rows"]
    full = {(r["model"], r["artifact"]): r["cosine_to_teacher"] for r in benched[1]["towers"]["text"]["rows"]}
    kept = [k for k, r in zip(full, benched[1]["towers"]["text"]["rows"]) if r["backend"] in ("pytorch", backend)]
    assert [(r["model"], r["artifact"]) for r in rows] == kept
    manifest = json.loads((out / "manifest.json").read_text())["artifacts"]
    left = [a["path"] for a in manifest if a["backend"] == other]
    assert f"--backend {backend}: student artifacts {', '.join(left)} not benched" in bench["notes"]
    for r in rows:  # the same files on the same texts; NNCF's INT8 IR of the teacher is built anew
        if r["inference_precision"] != "bf16" and r["artifact"] != "openvino INT8 (NNCF)":
            for corpus, cosine in r["cosine_to_teacher"].items():
                assert cosine == pytest.approx(full[(r["model"], r["artifact"])][corpus], abs=1e-5)
    assert bench["towers"]["text"]["best"]["teacher"] in {a for _, a in kept}


def test_the_bench_bar_in_a_log_draws_a_frame_at_its_start_and_end(compiled, tmp_path):
    """Each change of the bar's label drew a frame, past the 30 s a log's bars wait between frames. A process
    of its own: tqdm reads TQDM_MININTERVAL, which the command sets off a terminal, when it is first imported."""
    import subprocess

    _, _, out = compiled
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import sys; from lmmc.cli import main; main(sys.argv[1:])", "bench", str(out),
               "--quick", "--no-memory", "--json", str(tmp_path / "b.json")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = [f for f in proc.stderr.replace("\n", "\r").split("\r") if f.startswith("bench text")]
    assert 1 <= len(frames) <= 3, frames


def test_dual_encoder_benched_per_tower(tmp_path):
    """CLIP: one table per tower, each with the teacher's six deployments and that tower's artifact, and
    fidelity on the re-derived held-out split equal to the compile's own, tower by tower. The recipe sets
    no timing length: text is timed at validation's default, 128 tokens capped at CLIP's positions."""
    save_tiny("clip", tmp_path / "clip")
    recipe = {"calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
              "passes": [{"wanda": {"sparsity": 0.5}}], "export": ["onnx"],
              "validate": {"latency": False, "latency_batch": 2, "threads": 1}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert run("compile", tmp_path / "clip", "--recipe", tmp_path / "recipe.yaml", "--out", out).exit_code == 0
    result = run("bench", out, "--quick")
    assert result.exit_code == 0, result.output
    bench = json.loads((out / "bench.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert set(bench["towers"]) == {"text", "vision"}
    for name, tower in bench["towers"].items():
        assert [r["artifact"] for r in tower["rows"]] == [*TEACHER_ROWS, f"onnx/{name}.onnx"]
        assert tower["rows"][-1]["cosine_to_teacher"]["held-out"] == pytest.approx(
            report["validation"]["towers"][name]["cosine_mean"], abs=1e-4)
        assert f"{name}: fastest student onnx/{name}.onnx vs fastest teacher {tower['best']['teacher']}" in result.output
    assert bench["towers"]["vision"]["input"] == {"pixel_values": [2, 3, 32, 32]}
    positions = json.loads((tmp_path / "clip" / "config.json").read_text())["text_config"]["max_position_embeddings"]
    assert bench["towers"]["text"]["input"]["input_ids"] == [2, min(128, positions)]

    # Pairs of 33 pictures under two captions (a class prompt each): each tower counts its own distinct items.
    # Counted by pair, the captions stood for 33 texts in the text tower's column; two of them refused the corpus,
    # where its images are enough for the vision tower.
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "pictures").mkdir()
    pairs = []
    for i in range(33):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "pictures" / f"{i}.png")
        pairs.append(json.dumps({"image": f"pictures/{i}.png", "text": f"a picture of a {('cat', 'dog')[i % 2]}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    result = run("bench", out, "--quick", "--corpus", tmp_path / "pairs.jsonl")
    assert result.exit_code == 0, result.output
    bench = json.loads((out / "bench.json").read_text())
    assert bench["corpora"]["pairs.jsonl"] == {"image": 33}
    assert f"note: --corpus {tmp_path / 'pairs.jsonl'}: its texts are 2 distinct text(s), fewer than the 32 " \
           f"fidelity needs, so the text tower's fidelity is not measured on it" in " ".join(result.output.split())
    assert "pairs.jsonl" not in bench["towers"]["text"]["rows"][-1]["cosine_to_teacher"]


def _no_artifacts(tmp_path, out):
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("onnx", "manifest.json", "bench.json"))
    return bare


def _teacher_moved(tmp_path, out):
    moved = tmp_path / "moved"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("bench.json"))
    report = json.loads((moved / "report.json").read_text())
    report["inputs"]["model"]["path"] = str(tmp_path / "gone")
    (moved / "report.json").write_text(json.dumps({**report, "model": str(tmp_path / "gone")}))
    return moved


def _teacher_changed(tmp_path, teacher):
    """A copy of the teacher with one weight changed: what a bench run from another directory holding a
    model of the same relative name would read."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher, other)
    weights = load_file(other / "model.safetensors")
    weights["embeddings.word_embeddings.weight"][5] += 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    return other


def _without_tokenizer(tmp_path, out):
    lacking = tmp_path / "lacking"
    shutil.copytree(out, lacking, ignore=shutil.ignore_patterns("bench.json"))
    (lacking / "student" / "tokenizer.json").unlink()
    return lacking


def _without_weights(tmp_path, out):
    lacking = tmp_path / "unweighted"
    shutil.copytree(out, lacking, ignore=shutil.ignore_patterns("bench.json"))
    (lacking / "openvino" / "text.bin").unlink()
    return lacking


def _artifact_edited(tmp_path, out):
    edited = tmp_path / "edited"
    shutil.copytree(out, edited, ignore=shutil.ignore_patterns("bench.json"))
    with open(edited / "openvino" / "text.bin", "r+b") as f:  # one weight's bytes, the size kept
        f.seek(64)
        f.write(b"\x7f\xc0\x00\x00")
    return edited


def _tokenizer_swapped(tmp_path, out):
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped, ignore=shutil.ignore_patterns("bench.json"))
    tokenizer = swapped / "student" / "tokenizer.json"
    spec = json.loads(tokenizer.read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two words read as each other: another tokenizer, the same size
    tokenizer.write_text(json.dumps(spec))
    return swapped


def _report_edited(tmp_path, out):
    edited = tmp_path / "report-edited"
    shutil.copytree(out, edited, ignore=shutil.ignore_patterns("bench.json"))
    report = json.loads((edited / "report.json").read_text())
    report["recipe"]["calibration"]["seed"] = 7  # another held-out split, some of it calibrated on
    (edited / "report.json").write_text(json.dumps(report))
    return edited


def _file_list_damaged(tmp_path, out):
    damaged = tmp_path / "list-damaged"
    shutil.copytree(out, damaged, ignore=shutil.ignore_patterns("bench.json"))
    listed = damaged / FILE_LIST
    listed.write_text(listed.read_text()[:300])
    return damaged


def _manifest_redirected(tmp_path, out):
    redirected = tmp_path / "redirected"
    shutil.copytree(out, redirected, ignore=shutil.ignore_patterns("bench.json"))
    manifest = json.loads((redirected / "manifest.json").read_text())
    fp32 = next(a for a in manifest["artifacts"] if a["backend"] == "openvino" and a["precision"] == "fp32")
    int8 = next(a for a in manifest["artifacts"] if a["backend"] == "openvino" and a["precision"] == "int8")
    fp32["path"], fp32["files"] = int8["path"], int8["files"]  # the INT8 graph listed as the fp32 one
    (redirected / "manifest.json").write_text(json.dumps(manifest))
    return redirected


def _other_data(tmp_path):
    (tmp_path / "other.txt").write_text("\n".join(EXTRA * 8) + "\n")
    return tmp_path / "other.txt"


@pytest.mark.parametrize("case", ["missing", "not lmmc", "no artifacts", "backend missing", "json not ours",
                                  "teacher moved", "teacher changed", "teacher of another kind", "teacher no model",
                                  "data changed", "seq too long",
                                  "static seq below the texts", "empty json path", "threads past any CPU",
                                  "tokenizer deleted", "weights deleted", "artifact edited", "tokenizer swapped",
                                  "manifest edited", "report edited", "file list damaged", "json a link",
                                  "json inside the output", "json dash", "json a folder"])
def test_bad_input_one_clear_error_exit_2_nothing_written(tmp_path, compiled, monkeypatch, case):
    _, teacher, out = compiled
    target = out / "student" / "mine.json" if case == "json inside the output" else tmp_path / "b.json"
    args = {
        "missing": ([tmp_path / "nope"], "does not exist; pass the --out directory of an lmmc compile"),
        "not lmmc": ([tmp_path], "is not an lmmc output (no report.json or student/lmmc.json)"),
        "no artifacts": ([_no_artifacts(tmp_path, out)], "holds no student artifact to bench"),
        "backend missing": ([out], "pip install 'lmmc[openvino]'"),
        "json not ours": ([out], "exists and was not written there by lmmc bench"),
        "teacher moved": ([_teacher_moved(tmp_path, out)], "if it moved, pass --teacher with its new place"),
        "teacher changed": ([out, "--teacher", _teacher_changed(tmp_path, teacher)],
                            f"is not the model {out} was compiled from: its files differ from those the compile read "
                            f"({teacher}); pass --teacher with that model"),
        # a ViT's towers were read first: "holds no student artifact to bench", with onnx/text.onnx there
        "teacher of another kind": ([out, "--teacher", save_tiny("vit", tmp_path / "vit")],
                                    f"is not the model {out} was compiled from"),
        "teacher no model": ([out, "--teacher", tmp_path / "nope"], f"cannot open --teacher '{tmp_path / 'nope'}': "),
        "data changed": ([out, "--calib", _other_data(tmp_path)], f"is not the data {out} was compiled with (its "
                                                                  f"files differ), so its held-out split would be another"),
        "seq too long": ([out, "--seq", 65], "--seq 65 is more tokens than the teacher's text tower takes (64 "
                                             "positions); pass --seq 64 or less"),
        # the held-out texts are cut at the compile's max_length, 32
        "static seq below the texts": ([out, "--static", "--seq", 8], "--static compiles the IRs for 8 tokens, and the "
                                                                     "texts fidelity is measured on run to 32 tokens"),
        "empty json path": ([out], "--json is an empty path"),
        "threads past any CPU": ([out, "--threads", 10**20], "less than or equal to 1024"),
        # benched with the teacher's tokenizer, an output open_dir refuses
        "tokenizer deleted": ([_without_tokenizer(tmp_path, out)], "lacks ['student/tokenizer.json'], the "
                                                                   "preprocessing files its manifest lists"),
        # refused before the teacher's exports, not after them
        "weights deleted": ([_without_weights(tmp_path, out)], "openvino/text.bin', a file of student artifact "
                                                               "'openvino/text.xml' listed in manifest.json, is missing"),
        # refused before the teacher's exports, and never benched as the compile's
        "artifact edited": ([_artifact_edited(tmp_path, out)], "openvino/text.bin' is not the file the compile wrote "
                                                               "(its SHA-256 differs from the one .lmmc-files.json "
                                                               "keeps): it was edited or damaged since"),
        # the deployment's own preprocessing, which bench's feeds (the teacher's tokenizer's) never read
        "tokenizer swapped": ([_tokenizer_swapped(tmp_path, out)], "student/tokenizer.json' is not the file the "
                                                                   "compile wrote"),
        "manifest edited": ([_manifest_redirected(tmp_path, out)], "manifest.json' is not the file the compile wrote"),
        # its recipe draws the held-out split and sets the gate: benched with seed 7's split, exit 0
        "report edited": ([_report_edited(tmp_path, out)], "report.json' is not the file the compile wrote"),
        # it checked nothing, and said nothing
        "file list damaged": ([_file_list_damaged(tmp_path, out)], ".lmmc-files.json' is damaged (not the JSON object "
                                                                   "of digests the compile wrote)"),
        # the user's link (here dangling) stays a link, as lmmc report keeps a report.html link
        "json a link": ([out], "is a symbolic link, which lmmc never writes"),
        # a file there that the compile did not list would stop `lmmc compile --force` from replacing the output
        "json inside the output": ([out], f"is inside the output {out}, where bench writes only bench.json"),
        # read as standard output by many tools; it wrote a file named '-' in the current folder
        "json dash": ([out], "--json - would write a file named '-'"),
        "json a folder": ([out], f"--json '{target}' is a folder; give the path of a file, such as '{target / 'bench.json'}'"),
    }
    where, message = args[case]
    if case == "backend missing":
        monkeypatch.setitem(sys.modules, "nncf", None)  # what Python does when the package is absent
    if case == "json not ours":
        target.write_text('{"mine": 1}')
    if case == "json a link":
        target.symlink_to(tmp_path / "elsewhere.json")
    if case == "json dash":
        monkeypatch.chdir(tmp_path)
        target = tmp_path / "-"
    if case == "json a folder":
        target.mkdir()
    result = run("bench", *where, "--json", {"empty json path": "", "json dash": "-"}.get(case, target), "--quick")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1
    if case == "json a folder":
        assert list(target.iterdir()) == []
    else:
        assert (target.read_text() == '{"mine": 1}') if case == "json not ours" else not target.exists()
    assert target.is_symlink() == (case == "json a link")


def _tampered_output(tmp_path, change):
    """An lmmc output as bench reads it up to the point of loading the teacher (the report, the student's
    record, one ONNX file), with `change` applied to (report, manifest)."""
    out = tmp_path / "out"
    (out / "student").mkdir(parents=True)
    (out / "student" / "lmmc.json").write_text("{}")
    (out / "onnx").mkdir()
    (out / "onnx" / "text.onnx").write_bytes(b"")
    report = {"model": str(save_tiny("bert", tmp_path / "teacher")),
              "recipe": {"calibration": {"random": True, "samples": 16, "eval_samples": 32}, "validate": {}}}
    manifest = {"artifacts": [{"tower": "text", "backend": "onnxruntime", "precision": "fp32", "path": "onnx/text.onnx"}]}
    change(report, manifest)
    (out / "report.json").write_text(json.dumps(report))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("change, message", [
    (lambda r, m: r.pop("recipe"), "{out}/report.json lacks its recipe's calibration or validate section, from "
     "which lmmc bench takes the held-out split and the timing settings; recompile to rewrite it"),
    (lambda r, m: r.pop("model"), "{out}/report.json does not name the model it was compiled from; recompile to "
     "rewrite it"),
    (lambda r, m: r["recipe"]["calibration"].update(samples="lots"), "{out}/report.json holds a bad calibration "
     "section in its recipe; recompile to rewrite it:\n  samples: Input should be a valid integer, unable to parse "
     "string as an integer"),
    (lambda r, m: r["recipe"]["validate"].update(threads="two"), "{out}/report.json holds a bad validate section in "
     "its recipe; recompile to rewrite it:\n  threads: Input should be a valid integer, unable to parse string as an "
     "integer"),
    (lambda r, m: m["artifacts"][0].update(path="../outside.onnx"), "{out}/manifest.json names '../outside.onnx', "
     "which is not a file inside '{out}'; a manifest names only files of its own output directory: recompile to "
     "rewrite it"),
    (lambda r, m: m["artifacts"][0].pop("tower"), "{out}/manifest.json is not an lmmc manifest (each artifact needs "
     "a tower, backend, precision and path, each tower a modality and its preprocessing); recompile to rewrite it"),
    # an absolute path is found from nowhere else, and a folder is not missing
    (lambda r, m: r["recipe"]["calibration"].update(random=False, path="/nonexistent/calib.txt"), "the compile's "
     "calibration data '/nonexistent/calib.txt' is not there any more; put it back, or pass --calib with the same "
     "file where it now is"),
    (lambda r, m: m["artifacts"][0].update(path="student"), "student artifact '{out}/student' is listed in "
     "manifest.json but not a file; recompile '{out}'"),
], ids=["report without recipe", "report without model", "samples not a number", "threads not a number",
        "artifact outside", "artifact without tower", "calibration data gone", "artifact a folder"])
def test_a_tampered_report_or_manifest_is_one_error_naming_the_file(tmp_path, change, message):
    out = _tampered_output(tmp_path, change)
    (tmp_path / "outside.onnx").write_bytes(b"")
    result = run("bench", out, "--json", tmp_path / "b.json", "--quick")
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert f"error: {message.format(out=out)}\n" in result.output, result.output
    assert not (tmp_path / "b.json").exists()


def test_corpora_of_one_name_each_keep_a_column():
    from lmmc.bench import corpus_names

    paths = [Path("a/extra.txt"), Path("b/extra.txt"), Path("news.txt"), Path("imgs/held-out")]
    assert corpus_names(paths) == ["a/extra.txt", "b/extra.txt", "news.txt", "imgs/held-out"]
    assert corpus_names([Path("held-out"), Path("./held-out")]) == [str(Path("held-out").absolute())] * 2


def _row(model, artifact, p50, cosine):
    return {"model": model, "artifact": artifact, "latency_ms": {"p50": p50}, "cosine_to_teacher": {"held-out": cosine}}


def test_best_student_must_keep_the_recipes_fidelity_gate():
    rows = [_row("teacher", "openvino INT8 (NNCF)", 40.0, 0.998), _row("teacher", "onnxruntime fp32", 130.0, 1.0),
            _row("student", "ort/text.int8-static.onnx", 10.0, 0.80), _row("student", "openvino/text.int8.xml", 20.0, 0.95),
            _row("student", "onnx/text.onnx", 60.0, 0.96)]
    best = best_pair(rows, min_cosine=0.9)
    assert (best["student"], best["teacher"], best["latency_ratio"]) == ("openvino/text.int8.xml", "openvino INT8 (NNCF)", 0.5)
    assert best["student_meets_min_cosine"] is True
    assert best_pair(rows)["student"] == "ort/text.int8-static.onnx"  # no gate: the fastest
    none = best_pair(rows, min_cosine=0.99)
    assert (none["student"], none["student_meets_min_cosine"]) == ("ort/text.int8-static.onnx", False)
    # a faster teacher deployment that no longer keeps the teacher's fidelity is not the reference
    degraded = [*rows, _row("teacher", "openvino INT8 (NNCF) bf16", 30.0, 0.938)]
    assert best_pair(degraded, min_cosine=0.9)["teacher"] == "openvino INT8 (NNCF)"
    assert best_pair([*degraded, _row("teacher", "openvino bf16", 35.0, 0.9999)])["teacher"] == "openvino bf16"
    # an artifact whose cosine is NaN (broken) is never the best student, with or without a gate
    broken = [*rows, _row("student", "ort/text.fp16.onnx", 5.0, float("nan"))]
    assert best_pair(broken)["student"] == "ort/text.int8-static.onnx"
    assert best_pair(broken, min_cosine=0.99)["student"] == "ort/text.int8-static.onnx"
    assert best_pair(broken, min_cosine=0.9)["student"] == "openvino/text.int8.xml"


@pytest.mark.parametrize("args, message", [
    (["--backend", "openvino"], "holds no openvino student artifact to bench (its artifacts run in onnxruntime); "
                                "pass --backend onnxruntime, or leave --backend out"),
    (["--backend", "tensorrt"], "--backend tensorrt: bench runs onnxruntime and openvino on cpu, not tensorrt; set "
                                "--device to cuda on a machine with an NVIDIA GPU"),
    (["--backend", "tflite"], "Invalid value for '--backend': 'tflite' is not one of")])
def test_a_backend_the_output_or_the_device_lacks_is_one_clear_error(uncapped, tmp_path, args, message):
    _, _, out = uncapped  # its one artifact is an ONNX file
    result = run("bench", out, "--quick", "--json", tmp_path / "b.json", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "b.json").exists()


def test_a_runtime_the_teacher_is_not_deployed_in_is_said_to_compare_with_pytorch():
    from lmmc.bench import no_teacher_deployment

    # bench builds the teacher no TensorRT engine: on a GPU its ONNX Runtime fp16 is the one to compare with
    assert no_teacher_deployment("cuda", ("tensorrt",)) == (
        "--backend tensorrt: bench deploys the teacher in none of these runtimes on cuda, so the student is compared "
        "with the teacher in PyTorch eager; add --backend onnxruntime to compare it with the teacher's ONNX Runtime "
        "deployments")
    for device, chosen in [("cuda", ("onnxruntime", "tensorrt")), ("cuda", ()), ("cpu", ("openvino",)),
                           ("cpu", ("onnxruntime",))]:
        assert no_teacher_deployment(device, chosen) is None, (device, chosen)


def test_artifacts_from_the_manifest_and_backends_the_cpu_cannot_run(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "text.onnx").write_bytes(b"")
    (tmp_path / "onnx" / "vision.onnx").write_bytes(b"")
    # without a manifest: onnx/<tower>.onnx of the model's towers
    found, skipped = student_artifacts(tmp_path, ["text"])
    assert [(a["label"], a["backend"], a["path"]) for a in found] == [("onnx/text.onnx", "onnxruntime", tmp_path / "onnx" / "text.onnx")]
    unchecked = (f"{tmp_path} has no .lmmc-files.json, the digests of the files its compile wrote, so its artifacts "
                 f"and report.json were not checked against them (an older lmmc's output, or the list was removed)")
    assert skipped == [unchecked]  # nothing checked, and it says so
    (tmp_path / "openvino").mkdir()
    (tmp_path / "openvino" / "text.xml").write_bytes(b"")
    assert student_artifacts(tmp_path, ["text"])[1] == [  # what a manifest would have named is not left out unsaid
        f"{tmp_path} has no manifest.json, which names each artifact's tower and backend: only onnx/*.onnx is "
        f"benched, and openvino/text.xml are left out (compile again to write the manifest)", unchecked]
    entries = [{"tower": "text", "backend": "onnxruntime", "precision": "fp32", "path": "onnx/text.onnx"},
               {"tower": "text", "backend": "tensorrt", "precision": "fp16", "path": "tensorrt/text.engine"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": entries}))
    found, skipped = student_artifacts(tmp_path, ["text"])
    assert [a["label"] for a in found] == ["onnx/text.onnx"]
    assert skipped == ["student tensorrt/text.engine: tensorrt artifacts are not benched on the CPU", unchecked]


def test_a_recipe_with_bench_prints_the_table_after_the_compile(tmp_path, monkeypatch):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {
        "calibration": {"path": str(CORPUS), "samples": 16, "eval_samples": 32, "batch_size": 8, "max_length": 32},
        "passes": [{"wanda": {"sparsity": 0.5}}],
        "validate": {"latency": False, "latency_batch": 2, "latency_seq": 16, "threads": 1},
        "bench": {"repeats": 3, "warmup": 1, "memory": False, "threads": 1, "teacher_cache": "cache"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = run("compile", model_dir, "--recipe", tmp_path / "recipe.yaml", "--out", out)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "bench.json").read_text())
    # the recipe's folder, read beside the recipe as its other paths are
    assert saved["teacher_cache"] == str(tmp_path / "cache") and len(list((tmp_path / "cache").iterdir())) == 1
    rows = saved["towers"]["text"]["rows"]
    assert [r["artifact"] for r in rows] == [*TEACHER_ROWS, "onnx/text.onnx"]
    assert [len(r["latency_ms"]["runs"]) for r in rows] == [3] * len(rows)
    student = rows[-1]["cosine_to_teacher"]["held-out"]
    validated = json.loads((out / "report.json").read_text())["validation"]["towers"]["text"]["cosine_mean"]
    assert student == pytest.approx(validated, abs=1e-4)
    assert result.stdout.strip().splitlines()[-1] == format_table(saved).splitlines()[-1]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")
    import lmmc.bench
    monkeypatch.setattr(lmmc.bench, "bench", interrupted)
    result = run("compile", model_dir, "--recipe", tmp_path / "recipe.yaml", "--out", tmp_path / "again")
    assert result.exit_code == 130 and (tmp_path / "again" / "report.json").is_file()
    assert result.output.strip().splitlines()[-1] == (
        f"interrupted by SIGINT during the bench; the compile's output in '{tmp_path / 'again'}' is complete: run "
        f"'lmmc bench {tmp_path / 'again'}' to time it")


# ---------------------------------------------------------------------------------------------------------
# A compile whose recipe sets no calibration.max_length, of a model with 64 positions: what bench re-derives
# must be capped at them as the compile's own split was.

LONG = " ".join(["the man was on the road to the house of the data and the python function read the text of a "
                 "picture of a number in the cold water"] * 3)


@pytest.fixture(scope="module")
def uncapped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncapped")
    model_dir = save_tiny("bert", tmp / "teacher")
    recipe = {"calibration": {"path": str(CORPUS), "samples": 16, "eval_samples": 32, "batch_size": 8},
              "passes": [{"wanda": {"sparsity": 0.5}}], "export": ["onnx"],
              "validate": {"latency": False, "latency_batch": 2, "threads": 1}}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp / "out"
    result = run("compile", model_dir, "--recipe", tmp / "recipe.yaml", "--out", out)
    assert result.exit_code == 0, result.output
    return tmp, model_dir, out


def test_held_out_split_and_corpus_are_capped_at_the_models_positions(uncapped, tmp_path, monkeypatch):
    """The compile encodes texts to at most min(128, positions) tokens; bench re-derives the held-out
    split and encodes a --corpus the same way (uncapped, 128 tokens crash a model with 64 positions).
    Given relative to the working directory, the output's paths are written absolute to the JSON."""
    _, model_dir, out = uncapped
    texts = [LONG, LONG + " again", *EXTRA]
    (tmp_path / "long.txt").write_text("\n".join(texts) + "\n")
    teacher, adapter, pre = load_teacher(str(model_dir))
    assert len(pre["tokenizer"](LONG)["input_ids"]) > 64  # the cap matters
    monkeypatch.chdir(out.parent)
    result = run("bench", out.name, "--quick", "--corpus", tmp_path / "long.txt", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "b.json").read_text())
    student = bench["towers"]["text"]["rows"][-1]
    assert bench["out_dir"] == str(out.resolve()) and student["file"] == str((out / "onnx" / "text.onnx").resolve())
    report = json.loads((out / "report.json").read_text())
    assert student["cosine_to_teacher"]["held-out"] == pytest.approx(
        report["validation"]["towers"]["text"]["cosine_mean"], abs=1e-4)
    # LONG " again" reads, cut to 64 tokens, as LONG: one input, counted once
    assert bench["corpora"]["long.txt"] == {"text": len(texts) - 1}
    assert f"--corpus {tmp_path / 'long.txt'}: 1 of its texts read, cut to 64 tokens, as a text the compile " \
           f"calibrated or distilled on or as another of its texts, and are left out of its fidelity" in bench["notes"]
    texts.remove(LONG + " again")
    enc = pre["tokenizer"](texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        t = TowerModule(teacher, adapter.tower("text"))(enc["input_ids"], enc["attention_mask"])[1].numpy()
    session = ort.InferenceSession(str(out / "onnx" / "text.onnx"), providers=["CPUExecutionProvider"])
    s = session.run(["pooled_embedding"], {"input_ids": enc["input_ids"].numpy(),
                                           "attention_mask": enc["attention_mask"].numpy()})[0]
    assert student["cosine_to_teacher"]["long.txt"] == pytest.approx(float((t * s).sum(1).mean()), abs=1e-4)


def test_a_nan_cosine_is_null_in_strict_json(uncapped, tmp_path):
    """A student whose outputs are NaN (as a compile wrote it: the file list keeps its digest): bench.json stays
    strict JSON, the cosine null, and the table says nan."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    _, _, out = uncapped
    broken = tmp_path / "out"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("bench.json"))
    model = onnx.load(broken / "onnx" / "text.onnx")
    table = next(i for i in model.graph.initializer if i.name.endswith("word_embeddings.weight"))
    table.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(table), np.nan), table.name))
    onnx.save(model, broken / "onnx" / "text.onnx")
    listed = json.loads((broken / FILE_LIST).read_text())
    (broken / FILE_LIST).write_text(json.dumps({**listed, "onnx/text.onnx": hash_files(broken / "onnx" / "text.onnx")}))
    result = run("bench", broken, "--quick")
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise AssertionError(f"{constant} in bench.json")
    bench = json.loads((broken / "bench.json").read_text(), parse_constant=refuse)
    rows = bench["towers"]["text"]["rows"]
    assert rows[-1]["artifact"] == "onnx/text.onnx" and rows[-1]["cosine_to_teacher"] == {"held-out": None}
    assert rows[0]["cosine_to_teacher"] == {"held-out": 1.0}
    assert [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("student ")] == ["nan"]


def _readonly_dir(tmp_path):
    """A folder this process cannot create files in: chmod for a user; root writes through modes, so
    for root sysfs, where it cannot create files either."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    try:
        with tempfile.NamedTemporaryFile(dir="/sys/kernel"):
            pass
    except OSError:
        return Path("/sys/kernel")
    pytest.skip("no folder here refuses root's files")


def test_the_fidelity_script_agrees_with_validation(uncapped):
    """benchmarks/fidelity.py, whose figures BENCHMARKS.md quotes, had fallen behind two changes to bench's
    functions and failed at once."""
    from benchmarks.fidelity import fidelity

    _, _, out = uncapped
    got = fidelity(out, [CORPUS], 12, bands=True)
    validated = json.loads((out / "report.json").read_text())["validation"]["towers"]["text"]["cosine_mean"]
    assert got["text held-out"] == pytest.approx(validated, abs=5e-5)  # the script rounds to 4 decimals
    bands = got[f"text {CORPUS.name} by length"]
    assert sum(int(v.split("(")[1].rstrip(")")) for v in bands.values()) == 12
    assert 0 < got[f"text {CORPUS.name}"] <= 1


def test_runs_are_saved_in_the_order_timed_and_small_files_keep_their_size(uncapped, tmp_path, monkeypatch):
    """The JSON's runs were sorted, which hid any drift over the run; the table's MB column printed a
    tens-of-KB artifact as 0.0."""
    import lmmc.bench

    _, _, out = uncapped
    timed = lmmc.bench.interleaved_latency

    def speeding_up(candidates, *args):  # as many runs as timed, each 10 ms faster than the one before
        return {i: [10.0 * (len(runs) - k) + i for k in range(len(runs))]
                for i, runs in timed(candidates, *args).items()}

    monkeypatch.setattr(lmmc.bench, "interleaved_latency", speeding_up)
    result = run("bench", out, "--quick", "--no-memory", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())["towers"]["text"]["rows"]
    for r in rows:
        runs = r["latency_ms"]["runs"]
        assert runs == sorted(runs, reverse=True) and runs != sorted(runs)
        assert r["latency_ms"]["p50"] == statistics.median(runs)
        assert r["latency_ms"]["p90"] == pytest.approx(np.percentile(runs, 90))
    student = next(r for r in rows if r["artifact"] == "onnx/text.onnx")
    assert student["size_bytes"] < 1e6
    line = next(x for x in result.stdout.splitlines() if x.startswith("student  onnx/text.onnx "))
    assert f" {student['size_bytes'] / 1e6:.3f} " in line


def test_an_unwritable_json_folder_fails_before_the_run(uncapped, tmp_path, monkeypatch):
    _, _, out = uncapped
    ro = _readonly_dir(tmp_path)
    started = []
    monkeypatch.setattr("lmmc.modelio.load_teacher", lambda *a: started.append(a))
    result = run("bench", out, "--quick", "--json", ro / "b.json")
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert (f"error: cannot write '{ro / 'b.json'}': folder '{ro}' refuses new files (Permission denied); make it "
            f"writable or pass --json with a path in a writable folder\n") in result.output
    assert started == [] and not (ro / "b.json").exists()


@pytest.mark.parametrize("option, where", [("--json", "teacher"), ("--teacher-cache", "teacher"),
                                           ("--teacher-cache", "output")])
def test_a_json_or_a_teacher_cache_inside_what_bench_reads_is_refused(uncapped, monkeypatch, option, where):
    """A file bench added to the teacher's folder would change what it reads: every later bench would refuse the
    teacher as changed since the compile. In the output, the cache would change the files a bench checks are
    unchanged at its end, and it would save nothing."""
    _, model_dir, out = uncapped
    place, what = {"teacher": (model_dir, "the teacher's folder"), "output": (out, "the output")}[where]
    target = place / ("bench.json" if option == "--json" else "cache")
    started = []
    monkeypatch.setattr("lmmc.modelio.load_teacher", lambda *a: started.append(a))
    before = sorted(p.name for p in place.iterdir())
    result = run("bench", out, "--quick", option, target)
    assert result.exit_code == 2, result.output
    assert (f"error: {option} '{target}' is inside {what} ({place}), which bench reads; pass {option} with a path "
            f"outside it") in " ".join(result.output.split())
    assert started == [] and sorted(p.name for p in place.iterdir()) == before


def _during_the_run(monkeypatch, action):
    """Runs `action` while bench measures, after the checks at its start."""
    import lmmc.bench

    measure = lmmc.bench._bench_tower

    def measured(*args):
        action()
        return measure(*args)
    monkeypatch.setattr(lmmc.bench, "_bench_tower", measured)


def test_a_failed_write_at_the_end_prints_the_table_and_one_error(uncapped, tmp_path, monkeypatch):
    _, _, out = uncapped
    folder = tmp_path / "results"
    folder.mkdir()
    _during_the_run(monkeypatch, lambda: folder.rmdir())
    result = run("bench", out, "--quick", "--json", folder / "b.json")
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert "text: fastest student onnx/text.onnx vs fastest teacher" in result.stdout
    assert (f"error: lmmc bench measured everything but saved nothing: cannot write '{folder / 'b.json'}' (No such "
            f"file or directory); make '{folder}' writable or pass --json with another path\n") in result.output


def test_a_file_put_at_the_json_path_during_the_run_is_kept(uncapped, tmp_path, monkeypatch):
    _, _, out = uncapped
    target = tmp_path / "b.json"
    _during_the_run(monkeypatch, lambda: target.write_text('{"mine": 1}'))
    result = run("bench", out, "--quick", "--json", target)
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert "text: fastest student onnx/text.onnx vs fastest teacher" in result.stdout
    assert (f"error: lmmc bench measured everything but saved nothing, as '{target}' changed during the run: "
            f"'{target}' exists and was not written there by lmmc bench, or was edited since; pass --json with "
            f"another path\n") in result.output
    assert target.read_text() == '{"mine": 1}' and [p.name for p in tmp_path.iterdir()] == ["b.json"]


def test_a_copy_or_an_edit_of_a_bench_json_is_the_users(uncapped, tmp_path):
    """bench replaces a JSON it wrote at that path, unedited; a baseline copied from it, or the output's own
    bench.json with the user's notes added, is the user's file."""
    _, _, out = uncapped
    target = tmp_path / "b.json"
    assert run("bench", out, "--quick", "--no-memory", "--json", target).exit_code == 0
    first = json.loads(target.read_text())
    assert first["json"] == str(target) and len(first["digest"]) == 64
    assert run("bench", out, "--quick", "--no-memory", "--json", target).exit_code == 0  # its own: replaced
    assert json.loads(target.read_text())["seconds"] != first["seconds"]
    baseline = tmp_path / "baseline.json"
    shutil.copy(target, baseline)
    kept = baseline.read_bytes()
    result = run("bench", out, "--quick", "--no-memory", "--json", baseline)
    assert result.exit_code == 2 and "exists and was not written there by lmmc bench" in result.output, result.output
    assert baseline.read_bytes() == kept
    assert run("bench", out, "--quick", "--no-memory").exit_code == 0
    own = json.loads((out / "bench.json").read_text())
    assert "json" not in own  # the output's own bench.json is known by its place
    (out / "bench.json").write_text(json.dumps({**own, "note": "mine"}, indent=2))
    edited = (out / "bench.json").read_bytes()
    result = run("bench", out, "--quick", "--no-memory")
    assert result.exit_code == 2 and "or was edited since" in result.output, result.output
    assert (out / "bench.json").read_bytes() == edited
    (out / "bench.json").unlink()


def teacher_rows_of(bench: dict) -> dict[str, dict]:
    return {r["artifact"]: r["cosine_to_teacher"] for r in bench["towers"]["text"]["rows"] if r["model"] == "teacher"}


def test_a_teacher_cache_is_built_once_and_reused_with_the_same_figures(uncapped, tmp_path, monkeypatch):
    _, _, out = uncapped
    cache = tmp_path / "cache"
    assert run("bench", out, "--quick", "--teacher-cache", cache, "--json", tmp_path / "1.json").exit_code == 0
    first = json.loads((tmp_path / "1.json").read_text())
    [entry] = cache.iterdir()
    assert first["teacher_cache"] == str(cache)
    written = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    assert {"teacher-text.onnx", "teacher-text.int8.xml", "teacher-text.int8.bin", "entry.json"} <= set(written)

    def exported(*args, **kwargs):
        raise AssertionError("the cached teacher was exported again")
    monkeypatch.setattr("lmmc.export.onnx.export_tower", exported)
    result = run("bench", out, "--quick", "--teacher-cache", cache, "--json", tmp_path / "2.json")
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "2.json").read_text())
    assert teacher_rows_of(again) == teacher_rows_of(first)  # the same files: the same embeddings
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == written
    assert list(cache.iterdir()) == [entry]


def test_a_damaged_teacher_cache_entry_is_built_anew_for_the_bench_and_left_as_it_is(uncapped, tmp_path, monkeypatch):
    _, _, out = uncapped
    cache = tmp_path / "cache"
    assert run("bench", out, "--quick", "--teacher-cache", cache, "--json", tmp_path / "1.json").exit_code == 0
    [entry] = cache.iterdir()
    with open(entry / "teacher-text.int8.bin", "r+b") as f:
        f.truncate(100)
    import lmmc.export.onnx
    exports = []
    real = lmmc.export.onnx.export_tower
    monkeypatch.setattr(lmmc.export.onnx, "export_tower", lambda *a, **k: exports.append(a) or real(*a, **k))
    result = run("bench", out, "--quick", "--teacher-cache", cache, "--json", tmp_path / "2.json")
    assert result.exit_code == 0, result.output
    assert len(exports) == 1 and (entry / "teacher-text.int8.bin").stat().st_size == 100
    notes = json.loads((tmp_path / "2.json").read_text())["notes"]
    assert [n for n in notes if "cached in" in n] == [
        f"teacher text: the deployments cached in '{entry}' are incomplete or changed since they were built, so "
        f"they were built again for this bench; remove that folder to cache them anew"]
    assert teacher_rows_of(json.loads((tmp_path / "2.json").read_text())) == \
        teacher_rows_of(json.loads((tmp_path / "1.json").read_text()))


def test_a_bench_stopped_while_building_the_teacher_leaves_no_entry(uncapped, tmp_path, monkeypatch):
    _, _, out = uncapped
    cache = tmp_path / "cache"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")
    monkeypatch.setattr("lmmc.export.openvino.quantize_openvino", stopped)  # the last of the teacher's steps
    assert run("bench", out, "--quick", "--teacher-cache", cache, "--json", tmp_path / "b.json").exit_code == 130
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert run("bench", out, "--quick", "--teacher-cache", cache, "--json", tmp_path / "b.json").exit_code == 0
    [entry] = cache.iterdir()
    assert json.loads((entry / "entry.json").read_text())["files"]["teacher-text.int8.bin"] > 0


def test_the_teacher_cache_key_follows_the_weights_the_calibration_and_the_device(uncapped):
    from lmmc.bench import teacher_cache_key

    _, model_dir, _ = uncapped
    teacher, adapter, _ = load_teacher(str(model_dir))
    tower = adapter.tower("text")
    calib = [{"input_ids": np.arange(12).reshape(2, 6), "attention_mask": np.ones((2, 6), dtype=np.int64)}]
    key = teacher_cache_key(teacher, tower, calib, "cpu")
    assert teacher_cache_key(teacher, tower, [dict(b) for b in calib], "cpu") == key
    assert teacher_cache_key(teacher, tower, calib, "cuda") != key
    other = [{**calib[0], "attention_mask": np.array([[1] * 6, [1] * 5 + [0]])}]
    assert teacher_cache_key(teacher, tower, other, "cpu") != key
    with torch.no_grad():
        next(teacher.parameters())[0, 0] += 1e-3
    assert teacher_cache_key(teacher, tower, calib, "cpu") != key


def test_an_output_a_compile_replaces_during_the_run_gets_no_bench_json(uncapped, tmp_path, monkeypatch):
    """A bench beside a `compile --force` into the same folder saved the old student's figures into the new
    output (or into the old one, which the compile then removed) and exited 0; lmmc report then drew them
    on the new student's page."""
    from lmmc.resume import WorkArea

    _, _, original = uncapped
    out = tmp_path / "out"
    shutil.copytree(original, out)
    area = WorkArea(out)
    area.claim({}, resume=False)  # a compile running into it, as its lock says
    try:
        result = run("bench", out, "--quick", "--no-memory")
    finally:
        area.discard()
    assert result.exit_code == 2, result.output
    assert f"a compile (pid {os.getpid()} on " in result.output and f"is writing to '{out}'" in result.output
    listed = out / FILE_LIST
    _during_the_run(monkeypatch, lambda: listed.write_text(listed.read_text() + "\n"))  # a compile replaced it
    result = run("bench", out, "--quick", "--no-memory")
    assert result.exit_code == 2, result.output
    assert "text: fastest student onnx/text.onnx vs fastest teacher" in result.stdout
    assert (f"error: lmmc bench measured everything but saved nothing: '{out}' was replaced or is being replaced by "
            f"a compile since the run began") in " ".join(result.output.split())
    assert not (out / "bench.json").exists()
    monkeypatch.undo()
    assert run("bench", out, "--quick", "--no-memory").exit_code == 0
    assert run("report", out).exit_code == 0
    timed = "lmmc bench: median latency per backend"
    assert timed in (out / "report.html").read_text()
    listed.write_text(listed.read_text() + "\n")  # recompiled since the bench
    result = run("report", out)
    assert result.exit_code == 0, result.output
    why = (f"'{out / 'bench.json'}' timed another compile's output (one since replaced, or copied from elsewhere), "
           f"so its latencies are left out; run lmmc bench {out} again")
    assert f"warning: {why}" in " ".join(result.output.split())
    page = (out / "report.html").read_text()
    assert html.escape(why, quote=True) in page and timed not in page


def _calibrated_texts(out: Path) -> list[str]:
    """The texts the compile of `out` calibrated on, split again from its recipe."""
    from lmmc.data import read_samples, select
    from lmmc.recipe import CalibrationConfig

    cfg = CalibrationConfig.model_validate(json.loads((out / "report.json").read_text())["recipe"]["calibration"])
    return [r["text"] for r in select(cfg, CORPUS, read_samples(CORPUS), {"text"}).calib]


def test_more_threads_than_the_process_may_start_is_one_clear_error(compiled, tmp_path):
    """A thousand threads' stacks past a memory limit failed inside the teacher's export, as an internal error."""
    _, _, out = compiled
    done = lmmc_short_of_threads("bench", out, "--threads", 1000, "--json", tmp_path / "b.json")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --threads 1000: this process cannot start 1000 threads (can't start new thread); a limit on its memory "
        f"('ulimit -v') or processes ('ulimit -u') stops it. Ask for fewer: it may run on "
        f"{len(os.sched_getaffinity(0))} CPU(s)")
    assert not (tmp_path / "b.json").exists()


def test_threads_above_the_cpus_are_noted_as_unequal_runtimes(uncapped, tmp_path):
    """OpenVINO runs no more threads than the cores, ONNX Runtime all it is given: the table would compare the
    two at unequal threads without a word."""
    _, _, out = uncapped
    cpus = len(os.sched_getaffinity(0))
    for threads, notes in ((cpus + 1, 1), (cpus, 0)):
        result = run("bench", out, "--quick", "--threads", threads, "--json", tmp_path / f"{threads}.json")
        assert result.exit_code == 0, result.output
        bench = json.loads((tmp_path / f"{threads}.json").read_text())
        assert bench["threads"] == threads
        assert [n for n in bench["notes"] if n.startswith("threads ")] == [
            f"threads {cpus + 1} is above the {cpus} CPU(s) this process may use: ONNX Runtime's threads wait for a "
            f"core while OpenVINO runs {cpus}, so the rows compare runtimes at unequal threads; pass --threads {cpus} "
            f"or fewer"][:notes]


def test_texts_of_exactly_the_cut_length_are_not_counted_as_cut(uncapped, tmp_path):
    """A text of 64 tokens, [CLS] and [SEP] included, fills the mask and is whole; the note counted it as cut."""
    _, _, out = uncapped
    whole = [f"{w} " + "the " * 61 for w in ("water", "house", "road")]  # 62 words: 64 tokens
    longer = [f"{w} " + "the " * 70 for w in ("man", "number")]
    (tmp_path / "edge.txt").write_text("\n".join([*whole, *longer, *EXTRA]) + "\n")
    result = run("bench", out, "--quick", "--corpus", tmp_path / "edge.txt", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "b.json").read_text())["notes"]
    assert [n for n in notes if "are cut to" in n] == [f"--corpus {tmp_path / 'edge.txt'}: 2 of its {5 + len(EXTRA)} "
                                                      f"texts are cut to 64 tokens, as the compile cut its held-out split"]


def test_a_corpus_is_judged_without_what_the_compile_calibrated_on(uncapped, tmp_path):
    """A --corpus holding the compile's calibration texts (here: its whole calibration file) is judged on
    the rest: fidelity on calibrated texts is not held-out fidelity. A corpus of nothing else is refused."""
    _, _, out = uncapped
    calibrated = _calibrated_texts(out)
    assert len(calibrated) == 16
    lines = [*calibrated, *(t.upper() for t in calibrated[:3]), *EXTRA]  # another case is the same text
    (tmp_path / "mixed.txt").write_text("\n".join(lines) + "\n")
    result = run("bench", out, "--quick", "--corpus", tmp_path / "mixed.txt", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["corpora"]["mixed.txt"] == {"text": len(EXTRA)}
    note = f"--corpus {tmp_path / 'mixed.txt'}: 16 of its {16 + len(EXTRA)} distinct samples were calibrated or distilled on"
    assert [n for n in bench["notes"] if n.startswith("--corpus")] == [
        note + " (their texts or images) and are left out of its fidelity"]

    (tmp_path / "calib.txt").write_text("\n".join(calibrated) + "\n")
    result = run("bench", out, "--quick", "--corpus", tmp_path / "calib.txt", "--json", tmp_path / "c.json")
    assert result.exit_code == 2, result.output
    assert (f"error: --corpus '{tmp_path / 'calib.txt'}': the compile calibrated or distilled on every sample of "
            f"it") in " ".join(result.output.split())
    assert not (tmp_path / "c.json").exists()


def test_corpus_texts_the_tokenizer_reads_as_calibration_texts_are_left_out(uncapped, tmp_path):
    """A --corpus text that differs from a calibration text only where the uncased tokenizer does not look (its
    accents) is the same input to the model: it is left out of the held-out fidelity, as a copy is."""
    from lmmc.bench import load_data
    from lmmc.recipe import CalibrationConfig

    _, model_dir, out = uncapped
    teacher, adapter, pre = load_teacher(str(model_dir))
    calib_cfg = CalibrationConfig.model_validate(json.loads((out / "report.json").read_text())["recipe"]["calibration"])
    calibrated = list(load_data(calib_cfg, teacher, adapter, pre).calibration_texts)
    accented = [t.replace("e", "é") for t in calibrated if "e" in t]
    assert accented and all(pre["tokenizer"](a)["input_ids"] == pre["tokenizer"](t.replace("é", "e"))["input_ids"]
                            for a, t in zip(accented, accented))
    (tmp_path / "c.txt").write_text("\n".join(accented + EXTRA) + "\n")
    result = run("bench", out, "--quick", "--corpus", tmp_path / "c.txt", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["corpora"]["c.txt"] == {"text": len(EXTRA)}
    assert any(n.startswith(f"--corpus {tmp_path / 'c.txt'}: {len(accented)} of its texts read, cut to 64 tokens, as "
                            f"a text the compile calibrated or distilled on") for n in bench["notes"]), bench["notes"]


def test_a_corpus_line_of_megabytes_is_cut_before_the_tokenizer_reads_it(uncapped, tmp_path, monkeypatch):
    """The tokenizer never reads a --corpus line whole: one of megabytes took seconds and gigabytes, and
    killed the process where memory was short."""
    _, _, out = uncapped
    longest: list[int] = []
    call = transformers.PreTrainedTokenizerBase.__call__

    def recording(self, text=None, *args, **kwargs):
        longest.append(max(map(len, [text] if isinstance(text, str) else text or [""])))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__", recording)
    line = " ".join(EXTRA * 20_000)  # about 1.2 MB
    (tmp_path / "c.txt").write_text(line + "\n" + "\n".join(EXTRA) + "\n")
    result = run("bench", out, "--quick", "--corpus", tmp_path / "c.txt", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.json").read_text())["corpora"]["c.txt"] == {"text": len(EXTRA) + 1}
    assert len(line) > 10**6 and longest and max(longest) < 10**4


def test_the_distillation_corpora_count_as_trained_on(tmp_path):
    """Every corpus a distill pass read, nested in another pass's settings too, joins the calibration split
    in what a --corpus is judged without; a corpus that is gone is said in a note."""
    from types import SimpleNamespace

    from lmmc.bench import trained_on
    from lmmc.data import text_key

    (tmp_path / "d.txt").write_text("The first line\nthe second line\n")
    (tmp_path / "e.txt").write_text("A third line\n")
    (tmp_path / "f.txt").write_text("A fourth line\n")
    passes = [{"distill": {"corpus": str(tmp_path / "d.txt")}},
              {"antgmm": {"distill": {"corpus": [str(tmp_path / "e.txt"), str(tmp_path / "f.txt")]}}},
              {"distill": {"corpus": str(tmp_path / "gone.txt")}}]
    notes: list[str] = []
    data = SimpleNamespace(calibrated=frozenset({"text:x"}), calibration_texts=("X",))
    seen = trained_on({"recipe": {"passes": passes}}, data, {"text"}, notes)
    assert seen.keys == {"text:x", *("text:" + text_key(t) for t in ["the first line", "the second line",
                                                                     "a third line", "a fourth line"])}
    assert seen.texts == ("X", "The first line", "the second line", "A third line", "A fourth line")  # as written
    assert notes == [f"the distillation corpus {tmp_path / 'gone.txt'} is not there any more: --corpus samples it "
                     f"held are not told apart from unseen ones"]
    # edited since the compile hashed it: which --corpus texts were distilled on can no longer be told
    from lmmc.resume import hash_data

    data_inputs = {"passes[0].distill.corpus": {"path": str(tmp_path / "d.txt"), "sha256": hash_data(tmp_path / "d.txt")}}
    report = {"recipe": {"passes": passes[:1]}, "inputs": {"data": data_inputs}}
    assert len(trained_on(report, data, {"text"}, []).keys) == 3
    (tmp_path / "d.txt").write_text("The first line\n")
    with pytest.raises(LmmcError, match="the distillation corpus .*d.txt changed since the compile read it, so bench "
                                        "cannot tell which --corpus samples the student was distilled on"):
        trained_on(report, data, {"text"}, [])


@pytest.mark.parametrize("lines, message", [
    ([], "--corpus '{path}' holds no samples; give it at least a few texts or images"),
    (["only one line"], "--corpus '{path}' holds only 1 distinct sample this model reads; needs at least 2: add more texts"),
    (["same", "same", "same"], "--corpus '{path}' holds only 1 distinct sample this model reads; needs at least 2: "
                               "add more texts"),
    (["caf\u00e9 au lait", "Cafe\u0301  AU lait", "caf\u00e9 au\u200b lait"],
     "--corpus '{path}' holds only 1 distinct sample this model reads; needs at least 2: add more texts"),
    ([f"the {spelled(i)} road" for i in range(10)],
     "--corpus '{path}' holds at most 10 distinct texts this compile did not train on, and fidelity on fewer than 32 "
     "certifies nothing (the floor of the recipe's validate.min_held_out); give at least 32"),
], ids=["empty", "one line", "one distinct line", "one text in three forms", "ten lines"])
def test_a_corpus_too_small_is_one_error_naming_it(uncapped, tmp_path, lines, message):
    _, _, out = uncapped
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"{line}\n" for line in lines))
    result = run("bench", out, "--quick", "--corpus", path, "--json", tmp_path / "b.json")
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert f"error: {message.format(path=path)}\n" in result.output, result.output
    assert not (tmp_path / "b.json").exists()


def test_another_outputs_bench_json_is_named_as_such(uncapped, tmp_path):
    _, _, out = uncapped
    assert run("bench", out, "--quick").exit_code == 0
    other = tmp_path / "other"
    shutil.copytree(out, other)  # its bench.json was written for out, at out's path
    mine = (other / "bench.json").read_bytes()
    result = run("bench", out, "--quick", "--json", other / "bench.json")
    assert result.exit_code == 2 and (f"error: '{other / 'bench.json'}' is the bench result of another output, {other}; "
                                      f"pass --json with another path") in " ".join(result.output.split())
    assert (other / "bench.json").read_bytes() == mine


def test_a_corpus_larger_than_bench_draws_says_how_many_it_scored(uncapped, tmp_path):
    _, _, out = uncapped
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"the {spelled(i)} road\n" for i in range(300)))
    result = run("bench", out, "--quick", "--corpus", path, "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.json").read_text())["corpora"]["corpus.txt"] == {"text": 256}
    assert (f"note: --corpus {path}: 256 of its 300 distinct texts, drawn with the calibration seed, are scored"
            in " ".join(result.output.split()))


def test_a_vision_model_has_no_seq_and_static_irs_of_batch_only(tmp_path):
    """ViT: no text, so no timing length (and --seq is refused); an IR compiled for the timed shape is
    compiled for the batch only. --repeats 4 times two whole turns of three: the header says 6."""
    save_tiny("vit", tmp_path / "vit")
    recipe = {"calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
              "passes": [{"wanda": {"sparsity": 0.5}}], "export": ["onnx"],
              "validate": {"latency": False, "latency_batch": 2, "threads": 1}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert run("compile", tmp_path / "vit", "--recipe", tmp_path / "recipe.yaml", "--out", out).exit_code == 0
    refused = run("bench", out, "--quick", "--seq", 9)
    assert refused.exit_code == 2 and refused.output.count("error:") == 1, refused.output
    assert (f"error: --seq sets the tokens of a text sample, and the teacher '{tmp_path / 'vit'}' has no text tower "
            f"(towers: vision); drop --seq\n") in refused.output
    assert not (out / "bench.json").exists()
    (tmp_path / "pictures.txt").write_text("a\nb\n")  # read by nothing, and nothing said so
    ignored = run("bench", out, "--quick", "--calib", tmp_path / "pictures.txt")
    assert ignored.exit_code == 2 and "this compile read none (its recipe's calibration.random draws random " \
                                      "inputs); leave --calib out" in " ".join(ignored.output.split())
    one = run("bench", out, "--quick", "--repeats", 1, "--json", tmp_path / "one.json")  # refused, though documented
    assert one.exit_code == 0, one.output
    rows = json.loads((tmp_path / "one.json").read_text())["towers"]["vision"]["rows"]
    assert [len(r["latency_ms"]["runs"]) for r in rows] == [3] * len(rows)
    result = run("bench", out, "--quick", "--static", "--repeats", 4)
    assert result.exit_code == 0, result.output
    bench = json.loads((out / "bench.json").read_text())
    assert (bench["seq"], bench["repeats"]) == (None, 4)
    rows = bench["towers"]["vision"]["rows"]
    assert [r["artifact"] for r in rows] == [*teacher_rows(static=True), "onnx/vision.onnx"]
    for r in rows:
        assert r["static_shape"] == ([2] if r["artifact"].endswith(" static") else None)
        assert len(r["latency_ms"]["runs"]) == 6
    assert result.stdout.splitlines()[0] == (
        "threads 1, batch 2, 1 warm-up round + 6 timed runs a candidate (repeats 4 rounded up to whole turns), in "
        "turns of 1 untimed + 3 timed; cosine: mean to the fp32 teacher (PyTorch) per corpus")


def test_a_link_planted_under_the_jsons_temporary_name_is_not_written_through(tmp_path):
    """The JSON went to a predictable temporary name (pid-numbered) through whatever link sat there, and a
    file the link named held bench's JSON; one planted before the run made bench refuse the folder."""
    from lmmc.bench import JSON_KIND, check_writable, is_bench_json, write_json

    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    target = tmp_path / "bench.json"
    (tmp_path / f".bench.json.tmp-{os.getpid()}").symlink_to(victim)
    check_writable(target)
    (tmp_path / f".bench.json.tmp-{os.getpid()}").symlink_to(victim)
    write_json(target, {"kind": JSON_KIND, "rows": []}, tmp_path / "out")
    assert victim.read_text() == "mine"
    assert not target.is_symlink() and is_bench_json(target, here=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "victim.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file of the user's, group write and all


def test_a_hub_teacher_that_now_resolves_to_another_revision_is_refused(tmp_path):
    """A later download moved the hub id to other weights: bench reported the student's cosine to a teacher
    the compile never read (-0.06) without a word. The compile records the snapshot's revision."""
    import subprocess

    from conftest import save_tiny

    repo = tmp_path / "hub" / "models--org--tiny"
    save_tiny("clip", repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    recipe = {"calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
              "passes": [{"magnitude": {"sparsity": 0.3}}], "export": ["onnx"],
              "validate": {"latency": False, "threads": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def lmmc(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", "import sys; from lmmc.cli import main; main(sys.argv[1:])", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)

    done = lmmc("compile", "org/tiny", "-r", "r.yaml", "-o", "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["inputs"]["model"]["revision"] == "abc123"
    shutil.copytree(repo / "snapshots" / "abc123", repo / "snapshots" / "def456")
    (repo / "refs" / "main").write_text("def456")
    refused = lmmc("bench", "out", "--quick", "--corpus", str(CORPUS))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert ("the hub model 'org/tiny' now resolves to revision def456, and out was compiled from revision abc123; "
            "pass --teacher with a copy of that one") in " ".join(refused.stderr.split())


def test_a_ratio_that_rounds_to_one_is_said_as_level():
    """A student 0.13 % slower read as "the student is 1.00x slower"."""
    from lmmc.bench import _times

    assert [_times(r) for r in (1.0013, 0.998, 1.0, 1.2, 0.5)] == [
        "as fast, within 0.5 %", "as fast, within 0.5 %", "as fast, within 0.5 %", "1.20x slower", "2.00x faster"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is measured through Linux's /proc")
def test_a_deployment_with_no_room_to_load_once_more_is_not_measured_and_said(uncapped, tmp_path, monkeypatch):
    """The bench holds its own copies while a memory process loads another; where that would not fit, the
    kernel would end the largest process, the bench itself, so the row goes unmeasured with a note instead."""
    _, _, out = uncapped
    monkeypatch.setattr("lmmc.bench.available_bytes", lambda: 1024)  # a machine with 1 KiB free
    monkeypatch.setattr("lmmc.bench.check_room", lambda *a: None)  # ... once the timed deployments are loaded
    result = run("bench", out, "--repeats", 1, "--warmup", 1, "--json", tmp_path / "b.json")  # --quick measures none
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "b.json").read_text())
    rows = bench["towers"]["text"]["rows"]
    assert bench["memory"] and [r["peak_rss_mib"] for r in rows] == [None] * len(rows)
    said = [n for n in bench["notes"] if " is not measured: loading it once more in a fresh process takes about " in n]
    assert len(said) == len(rows) and all("0.0 GiB are available" in n for n in said)
    assert [n.split(" is not")[0] for n in said] == [f"peak memory of the {r['model']}'s text tower, {r['artifact']}"
                                                     for r in rows]
    # A deployment whose weights fit is measured, one that does not is refused, at twice its weights.
    monkeypatch.setattr("lmmc.bench.available_bytes", lambda: 4 * 2 ** 30)
    printed = "print('{\"peak_rss_increase_mib\": 5.0}')"
    assert memory_process(printed, {}, "a model", weights_bytes=2 * 2 ** 30) == 5.0
    with pytest.raises(NoRoom, match="a model is not measured: .* takes about 4.5 GiB, and 4.0 GiB are available"):
        memory_process(printed, {}, "a model", weights_bytes=2 * 2 ** 30 + 2 ** 28)


def test_a_deployment_with_no_room_beside_those_loaded_before_it_is_one_clear_error(compiled, tmp_path, monkeypatch):
    """Every deployment of a tower is held at once to be timed in turns. The one that would not fit beside
    those loaded before it is refused by name before it loads, where the out-of-memory killer would have
    ended the bench with nothing said."""
    _, _, out = compiled
    asked = []

    def available():  # room for three deployments, then none
        asked.append(1)
        return 2 ** 40 if len(asked) <= 3 else 2 ** 20
    monkeypatch.setattr("lmmc.bench.available_bytes", available)
    result = run("bench", out, "--quick", "--json", tmp_path / "b.json")
    assert result.exit_code == 2, result.output
    # the fourth is the teacher's fp32 IR, after its three ONNX Runtime deployments; a few MB of a tiny BERT
    assert ("error: no room to load the teacher's text tower, openvino fp32: it takes about 0.0 GiB and 0.0 GiB are "
            "available beside the deployments loaded before it") in result.output
    assert "let lmmc bench time one runtime at a time (--backend onnxruntime, then --backend openvino)" in result.output
    assert len(asked) == 4 and not (tmp_path / "b.json").exists()
