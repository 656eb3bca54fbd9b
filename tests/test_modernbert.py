"""ModernBERT: its fused q/k/v and GLU linears split per role compute the same model, and a student with
uneven heads and FFN widths reloads, exports and compiles like any other."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_TEXT, compile_tiny_text, padded_text, save_preprocessors, tower_outputs

from lmmc.adapters import block_list, get_adapter
from lmmc.blockwise import block_output, run_block, visit_blocks
from lmmc.export.onnx import export_tower
from lmmc.export.openvino import torch_to_openvino
from lmmc.modelio import save_student
from lmmc.runtime import load, open_dir
from lmmc.student import load_student
from lmmc.surgery import keep_blocks_, keep_channels_, keep_heads_

ADAPTER = get_adapter("modernbert")
TOWER = ADAPTER.tower("text")
HEAD_DIM = 8


def modernbert() -> torch.nn.Module:
    """Three blocks, the first with global attention and the others with a window of 8 tokens, so
    test inputs longer than the window exercise both kinds. At the default initializer_range (0.02) the blocks
    barely move the residual stream: a student without half its FLOPs kept cosine 1.0000, and a wrong window
    would hide under the tolerances."""
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(**{**TINY_TEXT, "num_hidden_layers": 3}, pad_token_id=0, bos_token_id=2,
                                        eos_token_id=3, cls_token_id=2, sep_token_id=3, local_attention=8,
                                        global_attn_every_n_layers=3, initializer_range=0.3)
    return transformers.ModernBertModel(cfg).eval()




def real(hidden: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """The states of real tokens: a padded query inside a window of padding sees no key, and runtimes
    differ on what it gets."""
    return hidden[mask.numpy().astype(bool)]


def uneven(model: torch.nn.Module) -> torch.nn.Module:
    blocks = block_list(model, TOWER)[1]
    keep_heads_(blocks[0], TOWER, HEAD_DIM, [0, 2, 3])
    keep_heads_(blocks[2], TOWER, HEAD_DIM, [1])
    keep_channels_(blocks[1], TOWER, [3, *range(10, 32)])
    return model


def test_block_by_block_calibration_gives_each_attention_type_its_own_mask_and_rotary_embeddings() -> None:
    """The sliding-window blocks are called with a mask and rotary embeddings of their own: a block visited
    in turn must see exactly the input the model's own forward gives it."""
    model = ADAPTER.prepared(modernbert())
    blocks = block_list(model, TOWER)[1]
    assert [b.attention_type for b in blocks] == ["full_attention", "sliding_attention", "sliding_attention"]
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(5, 99, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}]
    batches[0]["attention_mask"][1, 20:] = 0
    seen = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(block_output(out))) for b in blocks]
    with torch.no_grad():
        model(**batches[0])
    for handle in handles:
        handle.remove()
    for tower, i, block, inputs, _ in visit_blocks(model, ADAPTER, lambda t: batches, torch.device("cpu")):
        got = run_block(block, inputs[0])
        assert torch.allclose(got, seen[i], atol=1e-6), (i, (got - seen[i]).abs().max())


def test_split_linears_compute_the_fused_model() -> None:
    fused = modernbert()
    split = ADAPTER.prepared(copy.deepcopy(fused))
    assert type(split.layers[0].attn.Wqkv).__name__ == "SplitLinear"
    fused.set_attn_implementation("eager")  # as prepared: the comparison is of the linears alone
    feed = padded_text()
    with torch.no_grad():
        a = fused(input_ids=feed[0], attention_mask=feed[1]).last_hidden_state
        b = split(input_ids=feed[0], attention_mask=feed[1]).last_hidden_state
    assert torch.equal(a, b)


