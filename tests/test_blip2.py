"""BLIP-2 with an OPT decoder (tiny Blip2ForConditionalGeneration): the adapter's towers and projector,
the split vision qkv and its fusing back, calibration batches through Blip2Processor, local and structured
pruning, the student's reload, the generative export against PyTorch's greedy generate, and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from PIL import Image

import lmmc
from conftest import (BLIP2_QUERIES, LLAVA_IMAGE_TOKEN, TINY_OPT, TINY_VISION, assert_greedy_matches_pytorch,
                      greedy_reference, save_tiny_blip2, tiny_blip2, tiny_blip2_processor, write_llava_pairs)
from lmmc.adapters import block_linears, block_list, get_adapter, prunable_linears
from lmmc.artifact import Artifact
from lmmc.blockwise import capture_block_inputs
from lmmc.cli import main
from lmmc.data import (IGNORE_INDEX, answer_end, check_generative_records, encode_generative,
                        random_generative_calibration)
from lmmc.errors import LmmcError
from lmmc.export.generative import export_generative
from lmmc.modelio import make_student
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import CalibrationConfig
from lmmc.runtime import open_generative
from lmmc.runtime.generate import Generator, generative_prompt
from lmmc.student import load_student, read_structure, save
from lmmc.surgery import keep_blocks_, keep_channels_, keep_heads_

ADAPTER = get_adapter("blip-2")
HEAD_DIM = TINY_VISION["hidden_size"] // TINY_VISION["num_attention_heads"]
NEW_TOKENS = 16
PROMPTS = ["the picture of a house is", "cold water"]


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def encoded(processor=None, n: int = 2) -> dict[str, torch.Tensor]:
    """Two prompts about two pictures, left-padded: Blip2Processor writes the image tokens before the padding."""
    processor = processor or tiny_blip2_processor()
    processor.tokenizer.padding_side = "left"
    return processor(images=images(n), text=PROMPTS[:n], padding=True, return_tensors="pt")


def logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in enc.items()}).logits


def prepared(**text) -> torch.nn.Module:
    return ADAPTER.prepared(tiny_blip2(**text))


def make_artifact(samples: int = 8) -> Artifact:
    teacher = prepared()
    art = Artifact(model_ref="tiny-blip2", adapter=ADAPTER, teacher=teacher, student=make_student(teacher))
    art.calib = random_generative_calibration(CalibrationConfig(samples=samples, eval_samples=4, batch_size=4), teacher,
                                              ADAPTER)
    return art


def run(art: Artifact, name: str, **config):
    return run_pass(get_pass(name)(get_pass(name).Config(**config)), art).metrics


# ---- adapter -----------------------------------------------------------------------------------------

def test_adapter_names_the_split_vision_qkv_the_opt_blocks_and_the_projector(threads):
    original = tiny_blip2()
    model = ADAPTER.prepared(copy.deepcopy(original))
    assert [t.name for t in ADAPTER.towers] == ["vision", "language"]
    assert ADAPTER.tower("language").inputs == ("input_ids", "attention_mask", "pixel_values")
    found = prunable_linears(model, ADAPTER)
    per_block = {(pl.tower, pl.block): set() for pl in found}
    for pl in found:
        per_block[(pl.tower, pl.block)].add(pl.role)
    roles = {"q", "k", "v", "o", "fc1", "fc2"}
    assert per_block == {("vision", 0): roles, ("vision", 1): roles, ("language", 0): roles,
                         ("language", 1): roles, ("projector", 0): {"proj"}}
    assert [pl.param for pl in found if pl.tower == "projector"] == ["language_projection.weight"]
    # q, k and v are the fused matrix's row blocks, and its bias's (zero for k)
    fused = original.vision_model.encoder.layers[1].self_attn.qkv
    split = block_linears(block_list(model, ADAPTER.tower("vision"))[1][1], ADAPTER.tower("vision"))
    width = TINY_VISION["hidden_size"]
    for i, role in enumerate(("q", "k", "v")):
        torch.testing.assert_close(split[role][1].weight, fused.weight[i * width:(i + 1) * width], rtol=0, atol=0)
        torch.testing.assert_close(split[role][1].bias, fused.bias[i * width:(i + 1) * width], rtol=0, atol=0)
    assert not split["k"][1].bias.any()
    decoder = block_linears(model.language_model.model.decoder.layers[0], ADAPTER.tower("language"))
    assert decoder["fc1"][1] is model.language_model.model.decoder.layers[0].fc1
    # the image features are the projected Q-Former outputs, one per query
    assert ADAPTER.image_tokens.count(model.config) == BLIP2_QUERIES
    assert ADAPTER.image_tokens.token_id(model.config) == LLAVA_IMAGE_TOKEN
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = ADAPTER.image_features(model, pixels)
        want = original.language_projection(original.qformer(
            query_embeds=original.query_tokens.expand(3, -1, -1),
            encoder_hidden_states=original.vision_model(pixel_values=pixels).last_hidden_state).last_hidden_state)
        hidden, pooled = ADAPTER.tower("vision").embed(model, {"pixel_values": pixels})
    assert features.shape == (3, BLIP2_QUERIES, TINY_OPT["hidden_size"])
    torch.testing.assert_close(features, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, want.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden, original.vision_model(pixel_values=pixels).last_hidden_state, rtol=0, atol=1e-6)


def test_generative_batches_put_the_image_tokens_first_and_label_only_the_answer(tmp_path, threads):
    processor = tiny_blip2_processor()
    path = write_llava_pairs(tmp_path, n=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r["image"] = str(tmp_path / r["image"])
    batch, = encode_generative(processor, records, batch_size=3, max_length=None, chat_template=False)
    tok = processor.tokenizer
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    prompt = tok("is the picture a number ?", add_special_tokens=False)["input_ids"]
    for row, r in enumerate(records):
        ids, mask, labels = batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row]
        answer = tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        real = int(mask.sum())
        assert ids[:real].tolist() == [LLAVA_IMAGE_TOKEN] * BLIP2_QUERIES + prompt + answer
        assert mask[:real].all() and not mask[real:].any()
        assert labels[:real].tolist() == [IGNORE_INDEX] * (real - len(answer)) + answer
        assert (labels[real:] == IGNORE_INDEX).all()
    # the pixels are the image processor's for each picture
    want = processor.image_processor([Image.open(r["image"]).convert("RGB") for r in records],
                                     return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], want, rtol=0, atol=0)


def test_a_prompt_holding_the_image_token_is_refused_since_the_processor_places_the_image():
    processor = tiny_blip2_processor()
    assert generative_prompt(processor, None, False) == ""
    # as written: BLIP-2's OPT decoders end a text with a newline (their eos_token_id), so none is added
    assert generative_prompt(processor, "Question: is it cold? Answer:", False) == "Question: is it cold? Answer:"
    with pytest.raises(LmmcError, match="writes the picture's tokens before the prompt itself; write the prompt "
                                        "without '<image>'"):
        generative_prompt(processor, "<image> cold", False)
    records = [{"image": "a.png", "text": "cold"}, {"image": "b.png", "prompt": "<image> is it", "text": "cold"}]
    with pytest.raises(LmmcError, match="the prompt of sample 2 holds the image token '<image>' 1 time.s.; the "
                                        "model's processor writes the picture's tokens before the prompt itself"):
        check_generative_records(records, Path("pairs.jsonl"), processor)


def _opt_like_processor() -> transformers.Blip2Processor:
    """Blip2Processor over a byte-level BPE that starts a text with </s> and keeps spaces, as OPT's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    words = ["Question: what is it? Answer: a house", "a house on the road", "the picture of a house"]
    bpe.train_from_iterator(words * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>",
                                                pad_token="<pad>")
    image = transformers.BlipImageProcessor(size={"height": TINY_VISION["image_size"], "width": TINY_VISION["image_size"]})
    return transformers.Blip2Processor(image_processor=image, tokenizer=fast, num_query_tokens=BLIP2_QUERIES)


