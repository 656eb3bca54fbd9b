"""OpenVINO deployment: IR of structurally pruned students (from PyTorch and from ONNX) against PyTorch,
NNCF INT8 and bf16 inference against fp32, and the errors for a missing OpenVINO, a broken IR or a
frontend the recipe cannot serve."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import openvino as ov
import pytest
import torch
import transformers

from lmmc.adapters import TowerModule
from lmmc.errors import LmmcError
from lmmc.adapters import block_list, get_adapter
from lmmc.export.openvino import OpenVinoConfig, quantize_openvino, to_openvino, torch_to_openvino
from lmmc.export.ort import calibration_feeds
from lmmc.export.validate import cosine
from lmmc.recipe import parse_recipe
from lmmc.runtime import load
from lmmc.runtime.openvino import cpu_has_bf16
from tests.conftest import tiny_model, uneven_student
from tests.test_ort import feed, tiny_artifact


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_ir_of_uneven_student_matches_pytorch_and_int8_stays_close(tiny_kind, tmp_path, one_thread, exported_tower):
    art = tiny_artifact(tiny_kind, tmp_path)
    model = art.student  # uneven_student(tiny_kind)
    for tower in art.adapter.towers:
        plain = exported_tower("uneven", tiny_kind, tower.name, tmp_path / f"{tower.name}.onnx")
        fp32 = to_openvino(plain, tmp_path / f"{tower.name}.xml")
        # fp32 means fp32 weights: save_model's default would have halved them
        consts = [op for op in ov.Core().read_model(str(fp32)).get_ops() if op.get_type_name() == "Constant"]
        assert not any(op.get_element_type() == ov.Type.f16 for op in consts)
        int8 = quantize_openvino(fp32, tmp_path / f"{tower.name}.int8.xml", calibration_feeds(art, tower))
        got_feed, inputs = feed(model, tower)
        with torch.no_grad():
            ref = [r.numpy() for r in TowerModule(model, tower)(*inputs)]
        got = load(fp32, threads=1).run(got_feed)
        assert np.abs(got["last_hidden_state"] - ref[0]).max() <= 1e-4
        assert np.abs(got["pooled_embedding"] - ref[1]).max() <= 1e-4
        assert_int8_close(model, tower, int8)


def assert_int8_close(model, tower, int8) -> None:
    """The INT8 gate's figure, the mean cosine to the fp32 student, over 32 samples. A tiny random model's
    activations quantise worse than a trained one's (its SigLIP keeps 0.95 on average, single samples
    0.90); the 0.98 of a real model is held on MiniLM (test_minilm_nncf_int8_keeps_cosine_to_fp32)."""
    got_feed, inputs = feed(model, tower, batch=32)
    with torch.no_grad():
        ref = TowerModule(model, tower)(*inputs)[1].numpy()
    cos = cosine(load(int8, threads=1).run(got_feed)["pooled_embedding"], ref)
    assert cos.mean() >= 0.95 and cos.min() >= 0.88, (cos.mean(), cos.min())


def test_ir_from_pytorch_keeps_fused_attention_and_matches(tiny_kind, tmp_path, one_thread):
    """OpenVINO's PyTorch frontend on a student with uneven heads per layer: one ScaledDotProductAttention
    per block, every other shape of batch and sequence, PyTorch's outputs within 1e-4, INT8 close."""
    art = tiny_artifact(tiny_kind, tmp_path)
    model = art.student
    for tower in art.adapter.towers:
        transformers.utils.logging.warning_once.cache_clear()  # a warning shown once per process
        seen = Records()
        logging.getLogger("transformers").addHandler(seen)  # its logger does not propagate to caplog
        try:
            fp32 = torch_to_openvino(model, tower, tmp_path / f"{tower.name}.xml")
        finally:
            logging.getLogger("transformers").removeHandler(seen)
        # Tracing reads every property; the model's loss_function would warn about a loss it never uses.
        assert [r for r in seen.records if "loss_type" in r.getMessage()] == []
        assert transformers.logging.get_verbosity() == transformers.logging.WARNING
        ops = [op.get_type_name() for op in ov.Core().read_model(str(fp32)).get_ops()]
        assert ops.count("ScaledDotProductAttention") == len(block_list(model, tower)[1])
        int8 = quantize_openvino(fp32, tmp_path / f"{tower.name}.int8.xml", calibration_feeds(art, tower))
        runtime = load(fp32, threads=1)
        assert [s.name for s in runtime.outputs] == ["last_hidden_state", "pooled_embedding"]
        for batch, seq in [(3, 11), (2, 19)]:
            got_feed, inputs = feed(model, tower, batch, seq)
            with torch.no_grad():
                ref = [r.numpy() for r in TowerModule(model, tower)(*inputs)]
            got = runtime.run(got_feed)
            assert np.abs(got["last_hidden_state"] - ref[0]).max() <= 1e-4
            assert np.abs(got["pooled_embedding"] - ref[1]).max() <= 1e-4
        assert_int8_close(model, tower, int8)


