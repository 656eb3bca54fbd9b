"""MPNet: removing heads keeps each head's rows of the relative-position bias all blocks share, through
surgery, reload, ONNX Runtime, OpenVINO and a whole compile."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import compile_tiny_text, padded_text, save_tiny, tiny_model, tower_outputs

from lmmc.adapters import block_list, get_adapter
from lmmc.export.onnx import export_tower
from lmmc.export.openvino import torch_to_openvino
from lmmc.errors import LmmcError
from lmmc.modelio import save_student, text_positions
from lmmc.runtime import load, open_dir
from lmmc.student import SHRUNK_WEIGHTS, load_student
from lmmc.surgery import keep_blocks_, keep_channels_, keep_heads_

TOWER = get_adapter("mpnet").tower("text")
HEAD_DIM = 8  # tiny: 32 wide, 4 heads


def mpnet() -> torch.nn.Module:
    """The tiny MPNet with a relative-position bias large enough that a wrong head's row shows."""
    model = tiny_model("mpnet")
    with torch.no_grad():
        model.encoder.relative_attention_bias.weight.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(3))
    return model




def silence_heads_(model: torch.nn.Module, block: int, heads: list[int]) -> None:
    """The reference for removing heads: the same model with those heads' output-projection columns zeroed."""
    with torch.no_grad():
        for h in heads:
            model.encoder.layer[block].attention.attn.o.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0


def uneven(model: torch.nn.Module) -> torch.nn.Module:
    """Heads [0, 2, 3] in block 0; [1, 2] then [2] alone in block 1 (two cuts); 23 FFN channels in block 1."""
    blocks = block_list(model, TOWER)[1]
    keep_heads_(blocks[0], TOWER, HEAD_DIM, [0, 2, 3])
    keep_heads_(blocks[1], TOWER, HEAD_DIM, [1, 2])
    keep_heads_(blocks[1], TOWER, HEAD_DIM, [1])
    keep_channels_(blocks[1], TOWER, range(23))
    return model


def test_removed_heads_keep_their_own_rows_of_the_shared_position_bias() -> None:
    teacher = mpnet()
    reference = copy.deepcopy(teacher)
    silence_heads_(reference, 0, [1])
    silence_heads_(reference, 1, [0, 1, 3])
    with torch.no_grad():
        reference.encoder.layer[1].output.dense.weight[:, 23:] = 0
    student = uneven(copy.deepcopy(teacher))
    assert [b.attention.attn.bias_heads.tolist() for b in student.encoder.layer] == [[0, 2, 3], [2]]
    feed = padded_text()
    got, ref = tower_outputs(student, TOWER, *feed), tower_outputs(reference, TOWER, *feed)
    assert np.abs(got[0] - ref[0]).max() <= 1e-5
    # The bias matters: the same heads reading the first rows of the table give another model.
    student.encoder.layer[1].attention.attn.bias_heads = torch.tensor([0])
    assert np.abs(tower_outputs(student, TOWER, *feed)[0] - ref[0]).max() > 1e-2


def test_blocks_removed_after_heads_keep_their_rows() -> None:
    teacher = mpnet()
    reference = copy.deepcopy(teacher)
    silence_heads_(reference, 1, [0, 3])
    keep_blocks_(reference, TOWER, [1])
    student = copy.deepcopy(teacher)
    keep_heads_(block_list(student, TOWER)[1][1], TOWER, HEAD_DIM, [1, 2])
    keep_blocks_(student, TOWER, [1])
    feed = padded_text()
    assert np.abs(tower_outputs(student, TOWER, *feed)[0] - tower_outputs(reference, TOWER, *feed)[0]).max() <= 1e-5