def test_answers_continue_the_prompt_after_a_space_and_end_with_the_decoders_newline(tmp_path):
    """OPT's tokenizer ends a text with </s>, BLIP-2's decoders with a newline (their eos_token_id); an answer
    after "Answer:" starts with a space, as the processor tokenizes the prompt and the answer together."""
    processor = _opt_like_processor()
    tok = processor.tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    image_id = tok.convert_tokens_to_ids("<image>")
    config = transformers.Blip2Config(text_config={**TINY_OPT, "eos_token_id": newline}, image_token_index=image_id)
    end = answer_end(processor, ADAPTER, config)
    assert end == newline != tok.eos_token_id
    images(1)[0].save(tmp_path / "a.png")
    prompt = "Question: what is it? Answer:"
    records = [{"image": str(tmp_path / "a.png"), "prompt": prompt, "text": "a house"},
               {"image": str(tmp_path / "a.png"), "text": "a house"}]
    batch, = encode_generative(processor, records, 2, None, False, end=end)
    for row, text in zip(batch["input_ids"].tolist(), (f"{prompt} a house", "a house")):
        want = processor(images=images(1), text=text)["input_ids"][0] + [newline]
        assert row[:len(want)] == want and set(row[len(want):]) <= {tok.pad_token_id}
        assert want[:BLIP2_QUERIES + 1] == [image_id] * BLIP2_QUERIES + [tok.bos_token_id]
    labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labels == tok(" a house", add_special_tokens=False)["input_ids"] + [newline]


