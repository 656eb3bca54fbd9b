"""The measured latency model: a real fit on a tiny BERT in ONNX Runtime static INT8, a dual encoder
measured in OpenVINO INT8 (NNCF), predictions read off uneven structures, the cache, and bad targets."""

from __future__ import annotations

import json
import os
import platform

import numpy as np
import pytest
import scipy.optimize

from lmmc import latency_model as lm
from lmmc.adapters import example_inputs, get_adapter, input_names
from lmmc.errors import LmmcError
from lmmc.latency_model import LatencyModel, Target, TowerLatency, cache_file, cache_key, cut, fit_latency_model
from lmmc.surgery import keep_hidden_
from tests.conftest import tiny_model

pytestmark = pytest.mark.timed  # the fitted latency model times every variant

# The fit deploys nine variants; ONNX Runtime's static INT8 keeps that to the export's cost, while
# OpenVINO and NNCF are exercised by the measurement of the dual encoder below.
TARGET = Target("onnxruntime", "int8", threads=1, batch=8, seq=32)


def _feeds(model, adapter) -> dict[str, list[dict[str, np.ndarray]]]:
    return {t.name: [{n: x.numpy() for n, x in zip(input_names(t), example_inputs(model, t, 4, 16))}]
            for t in adapter.towers}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One real fit, the exports counted; the cache directory is kept for the cache-hit test."""
    model = tiny_model("bert")
    adapter = get_adapter("bert")
    cache = tmp_path_factory.mktemp("latency-cache")
    exports = []
    real_export = lm.export_tower
    lm.export_tower = lambda *a, **k: exports.append(a[2]) or real_export(*a, **k)
    try:
        result = fit_latency_model(model, adapter, TARGET, cache, _feeds(model, adapter), repeats=15)
    finally:
        lm.export_tower = real_export
    return model, adapter, cache, result, exports


def test_fit_measures_every_variant_and_reproduces_the_fitted_ones(fitted):
    model, adapter, cache, result, exports = fitted
    assert len(exports) == len(lm.variants(lm.read_structure(model, adapter)))  # one tower, one export each
    rows = result.fit["variants"]
    assert sum(r["held_out"] for r in rows) == 3 and len(rows) == 9
    coef = result.towers["text"]
    assert min(coef.fixed, coef.block, coef.head, coef.channel) >= 0 and coef.hidden == 32
    for r in rows:  # the report's predictions are the model's own
        expected = coef.fixed + sum(coef.block + coef.head * h + coef.channel * c for h, c in zip(r["heads"], r["ffn"]))
        assert r["predicted_ms"] == pytest.approx(expected)
        assert r["rel_error"] == pytest.approx((r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"])
    fitted_errors = [abs(r["rel_error"]) for r in rows if not r["held_out"]]
    # a loose bound: a tiny model runs in a few ms, where a shared machine's noise is large
    assert np.mean(fitted_errors) <= 0.35
    held = [abs(r["rel_error"]) for r in rows if r["held_out"]]
    assert result.fit["held_out_rel_error"]["text"]["max"] == pytest.approx(max(held))
    assert [p.name for p in cache.iterdir()] == [cache_file(cache, cache_key(model, adapter, TARGET)).name]


def test_cache_hit_returns_the_same_coefficients_without_exporting(fitted, monkeypatch):
    model, adapter, cache, result, _ = fitted
    exports = []
    monkeypatch.setattr(lm, "export_tower", lambda *a, **k: exports.append(a))
    again = fit_latency_model(model, adapter, TARGET, cache, _feeds(model, adapter))
    assert exports == []
    assert again.towers == result.towers and again.target == TARGET
    assert again.fit["variants"] == result.fit["variants"]
    # the report tells a reused fit (its seconds are the first compile's) from this compile's own
    assert again.fit["reused_from"] == str(cache_file(cache, cache_key(model, adapter, TARGET)))
    assert "reused_from" not in result.fit and result.fit["fitted_at"] == again.fit["fitted_at"]


def test_the_variants_of_a_killed_fit_are_cleared_and_no_live_ones(fitted, tmp_path, monkeypatch):
    # a SIGKILL skips the temporary folder's removal; a shared cache kept every killed fit's exported models
    import fcntl
    import shutil

    model, adapter, cache, _, _ = fitted
    shutil.copytree(cache, tmp_path / "cache")
    names = ["latency-variants-dead", "latency-variants-live", "latency-variants-unlocked", "latency-variants-notes"]
    for name in names:
        (tmp_path / "cache" / name / "v0").mkdir(parents=True)
    for name in names[:2]:
        (tmp_path / "cache" / name / ".lock").touch()
        os.utime(tmp_path / "cache" / name / ".lock", (0, 0))  # made long ago: a fit just started is left alone
    (tmp_path / "cache" / "latency-variants-new" / "v0").mkdir(parents=True)
    (tmp_path / "cache" / "latency-variants-new" / ".lock").touch()
    names.append("latency-variants-new")
    (tmp_path / "cache" / "latency-variants-link").symlink_to(tmp_path / "cache" / "latency-variants-dead")
    monkeypatch.setattr(lm, "export_tower", lambda *a, **k: pytest.fail("a cached fit exports nothing"))
    # a live fit, in this process or another machine's container, holds its folder's lock
    with open(tmp_path / "cache" / "latency-variants-live" / ".lock", "r+") as live:
        fcntl.flock(live, fcntl.LOCK_EX)
        fit_latency_model(model, adapter, TARGET, tmp_path / "cache", _feeds(model, adapter))
    assert sorted(p.name for p in (tmp_path / "cache").glob("latency-variants-*") if p.exists()) == sorted(names[1:])


def test_a_damaged_cache_file_is_said_before_it_is_fitted_again(fitted, tmp_path, monkeypatch, capsys):
    model, adapter, cache, _, _ = fitted
    path = cache_file(tmp_path, cache_key(model, adapter, TARGET))
    path.write_text(cache_file(cache, cache_key(model, adapter, TARGET)).read_text()[:100])  # cut short

    class Fitting(Exception):
        pass

    def fitting(*args):
        raise Fitting
    monkeypatch.setattr(lm, "variants", fitting)
    with pytest.raises(Fitting):
        fit_latency_model(model, adapter, TARGET, tmp_path, _feeds(model, adapter))
    assert (f"lmmc: the latency model cached in '{path}' is damaged, edited or of another lmmc version; fitting it "
            f"again, which replaces that file") in capsys.readouterr().err


@pytest.mark.parametrize("damage", [{"head": float("nan")}, {"channel": -0.5}, {"fixed": "1.2"},
                                    {"block": 0.0, "head": 0.0, "channel": 0.0}, None])
def test_a_cached_fit_that_no_fit_would_write_is_measured_again(fitted, tmp_path, damage):
    model, adapter, cache, _, _ = fitted
    key = cache_key(model, adapter, TARGET)
    stored = json.loads(cache_file(cache, key).read_text())
    assert lm._read_cache(cache_file(cache, key), key, ["text"]) is not None
    if damage is None:
        stored["model"]["towers"] = {}  # a fit of no tower
    else:
        stored["model"]["towers"]["text"].update(damage)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(stored))
    assert lm._read_cache(path, key, ["text"]) is None


@pytest.mark.parametrize("edit", ["plausible", "towers_list", "hidden"])
def test_a_cached_fit_edited_by_hand_is_measured_again(fitted, tmp_path, edit):
    """Figures no fit wrote, however plausible (a channel 100x dearer), or a shape the read cannot take,
    are measured again rather than planned with or failing the compile."""
    model, adapter, cache, _, _ = fitted
    key = cache_key(model, adapter, TARGET)
    stored = json.loads(cache_file(cache, key).read_text())
    text = stored["model"]["towers"]["text"]
    if edit == "plausible":
        text["channel"] = max(text["channel"], 1e-6) * 100  # a fit on a loaded machine can price channels at 0
    elif edit == "hidden":
        text["hidden"] //= 2
    else:
        stored["model"]["towers"] = []
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(stored))
    assert lm._read_cache(path, key, ["text"]) is None


@pytest.mark.parametrize("text", ["[1, 2]", "null", "3", '"key"'])
def test_a_cache_file_that_holds_no_object_is_measured_again(fitted, tmp_path, text):
    model, adapter, _, _, _ = fitted
    path = tmp_path / "foreign.json"
    path.write_text(text)
    assert lm._read_cache(path, cache_key(model, adapter, TARGET), ["text"]) is None


def test_predict_reads_uneven_structures():
    teacher = tiny_model("bert")
    adapter = get_adapter("bert")
    model = LatencyModel(TARGET, {"text": TowerLatency(fixed=1.5, block=0.25, head=0.125, channel=0.01, hidden=32)})
    student = cut(teacher, adapter, lm.Variant("x", False, {"text": [3, 1]}, {"text": [37, 5]}))
    assert model.predict(student, adapter) == {"text": pytest.approx(1.5 + (0.25 + 3 * 0.125 + 37 * 0.01)
                                                                     + (0.25 + 1 * 0.125 + 5 * 0.01))}
    one = cut(teacher, adapter, lm.Variant("y", False, {"text": [2]}, {"text": [63]}))
    assert model.predict(one, adapter)["text"] == pytest.approx(1.5 + 0.25 + 2 * 0.125 + 63 * 0.01)
    assert model.block_ms("text", 2, 63) == pytest.approx(0.25 + 2 * 0.125 + 63 * 0.01)
    assert model.structure_ms("text", [3, 1], [37, 5]) == model.predict(student, adapter)["text"]
    assert LatencyModel.from_json(json.loads(json.dumps(model.to_json()))).towers == model.towers
    keep_hidden_(one, adapter.towers[0], range(20))
    with pytest.raises(LmmcError, match="residual stream is 20 channels wide"):
        model.predict(one, adapter)
    with pytest.raises(LmmcError, match="no 'vision' tower"):
        model.block_ms("vision", 1, 1)


def test_fit_recovers_known_coefficients_and_nnls_matches_scipy():
    truth = (2.0, 0.5, 0.3, 0.002)
    rows = [(v.heads["text"], v.ffn["text"], None) for v in lm.variants(
        {"text": {"layers": 6, "heads": [12] * 6, "ffn": [1536] * 6}})]
    rows = [(h, c, float(np.dot(truth, lm._features(h, c)))) for h, c, _ in rows]
    assert lm.fit_tower(rows) == pytest.approx(truth, rel=1e-9)
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.normal(size=(9, 4)), rng.normal(size=9)
        np.testing.assert_allclose(lm.nonnegative_lstsq(a, b), scipy.optimize.nnls(a, b)[0], atol=1e-9)


def test_cache_key_follows_the_target_and_the_architecture(monkeypatch):
    teacher = tiny_model("bert")
    adapter = get_adapter("bert")
    base = cache_key(teacher, adapter, TARGET)
    assert base == cache_key(tiny_model("bert"), adapter, TARGET)
    for other in (Target("onnxruntime", "fp32", threads=1, batch=8, seq=32), Target("onnxruntime", "int8", threads=2, batch=8, seq=32),
                  Target("openvino", "int8", threads=1, batch=8, seq=32), Target("onnxruntime", "int8", threads=1, batch=4, seq=32),
                  Target("onnxruntime", "int8", threads=1, batch=8, seq=16)):
        assert cache_key(teacher, adapter, other) != base
        assert cache_file(lm.Path("c"), cache_key(teacher, adapter, other)) != cache_file(lm.Path("c"), base)
    shallow = cut(teacher, adapter, lm.Variant("z", False, {"text": [4]}, {"text": [64]}))
    assert cache_key(shallow, adapter, TARGET) != base
    relu = tiny_model("bert")
    relu.config.hidden_act = "relu"
    assert base["model"]["towers"]["text"]["activation"] == "gelu"
    assert cache_key(relu, adapter, TARGET) != base
    # a CPU named alike with other instruction sets (AMX or not) is another machine
    assert "avx" in " ".join(base["machine"]["isa"]) or platform.machine() != "x86_64"
    monkeypatch.setattr(lm, "machine", lambda: {**base["machine"], "isa": []})
    assert cache_key(teacher, adapter, TARGET) != base
    assert base["machine"]["cores"] >= 1 and list(base["runtime"]) == ["onnxruntime", "torch", "transformers"]
    assert list(cache_key(teacher, adapter, Target())["runtime"]) == ["openvino", "nncf", "torch", "transformers"]
    # an image tower reads no tokens: a seq it never sees fitted it again
    vit = tiny_model("vit")
    assert cache_key(vit, get_adapter("vit"), Target(seq=16)) == cache_key(vit, get_adapter("vit"), Target(seq=32))
    # relative position terms change every attention's graph; they reused absolute positions' milliseconds
    relative = tiny_model("bert")
    relative.config.position_embedding_type = "relative_key_query"
    assert cache_key(relative, adapter, TARGET) != cache_key(tiny_model("bert"), adapter, TARGET)


def test_two_writers_of_one_cache_file_both_finish_and_leave_a_whole_file(fitted, tmp_path):
    """They shared one temporary name: the second rename found it gone (FileNotFoundError) after the whole fit."""
    import multiprocessing

    model, adapter, cache, result, _ = fitted
    key = cache_key(model, adapter, TARGET)
    path = tmp_path / cache_file(cache, key).name
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_often, args=(path, key, result)) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    assert [w.exitcode for w in writers] == [0, 0]
    assert lm._read_cache(path, key, ["text"]).towers == result.towers
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_cache_file_is_as_readable_as_any_file_the_user_writes(fitted, tmp_path):
    """The temporary file it is renamed from is its owner's alone (0600), which others sharing the cache kept."""
    model, adapter, cache, result, _ = fitted
    key = cache_key(model, adapter, TARGET)
    path = tmp_path / cache_file(cache, key).name
    before = os.umask(0o022)
    try:
        lm.write_cache(path, key, result)
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == 0o644