def test_an_interrupt_during_the_frontends_conversion_stays_an_interrupt(tmp_path, monkeypatch):
    """The frontend calls back into Python while it converts; a SIGTERM handled there raised inside its C++,
    which reported a failed conversion: the compile called that bad input (exit 2) and discarded its work."""
    import os
    import signal

    from lmmc import process_state

    def interrupted_conversion(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the Python the frontend calls back into, where the handler runs
                sum(range(1000))
        except KeyboardInterrupt:  # what the frontend's C++ makes of an exception in its callback
            raise RuntimeError("Check 'false' failed at src/frontends/common/src/frontend.cpp:53:") from None
        raise RuntimeError("Check 'false' failed at src/frontends/common/src/frontend.cpp:53:")

    monkeypatch.setattr(ov, "convert_model", interrupted_conversion)
    previous = signal.signal(signal.SIGTERM, process_state.interrupt)
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            torch_to_openvino(tiny_model("bert"), get_adapter("bert").towers[0], tmp_path / "text.xml")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_bert_configured_as_a_decoder_converts_from_pytorch(tmp_path, one_thread):
    """With is_decoder, BERT builds a key/value cache the frontend cannot convert (it failed after every pass
    had run); the embedding reads none, so the tower runs without one, as transformers' causal BERT computes."""
    from tests.conftest import TINY_TEXT

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY_TEXT, is_decoder=True)).eval()
    tower = get_adapter("bert").towers[0]
    runtime = load(torch_to_openvino(model, tower, tmp_path / "text.xml"), threads=1)
    got_feed, inputs = feed(model, tower, 3, 11)
    with torch.no_grad():
        causal = model(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False).last_hidden_state
    got = runtime.run(got_feed)
    mask = got_feed["attention_mask"].astype(bool)
    assert np.abs(got["last_hidden_state"][mask] - causal.numpy()[mask]).max() <= 1e-4


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 units for OpenVINO")
def test_bf16_inference_stays_close_to_f32(tiny_ir):
    got_feed, _ = uneven_bert_feed()
    f32 = load(tiny_ir, threads=1).run(got_feed)["pooled_embedding"]
    bf16 = load(tiny_ir, threads=1, inference_precision="bf16")
    assert bf16.inference_precision == "bf16"
    got = bf16.run(got_feed)["pooled_embedding"]
    assert 0 < np.abs(got - f32).max() and cosine(got, f32).min() >= 0.99  # bf16 really ran, and stays close


def test_inference_precision_errors(tiny_ir, tmp_path, exported_tower):
    with pytest.raises(LmmcError, match="unknown OpenVINO inference precision 'f16'"):
        load(tiny_ir, inference_precision="f16")
    onnx_file = exported_tower("uneven", "bert", "text", tmp_path / "other.onnx")
    with pytest.raises(LmmcError, match="inference_precision is OpenVINO's setting"):
        load(onnx_file, inference_precision="bf16")


def test_frontend_follows_the_int8_choice():
    assert OpenVinoConfig().frontend == "pytorch"
    assert OpenVinoConfig(int8={"mixed": {"max_cosine_drop": 0.002}}).frontend == "onnx"
    with pytest.raises(ValueError, match="use frontend: onnx"):
        OpenVinoConfig(int8={"mixed": {"max_cosine_drop": 0.002}}, frontend="pytorch")
    parse_recipe({"calibration": {"random": True}, "export": ["openvino", "onnx"]})  # nothing needed before it
    with pytest.raises(LmmcError, match="put 'onnx' before it"):
        parse_recipe({"calibration": {"random": True}, "export": [{"openvino": {"frontend": "onnx"}}]})


