"""Mixed precision: a block matrix made outlier-heavy is kept fp32 by the ONNX Runtime and OpenVINO
searches, the mixed artifacts beat plain INT8 on held-out cosine, the choice table and manifest name the
module, plain INT8 is unchanged, and bad recipes fail at the boundary."""

from __future__ import annotations

import shutil
from collections import Counter

import nncf
import numpy as np
import onnx
import openvino as ov
import pytest
import torch

from lmmc.adapters import input_names
from lmmc.errors import LmmcError
from lmmc.export.openvino import quantize_openvino
from lmmc.export.ort import calibration_feeds, qdq_without, quantize_static_onnx
from lmmc.export.validate import cosine
from lmmc.manifest import build_manifest
from lmmc.recipe import parse_recipe
from lmmc.report_html import render
from lmmc.runtime import load
from tests.test_ort import run, tiny_artifact

OUTLIER = "encoder.layer.0.output.dense"  # block 0's second FFN matrix
FC1 = "encoder.layer.0.intermediate.dense"
MIXED = {"mixed": {"max_cosine_drop": 0.002}}


def outlier_student(tmp_path):
    """The tiny uneven BERT student with one input column of block 0's fc2 weight scaled up 300-fold and
    the fc1 channel feeding it scaled down alike (GELU is nearly linear there, so the function barely
    moves): an INT8 scale stretched by that column rounds the rest of each row to nearly nothing. The
    whole fc2 is first scaled 20-fold so that its block's FFN weighs in the embedding (random weights
    of std 0.02 leave the residual stream to the embeddings)."""
    art = tiny_artifact("bert", tmp_path)
    with torch.no_grad():
        art.student.get_submodule(OUTLIER).weight.mul_(20)
        art.student.get_submodule(OUTLIER).weight[:, 5] *= 300
        art.student.get_submodule(FC1).weight[5] /= 300
        art.student.get_submodule(FC1).bias[5] /= 300
    return art


@pytest.fixture(scope="module")
def outlier_onnx(tmp_path_factory):
    """The outlier student's onnx pass, run once for the module: (its workdir, its record)."""
    folder = tmp_path_factory.mktemp("outlier")
    art = outlier_student(folder)
    return folder, run(art, "onnx")


@pytest.fixture
def outlier_artifact(tmp_path, outlier_onnx):
    """A fresh outlier student in `tmp_path` whose onnx pass has run: the module's export, copied."""
    folder, record = outlier_onnx
    art = outlier_student(tmp_path)
    shutil.copytree(folder / "onnx", tmp_path / "onnx")
    art.onnx = {"text": tmp_path / "onnx" / "text.onnx"}
    art.records.append(record)
    return art


def held_out_cosine(art, path, backend) -> float:
    """Mean cosine of an artifact's pooled embeddings to the fp32 export's on the held-out batches."""
    tower = art.adapter.towers[0]
    feeds = [{n: b[n].numpy() for n in input_names(tower)} for b in art.calib.eval_batches(tower.modality)]
    fp32, model = load(art.onnx["text"], "onnxruntime", 1), load(path, backend, 1)
    return float(np.concatenate([cosine(fp32.run(f)["pooled_embedding"], model.run(f)["pooled_embedding"])
                                 for f in feeds]).mean())


def check_choice(choice: dict) -> None:
    table = {row["matrix"]: row for row in choice["matrices"]}
    # every block linear of the two blocks has a row: q, k, v, attention output, fc1, fc2
    assert len(table) == 12
    assert max(table, key=lambda m: table[m]["cosine_cost"]) == OUTLIER
    assert table[OUTLIER]["precision"] == "fp32" and OUTLIER in choice["fp32_matrices"]
    assert choice["fp32_matrices"] == [m for m, row in table.items() if row["precision"] == "fp32"]
    assert len(choice["fp32_matrices"]) < 12
    assert choice["cosine_drop"] <= 0.002 < choice["int8_cosine_drop"]


def test_ort_static_mixed_keeps_the_outlier_matrix_fp32(tmp_path, one_thread, outlier_artifact):
    art = outlier_artifact
    metrics = run(art, "ort", fuse="off", int8=[{"static": MIXED}], threads=1).metrics["text"]
    check_choice(metrics["mixed"]["text.mixed-static.onnx"])
    [rec] = art.exports
    assert (rec.backend, rec.precision, rec.variant, rec.path.name) == ("onnxruntime", "mixed", "static",
                                                                         "text.mixed-static.onnx")
    assert rec.fp32_matrices == metrics["mixed"]["text.mixed-static.onnx"]["fp32_matrices"]
    # the MatMuls kept fp32 read no dequantised input; the others all do
    graph = onnx.load(str(rec.path)).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_nodes = {n.name for n in graph.node if n.op_type == "MatMul" and not any(i in dq for i in n.input)}
    kept = {row["node"] for row in metrics["mixed"]["text.mixed-static.onnx"]["matrices"] if row["precision"] == "fp32"}
    assert kept <= float_nodes
    every_int8 = tmp_path / "every.onnx"
    quantize_static_onnx(art.onnx["text"], every_int8, calibration_feeds(art, art.adapter.towers[0]))
    mixed, plain = held_out_cosine(art, rec.path, "onnxruntime"), held_out_cosine(art, every_int8, "onnxruntime")
    assert mixed >= 0.998 and mixed > plain + 0.002
    entry = next(a for a in build_manifest(art, tmp_path, 64)["artifacts"] if a["precision"] == "mixed")
    assert entry["fp32_matrices"] == rec.fp32_matrices and entry["path"] == "ort/text.mixed-static.onnx"