def test_decoder_blocks_read_the_image_features_over_the_image_tokens(threads):
    model = prepared()
    batches = random_generative_calibration(CalibrationConfig(samples=4, eval_samples=4, batch_size=4), model,
                                            ADAPTER).calib_batches("text")
    (args, kwargs), = capture_block_inputs(model, ADAPTER.tower("language"), batches, torch.device("cpu"))
    hidden = args[0] if args else kwargs["hidden_states"]
    batch = batches[0]
    image = batch["input_ids"] == LLAVA_IMAGE_TOKEN
    decoder = model.language_model.model.decoder
    with torch.no_grad():
        features = ADAPTER.image_features(model, batch["pixel_values"])
        # OPT adds its learned positions (cumulative over the mask, offset by 2) to every input embedding
        positions = decoder.embed_positions(batch["attention_mask"], 0)
        tokens = decoder.embed_tokens(batch["input_ids"]) + positions
    assert int(image.sum()) == len(batch["input_ids"]) * BLIP2_QUERIES
    torch.testing.assert_close(hidden[image], (features + positions[:, :BLIP2_QUERIES]).reshape(-1, 32), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(hidden[~image], tokens[~image], rtol=0, atol=1e-6)


# ---- prepare / standard_state ---------------------------------------------------------------------------

@pytest.mark.parametrize("qkv_bias", [True, False])
def test_prepared_model_computes_the_same_and_fuses_back_into_a_standard_checkpoint(qkv_bias, threads):
    torch.manual_seed(1)
    cfg = tiny_blip2().config
    cfg.vision_config.qkv_bias = qkv_bias
    original = transformers.Blip2ForConditionalGeneration(cfg).eval()
    model = ADAPTER.prepared(copy.deepcopy(original))
    assert type(model.vision_model.encoder.layers[0].self_attn).__name__ == "SplitQkvAttention"
    enc = encoded()
    want = logits(original, enc)
    assert (logits(model, enc) - want).abs().max() <= 1e-6
    state = ADAPTER.standard_state(model.state_dict())
    assert set(state) == set(original.state_dict())
    fresh = transformers.Blip2ForConditionalGeneration(copy.deepcopy(cfg)).eval()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(logits(fresh, enc), want)


def test_removing_heads_from_the_split_attention_equals_zeroing_their_output_columns(threads):
    """Blocks with different head counts run: the attention reads its heads from the q rows, not the config."""
    model = prepared()
    masked = copy.deepcopy(model)
    tower = ADAPTER.tower("vision")
    for block, other, keep in zip(block_list(model, tower)[1], block_list(masked, tower)[1], ([0, 2], [1, 2, 3])):
        keep_heads_(block, tower, HEAD_DIM, keep)
        gone = [h for h in range(4) if h not in keep]
        with torch.no_grad():
            for h in gone:
                other.self_attn.projection.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
    assert [b.self_attn.qkv.q.out_features // HEAD_DIM for b in block_list(model, tower)[1]] == [2, 3]
    enc = encoded()
    assert (logits(model, enc) - logits(masked, enc)).abs().max() <= 1e-5


# ---- local pruners -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["magnitude", "wanda"])
def test_pruners_mask_every_matrix_of_the_vision_tower_projector_and_decoder(name, threads):
    art = make_artifact()
    metrics = run(art, name, sparsity=0.5)
    found = prunable_linears(art.student, art.adapter)
    assert set(art.masks) == {pl.param for pl in found}
    assert set(metrics["sparsity_per_tower"]) == {"vision", "language", "projector"}
    dense = {pl.param: pl.module.weight for pl in prunable_linears(art.teacher, art.adapter)}
    for pl in found:
        w, mask = pl.module.weight, art.masks[pl.param]
        assert torch.equal(w != 0, mask), pl.param
        assert torch.equal((~mask).sum(1), torch.full((w.shape[0],), w.shape[1] // 2)), pl.param
        torch.testing.assert_close(w[mask], dense[pl.param][mask], rtol=0, atol=0)
        if name == "magnitude":  # the kept weights of a row are its largest
            kept = torch.where(mask, w.abs(), torch.inf).min(1).values
            dropped = torch.where(mask, -torch.inf, dense[pl.param].abs()).max(1).values
            assert (kept >= dropped).all(), pl.param
    assert metrics["sparsity"] == pytest.approx(0.5)


def test_wanda_calibrates_the_projector_on_the_pruned_vision_tower_and_q_former(threads):
    from lmmc.sparsity import row_mask

    art = make_artifact()
    dense = art.teacher.language_projection.weight.detach().clone()
    run(art, "wanda", sparsity=0.5)
    rows = []
    projection = art.student.language_projection
    handle = projection.register_forward_pre_hook(lambda _m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in art.calib.calib_batches("image"):
            ADAPTER.image_features(art.student, batch["pixel_values"])
    handle.remove()
    norms = torch.cat(rows).pow(2).sum(0).sqrt()
    assert torch.equal(art.masks["language_projection.weight"], row_mask(dense.abs() * norms, 0.5))


@pytest.mark.parametrize("schedule", ["all", "round_robin"])
def test_distillation_trains_vision_projector_and_decoder_and_keeps_the_q_former(schedule, threads):
    art = make_artifact()
    run(art, "magnitude", sparsity=0.5)
    before = {n: p.detach().clone() for n, p in art.student.named_parameters()}
    metrics = run(art, "distill", steps=6, batch_size=4, lr=1e-3, dev_samples=4, eval_every=0, progress=False,
                  schedule=schedule, keep_best=False)
    moved = {n for n, p in art.student.named_parameters() if not torch.equal(p, before[n])}
    fixed = {n for n in before if n.startswith(("qformer.", "query_tokens"))}
    assert fixed and not moved & fixed
    for prefix in ("vision_model.encoder.", "language_projection.", "language_model.model.decoder.layers."):
        assert any(n.startswith(prefix) for n in moved), prefix
    assert metrics["masked_weights_nonzero"] == 0


def test_structured_student_saves_and_reloads_with_the_same_outputs(tmp_path, threads):
    """AntGMM removes heads, FFN channels and blocks of both towers; the student reloads exactly."""
    art = make_artifact()
    run(art, "antgmm", keep=0.5, importance="activation", shares={"depth": 0.4, "ffn": 0.3, "heads": 0.3})
    before, after = read_structure(art.teacher, ADAPTER), read_structure(art.student, ADAPTER)
    for tower in ("vision", "language"):
        shrunk = [after[tower][k] != before[tower][k] for k in ("layers", "heads", "ffn")]
        assert any(shrunk), tower
    assert sum(sum(t["heads"]) * HEAD_DIM + sum(t["ffn"]) for t in after.values()) < \
        sum(sum(t["heads"]) * HEAD_DIM + sum(t["ffn"]) for t in before.values())
    save(art.student, tmp_path / "student", {})
    reloaded = load_student(tmp_path / "student")
    assert read_structure(reloaded, ADAPTER) == after
    enc = encoded()
    assert torch.equal(logits(reloaded, enc), logits(art.student.eval(), enc))


def test_depth_only_student_is_a_standard_checkpoint(tmp_path, threads):
    model = prepared()
    keep_blocks_(model, ADAPTER.tower("vision"), [1])
    save(model, tmp_path / "student", {})
    assert (tmp_path / "student" / "model.safetensors").is_file()
    plain = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "student").eval()
    assert plain.config.vision_config.num_hidden_layers == 1
    enc = encoded()
    assert torch.equal(logits(plain, enc), logits(model, enc))


@pytest.mark.parametrize("shrink", [False, True])
def test_an_output_layer_tied_to_the_token_embeddings_saves_once_and_reloads_tied(tmp_path, shrink, threads):
    """BLIP-2's OPT checkpoints tie lm_head to embed_tokens: a standard student (safetensors stores no
    aliases) and a shrunk one reload with the tie and the same outputs."""
    model = prepared(tie_word_embeddings=True)
    decoder = model.language_model.model.decoder
    assert model.language_model.lm_head.weight is decoder.embed_tokens.weight
    if shrink:
        keep_channels_(decoder.layers[0], ADAPTER.tower("language"), range(40))
    save(model, tmp_path / "student", {})
    name = "student.safetensors" if shrink else "model.safetensors"
    assert (tmp_path / "student" / name).is_file()
    reloaded = load_student(tmp_path / "student")
    assert reloaded.language_model.lm_head.weight is reloaded.language_model.model.decoder.embed_tokens.weight
    enc = encoded()
    assert torch.equal(logits(reloaded, enc), logits(model, enc))


# ---- generative export --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain(threads, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blip2")
    model, processor = prepared(), tiny_blip2_processor()
    processor.tokenizer.padding_side = "left"
    export_generative(model, tmp / "onnx")
    return model, processor, Generator(tmp / "onnx", threads=1, preprocessor=processor)


def test_export_gives_pytorchs_image_features_and_greedy_tokens(plain):
    model, processor, gen = plain
    enc = {k: v.numpy() for k, v in encoded(processor).items()}
    # the second row: image tokens, then its left padding, then its text
    assert enc["attention_mask"][1, :BLIP2_QUERIES].all() and not enc["attention_mask"][1, BLIP2_QUERIES]
    got = gen.vision.run({"pixel_values": enc["pixel_values"]})["image_features"]
    with torch.no_grad():
        want = ADAPTER.image_features(model, torch.as_tensor(enc["pixel_values"])).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
    assert_greedy_matches_pytorch(model, gen, enc, NEW_TOKENS)


def test_generate_text_from_an_image(plain):
    model, processor, gen = plain
    image = images(1)[0]
    text = gen.generate(image, "the picture of a house is", max_new_tokens=12)
    enc = processor(images=image, text=generative_prompt(processor, "the picture of a house is", False),
                    return_tensors="np")
    assert enc["input_ids"][0, :BLIP2_QUERIES].tolist() == [LLAVA_IMAGE_TOKEN] * BLIP2_QUERIES
    want = greedy_reference(model, enc, 12)[0]
    assert text and text == processor.tokenizer.decode(want, skip_special_tokens=True)
    with pytest.raises(LmmcError, match="write the prompt without '<image>'"):
        gen.generate(image, "<image> cold")


# ---- compile end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled(threads, tmp_path_factory):
    """A saved tiny BLIP-2 compiled on processor-expanded image-prompt-answer records with AntGMM (depth, FFN
    and head stages on both towers), the generative export and validation with its ONNX Runtime gates."""
    tmp = tmp_path_factory.mktemp("blip2-compile")
    teacher = save_tiny_blip2(tmp / "teacher")
    recipe = {"calibration": {"samples": 8, "eval_samples": 4, "batch_size": 4},
              "passes": [{"antgmm": {"keep": 0.5, "importance": "activation",
                                     "shares": {"depth": 0.4, "ffn": 0.3, "heads": 0.3}}}],
              "export": [{"onnx_generative": {}}],
              "validate": {"min_held_out": 4, "generation_tokens": 8, "max_runtime_diff": 1e-4, "max_kl": 100.0,
                           "min_top1_agreement": 0.0, "min_generation_agreement": 0.0}}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp / "out"
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(tmp / "recipe.yaml"), "--calib",
                                       str(write_llava_pairs(tmp, n=16)), "-o", str(out)])
    return teacher, out, result


def test_compiled_structured_student_exports_and_generates_like_pytorch(compiled):
    teacher_dir, out, result = compiled
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    runtime = report["validation"]["generation"]["runtime"]
    assert report["passed"] is True
    assert runtime["greedy_identical"] == 1.0 and runtime["first_logits_max_abs_diff"] <= 1e-4
    student = lmmc.load_student(out / "student")
    teacher = ADAPTER.prepared(transformers.Blip2ForConditionalGeneration.from_pretrained(teacher_dir))
    before, after = read_structure(teacher, ADAPTER), read_structure(student, ADAPTER)
    for tower in ("vision", "language"):  # each tower lost blocks, heads or FFN channels
        assert any(after[tower][k] != before[tower][k] for k in ("layers", "heads", "ffn")), tower
    assert (out / "student" / "student.safetensors").is_file()  # per-layer widths: the shrunk format
    assert json.loads((out / "onnx" / "generative.json").read_text())["image_tokens_per_image"] == BLIP2_QUERIES

    gen = open_generative(out, threads=1)
    enc = {k: v.numpy() for k, v in encoded(gen.preprocessor).items()}
    got = gen.vision.run({"pixel_values": enc["pixel_values"]})["image_features"]
    with torch.no_grad():
        want = ADAPTER.image_features(student, torch.as_tensor(enc["pixel_values"])).numpy()
    assert np.abs(got - want).max() < 1e-4
    np.testing.assert_array_equal(gen.generate_ids(enc["pixel_values"], enc["input_ids"], enc["attention_mask"],
                                                   NEW_TOKENS).tokens, greedy_reference(student, enc, NEW_TOKENS))


def test_bench_times_the_structured_student_against_the_teacher_exported_alike(compiled, tmp_path):
    _, out, _ = compiled
    target = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(out), "--repeats", "3", "--threads", "1", "--no-memory",
                                       "--json", str(target)])
    assert result.exit_code == 0, result.output
    bench, report = json.loads(target.read_text()), json.loads((out / "report.json").read_text())
    rows = {(r["model"], r["backend"]): r for r in bench["rows"]}
    assert rows["teacher", "onnxruntime"]["agreement"]["held-out"] == 1.0  # the teacher's export generates its tokens
    for backend in ("pytorch", "onnxruntime"):
        assert (rows["student", backend]["agreement"]["held-out"]
                == report["validation"]["generation"]["generation"]["agreement"])
    # AntGMM removed blocks, heads and channels: the student's export holds fewer weights than the teacher's
    assert rows["student", "onnxruntime"]["parameters"] < rows["teacher", "onnxruntime"]["parameters"]
    assert rows["student", "onnxruntime"]["size_bytes"] < rows["teacher", "onnxruntime"]["size_bytes"]


