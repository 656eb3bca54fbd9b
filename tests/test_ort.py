"""ONNX Runtime deployment: fused graphs of structurally pruned students (uneven heads and FFN widths per
layer) against PyTorch with their fused operators counted, the fallback when fusion fails, and INT8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers

import lmmc.export.ort
from lmmc.adapters import TowerModule, block_list, example_inputs, get_adapter, head_dim, input_names, prunable_linears
from lmmc.artifact import Artifact
from lmmc.data import random_calibration
from lmmc.export.onnx import export_tower
from lmmc.export.ort import FusionFailed, fc2_matmuls, fuse_onnx, quantize_dynamic_onnx, quantize_static_onnx
from lmmc.export.validate import cosine, token_cosine
from lmmc.modelio import make_student
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import CalibrationConfig
from lmmc.runtime import load
from lmmc.surgery import keep_heads_
from tests.conftest import tiny_model, uneven_student


def feed(model, tower, batch=3, seq=11) -> tuple[dict[str, np.ndarray], tuple[torch.Tensor, ...]]:
    inputs = example_inputs(model, tower, batch=batch, seq=seq)
    if tower.modality == "text":
        inputs[1][1, 7:] = 0  # padding, so the mask path is exercised
    return {n: t.numpy() for n, t in zip(input_names(tower), inputs)}, inputs


def test_fused_uneven_student_matches_pytorch_with_fused_attention(tiny_kind, tmp_path, one_thread, exported_tower):
    model = uneven_student(tiny_kind)
    for tower in get_adapter(model.config.model_type).towers:
        plain, fused = tmp_path / f"{tower.name}.onnx", tmp_path / f"{tower.name}.fused.onnx"
        exported_tower("uneven", tiny_kind, tower.name, plain)
        probe, _ = feed(model, tower, batch=2, seq=9)
        counts = fuse_onnx(plain, fused, [probe])
        # one Attention per block, two skip layer norms per block (CLIP's vision tower: its pre-norm
        # before the first block stays a plain LayerNormalization, so 3)
        assert counts["Attention"] == 2
        assert counts["SkipLayerNormalization"] == (3 if (tiny_kind, tower.name) == ("clip", "vision") else 4)
        if tiny_kind in ("bert", "vit"):
            assert counts["BiasGelu"] == 2
        got_feed, inputs = feed(model, tower)
        got = load(fused).run(got_feed)
        with torch.no_grad():
            ref = TowerModule(model, tower)(*inputs)
        for name, r in zip(("last_hidden_state", "pooled_embedding"), ref):
            assert got[name].shape == tuple(r.shape)
            assert np.abs(got[name] - r.numpy()).max() <= 1e-4


def test_fusion_that_changes_outputs_is_refused_and_removed(tmp_path, one_thread, exported_tower):
    model = uneven_student("bert")
    tower = get_adapter("bert").towers[0]
    plain, fused = tmp_path / "text.onnx", tmp_path / "text.fused.onnx"
    exported_tower("uneven", "bert", tower.name, plain)
    notes: list[str] = []
    # fusion reorders float sums (about 1e-6 here); a tolerance of 1e-12 makes every level miss
    with pytest.raises(FusionFailed):
        fuse_onnx(plain, fused, [feed(model, tower)[0]], atol=1e-12, notes=notes)
    assert not fused.exists()
    assert len(notes) == 2 and all("changed the outputs" in n for n in notes)


def test_a_level_that_misses_is_noted_with_the_level_kept(tmp_path, one_thread, exported_tower, monkeypatch):
    model = uneven_student("bert")
    tower = get_adapter("bert").towers[0]
    plain, fused = tmp_path / "text.onnx", tmp_path / "text.fused.onnx"
    exported_tower("uneven", "bert", tower.name, plain)
    diffs = iter([1.0, 0.0])  # the first level's graph off by 1, the second's exact
    monkeypatch.setattr(lmmc.export.ort, "_max_diff", lambda *args: next(diffs))
    notes: list[str] = []
    assert fuse_onnx(plain, fused, [feed(model, tower)[0]], notes=notes)["Attention"] == 2
    assert notes == ["text.onnx: optimize_for_ort changed the outputs by 1.00e+00 > 1e-04; text.onnx's graph of "
                     "transformer fusions ran and agreed, and is the one kept"]


def tiny_artifact(kind: str, tmp_path) -> Artifact:
    teacher = tiny_model(kind)
    adapter = get_adapter(teacher.config.model_type)
    student = uneven_student(kind)
    art = Artifact(model_ref=kind, adapter=adapter, teacher=teacher, student=student, workdir=tmp_path)
    art.calib = random_calibration(CalibrationConfig(random=True, samples=32, eval_samples=32, batch_size=8),
                                   teacher, adapter)
    return art


def run(art: Artifact, name: str, **config):
    cls = get_pass(name)
    return run_pass(cls(cls.Config(**config)), art)


def test_pass_falls_back_to_the_plain_graph_with_a_warning(tmp_path, one_thread):
    art = tiny_artifact("bert", tmp_path)
    run(art, "onnx")
    metrics = run(art, "ort", fuse="on", atol=1e-12, int8=["dynamic"]).metrics["text"]
    assert metrics["kept"] == "plain"
    assert any("no fused graph agrees" in w for w in metrics["warnings"])
    assert not (tmp_path / "ort" / "text.fused.onnx").exists()
    [rec] = art.exports
    assert (rec.backend, rec.precision, rec.variant, rec.source) == ("onnxruntime", "int8", "dynamic", "plain")


@pytest.mark.parametrize("fuse", ["off", "on"])
def test_dynamic_int8_keeps_the_second_ffn_matrices_fp32_when_quantising_them_costs_too_much(tmp_path, one_thread,
                                                                                              fuse):
    art = tiny_artifact("bert", tmp_path)
    run(art, "onnx")
    plain = art.onnx["text"]
    fc2 = set(fc2_matmuls(art.student, art.adapter, art.adapter.tower("text"), plain))
    assert len(fc2) == 2
    weights = {n.input[1] for n in onnx.load(str(plain)).graph.node if n.name in fc2}
    dst = tmp_path / "ort" / "text.int8-dynamic.onnx"

    def float_matmul_weights() -> set[str]:
        return {n.input[1] for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMul"}

    def float_attention_weights() -> list[str]:
        graph = onnx.load(str(dst)).graph
        floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
        return [n.input[1] for n in graph.node if n.op_type == "Attention" and n.input[1] in floats]

    def modules(*roles: str) -> list[str]:
        return [p.param.removesuffix(".weight") for p in prunable_linears(art.student, art.adapter) if p.role in roles]

    every = run(art, "ort", fuse=fuse, int8=["dynamic"], dynamic_min_cosine=0.0).metrics["text"]["dynamic"]
    assert every["fp32_fc2"] is False and 0.9 < every["cosine_to_fp32"] < 1.0
    every_float = float_matmul_weights()
    assert not every_float & weights
    # ONNX Runtime's quantiser leaves the fused Attention's q/k/v fp32; the record (and so the manifest) says so
    assert len(float_attention_weights()) == (2 if fuse == "on" else 0)
    assert art.exports[-1].fp32_matrices == (modules("q", "k", "v") if fuse == "on" else [])
    art.exports.clear()
    # No INT8 graph reaches a cosine of 1: the fallback runs, and only the fc2 MatMuls stay fp32.
    kept = run(art, "ort", fuse=fuse, int8=["dynamic"], dynamic_min_cosine=1.0).metrics["text"]
    assert kept["kept"] == ("fused" if fuse == "on" else "plain")
    assert kept["dynamic"]["fp32_fc2"] is True
    assert art.exports[-1].fp32_matrices == (modules("q", "k", "v", "fc2") if fuse == "on" else modules("fc2"))
    assert kept["dynamic"]["cosine_every_matmul"] == pytest.approx(every["cosine_to_fp32"], abs=1e-6)
    # Every MatMul the quantiser leaves float besides (attention's products of two activations) is left in both.
    assert float_matmul_weights() - weights == every_float - weights and weights <= float_matmul_weights()
    # On this tiny random model the fc2 inputs have no outliers: keeping them fp32 changes the cosine by < 1e-6.
    assert kept["dynamic"]["cosine_to_fp32"] == pytest.approx(every["cosine_to_fp32"], abs=1e-6)


def test_quantising_drops_only_onnxruntimes_noise(tmp_path, exported_tower, caplog):
    import logging

    plain = exported_tower("tiny", "bert", "text", tmp_path / "text.onnx")
    model = tiny_model("bert")
    feeds = [feed(model, get_adapter("bert").towers[0])[0]]
    # A ViT tower cut to one head a block fuses to MultiHeadAttention, whose output the quantiser cannot type.
    student, tower = make_student(tiny_model("clip")), get_adapter("clip").tower("vision")
    for block in block_list(student, tower)[1]:
        keep_heads_(block, tower, head_dim(student, tower), [0])
    export_tower(student, tower, tmp_path / "vision.onnx")
    vision = tmp_path / "vision.fused.onnx"
    assert fuse_onnx(tmp_path / "vision.onnx", vision)["MultiHeadAttention"] == 2
    with caplog.at_level(logging.WARNING):
        quantize_dynamic_onnx(plain, tmp_path / "dynamic.onnx")
        quantize_static_onnx(plain, tmp_path / "static.onnx", feeds)
        quantize_dynamic_onnx(vision, tmp_path / "vision.dynamic.onnx")
        logging.warning("a warning of the caller")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("pre-processing" in m or "Failed to infer" in m for m in messages) == 0
    assert messages.count("a warning of the caller") == 1
    assert len(logging.getLogger().filters) == 0


def test_static_calibration_runs_a_few_rows_at_a_time_to_the_same_ranges(tmp_path, exported_tower, monkeypatch):
    """ORT's calibration graph keeps every activation of a run alive until it ends: 32 images of a
    SigLIP-B/16 tower at once held 12 GB. Runs of 8 rows give the very same min-max ranges."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    plain = exported_tower("tiny", "bert", "text", tmp_path / "text.onnx")
    tower = get_adapter("bert").towers[0]
    feeds = [feed(tiny_model("bert"), tower, batch=19, seq=11)[0], feed(tiny_model("bert"), tower, batch=3)[0]]
    rows = []
    real_run = lmmc.export.ort.ort.InferenceSession.run

    def counted(self, names, inputs, *args, **kwargs):
        rows.append(len(inputs["input_ids"]))
        return real_run(self, names, inputs, *args, **kwargs)
    monkeypatch.setattr(lmmc.export.ort.ort.InferenceSession, "run", counted)
    quantize_static_onnx(plain, tmp_path / "static.onnx", feeds)
    monkeypatch.undo()
    assert rows == [8, 8, 3, 3]

    class Whole(lmmc.export.ort.CalibrationDataReader):  # the two batches as they are, the quantiser's settings
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)
    quantize_static(plain, tmp_path / "whole.onnx", Whole(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    got, want = onnx.load(str(tmp_path / "static.onnx")), onnx.load(str(tmp_path / "whole.onnx"))
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in want.graph.initializer if "scale" in i.name or "zero" in i.name}
    assert len(scales) > 10
    for init in got.graph.initializer:
        if init.name in scales:
            assert np.array_equal(onnx.numpy_helper.to_array(init), scales.pop(init.name)), init.name
    assert not scales


def test_dynamic_int8_of_an_opset_23_graph_leaves_onnxs_own_attention_to_run(tmp_path, one_thread):
    """From opset 23 the exporter writes ONNX's Attention operator, which ONNX Runtime's quantiser took for
    its own contrib Attention and turned into a QAttention that cannot load."""
    model, tower = tiny_model("bert"), get_adapter("bert").towers[0]
    export_tower(model, tower, tmp_path / "text.onnx", opset=23)
    assert sum(n.op_type == "Attention" for n in onnx.load(tmp_path / "text.onnx").graph.node) == 2
    quantize_dynamic_onnx(tmp_path / "text.onnx", tmp_path / "dynamic.onnx")
    ops = {n.op_type for n in onnx.load(tmp_path / "dynamic.onnx").graph.node}
    assert "Attention" in ops and "QAttention" not in ops and ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    x, inputs = feed(model, tower)
    fp32 = load(tmp_path / "text.onnx", threads=1).run(x)["pooled_embedding"]
    int8 = load(tmp_path / "dynamic.onnx", threads=1).run(x)["pooled_embedding"]
    assert cosine(fp32, int8).min() >= 0.98


def test_pass_writes_fused_and_int8_artifacts_that_validate(tmp_path, one_thread):
    art = tiny_artifact("clip", tmp_path)
    run(art, "onnx")
    metrics = run(art, "ort", fuse="on", latency_batch=2, latency_seq=8, repeats=3).metrics
    for tower in ("text", "vision"):
        assert metrics[tower]["kept"] == "fused" and metrics[tower]["warnings"] == []
        assert set(metrics[tower]["latency_ms"]) >= {"plain", "fused", "threads"}
    written = {(r.tower, r.precision, r.variant, r.source): r.path.relative_to(tmp_path).as_posix() for r in art.exports}
    assert written == {
        ("text", "fp32", "fused", None): "ort/text.fused.onnx",
        ("text", "int8", "dynamic", "fused"): "ort/text.int8-dynamic.onnx",
        ("text", "int8", "static", "plain"): "ort/text.int8-static.onnx",
        ("vision", "fp32", "fused", None): "ort/vision.fused.onnx",
        ("vision", "int8", "dynamic", "fused"): "ort/vision.int8-dynamic.onnx",
        ("vision", "int8", "static", "plain"): "ort/vision.int8-static.onnx",
    }
    validation = run(art, "validate", latency=False, min_cosine_int8=0.98).metrics
    assert validation["passed"]
    figures = {(e["tower"], e["variant"]): e for e in validation["exports"]}
    assert len(figures) == 6
    for (tower, variant), e in figures.items():
        if variant == "fused":
            assert max(e["max_abs_diff"].values()) <= 1e-4
        assert e["cosine_to_student"] >= 0.98
        # the teacher figure is the student's own fidelity, moved little by the runtime
        fp32 = validation["towers"][tower]["cosine_mean"]
        assert abs(e["cosine_to_teacher"] - fp32) <= 0.02
    names = [g["name"] for g in validation["gates"]]
    assert "text: onnxruntime int8 static: cosine to fp32 student" in names
    assert "vision: onnxruntime fp32 fused: max diff to PyTorch" in names


@pytest.mark.e2e
def test_minilm_int8_keeps_cosine_to_fp32(minilm, minilm_onnx, tmp_path):
    """ORT INT8, dynamic and static, on the real teacher: held-out cosine to fp32 at least 0.98, and 0.9 on
    every real token."""
    import transformers

    from tests.conftest import CORPUS

    model = transformers.AutoModel.from_pretrained(minilm).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    tower = get_adapter("bert").towers[0]
    plain = minilm_onnx(tmp_path / "text.onnx")
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]

    def feeds(texts):
        return [dict(tokenizer(texts[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="np"))
                for i in range(0, len(texts), 16)]

    calib, held_out = feeds(lines[:64]), feeds(lines[-128:])
    for f in calib + held_out:
        f.pop("token_type_ids", None)
    quantize_dynamic_onnx(plain, tmp_path / "dynamic.onnx")
    quantize_static_onnx(plain, tmp_path / "static.onnx", calib, fc2_matmuls(model, get_adapter("bert"), tower, plain))
    ref = [load(plain).run(f) for f in held_out]
    for name in ("dynamic", "static"):
        got = [load(tmp_path / f"{name}.onnx").run(f) for f in held_out]
        pooled = cosine(*(np.concatenate([o["pooled_embedding"] for o in outs]) for outs in (ref, got)))
        assert pooled.mean() >= 0.98, name
        # every real token's state too, which validation warns of below 0.8
        tokens = np.concatenate([token_cosine(g["last_hidden_state"], r["last_hidden_state"], f)
                                 for g, r, f in zip(got, ref, held_out)])
        assert tokens.min() >= 0.9, (name, tokens.min())


def test_fusion_is_judged_relative_to_large_outputs(tmp_path, one_thread):
    """A fused graph of a model whose hidden states reach thousands differs by more than 1e-4 in absolute
    terms through reordered float sums alone; it was thrown away even with fuse: on."""
    model = tiny_model("bert")
    with torch.no_grad():
        norm = model.encoder.layer[-1].output.LayerNorm
        norm.weight.mul_(3000)
        norm.bias.mul_(3000)
    tower = get_adapter("bert").towers[0]
    plain, fused = tmp_path / "text.onnx", tmp_path / "text.fused.onnx"
    export_tower(model, tower, plain)
    probe, _ = feed(model, tower)
    assert fuse_onnx(plain, fused, [probe])["Attention"] == 2
    a, b = load(plain).run(probe), load(fused).run(probe)
    largest = np.abs(a["last_hidden_state"]).max()
    absolute = np.abs(a["last_hidden_state"] - b["last_hidden_state"]).max()
    assert largest > 1000 and 1e-4 < absolute <= 1e-4 * largest


def test_short_texts_of_quantised_artifacts_are_measured_and_their_loss_is_warned_of(tmp_path, one_thread,
                                                                                      monkeypatch):
    """A query of a word or two is mostly [CLS] and [SEP]: the gates, judging whole held-out texts, did not
    see what INT8 does to it. Each quantised artifact gets its cosine to the fp32 student on the opening
    words of the held-out texts, checked here against ONNX Runtime and PyTorch run directly."""
    import json

    import onnxruntime as ort
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from lmmc.cli import main
    from lmmc.data import load_calibration
    from tests.conftest import save_tiny, tower_outputs

    teacher = save_tiny("bert", tmp_path / "teacher")
    weights = load_file(teacher / "model.safetensors")
    for layer in range(2):  # outlier channels, as trained encoders have them
        weights[f"encoder.layer.{layer}.output.LayerNorm.weight"][[3, 17]] = 40.0
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    words = "cold water road sea hill town river stone field light dark rain snow wind tree leaf bird".split()
    (tmp_path / "calib.txt").write_text("\n".join(
        f"{words[i % 17]} {words[i // 17]} {words[(i * 5) % 17]} {words[(i * 3) % 17]} {words[(i * 7) % 17]} {i}"
        for i in range(200)))
    recipe = {"calibration": {"path": str(tmp_path / "calib.txt"), "samples": 64, "eval_samples": 48, "batch_size": 8,
                              "max_length": 32},
              "passes": [], "export": ["onnx", {"ort": {"fuse": "off", "int8": ["dynamic", "static"]}}],
              "validate": {"latency": False, "max_runtime_diff": 1e-4, "min_cosine": 0.5, "threads": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr("lmmc.compile.MIN_SHORT_COSINE", 1.0)  # a tiny model loses too little to be warned of
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())

    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher)
    cfg = CalibrationConfig(**recipe["calibration"])
    short = load_calibration(cfg, cfg.path, {"text"}, {"tokenizer": tokenizer}).eval_short
    model = transformers.BertModel.from_pretrained(tmp_path / "o" / "student").eval()
    tower = get_adapter("bert").towers[0]
    ref = np.concatenate([tower_outputs(model, tower, b["input_ids"], b["attention_mask"])[1] for b in short])
    for export in report["validation"]["exports"]:
        session = ort.InferenceSession(str(tmp_path / "o" / export["path"]), providers=["CPUExecutionProvider"])
        got = np.concatenate([session.run(["pooled_embedding"], {k: b[k].numpy() for k in ("input_ids", "attention_mask")})[0]
                              for b in short])
        ours = cosine(ref, got)
        assert export["short_cosine_to_student"] == pytest.approx({"mean": ours.mean(), "min": ours.min(),
                                                                   "texts": len(ours)}, abs=1e-4)
        assert 0.99 < ours.min() < 1 and f"{export['path']}: on texts of one to four words (the opening words of the " \
               f"held-out texts) its embedding falls to a cosine of {ours.min():.3f}" in " ".join(report["warnings"])
        assert f'<td class="num">{ours.min():.4f}</td>' in (tmp_path / "o" / "report.html").read_text()
    # the held-out texts' openings, not the empty text, which calibration sees
    assert 20 <= len(ours) <= 48 and "" not in [t for b in short for t in tokenizer.batch_decode(
        b["input_ids"], skip_special_tokens=True)]


def test_held_out_texts_that_open_as_calibrated_ones_leave_no_short_figure_and_say_so(tmp_path, one_thread):
    import json

    import yaml
    from click.testing import CliRunner

    from lmmc.cli import main
    from tests.conftest import save_tiny

    teacher = save_tiny("bert", tmp_path / "teacher")
    (tmp_path / "calib.txt").write_text("\n".join(f"one two three four {chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(200)))
    recipe = {"calibration": {"path": str(tmp_path / "calib.txt"), "samples": 128, "eval_samples": 32, "batch_size": 8,
                              "max_length": 32},
              "passes": [], "export": ["onnx", {"ort": {"fuse": "off", "int8": ["dynamic"]}}],
              "validate": {"latency": False, "max_runtime_diff": 1e-4, "min_cosine": 0.5, "threads": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    [export] = report["validation"]["exports"]
    assert "short_cosine_to_student" not in export
    assert any(w.startswith("every held-out text opens with words that calibration's short texts hold as well")
               for w in report["warnings"])


def test_token_states_of_quantised_artifacts_are_measured_and_their_loss_is_warned_of(tmp_path, one_thread):
    """On a teacher with outlier features the INT8 and fp16 artifacts kept pooled cosines of 0.999 to the fp32
    student while single token states pointed the other way; the gates read only the pooled embedding."""
    import json

    import onnxruntime as ort
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from lmmc.cli import main
    from tests.conftest import save_tiny

    teacher = save_tiny("bert", tmp_path / "teacher")
    weights = load_file(teacher / "model.safetensors")
    for name in weights:
        if name.startswith("encoder.") and name.endswith(".weight") and "LayerNorm" not in name:
            weights[name] *= 10
    for layer in range(2):
        weights[f"encoder.layer.{layer}.output.LayerNorm.weight"][[3, 17]] = 3000.0
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    recipe = {"calibration": {"random": True, "samples": 16, "eval_samples": 32, "batch_size": 8, "max_length": 12},
              "passes": [], "export": ["onnx", {"ort": {"fuse": "off", "int8": ["static"], "fp16": True}}],
              "validate": {"latency": False, "max_runtime_diff": 1e-4, "min_cosine": 0.5, "min_cosine_fp16": 0.99,
                           "threads": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())

    # the same held-out batches, the artifacts in ONNX Runtime directly, cosine per real token
    model = transformers.BertModel.from_pretrained(teacher).eval()
    held = random_calibration(CalibrationConfig(**recipe["calibration"]), model, get_adapter("bert")).eval["text"]
    def states(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [session.run(["last_hidden_state"], {k: b[k].numpy() for k in ("input_ids", "attention_mask")})[0]
                [b["attention_mask"].numpy().astype(bool)] for b in held]
    fp32 = np.concatenate(states(tmp_path / "o" / "onnx" / "text.onnx"))
    for export in report["validation"]["exports"]:
        ours = cosine(fp32, np.concatenate(states(tmp_path / "o" / export["path"])))
        assert export["hidden_cosine_to_student"] == pytest.approx({"mean": ours.mean(), "min": ours.min()}, abs=1e-4)
        assert export["cosine_to_student"] > 0.99 and ours.min() < 0.8, export["path"]
        assert any(w.startswith(f"{export['path']}: its last_hidden_state falls to a cosine of {ours.min():.3f}")
                   for w in report["warnings"]), export["path"]
