"""Structured surgery on generative decoders: grouped-query head groups, SwiGLU channels and decoder blocks
of a LLaVA model, their costs, and exact reload through the student format."""

from __future__ import annotations

import copy
import json

import conftest
import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from lmmc.adapters import block_linears, block_list, get_adapter, head_dim
from lmmc.artifact import Artifact
from lmmc.data import random_generative_calibration
from lmmc.pipeline import get_pass, load_passes
from lmmc.recipe import CalibrationConfig
from lmmc.cost import block_cost, channel_cost, group_cost
from lmmc.errors import LmmcError
from lmmc.importance import gate_hook
from lmmc.student import load_student, read_structure, save
from lmmc.surgery import group_size, keep_blocks_, keep_channels_, keep_heads_

IMAGE_TOKEN = 63
IMAGE_TOKENS = 9  # (30 / 10)² patches; the CLS token is dropped by the default feature strategy


def tiny_llava(decoder: str = "llama", seed: int = 0) -> transformers.LlavaForConditionalGeneration:
    """A CLIP vision tower, a projector and a 4-block decoder with 4 query heads in 2 GQA groups."""
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=30, patch_size=10)
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
    text_cfg = {"llama": transformers.LlamaConfig, "olmo2": transformers.Olmo2Config}.get(
        decoder, transformers.Qwen2Config)(**text)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_id=IMAGE_TOKEN,
                                   image_seq_length=IMAGE_TOKENS)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def prompt(seed: int = 1, words: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((2, IMAGE_TOKENS), IMAGE_TOKEN), torch.randint(0, 60, (2, words), generator=gen)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(2, 3, 30, 30, generator=gen)}


def logits(model: torch.nn.Module, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**prompt(), **extra).logits


def greedy(model: torch.nn.Module, tokens: int = 12, use_cache: bool = True) -> torch.Tensor:
    with torch.no_grad():
        # A generated image token would ask an uncached step for image features it has no pixels for.
        return model.generate(**prompt(), max_new_tokens=tokens, do_sample=False, use_cache=use_cache,
                              min_new_tokens=tokens, suppress_tokens=[IMAGE_TOKEN])


ADAPTER = get_adapter("llava")
LANGUAGE, VISION = ADAPTER.tower("language"), ADAPTER.tower("vision")


def decoder_block(model: torch.nn.Module, i: int) -> torch.nn.Module:
    return block_list(model, LANGUAGE)[1][i]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def test_removing_a_gqa_group_equals_silencing_its_query_heads() -> None:
    """A removed group (one k/v head, its 2 query heads, their o-projection columns) changes the output
    exactly as zeroing those heads' o-projection columns does; forward and cached generation both run."""
    model = tiny_llava()
    hd = head_dim(model, LANGUAGE)
    silenced = copy.deepcopy(model)
    o = block_linears(decoder_block(silenced, 1), LANGUAGE)["o"][1]
    with torch.no_grad():
        o.weight[:, 0:2 * hd] = 0  # query heads 0 and 1 = group 0
    keep_heads_(decoder_block(model, 1), LANGUAGE, hd, [2, 3])
    lin = block_linears(decoder_block(model, 1), LANGUAGE)
    assert [lin[r][1].weight.shape for r in ("q", "k", "v", "o")] == [(2 * hd, 32), (hd, 32), (hd, 32), (32, 2 * hd)]
    assert group_size(decoder_block(model, 1), LANGUAGE, hd) == 2
    torch.testing.assert_close(logits(model), logits(silenced), atol=1e-5, rtol=0)
    assert torch.equal(greedy(model), greedy(silenced))
    assert torch.equal(greedy(model), greedy(model, use_cache=False))


@pytest.mark.parametrize("keep", [[0, 2, 3], [1, 2], [0]])
def test_a_cut_that_splits_a_gqa_group_is_refused(keep: list[int]) -> None:
    model = tiny_llava()
    block = decoder_block(model, 0)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises(LmmcError, match=r"each group of 2 query heads shares one key/value head"):
        keep_heads_(block, LANGUAGE, head_dim(model, LANGUAGE), keep)
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-cut