def test_shrunk_mpnet_reloads_bit_identically(tmp_path) -> None:
    student = uneven(mpnet())
    save_student(student, {}, tmp_path, {"teacher": "tiny"})
    record = json.loads((tmp_path / "lmmc.json").read_text())["structure"]
    assert record["weights"] == SHRUNK_WEIGHTS
    assert record["towers"]["text"]["heads"] == [3, 1] and record["towers"]["text"]["ffn"] == [64, 23]
    loaded = load_student(tmp_path)
    assert [b.attention.attn.bias_heads.tolist() for b in loaded.encoder.layer] == [[0, 2, 3], [2]]
    feed = padded_text()
    for a, b in zip(tower_outputs(loaded, TOWER, *feed), tower_outputs(student, TOWER, *feed)):
        assert np.array_equal(a, b)


def test_shrunk_mpnet_runs_the_same_in_onnx_runtime_and_openvino(tmp_path) -> None:
    student = uneven(mpnet())
    export_tower(student, TOWER, tmp_path / "text.onnx")
    torch_to_openvino(student, TOWER, tmp_path / "text.xml")
    feed = padded_text(batch=2, seq=13)  # not the tracing shapes: the dynamic axes are exercised
    ref = tower_outputs(student, TOWER, *feed)
    for path in ("text.onnx", "text.xml"):
        model = load(tmp_path / path, threads=1)
        got = model.run({n: t.numpy() for n, t in zip(model.input_names, feed)})
        assert np.abs(got["last_hidden_state"] - ref[0]).max() <= 1e-4, path
        assert np.abs(got["pooled_embedding"] - ref[1]).max() <= 1e-4, path


def test_compile_prunes_heads_and_deploys(tmp_path, one_thread) -> None:
    teacher = save_tiny("mpnet", tmp_path / "teacher")
    out = compile_tiny_text(teacher, tmp_path / "out", [
        {"antgmm": {"keep": 0.5, "budget": "flops", "importance": "activation", "shares": {"ffn": 0.5, "heads": 0.5}}},
        {"distill": {"steps": 4, "batch_size": 8, "dev_samples": 8, "eval_every": 2}}])
    student = load_student(out / "student")
    heads = [b.attention.attn.q.out_features // HEAD_DIM for b in student.encoder.layer]
    assert sum(heads) < 8
    texts = ["the cold water", "a man on the road was in the house", "python"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "student")
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    ref = tower_outputs(student, TOWER, enc["input_ids"], enc["attention_mask"])[1]
    for backend in ("onnxruntime", "openvino"):
        got = open_dir(out, backend=backend, threads=1).encode(texts)
        assert np.abs(got - ref).max() <= 1e-4, backend
    # One token past the position table: OpenVINO read the missing rows as zeros and answered; its shape
    # inference finds no limit, since MPNet computes its positions from the mask
    limit = text_positions(student.config, TOWER)
    assert json.loads((out / "manifest.json").read_text())["preprocessing"]["text"]["positions"] == limit
    for path, options in [("onnx/text.onnx", {}), ("openvino/text.xml", {}),
                          ("openvino/text.xml", {"static_shape": (2, 2 * limit)})]:
        model = load(out / path, threads=1, **options)
        for n, fits in ((limit, True), (limit + 1, False)):
            feed = {"input_ids": np.full((1, n), 7), "attention_mask": np.ones((1, n), dtype=np.int64)}
            if fits:
                assert np.isfinite(model.run(feed)["pooled_embedding"]).all()
            else:
                with pytest.raises(LmmcError, match="More tokens than the model's position table"):
                    model.run(feed)


def test_the_token_limit_is_the_longest_input_the_position_table_takes():
    """MPNet numbers positions from 2 whatever its pad_token_id (the tiny one's is 0), RoBERTa from
    pad_token_id + 1: the limit lmmc cuts and times at runs, and one token more does not."""

    model = tiny_model("mpnet")
    assert model.config.pad_token_id != 1
    limit = text_positions(model.config, TOWER)
    assert limit == model.config.max_position_embeddings - 2
    ids = torch.full((1, limit), 5)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        with pytest.raises(IndexError):  # a position past the table
            model(input_ids=torch.full((1, limit + 1), 5), attention_mask=torch.ones(1, limit + 1, dtype=torch.long))
    roberta = transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    assert text_positions(roberta, get_adapter("roberta").tower("text")) == 512