# ---- refusals --------------------------------------------------------------------------------------------

def _save_with_text(path: Path, text: dict) -> Path:
    torch.manual_seed(0)
    cfg = tiny_blip2().config.to_dict()
    cfg["text_config"] = text
    config = transformers.Blip2Config(**{k: v for k, v in cfg.items() if k in (
        "vision_config", "qformer_config", "text_config", "num_query_tokens", "image_token_index")})
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(path)
    tiny_blip2_processor().save_pretrained(path)
    return path


@pytest.mark.parametrize("text, message", [
    (dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=64),
     "language model is t5, an encoder-decoder (the Flan-T5 variants); lmmc compiles BLIP-2 with a decoder-only OPT"),
    ({**TINY_OPT, "word_embed_proj_dim": 16},
     "embeds tokens in 16 channels and computes in 32 (word_embed_proj_dim != hidden_size)"),
])
def test_unsupported_blip2_exits_2_with_one_clear_error(tmp_path, text, message, threads):
    model = _save_with_text(tmp_path / "teacher", text)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"samples": 4, "eval_samples": 4, "batch_size": 4},
                                      "passes": [{"wanda": {"sparsity": 0.5}}]}))
    result = CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "--calib",
                                       str(write_llava_pairs(tmp_path, n=8)), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