def test_openvino_mixed_keeps_the_outlier_matrix_fp32(tmp_path, one_thread, outlier_artifact):
    art = outlier_artifact
    metrics = run(art, "openvino", int8=MIXED, threads=1).metrics["text"]
    choice = metrics["mixed"]["text.mixed.xml"]
    check_choice(choice)
    assert metrics["files"] == ["text.xml", "text.mixed.xml"]
    fp32_ir, rec = art.exports
    assert (rec.backend, rec.precision, rec.variant) == ("openvino", "mixed", "nncf")
    plain = quantize_openvino(fp32_ir.path, tmp_path / "plain.int8.xml", calibration_feeds(art, art.adapter.towers[0]))
    mixed, int8 = held_out_cosine(art, rec.path, "openvino"), held_out_cosine(art, plain, "openvino")
    assert mixed >= 0.998 and mixed > int8 + 0.002
    html = render({"lmmc_version": "x", "passes": [{"name": "openvino", "metrics": {"text": metrics}}]})
    assert f"<td>{OUTLIER}</td><td>fp32</td>" in html
    assert html.count("<td>int8</td>") == 12 - len(choice["fp32_matrices"])


def test_openvino_mixed_warnings_name_their_file(one_thread, outlier_artifact):
    """A budget no single round meets: the warning says which IR it is about (a dual encoder has two), once
    (the choice kept its own copy, and the report said it twice)."""
    from lmmc.compile import _pass_warnings

    metrics = run(outlier_artifact, "openvino", int8={"mixed": {"max_cosine_drop": 1e-9, "max_rounds": 1}},
                  threads=1).metrics
    assert "warnings" not in metrics["text"]["mixed"]["text.mixed.xml"]
    said = _pass_warnings(metrics)
    assert len(said) == 1 and said[0].startswith("text.mixed.xml: the mixed artifact's cosine drop"), said


def test_validation_warns_of_a_mixed_artifact_over_its_budget_on_held_out_samples(one_thread, outlier_artifact):
    """The budget is met on the calibration batches the matrices were chosen (and INT8 ranges fitted) on;
    held-out samples may cost more, which validation measured and said nothing of."""
    art = outlier_artifact
    run(art, "openvino", int8=MIXED, threads=1)
    rec = art.exports[-1]
    assert rec.max_cosine_drop == 0.002
    for budget in (0.5, 1e-9):
        rec.max_cosine_drop = budget
        [entry] = [e for e in run(art, "validate", latency=False, threads=1, min_cosine=0.0,
                                  min_cosine_int8=0.0).metrics["exports"] if e["precision"] == "mixed"]
        drop = 1 - entry["cosine_to_student"]
        assert 1e-9 < drop < 0.5
        assert entry.get("warnings", []) == ([] if budget == 0.5 else [
            f"openvino/text.mixed.xml: its cosine drop to the fp32 student on the held-out samples, {drop:.4g}, is "
            f"above the max_cosine_drop of 1e-09 its fp32 matrices were chosen for on the calibration batches; lower "
            f"max_cosine_drop to keep more matrices fp32"])
    rec.all_fp32 = True  # with no matrix left to keep fp32, the advice was to keep more
    [entry] = [e for e in run(art, "validate", latency=False, threads=1, min_cosine=0.0,
                              min_cosine_int8=0.0).metrics["exports"] if e["precision"] == "mixed"]
    assert entry["warnings"][0].endswith("calibration batches; every block matrix is fp32 already, and the drop "
                                         "left is the quantisation outside them: raise max_cosine_drop")


def test_plain_nncf_int8_is_unchanged(tmp_path, one_thread, outlier_artifact):
    """int8: true writes what NNCF's transformer preset alone writes: the same operators, the same counts."""
    art = outlier_artifact
    run(art, "openvino", int8=True)
    fp32, int8 = art.exports
    feeds = calibration_feeds(art, art.adapter.towers[0])
    direct = nncf.quantize(ov.Core().read_model(str(fp32.path)), nncf.Dataset(feeds),
                           model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))

    def ops(model) -> Counter:
        return Counter(op.get_type_name() for op in model.get_ops())
    written = ops(ov.Core().read_model(str(int8.path)))
    assert written == ops(direct) and written["FakeQuantize"] > 0
    assert int8.precision == "int8" and int8.fp32_matrices is None