def test_removing_swiglu_channels_equals_zeroing_their_down_columns() -> None:
    model = tiny_llava()
    gone = [0, 5, 6, 17, 40, 47]
    kept = [c for c in range(48) if c not in gone]
    silenced = copy.deepcopy(model)
    with torch.no_grad():
        block_linears(decoder_block(silenced, 2), LANGUAGE)["fc2"][1].weight[:, gone] = 0
    keep_channels_(decoder_block(model, 2), LANGUAGE, kept)
    lin = block_linears(decoder_block(model, 2), LANGUAGE)
    assert [lin[r][1].weight.shape for r in ("gate", "fc1", "fc2")] == [(42, 32), (42, 32), (32, 42)]
    assert decoder_block(model, 2).mlp.intermediate_size == 42
    torch.testing.assert_close(logits(model), logits(silenced), atol=1e-5, rtol=0)
    assert torch.equal(greedy(model), greedy(silenced))


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_removing_decoder_blocks_keeps_the_kv_cache_working(decoder: str) -> None:
    """Blocks 0 and 2 go: the rest are renumbered (layer_idx, num_hidden_layers, layer_types), the output
    equals the full model with those blocks' residual updates gated off, and cached generation equals
    uncached generation."""
    model = tiny_llava(decoder)
    skipped = copy.deepcopy(model)
    for i in (0, 2):
        decoder_block(skipped, i).register_forward_hook(gate_hook(torch.zeros(())), with_kwargs=True)
    keep_blocks_(model, LANGUAGE, [1, 3])
    text_cfg = model.config.text_config
    assert [decoder_block(model, i).self_attn.layer_idx for i in range(2)] == [0, 1]
    assert text_cfg.num_hidden_layers == 2 and text_cfg.lmmc_teacher_layers == [1, 3]
    if decoder == "qwen2":
        assert text_cfg.layer_types == ["full_attention"] * 2
    torch.testing.assert_close(logits(model, use_cache=False), logits(skipped, use_cache=False), atol=1e-5, rtol=0)
    assert torch.equal(greedy(model), greedy(model, use_cache=False))
    assert torch.equal(greedy(model), greedy(skipped, use_cache=False))


def test_olmo2s_q_and_k_norms_keep_the_rows_of_the_kept_heads() -> None:
    """OLMo2 normalises q and k over all heads: a cut keeps the norm weights of the rows it keeps (it left
    them whole, and the block failed on mismatched shapes), and generation runs with and without the cache."""
    model = tiny_llava("olmo2")
    hd = head_dim(model, LANGUAGE)
    attention = decoder_block(model, 1).self_attn
    q_norm, k_norm = attention.q_norm.weight.detach().clone(), attention.k_norm.weight.detach().clone()
    with torch.no_grad():
        q_norm.uniform_(0.5, 1.5), k_norm.uniform_(0.5, 1.5)
        attention.q_norm.weight.copy_(q_norm), attention.k_norm.weight.copy_(k_norm)
    keep_heads_(decoder_block(model, 1), LANGUAGE, hd, [2, 3])
    assert torch.equal(attention.q_norm.weight, q_norm[2 * hd:4 * hd])
    assert torch.equal(attention.k_norm.weight, k_norm[hd:2 * hd])
    assert torch.equal(greedy(model), greedy(model, use_cache=False))


def prune_unevenly_(model: torch.nn.Module) -> None:
    """Different head groups, SwiGLU widths and block counts per layer, in both towers."""
    hd = head_dim(model, LANGUAGE)
    keep_heads_(decoder_block(model, 0), LANGUAGE, hd, [2, 3])
    keep_channels_(decoder_block(model, 0), LANGUAGE, range(0, 48, 2))
    keep_channels_(decoder_block(model, 1), LANGUAGE, range(40))
    keep_heads_(decoder_block(model, 3), LANGUAGE, hd, [0, 1])
    keep_channels_(decoder_block(model, 3), LANGUAGE, [3, 9, 11])
    keep_blocks_(model, LANGUAGE, [0, 1, 3])
    vision_block = block_list(model, VISION)[1][0]
    keep_heads_(vision_block, VISION, head_dim(model, VISION), [1, 3])
    keep_channels_(vision_block, VISION, range(20))


