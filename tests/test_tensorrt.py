"""TensorRT export: everything that needs no TensorRT (optimisation profiles, the FP16 ONNX and the
symmetric INT8 QDQ graph checked in ONNX Runtime, the sparsity report parsed from log lines and inspector
JSON in TensorRT's documented formats and mapped to PyTorch modules, 2:4 detection against polygraphy,
the honest "not built" entry); engine builds and runs only where TensorRT and a GPU are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from lmmc.adapters import TowerModule, get_adapter, prunable_linears
from lmmc.cli import main
from lmmc.errors import LmmcError
from lmmc.export.fp16 import to_fp16_onnx
from lmmc.export.ort import calibration_feeds, fc2_matmuls
from lmmc.export.tensorrt import (NO_GPU, NOT_BUILT, ShapeRange, _made_once, build_hint, builder_setup, make_builder,
                                  node_modules, optimisation_profile, parse_inspector, parse_sparsity_log, parser_hint,
                                  quantize_for_tensorrt, sparsity_table, timing_cache_path, two_four_weights)
from lmmc.export.validate import cosine
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import parse_recipe
from lmmc.resume import work_path
from lmmc.runtime import load
from tests.conftest import save_tiny, tiny_model
from tests.test_cli import TINY_RECIPE, write_recipe
from tests.test_nm import artifact_for, polygraphy_sparse_tensors
from tests.test_ort import feed, tiny_artifact

pytestmark = pytest.mark.usefixtures("one_thread")

RANGES = {"batch": ShapeRange(min=1, opt=8, max=32), "sequence": ShapeRange(min=1, opt=48, max=64)}


def test_profile_comes_from_the_exports_dynamic_axes(tmp_path, exported_tower):
    exported_tower("tiny", "clip", "text", tmp_path / "text.onnx")
    exported_tower("tiny", "clip", "vision", tmp_path / "vision.onnx")
    assert optimisation_profile(tmp_path / "text.onnx", RANGES) == {
        "input_ids": ((1, 1), (8, 48), (32, 64)), "attention_mask": ((1, 1), (8, 48), (32, 64))}
    # an image tower has only its batch dynamic: channels and the 32x32 image stay fixed
    assert optimisation_profile(tmp_path / "vision.onnx", RANGES) == {
        "pixel_values": ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))}
    with pytest.raises(LmmcError, match="axis 'sequence' with no size range"):
        optimisation_profile(tmp_path / "text.onnx", {"batch": RANGES["batch"]})


def test_profile_ranges_are_checked_in_the_recipe():
    with pytest.raises(LmmcError, match="min <= opt <= max"):
        parse_recipe({"calibration": {"random": True},
                      "export": ["onnx", {"tensorrt": {"optional": True, "batch": {"min": 4, "opt": 2, "max": 8}}}]})
    with pytest.raises(LmmcError, match="precision"):
        parse_recipe({"calibration": {"random": True}, "export": ["onnx", {"tensorrt": {"optional": True,
                                                                                     "precision": ["bf16"]}}]})


def test_precision_by_flags_on_tensorrt_10_and_by_typed_graphs_on_11():
    assert builder_setup(10, "fp32") == ("plain", []) == builder_setup(11, "fp32")
    assert builder_setup(10, "fp16") == ("plain", ["FP16"])
    assert builder_setup(10, "int8") == ("qdq", ["INT8"])
    assert builder_setup(11, "fp16") == ("fp16-onnx", [])
    assert builder_setup(11, "int8") == ("qdq", [])


def test_fp16_onnx_matches_the_fp32_student_in_onnx_runtime(tiny_kind, tmp_path, exported_tower):
    model = tiny_model(tiny_kind)
    for tower in get_adapter(tiny_kind).towers:
        plain, half = tmp_path / f"{tower.name}.onnx", tmp_path / f"{tower.name}.fp16.onnx"
        exported_tower("tiny", tiny_kind, tower.name, plain)
        counts = to_fp16_onnx(plain, half)
        graph = onnx.load(str(half)).graph
        dtypes = {i.name: i.data_type for i in graph.initializer}
        # what each cast makes: the types the nodes after it compute in
        dtypes.update({n.output[0]: n.attribute[0].i for n in graph.node if n.op_type == "Cast"})
        matmul_weights = [n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in dtypes]
        assert matmul_weights and all(dtypes[w] == onnx.TensorProto.FLOAT16 for w in matmul_weights)
        kept = [i for n in graph.node if n.op_type in ("LayerNormalization", "Softmax") for i in n.input if i]
        assert kept and all(dtypes[i] == onnx.TensorProto.FLOAT for i in kept)
        assert counts["float16_initializers"] >= len(matmul_weights)
        got_feed, inputs = feed(model, tower)
        with torch.no_grad():
            ref = [r.numpy() for r in TowerModule(model, tower)(*inputs)]
        got = load(half, threads=1).run(got_feed)
        assert got["pooled_embedding"].dtype == np.float32  # inputs and outputs keep their types
        assert cosine(got["pooled_embedding"], ref[1]).min() >= 0.999


@pytest.mark.e2e
def test_minilm_fp16_onnx_keeps_cosine_to_fp32(minilm, minilm_onnx, tmp_path):
    import transformers

    from tests.conftest import CORPUS

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    minilm_onnx(tmp_path / "text.onnx")
    to_fp16_onnx(tmp_path / "text.onnx", tmp_path / "text.fp16.onnx")
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()][-64:]
    enc = tokenizer(lines, padding=True, truncation=True, max_length=128, return_tensors="np")
    feed_ = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    ref = load(tmp_path / "text.onnx").run(feed_)["pooled_embedding"]
    got = load(tmp_path / "text.fp16.onnx").run(feed_)["pooled_embedding"]
    assert cosine(ref, got).min() >= 0.999


def test_a_source_graph_killed_mid_write_is_made_again(tmp_path):
    def killed(dst):
        dst.write_bytes(b"half a graph")
        raise KeyboardInterrupt

    dst = tmp_path / "text.fp16.onnx"
    with pytest.raises(KeyboardInterrupt):
        _made_once(dst, killed)
    assert not dst.exists()  # a resumed compile finds no file to take for a finished one
    assert _made_once(dst, lambda d: d.write_bytes(b"whole")).read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == ["text.fp16.onnx"]


def test_int8_qdq_for_tensorrt_is_signed_symmetric_and_close(tmp_path, exported_tower):
    art = tiny_artifact("bert", tmp_path)
    tower = art.adapter.towers[0]
    plain, qdq = tmp_path / "text.onnx", tmp_path / "text.int8-qdq.onnx"
    exported_tower("uneven", "bert", "text", plain)  # the export of art.student
    quantize_for_tensorrt(plain, qdq, calibration_feeds(art, tower), fc2_matmuls(art.student, art.adapter, tower, plain))
    graph = onnx.load(str(qdq)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    q_nodes = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(q_nodes) > 10
    for node in q_nodes:  # TensorRT reads only INT8 with a zero point of 0
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any()
    # weights of 2 layers x (q, k, v, attention out, fc1) quantised; fc2 kept fp32 as in the ort pass
    weight_dq = {d.output[0] for d in q_nodes if d.op_type == "DequantizeLinear" and d.input[0] in inits}
    quantised = {n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weight_dq}
    assert len(quantised) == 10 and not quantised & set(fc2_matmuls(art.student, art.adapter, tower, plain))
    got_feed, inputs = feed(art.student, tower)
    ref = load(plain, threads=1).run(got_feed)["pooled_embedding"]
    assert cosine(load(qdq, threads=1).run(got_feed)["pooled_embedding"], ref).min() >= 0.98
    # the QDQ graph maps back to the same modules as the plain one
    names = json.loads(plain.with_suffix(".names.json").read_text())
    assert node_modules(qdq, names) == node_modules(plain, names)


@pytest.fixture
def two_four_export(tmp_path):
    """A tiny BERT pruned 2:4 by wanda and exported: (ONNX path, its names map, the artifact)."""
    art = artifact_for(tiny_model("bert"), tmp_path)
    run_pass(get_pass("wanda")(get_pass("wanda").Config(nm="2:4")), art)
    run_pass(get_pass("onnx")(get_pass("onnx").Config()), art)
    path = art.onnx["text"]
    return path, json.loads(path.with_suffix(".names.json").read_text()), art


def test_two_four_detection_agrees_with_polygraphy(two_four_export, tmp_path, exported_tower):
    path, names, art = two_four_export
    found = two_four_weights(path)
    sparse, _ = polygraphy_sparse_tensors(path)
    assert len(found) == 12 and set(found) == sparse  # the same weights as TensorRT's own tooling sees
    # every pruned linear of the student is 2:4 in the export, and nothing else is
    targeted = {p.param for p in prunable_linears(art.student, art.adapter)}
    assert {names[w]["param"] for w in found} == targeted
    assert two_four_weights(exported_tower("tiny", "bert", "text", tmp_path / "dense.onnx")) == []


def test_sparsity_report_from_documented_log_lines_names_the_modules(two_four_export):
    path, names, _ = two_four_export
    modules = node_modules(path, names)
    assert len(modules) == 12 and len(set(modules.values())) == 12  # 2 layers x q, k, v, out, fc1, fc2
    by_module = {m: n for n, m in modules.items()}
    query = by_module["encoder.layer.0.attention.self.query"]
    fc1 = by_module["encoder.layer.0.intermediate.dense"]
    fc2 = by_module["encoder.layer.1.output.dense"]
    graph = onnx.load(str(path)).graph
    bias_add = next(n.name for n in graph.node if n.op_type == "Add" and fc1 in
                    {p.name for p in graph.node if p.output[0] in n.input})
    # the builder's INFO lines in the format TensorRT's developer guide shows (trtexec prefix included),
    # with this export's node names; TensorRT names a fused layer by its nodes joined with " + "
    log = [
        "[03/23/2021-00:14:05] [I] [TRT] Some other line",
        f"[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: {query}, {fc1} + {bias_add}, {fc2}",
        f"[03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: "
        f"{fc1} + {bias_add}",
    ]
    parsed = parse_sparsity_log(log)
    assert parsed == {"eligible": [query, f"{fc1} + {bias_add}", fc2], "picked": [f"{fc1} + {bias_add}"]}
    assert sparsity_table(parsed, {}, modules) == [
        {"layer": query, "eligible": True, "picked_sparse": False, "modules": ["encoder.layer.0.attention.self.query"]},
        {"layer": f"{fc1} + {bias_add}", "eligible": True, "picked_sparse": True,
         "modules": ["encoder.layer.0.intermediate.dense"]},
        {"layer": fc2, "eligible": True, "picked_sparse": False, "modules": ["encoder.layer.1.output.dense"]},
    ]
    assert parse_sparsity_log(["(Sparsity) nothing here", "[I] [TRT] Engine built"]) == {}


def test_sparsity_report_from_inspector_json(two_four_export):
    path, names, _ = two_four_export
    modules = node_modules(path, names)
    query, key = (n for n, m in modules.items() if m in ("encoder.layer.1.attention.self.query",
                                                           "encoder.layer.1.attention.self.key"))
    # per-layer JSON as the engine inspector writes it at DETAILED verbosity (trimmed to the fields read)
    engine_json = json.dumps({"Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat"},
        {"Name": query, "LayerType": "CaskGemm", "Weights": {"Type": "Half", "Count": 1024}, "HasSparseWeights": 1},
        {"Name": key, "LayerType": "CaskGemm", "Weights": {"Type": "Half", "Count": 1024}, "HasSparseWeights": 0},
    ], "Bindings": ["input_ids", "attention_mask", "last_hidden_state", "pooled_embedding"]})
    inspector = parse_inspector(engine_json)
    assert inspector == {query: True, key: False}
    # a log with the eligible line but no picked line: the inspector tells which layers run sparse
    table = sparsity_table({"eligible": [query, key]}, inspector, modules)
    assert [(r["layer"], r["eligible"], r["picked_sparse"], r["modules"]) for r in table] == [
        (query, True, True, ["encoder.layer.1.attention.self.query"]),
        (key, True, False, ["encoder.layer.1.attention.self.key"])]
    # the FP16 graph the TensorRT 11 build reads maps its MatMuls to the same modules
    to_fp16_onnx(path, path.with_name("text.fp16.onnx"))
    assert node_modules(path.with_name("text.fp16.onnx"), names) == modules


def test_a_refused_graph_or_failed_build_says_what_applies(tmp_path, exported_tower):
    """The opset advice only where the graph's opset is above the parser's 20; the memory advice only where
    the builder's errors speak of memory."""
    exported_tower("tiny", "bert", "text", tmp_path / "text.onnx")
    assert parser_hint(tmp_path / "text.onnx", "10.13.0") == (
        "The graph is opset 20, which the parser reads: an operator or attribute in it is one TensorRT 10.13.0 "
        "does not take (onnx-tensorrt's operator list for that version says which)")
    model = onnx.load(str(tmp_path / "text.onnx"))
    next(o for o in model.opset_import if o.domain == "").version = 23
    onnx.save(model, str(tmp_path / "23.onnx"))
    assert parser_hint(tmp_path / "23.onnx", "10.13.0").startswith(
        "Export with opset 20 or lower (`onnx: {opset: 20}`; this graph is opset 23)")
    assert build_hint(["Error Code 2: OutOfMemory (Requested size was 4294967296 bytes.)"]) == \
        "Raise tensorrt.workspace_mb, or narrow tensorrt.batch / seq"
    assert build_hint(["Error Code 4: Internal Error (no implementation for node /MatMul)"]).startswith(
        "The builder's errors above say why")