def test_missing_openvino_fails_the_recipe_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without the package sees
    with pytest.raises(LmmcError, match=r"pip install 'lmmc\[openvino\]'"):
        parse_recipe({"calibration": {"random": True}, "export": ["onnx", "openvino"]})
    with pytest.raises(LmmcError, match=r"pip install 'lmmc\[openvino\]'"):
        load(__file__, "openvino")  # any existing file: the backend is checked first


def test_missing_nncf_fails_only_when_int8_is_asked(monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)
    parse_recipe({"calibration": {"random": True}, "export": ["onnx", {"openvino": {"int8": False}}]})
    with pytest.raises(LmmcError, match="needs NNCF"):
        parse_recipe({"calibration": {"random": True}, "export": ["onnx", "openvino"]})


@pytest.fixture
def tiny_ir(tmp_path, exported_tower):
    return to_openvino(exported_tower("uneven", "bert", "text", tmp_path / "text.onnx"), tmp_path / "text.xml")


def uneven_bert_feed():
    """A feed for the `tiny_ir` fixture's tower (the uneven BERT student)."""
    return feed(uneven_student("bert"), get_adapter("bert").towers[0])


@pytest.mark.parametrize("damage", ["truncated xml", "foreign bin", "missing bin"])
def test_broken_ir_is_one_clear_error(tiny_ir, damage):
    if damage == "truncated xml":
        tiny_ir.write_text(tiny_ir.read_text()[:500])
    elif damage == "foreign bin":
        tiny_ir.with_suffix(".bin").write_bytes(b"\0" * 64)
    else:
        tiny_ir.with_suffix(".bin").unlink()
    with pytest.raises(LmmcError, match="export it again with `lmmc compile`") as err:
        load(tiny_ir)
    assert str(tiny_ir) in str(err.value)


@pytest.mark.e2e
def test_minilm_nncf_int8_keeps_cosine_to_fp32(minilm, minilm_onnx, tmp_path):
    """NNCF INT8 of the real teacher, calibrated on one part of the corpus: held-out cosine to the fp32
    IR at least 0.98."""
    import transformers

    from tests.conftest import CORPUS

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    minilm_onnx(tmp_path / "text.onnx")
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]

    def feeds(texts):
        out = []
        for i in range(0, len(texts), 16):
            enc = tokenizer(texts[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="np")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out

    calib, held_out = feeds(lines[:64]), feeds(lines[-128:])
    fp32 = to_openvino(tmp_path / "text.onnx", tmp_path / "text.xml")
    int8 = quantize_openvino(fp32, tmp_path / "text.int8.xml", calib)
    ref = np.concatenate([load(fp32).run(f)["pooled_embedding"] for f in held_out])
    got = np.concatenate([load(int8).run(f)["pooled_embedding"] for f in held_out])
    assert cosine(ref, got).mean() >= 0.98


@pytest.mark.e2e
def test_minilm_nncf_int8_calibrated_on_short_texts_too_keeps_short_queries(minilm, minilm_onnx, tmp_path):
    """A query of a word or two is mostly [CLS] and [SEP]: calibrated on sentences alone, the INT8 IR's
    embedding of one strayed to 0.87 cosine from fp32's; the short texts cut from the same calibration
    sentences bring it back."""
    import transformers

    from lmmc.data import encode_text, short_texts
    from tests.conftest import CORPUS

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    minilm_onnx(tmp_path / "text.onnx")
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()][:64]
    queries = ["", "python", "hello", "bank", "weather", "open a file", "cheap flights", "?", "42", ":)"]

    def feeds(texts, batch=16):
        return [{k: b[k].numpy() for k in ("input_ids", "attention_mask")}
                for b in encode_text(tokenizer, texts, batch, 128)]

    fp32 = to_openvino(tmp_path / "text.onnx", tmp_path / "text.xml")
    ref = np.concatenate([load(fp32).run(f)["pooled_embedding"] for f in feeds(queries, 1)])
    cos = {}
    for name, calib in {"sentences": feeds(lines), "with short": feeds(lines) + feeds([""] + short_texts(lines[:16], 0, tokenizer))}.items():
        int8 = quantize_openvino(fp32, tmp_path / f"{name}.int8.xml", calib)
        got = np.concatenate([load(int8).run(f)["pooled_embedding"] for f in feeds(queries, 1)])
        cos[name] = cosine(ref, got)
    # measured: the empty text 0.871 -> 0.981, the worst query ("?") 0.799 -> 0.941
    assert cos["with short"][0] >= 0.97 and cos["with short"].min() >= 0.9
    assert cos["with short"].min() >= cos["sentences"].min() + 0.05 and (cos["with short"] >= cos["sentences"] - 0.01).all()