@pytest.mark.parametrize("decoder", ["llama", "qwen2", "olmo2"])
def test_a_pruned_llava_reloads_exactly(decoder: str, tmp_path) -> None:
    model = tiny_llava(decoder)
    prune_unevenly_(model)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [2, 3], 0  # not config.json's
    record = save(model, tmp_path, {})
    assert record["weights"] == "student.safetensors"
    lang = record["towers"]["language"]
    assert (lang["layers"], lang["teacher_layers"]) == (3, [0, 1, 3])
    assert (lang["heads"], lang["kv_heads"], lang["ffn"]) == ([2, 4, 2], [1, 2, 1], [24, 40, 3])
    assert (record["towers"]["vision"]["heads"], record["towers"]["vision"]["ffn"]) == ([2, 4], [20, 48])
    reloaded = load_student(tmp_path)
    assert type(reloaded) is transformers.LlavaForConditionalGeneration
    assert read_structure(reloaded, ADAPTER) == read_structure(model, ADAPTER)
    assert torch.equal(logits(reloaded), logits(model))
    assert torch.equal(greedy(reloaded, tokens=16), greedy(model, tokens=16))
    assert (reloaded.generation_config.eos_token_id, reloaded.generation_config.pad_token_id) == ([2, 3], 0)


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_a_llava_with_blocks_removed_only_reloads_with_from_pretrained(decoder: str, tmp_path) -> None:
    """Depth pruning alone leaves a model its config describes: plain weights, and the config's layer
    count, layer types and teacher layers carry the removal."""
    model = tiny_llava(decoder)
    keep_blocks_(model, LANGUAGE, [0, 3])
    keep_blocks_(model, VISION, [0])  # the block whose output the projector reads (vision_feature_layer -2)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [2, 3], 0
    assert save(model, tmp_path, {})["weights"] == "model.safetensors"
    plain = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    reloaded = load_student(tmp_path)
    assert plain.config.text_config.lmmc_teacher_layers == [0, 3]
    for other in (plain, reloaded):
        assert torch.equal(logits(other), logits(model))
        assert torch.equal(greedy(other), greedy(model))
        assert (other.generation_config.eos_token_id, other.generation_config.pad_token_id) == ([2, 3], 0)


def test_reload_refuses_a_record_whose_heads_split_groups(tmp_path) -> None:
    model = tiny_llava()
    prune_unevenly_(model)
    save(model, tmp_path, {})
    meta = json.loads((tmp_path / "lmmc.json").read_text())
    meta["structure"]["towers"]["language"]["kv_heads"][0] = 2  # 2 query heads cannot use 2 k/v heads
    (tmp_path / "lmmc.json").write_text(json.dumps(meta))
    with pytest.raises(LmmcError, match="groups its query heads 2 to a key/value head"):
        load_student(tmp_path)


def flops_and_params(block: torch.nn.Module, hidden: torch.Tensor, rope) -> tuple[int, int]:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        block(hidden, attention_mask=None, position_embeddings=rope)
    return counter.get_total_flops(), sum(p.numel() for p in block.parameters())


def test_group_and_channel_costs_match_the_flop_counter() -> None:
    """What the cost model says one GQA group and one SwiGLU channel cost is what removing one saves,
    counted by torch's FLOP counter and in parameters; the block's total cost matches too."""
    model = tiny_llava("qwen2")  # q/k/v biases
    model.set_attn_implementation("eager")  # so the attention products are matmuls the counter sees
    tokens = 11
    hd = head_dim(model, LANGUAGE)
    hidden = torch.randn(1, tokens, 32)
    rope = model.model.language_model.rotary_emb(hidden, torch.arange(tokens)[None])
    block = decoder_block(model, 0)
    flops0, params0 = flops_and_params(block, hidden, rope)
    assert (block_cost(block, LANGUAGE, hd, tokens).flops, block_cost(block, LANGUAGE, hd, tokens).params) == (flops0, params0)
    group, channel = group_cost(block, LANGUAGE, hd, tokens), channel_cost(block, LANGUAGE, tokens)
    keep_heads_(block, LANGUAGE, hd, [0, 1])
    flops1, params1 = flops_and_params(block, hidden, rope)
    assert (group.flops, group.params) == (flops0 - flops1, params0 - params1)
    keep_channels_(block, LANGUAGE, range(47))
    flops2, params2 = flops_and_params(block, hidden, rope)
    assert (channel.flops, channel.params) == (flops1 - flops2, params1 - params2)