def test_removed_heads_and_channels_match_the_model_with_them_silenced() -> None:
    teacher = ADAPTER.prepared(modernbert())
    reference = copy.deepcopy(teacher)
    with torch.no_grad():
        reference.layers[0].attn.Wo.weight[:, HEAD_DIM:2 * HEAD_DIM] = 0
        for h in (0, 2, 3):
            reference.layers[2].attn.Wo.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
        dropped = sorted(set(range(64)) - {3, *range(10, 32)})
        reference.layers[1].mlp.Wo.weight[:, dropped] = 0
    student = uneven(copy.deepcopy(teacher))
    assert student.layers[1].mlp.Wi.up.out_features == student.layers[1].mlp.Wi.gate.out_features == 23
    feed = padded_text()
    assert np.abs(tower_outputs(student, TOWER, *feed)[0] - tower_outputs(reference, TOWER, *feed)[0]).max() <= 1e-5
    # Removing a block renumbers the kinds of attention the rest use.
    keep_blocks_(student, TOWER, [0, 2])
    keep_blocks_(reference, TOWER, [0, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert np.abs(tower_outputs(student, TOWER, *feed)[0] - tower_outputs(reference, TOWER, *feed)[0]).max() <= 1e-5


def test_shrunk_modernbert_reloads_bit_identically_and_runs_in_every_runtime(tmp_path) -> None:
    student = uneven(ADAPTER.prepared(modernbert()))
    # Without its first block: the teacher's first block alone has no attn_norm, and the block now first
    # keeps its own, which a model built from the config would lack.
    keep_blocks_(student, TOWER, [1, 2])
    save_student(student, {}, tmp_path / "student", {"teacher": "tiny"})
    loaded = load_student(tmp_path / "student")
    feed = padded_text()
    ref = tower_outputs(student, TOWER, *feed)
    for a, b in zip(tower_outputs(loaded, TOWER, *feed), ref):
        assert np.array_equal(a, b)
    export_tower(student, TOWER, tmp_path / "text.onnx")
    torch_to_openvino(student, TOWER, tmp_path / "text.xml")
    for path in ("text.onnx", "text.xml"):
        got = load(tmp_path / path, threads=1).run({"input_ids": feed[0].numpy(), "attention_mask": feed[1].numpy()})
        assert np.abs(real(got["last_hidden_state"], feed[1]) - real(ref[0], feed[1])).max() <= 1e-4, path
        assert np.abs(got["pooled_embedding"] - ref[1]).max() <= 1e-4, path


def test_a_student_of_the_teachers_shapes_is_saved_as_a_standard_checkpoint(tmp_path) -> None:
    """Split linears are fused again on save when the config describes the student: plain
    `from_pretrained` then loads it, and `load_student` splits it again."""
    student = ADAPTER.prepared(modernbert())
    with torch.no_grad():  # unstructured sparsity changes no shape
        student.layers[1].mlp.Wi.gate.weight[:, ::2] = 0
        student.layers[0].attn.Wqkv.k.weight[3] = 0
    save_student(student, {}, tmp_path / "student", {"teacher": "tiny"})
    assert (tmp_path / "student" / "model.safetensors").is_file()
    assert not (tmp_path / "student" / "student.safetensors").exists()
    plain, info = transformers.AutoModel.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs"), info
    assert isinstance(plain.layers[0].attn.Wqkv, torch.nn.Linear)
    plain.set_attn_implementation("eager")
    feed = padded_text()
    ref = tower_outputs(student, TOWER, *feed)
    with torch.no_grad():
        got = plain.eval()(input_ids=feed[0], attention_mask=feed[1]).last_hidden_state.numpy()
    assert np.array_equal(got, ref[0])
    loaded = load_student(tmp_path / "student")
    assert type(loaded.layers[0].attn.Wqkv).__name__ == "SplitLinear"
    for a, b in zip(tower_outputs(loaded, TOWER, *feed), ref):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_compile_prunes_and_deploys_with_the_models_pooling(tmp_path, one_thread, pooling: str) -> None:
    teacher = tmp_path / "teacher"
    modernbert().save_pretrained(teacher)
    save_preprocessors("bert", teacher)
    (teacher / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.'
                                          'Transformer"}, {"idx": 1, "name": "1", "path": "1_Pooling", "type": '
                                          '"sentence_transformers.models.Pooling"}, {"idx": 2, "name": "2", "path": '
                                          '"2_Normalize", "type": "sentence_transformers.models.Normalize"}]')
    (teacher / "1_Pooling").mkdir()
    (teacher / "1_Pooling" / "config.json").write_text(
        f'{{"word_embedding_dimension": 32, "pooling_mode_cls_token": {str(pooling == "cls").lower()}, '
        f'"pooling_mode_mean_tokens": {str(pooling == "mean").lower()}}}')
    out = compile_tiny_text(teacher, tmp_path / "out", [
        {"antgmm": {"keep": 0.5, "budget": "flops", "importance": "activation"}},
        {"distill": {"steps": 4, "batch_size": 8, "dev_samples": 8, "eval_every": 2}}], max_length=20)
    student = load_student(out / "student")
    assert len(student.layers) < 3 or sum(b.attn.Wqkv.q.out_features for b in student.layers) < 3 * 32
    texts = ["the cold water", "a man on the road was in the house of the picture number", "python"]
    enc = transformers.AutoTokenizer.from_pretrained(out / "student")(texts, padding=True, return_tensors="pt")
    ref = tower_outputs(student, TOWER, enc["input_ids"], enc["attention_mask"])[1]
    hidden = tower_outputs(student, TOWER, enc["input_ids"], enc["attention_mask"])[0]
    first = hidden[:, 0] / np.linalg.norm(hidden[:, 0], axis=-1, keepdims=True)
    assert (np.abs(ref - first).max() <= 1e-5) == (pooling == "cls")
    for backend in ("onnxruntime", "openvino"):
        got = open_dir(out, backend=backend, threads=1).encode(texts)
        assert np.abs(got - ref).max() <= 1e-4, backend


def test_runtime_agreement_is_judged_at_real_tokens() -> None:
    from lmmc.export.validate import hidden_diff

    ref = np.zeros((2, 3, 4), dtype=np.float32)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    padded = ref.copy()
    padded[1, 2] = 5.0  # a padded position: not compared
    assert hidden_diff(padded, ref, {"attention_mask": mask}) == 0.0
    assert hidden_diff(padded, ref, {}) == 5.0  # no mask (an image tower): every position
    padded[0, 1, 0] = 0.25
    assert hidden_diff(padded, ref, {"attention_mask": mask}) == 0.25
    padded[1, 0, 3] = np.nan
    assert np.isnan(hidden_diff(padded, ref, {"attention_mask": mask}))