def test_qdq_graph_with_every_node_reverted_is_the_fp32_graph(tmp_path, one_thread, outlier_artifact):
    art = outlier_artifact
    plain, qdq_path = art.onnx["text"], tmp_path / "qdq.onnx"
    feeds = calibration_feeds(art, art.adapter.towers[0])
    quantize_static_onnx(plain, qdq_path, feeds)
    qdq = onnx.load(str(qdq_path))
    weights = {i.name: i for i in onnx.load(str(plain)).graph.initializer}
    every = {n.name for n in qdq.graph.node if n.op_type == "MatMul"}
    reverted = tmp_path / "reverted.onnx"
    onnx.save(qdq_without(qdq, weights, every), str(reverted))
    got, want = load(reverted).run(feeds[0]), load(plain).run(feeds[0])
    assert np.abs(got["pooled_embedding"] - want["pooled_embedding"]).max() <= 1e-5
    assert np.abs(load(qdq_path).run(feeds[0])["pooled_embedding"] - want["pooled_embedding"]).max() > 1e-3


@pytest.mark.parametrize("export, message", [
    ({"openvino": {"int8": {"mixed": {"max_cosine_drop": 0}}}}, "max_cosine_drop"),
    ({"openvino": {"int8": {"mixed": {"max_cosine_drop": 0.01, "rounds": 2}}}}, "rounds"),
    ({"openvino": {"int8": {"mixed": {}}}}, "max_cosine_drop"),
    ({"ort": {"int8": ["static", {"static": MIXED}]}}, "int8 lists a mode twice"),
    ({"ort": {"int8": [{"dynamic": MIXED}]}}, "dynamic"),
])
def test_bad_mixed_recipe_is_one_clear_error(export, message):
    with pytest.raises(LmmcError, match=message):
        parse_recipe({"calibration": {"random": True}, "export": ["onnx", export]})


def test_mixed_recipe_parses_alongside_plain_int8():
    recipe = parse_recipe({"calibration": {"random": True}, "export": [
        "onnx", {"ort": {"int8": ["dynamic", {"static": MIXED}]}}, {"openvino": {"int8": MIXED}}]})
    ort_cfg, ov_cfg = (s.config for s in recipe.export if s.name in ("ort", "openvino"))
    assert ort_cfg.int8[0] == "dynamic" and ort_cfg.int8[1].static.mixed.max_cosine_drop == 0.002
    assert ov_cfg.int8.mixed.max_cosine_drop == 0.002 and ov_cfg.int8.mixed.max_rounds == 3


def test_a_budget_missed_with_every_matrix_fp32_does_not_advise_more_rounds():
    from lmmc.export.mixed_precision import MixedConfig, choose_precisions

    feeds, reference = [{"x": np.zeros(1)}], [np.array([[1.0, 0.0]])]
    tilted = np.array([[1.0, 0.2]])  # a drop of about 0.02 that no matrix kept fp32 removes

    def runner(_nodes):
        return lambda feed: tilted

    matrices = {"m0": "blocks.0.fc", "m1": "blocks.1.fc"}
    result = choose_precisions(matrices, runner, runner, feeds, reference, MixedConfig(max_cosine_drop=0.001))
    assert result["fp32_matrices"] == ["blocks.0.fc", "blocks.1.fc"] and len(result["rounds"]) == 1
    assert result["warnings"] == [
        f"the mixed artifact's cosine drop {result['cosine_drop']:.4g} stays above max_cosine_drop 0.001 with 2 of 2 "
        "matrices in fp32 after 1 rounds; every block matrix is fp32 already, and the drop left is the quantisation "
        "outside them; raise max_cosine_drop"]


def test_a_matrixs_cost_leaves_out_what_the_quantisers_outside_the_matrices_cost():
    """The costs included the drop of the always-quantised attention products: a matrix whose quantisation
    changed nothing was priced at that drop. Runners here add a fixed error per quantised matrix (none for
    'a') on top of one from outside the matrices."""
    from lmmc.export.mixed_precision import MixedConfig, choose_precisions

    rng = np.random.default_rng(0)
    reference = [rng.normal(size=(4, 8)) for _ in range(2)]
    feeds = [{"batch": np.array(i)} for i in range(2)]
    outside, error = rng.normal(size=(4, 8)) * 0.3, {"a": np.zeros((4, 8)), "b": rng.normal(size=(4, 8))}

    def runner(quantised: set[str]):
        return lambda feed: reference[int(feed["batch"])] + outside + sum((error[n] for n in quantised), np.zeros((4, 8)))

    every = {"a", "b"}
    choice = choose_precisions({"a": "m.a", "b": "m.b"}, lambda fp32: runner(every - fp32),
                               lambda fp32: runner(every - set(fp32)), feeds, reference,
                               MixedConfig(max_cosine_drop=0.5))
    cost = {row["matrix"]: row["cosine_cost"] for row in choice["matrices"]}
    assert choice["fp32_matrices_cosine_drop"] > 0.01
    assert cost["m.a"] == pytest.approx(0.0, abs=1e-12) and cost["m.b"] > 0.01