def test_the_openvino_pass_calibrates_a_text_tower_on_its_short_texts_too(tmp_path, monkeypatch):
    import lmmc.export.openvino as openvino_export
    from lmmc.recipe import CalibrationConfig
    from lmmc.data import load_calibration, short_texts
    from tests.conftest import save_tiny
    from tests.test_ort import run

    words = "cold water road sea hill town river stone field light dark rain snow wind tree leaf bird".split()
    texts = [f"{words[i % 17]} {words[i // 17]} {words[(i * 5) % 17]} {words[(i * 3) % 17]} {i} again" for i in range(60)]
    (tmp_path / "calib.txt").write_text("\n".join(texts))
    tokenizer = transformers.AutoTokenizer.from_pretrained(save_tiny("bert", tmp_path / "teacher"))
    art = tiny_artifact("bert", tmp_path)
    cfg = CalibrationConfig(path=str(tmp_path / "calib.txt"), samples=32, eval_samples=8, batch_size=8)
    art.calib = load_calibration(cfg, cfg.path, {"text"}, {"tokenizer": tokenizer})
    chosen = [tokenizer.decode(row[mask.bool()], skip_special_tokens=True) for b in art.calib.calib_batches("text")
              for row, mask in zip(b["input_ids"], b["attention_mask"])]
    short = [tokenizer.decode(row[mask.bool()], skip_special_tokens=True) for b in art.calib.short
             for row, mask in zip(b["input_ids"], b["attention_mask"])]
    assert short == [""] + short_texts(chosen[:8], 0, tokenizer) and len(chosen) == 32 and len(short) >= 6
    seen = []
    real = openvino_export.quantize_openvino
    monkeypatch.setattr(openvino_export, "quantize_openvino", lambda *a: seen.append(a[2]) or real(*a))
    run(art, "onnx")
    run(art, "openvino")
    [feeds] = seen
    assert len(feeds) == 4 + len(art.calib.short) == 6 and all((f["input_ids"] == b["input_ids"].numpy()).all() for f, b in zip(feeds[4:], art.calib.short))


def test_short_texts_are_the_opening_words_of_each_text(minilm):
    from lmmc.data import short_texts, token_ids, unseen_texts

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    texts = [f"w{i} a b c d e f" for i in range(10)]
    short = short_texts(texts, 0, tokenizer)
    assert len(short) == 10 and short == short_texts(texts, 0, tokenizer)
    assert all(s.split() == t.split()[:len(s.split())] and 1 <= len(s.split()) <= 4 for s, t in zip(short, texts))
    assert len({tuple(short_texts(texts, seed, tokenizer)) for seed in range(5)}) > 1  # the cut moves with the seed
    assert short_texts(["a b", "a b", "a"], 0, tokenizer) in (["a b", "a"], ["a"])  # repeats dropped
    [cjk] = short_texts(["今天天气很好我们去公园散步吧"], 0, tokenizer)  # no spaces: its first one to four tokens
    assert 1 <= len(cjk.replace(" ", "")) <= 4 and "今天天气".startswith(cjk.replace(" ", ""))
    # held out only where the tokens differ from every calibrated text's and from each other's
    seen = set(token_ids(tokenizer, ["what is"], 128))
    assert unseen_texts(tokenizer, ["What is", "where", "WHERE", "how"], seen, 128) == [1, 3]


def test_a_signal_after_irs_are_released_in_load_order_reaches_its_handler(tiny_ir):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack in and back out; two plugins released
    first-in first-out left a freed stack installed, and the next SIGTERM or Ctrl-C was a segfault (exit 139)
    instead of lmmc's handler. Every IR is compiled through one Core, so none is ever released."""
    code = ("import gc, os, signal, sys, time\n"
            "from lmmc.runtime import load\n"
            "first, second = load(sys.argv[1]), load(sys.argv[1])\n"
            "del first; gc.collect()\n"
            "del second; gc.collect()\n"
            "signal.signal(signal.SIGTERM, lambda *a: print('handled', flush=True))\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(0.5)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_ir)], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "handled\n"), proc.stderr