def test_antgmm_removes_whole_gqa_groups_and_the_student_reloads_exactly(tmp_path) -> None:
    """AntGMM's head units on a decoder are GQA groups scored over their query heads: a group whose two
    query heads are silenced (zero output-projection columns, so zero activation score) goes first, with
    its k/v head; every block keeps whole groups, and the pruned LLaVA reloads exactly."""
    load_passes()
    model = conftest.tiny_llava()  # calibration ids are drawn above its image token
    hd = head_dim(model, LANGUAGE)
    lin = block_linears(decoder_block(model, 0), LANGUAGE)
    with torch.no_grad():
        lin["o"][1].weight[:, : 2 * hd] = 0  # group 0 = query heads 0 and 1
    q_before, k_before = lin["q"][1].weight.clone(), lin["k"][1].weight.clone()
    calib = random_generative_calibration(CalibrationConfig(random=True, samples=8, eval_samples=2, batch_size=4), model, ADAPTER)
    art = Artifact(model_ref="tiny", adapter=ADAPTER, teacher=copy.deepcopy(model), student=model, calib=calib)
    antgmm = get_pass("antgmm")
    metrics = antgmm(antgmm.Config(keep=0.8, importance="activation", shares={"ffn": 0.5, "heads": 0.5})).run(art)
    assert abs(metrics["kept"] - 0.8) < 0.03
    lang = metrics["structure"]["language"]
    assert all(h == 2 * kv for h, kv in zip(lang["heads"], lang["kv_heads"]))
    assert sum(lang["heads"]) + sum(metrics["structure"]["vision"]["heads"]) < 4 * 4  # some groups went
    lin = block_linears(decoder_block(model, 0), LANGUAGE)
    assert torch.equal(lin["q"][1].weight, q_before[2 * hd:]) and torch.equal(lin["k"][1].weight, k_before[hd:])
    save(model, tmp_path, {})
    reloaded = load_student(tmp_path)
    assert read_structure(reloaded, ADAPTER) == read_structure(model, ADAPTER)
    batch = calib.eval_batches("text")[0]
    with torch.no_grad():
        assert torch.equal(reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                           model(**{k: v for k, v in batch.items() if k != "labels"}).logits)


def test_a_pruned_idefics3_reloads_exactly(tmp_path) -> None:
    """The second generative family: uneven GQA groups, SwiGLU widths and vision heads, a removed vision
    block; logits and greedy tokens of the reloaded student equal the saved model's."""
    model = conftest.tiny_idefics3()
    adapter = get_adapter("idefics3")
    language, vision = adapter.tower("language"), adapter.tower("vision")
    blocks = block_list(model, language)[1]
    keep_heads_(blocks[0], language, head_dim(model, language), [0, 1])
    keep_channels_(blocks[0], language, range(0, 64, 3))
    keep_channels_(blocks[1], language, range(50))
    keep_heads_(block_list(model, vision)[1][1], vision, head_dim(model, vision), [0, 2, 3])
    keep_blocks_(model, vision, [1])
    record = save(model, tmp_path, {})
    assert record["towers"]["language"]["kv_heads"] == [1, 2] and record["towers"]["language"]["ffn"] == [22, 50]
    reloaded = load_student(tmp_path)
    assert type(reloaded) is type(model) and read_structure(reloaded, adapter) == read_structure(model, adapter)
    calib = random_generative_calibration(CalibrationConfig(random=True, samples=2, eval_samples=2, batch_size=2),
                                          model, adapter)
    batch = {k: v for k, v in calib.eval_batches("text")[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
        tokens = [m.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             suppress_tokens=[model.config.image_token_id]) for m in (model, reloaded)]
    assert torch.equal(*tokens)


def test_taylor_importance_of_a_llava_follows_its_next_token_loss() -> None:
    """A LLaVA has no embedding to contrast: Taylor scores come from its next-token loss through the whole
    model. The vision block after the one LLaVA-1.5 reads (vision_feature_layer -2) scores nothing; every
    other block scores, on a second call too, when transformers' own hidden-state hooks already sit on
    the blocks and the gate must still come first."""
    from lmmc.importance import taylor_importance

    model = conftest.tiny_llava()  # calibration ids are drawn above its image token
    assert model.config.vision_feature_layer == -2
    calib = random_generative_calibration(CalibrationConfig(random=True, samples=8, eval_samples=2, batch_size=4),
                                          model, ADAPTER)
    first, second = (taylor_importance(model, model, ADAPTER, calib, torch.device("cpu")) for _ in range(2))
    unread = ("vision", 1)
    assert first.blocks[unread] == 0.0 and not first.heads[unread].any() and not first.channels[unread].any()
    for key in [("vision", 0), ("language", 0), ("language", 1)]:
        assert first.blocks[key] > 0 and first.heads[key].sum() > 0 and first.channels[key].sum() > 0, key
    assert first.blocks == pytest.approx(second.blocks)
    assert all(torch.allclose(first.heads[k], second.heads[k]) for k in first.heads)


def test_a_pruned_decoder_with_tied_embeddings_saves_and_reloads_tied(tmp_path) -> None:
    """Qwen2-0.5B ties its output layer to its token embeddings; safetensors stores no aliases, so the
    student keeps the tensor once and reload shares it again."""
    cfg = tiny_llava("qwen").config
    cfg.tie_word_embeddings = cfg.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    keep_channels_(decoder_block(model, 1), LANGUAGE, range(20))
    save(model, tmp_path, {})
    reloaded = load_student(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.language_model.embed_tokens.weight
    assert torch.equal(logits(reloaded), logits(model))