def test_timing_cache_sits_beside_the_output(tmp_path):
    out = tmp_path / "out"
    assert timing_cache_path(work_path(out) / "output") == tmp_path / ".out.tensorrt-timing.cache"
    assert timing_cache_path(tmp_path / "elsewhere") == tmp_path / "elsewhere" / "tensorrt" / "timing.cache"


def _without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what a machine without the package sees


def test_required_step_without_tensorrt_is_refused_naming_the_extra(monkeypatch, tmp_path):
    _without_tensorrt(monkeypatch)
    with pytest.raises(LmmcError, match=r"pip install 'lmmc\[tensorrt\]'.*optional: true"):
        parse_recipe({"calibration": {"random": True}, "export": ["onnx", "tensorrt"]})
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**TINY_RECIPE, "export": ["onnx", "tensorrt"]}
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)), "-o", str(out)])
    assert result.exit_code == 2
    assert "lmmc[tensorrt]" in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "teacher"]
    with pytest.raises(LmmcError, match=r"lmmc\[tensorrt\]"):
        load(tmp_path / "recipe.yaml", "tensorrt")  # any existing file: the backend is checked first


def test_optional_step_without_tensorrt_finishes_and_says_not_built(monkeypatch, tmp_path):
    _without_tensorrt(monkeypatch)
    model_dir = save_tiny("bert", tmp_path / "teacher")
    recipe = {**TINY_RECIPE, "export": ["onnx", {"tensorrt": {"optional": True}}],
              "validate": {**TINY_RECIPE["validate"], "latency": False}}  # timing would export the teacher too
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    step = next(p for p in report["passes"] if p["name"] == "tensorrt")
    assert step["metrics"]["tensorrt"] == NOT_BUILT == "not installed — engine not built"
    said = ("warning: tensorrt: TensorRT is not installed, so no engine was built (the step is optional); pip install "
            "'lmmc[tensorrt]' on a machine with an NVIDIA GPU")
    assert said in " ".join(result.output.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"] == NOT_BUILT
    assert {a["backend"] for a in manifest["artifacts"]} == {"onnxruntime"}
    assert report["passed"] is True and not (out / "tensorrt").exists()
    assert not list(tmp_path.glob(".out.tensorrt-timing.cache"))


class NoGpu:  # what the binding does where CUDA cannot start: its builder factory returns nothing
    __version__ = "10.0.0"

    class Logger:
        ERROR = 0

        def __init__(self, severity):
            pass

    def Builder(self, logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")


def test_a_required_step_with_tensorrt_but_no_usable_gpu_is_refused_by_the_dry_run(monkeypatch, tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")  # transformers looks for TensorRT as it first imports
    monkeypatch.setitem(sys.modules, "tensorrt", NoGpu())
    recipe = {**TINY_RECIPE, "export": ["onnx", "tensorrt"]}
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)), "-o",
                                       str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2 and "TensorRT is installed but finds no usable NVIDIA GPU" in result.output


def test_optional_step_with_tensorrt_but_no_usable_gpu_finishes_and_says_not_built(monkeypatch, tmp_path):
    model_dir = save_tiny("bert", tmp_path / "teacher")
    monkeypatch.setitem(sys.modules, "tensorrt", NoGpu())
    recipe = {**TINY_RECIPE, "export": ["onnx", {"tensorrt": {"optional": True}}],
              "validate": {**TINY_RECIPE["validate"], "latency": False}}
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(write_recipe(tmp_path, recipe)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"] == NO_GPU and {a["backend"] for a in manifest["artifacts"]} == {"onnxruntime"}
    assert not (out / "tensorrt").exists()
    said = "warning: tensorrt: TensorRT finds no usable NVIDIA GPU, so no engine was built"
    assert said in " ".join(result.output.split())


def _tensorrt_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (extra lmmc[tensorrt]; needs an NVIDIA GPU)")
    pytest.importorskip("polygraphy.cuda", reason="polygraphy (extra lmmc[tensorrt]) is not installed")
    try:
        make_builder(trt, trt.Logger(trt.Logger.ERROR))
    except LmmcError as err:
        pytest.skip(str(err))
    return trt


@pytest.mark.parametrize("precision, atol, min_cos", [("fp32", 1e-4, 0.9999), ("fp16", None, 0.999),
                                                      ("int8", None, 0.98)])
def test_engine_runs_through_lmmc_runtime_like_pytorch(tmp_path, precision, atol, min_cos):
    _tensorrt_gpu()
    art = tiny_artifact("bert", tmp_path)
    run_pass(get_pass("onnx")(get_pass("onnx").Config()), art)
    step = get_pass("tensorrt")(get_pass("tensorrt").Config(precision=[precision], batch={"min": 1, "opt": 3, "max": 4},
                                                            seq={"min": 1, "opt": 11, "max": 16}))
    metrics = run_pass(step, art).metrics
    engine = art.exports[-1].path
    assert metrics["text"]["engines"][precision]["file"] == engine.name
    tower = art.adapter.towers[0]
    model = load(engine)
    for batch, seq in ((3, 11), (1, 5), (4, 16)):  # shapes change call by call within the profile
        got_feed, inputs = feed(art.student, tower, batch=batch, seq=seq)
        with torch.no_grad():
            ref = [r.numpy() for r in TowerModule(art.student, tower)(*inputs)]
        got = model.run(got_feed)
        assert got["last_hidden_state"].shape == ref[0].shape
        if atol is not None:
            assert np.abs(got["last_hidden_state"] - ref[0]).max() <= atol
        assert cosine(got["pooled_embedding"], ref[1]).min() >= min_cos
    with pytest.raises(LmmcError, match="outside the engine's profile"):
        model.run(feed(art.student, tower, batch=5, seq=11)[0])
    # the second build reads the timing cache the first one wrote
    again = run_pass(step, art).metrics
    assert again["text"]["engines"][precision]["timing_cache_reused"] is True


def test_two_four_engine_reports_its_sparse_layers(two_four_export):
    _tensorrt_gpu()
    _, _, art = two_four_export
    metrics = run_pass(get_pass("tensorrt")(get_pass("tensorrt").Config(precision=["fp16"])), art).metrics
    engine = metrics["text"]["engines"]["fp16"]
    assert "SPARSE_WEIGHTS" in engine["flags"] and metrics["text"]["two_four_weights"] == 12
    # whether a sparse kernel wins is TensorRT's call (tiny widths rarely); every eligible row names modules,
    # and a build whose layers TensorRT did not report says so instead of leaving the table empty unremarked
    assert all(r["modules"] for r in engine["sparsity"] if r["eligible"])
    assert bool(engine["sparsity"]) != bool(engine["warnings"])