def _write_often(path, key, model):
    for _ in range(150):
        lm.write_cache(path, key, model)


@pytest.mark.parametrize("kwargs, match", [
    ({"runtime": "tensorrt"}, "unknown target runtime 'tensorrt'"),
    ({"precision": "fp16"}, "unknown target precision"),
    ({"threads": 0}, "target threads = 0"),
    ({"batch": -1}, "target batch = -1"),
    ({"seq": 2.5}, "target seq = 2.5"),
    ({"device": "cuda"}, "measured on the CPU only"),
])
def test_bad_target_is_refused(kwargs, match):
    with pytest.raises(LmmcError, match=match):
        Target(**kwargs)


def test_measure_times_each_tower_of_a_dual_encoder_in_openvino_int8(tmp_path, one_thread):
    model = tiny_model("clip")
    adapter = get_adapter("clip")
    target = Target("openvino", "int8", threads=1, batch=2, seq=16)
    ms = lm.measure_ms(model, adapter, target, tmp_path, _feeds(model, adapter), repeats=3)
    assert sorted(ms) == ["text", "vision"] and all(v > 0 for v in ms.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{t}{suffix}" for t in ("text", "vision")
        for suffix in (".xml", ".bin", ".int8.xml", ".int8.bin"))  # IRs from PyTorch: no ONNX file
    assert list(lm.tower_feed(model, adapter.tower("vision"), target)["pixel_values"].shape) == [2, 3, 32, 32]
    assert list(lm.tower_feed(model, adapter.tower("text"), Target(seq=500))["input_ids"].shape) == [8, 64]  # position limit
    with pytest.raises(LmmcError, match="INT8 target needs calibration feeds for the text tower"):
        lm.measure_ms(model, adapter, Target("onnxruntime", "int8"), tmp_path / "q", {})
