"""Generative vision-language models (tiny LLaVA with CLIP or SigLIP vision, tiny Idefics3): adapter layout, calibration batches through the
processor, decoder calibration on merged image features, local pruners and ECoFLaP on every tower and
the projector, and the compile end to end with its bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from PIL import Image

from lmmc.adapters import block_linears, block_list, get_adapter, kv_heads, prunable_linears
from lmmc.artifact import Artifact
from lmmc.blockwise import capture_block_inputs
from lmmc.cli import main
from lmmc.data import IGNORE_INDEX, encode_generative, random_generative_calibration
from lmmc.modelio import make_student
from lmmc.objectives import NextTokenObjective, objective_batches
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import CalibrationConfig
from lmmc.sparsity import row_mask
from tests.conftest import (CORPUS, LLAVA_IMAGE_TOKEN, TINY_DECODER, TINY_VISION, save_tiny_idefics3, save_tiny_llava, tiny_idefics3, tiny_llava,
                            tiny_llava_processor)

ADAPTER = get_adapter("llava")
IMAGE_TOKENS = 16  # (32 / 8)² patches, the CLIP class token dropped
# "clip" and "siglip": LLaVA with that vision tower; "idefics3": 4 image tokens per image after pixel shuffle.
KINDS = ("clip", "siglip", "idefics3")


def build(kind: str) -> torch.nn.Module:
    """A tiny model of `kind`; "qwen2": LLaVA with a CLIP tower and a Qwen2 decoder (q/k/v with biases)."""
    if kind == "qwen2":
        torch.manual_seed(0)
        cfg = transformers.LlavaConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION},
                                       text_config={**TINY_DECODER, "model_type": "qwen2"},
                                       image_token_index=LLAVA_IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS)
        return transformers.LlavaForConditionalGeneration(cfg).eval()
    return tiny_idefics3() if kind == "idefics3" else tiny_llava(kind)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def make_artifact(kind: str = "clip", samples: int = 8) -> Artifact:
    teacher = build(kind)
    adapter = get_adapter(teacher.config.model_type)
    art = Artifact(model_ref=f"tiny-{kind}", adapter=adapter, teacher=teacher, student=make_student(teacher))
    art.calib = random_generative_calibration(CalibrationConfig(samples=samples, eval_samples=4, batch_size=4), teacher,
                                               adapter)
    return art


def run(art: Artifact, name: str, **config):
    return run_pass(get_pass(name)(get_pass(name).Config(**config)), art).metrics


def write_pairs(folder: Path, n: int = 24, images: bool = True) -> Path:
    """Random 40x40 pictures with short captions of known words; every other record has a prompt."""
    rng = np.random.default_rng(0)
    captions = ["the water is cold", "a man was on the road", "the house of a man", "picture of a number"]
    (folder / "img").mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(n):
            rec = {"text": f"{captions[i % 4]} {i % 10}"}
            if images:
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
                rec["image"] = f"img/{i}.png"
            if i % 2:
                rec["prompt"] = "is the picture a number ?"
            f.write(json.dumps(rec) + "\n")
    return path


# ---- adapter ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_adapter_names_every_linear_gqa_heads_and_the_projector(vision):
    model = tiny_llava(vision)
    vision_tower, language = ADAPTER.tower("vision"), ADAPTER.tower("language")
    assert kv_heads(model, language) == 2 and kv_heads(model, vision_tower) == 4
    layer = block_list(model, language)[1][0]
    linears = block_linears(layer, language)
    assert linears["gate"][1] is layer.mlp.gate_proj and linears["fc1"][1] is layer.mlp.up_proj
    assert linears["fc2"][1] is layer.mlp.down_proj
    assert "gate" not in block_linears(block_list(model, vision_tower)[1][0], vision_tower)
    found = prunable_linears(model, ADAPTER)
    per_tower = {t: sum(pl.tower == t for pl in found) for t in ("vision", "language", "projector")}
    assert per_tower == {"vision": 2 * 6, "language": 2 * 7, "projector": 2}
    projector = {pl.role: pl for pl in found if pl.tower == "projector"}
    assert projector["fc1"].module is model.model.multi_modal_projector.linear_1
    assert projector["fc2"].param == "model.multi_modal_projector.linear_2.weight"
    # the image features are the projector's output, one row per image token
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = ADAPTER.image_features(model, pixels)
    assert feats.shape == (2, IMAGE_TOKENS, 32)


@pytest.mark.parametrize("vision, strategy, seq", [("clip", "default", 576), ("clip", "full", 16),
                                                   ("siglip", "full", 5), ("siglip", "default", 16)])
def test_image_tokens_are_the_features_the_model_makes_whatever_image_seq_length_says(vision, strategy, seq):
    """transformers never reads image_seq_length: a stale one (576 from a 336-px checkpoint) must neither
    refuse the right processor nor pass a wrong one."""
    model = tiny_llava(vision)
    model.config.vision_feature_select_strategy, model.config.image_seq_length = strategy, seq
    pixels = torch.zeros(1, 3, TINY_VISION["image_size"], TINY_VISION["image_size"])
    with torch.no_grad():
        made = model.model.get_image_features(pixel_values=pixels).pooler_output[0].shape[0]
    assert get_adapter("llava").image_tokens.count(model.config) == made


def test_idefics3_adapter_names_the_connector_and_the_gated_decoder():
    model = tiny_idefics3()
    adapter = get_adapter("idefics3")
    language = adapter.tower("language")
    assert kv_heads(model, language) == 2
    found = prunable_linears(model, adapter)
    per_tower = {t: sum(pl.tower == t for pl in found) for t in ("vision", "language", "projector")}
    assert per_tower == {"vision": 2 * 6, "language": 2 * 7, "projector": 1}
    assert next(pl for pl in found if pl.tower == "projector").module is model.model.connector.modality_projection.proj
    assert adapter.image_tokens.count(model.config) == 4
    with torch.no_grad():
        assert adapter.image_features(model, torch.randn(2, 1, 3, 32, 32)).shape == (2, 4, 32)


# ---- calibration batches ---------------------------------------------------------------------------

@pytest.mark.parametrize("chat_template", [False, True])
def test_generative_batches_expand_image_tokens_and_label_only_the_answer(tmp_path, chat_template):
    processor = tiny_llava_processor("clip")
    path = write_pairs(tmp_path, n=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r["image"] = str(tmp_path / r["image"])
    batch, = encode_generative(processor, records, batch_size=3, max_length=None, chat_template=chat_template)
    tok = processor.tokenizer
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    for row, r in enumerate(records):
        ids, mask, labels = batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row]
        assert int((ids == LLAVA_IMAGE_TOKEN).sum()) == IMAGE_TOKENS
        answer = tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        real = int(mask.sum())
        assert mask[:real].all() and not mask[real:].any()  # right padding
        assert labels[labels != IGNORE_INDEX].tolist() == answer
        assert ids[real - len(answer):real].tolist() == answer  # the answer closes the real tokens
        assert (labels[:real - len(answer)] == IGNORE_INDEX).all()  # prompt and image tokens are not targets
        assert (labels[real:] == IGNORE_INDEX).all()
        prompt = tok.decode(ids[:real - len(answer)][ids[:real - len(answer)] != LLAVA_IMAGE_TOKEN])
        assert (":" in prompt) == chat_template  # the tiny template's generation prompt
        assert ("is the picture a number ?" in prompt) == ("prompt" in r)


def test_max_length_cuts_the_answer_and_refuses_a_prompt_that_leaves_no_room(tmp_path):
    from lmmc.errors import LmmcError

    processor = tiny_llava_processor("clip")
    path = write_pairs(tmp_path, n=2)
    records = [{**json.loads(line), "image": str(tmp_path / json.loads(line)["image"])}
               for line in path.read_text().splitlines()]
    # record 1 has a 6-token prompt: 8 text tokens leave 2 for its answer
    batch, = encode_generative(processor, records[1:], batch_size=1, max_length=8, chat_template=False)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 2
    with pytest.raises(LmmcError, match="leaving none of calibration.max_length = 6"):
        encode_generative(processor, records[1:], batch_size=1, max_length=6, chat_template=False)
    # the decoder's positions bound the whole sequence, the image's tokens included
    prompt = int((batch["labels"] == IGNORE_INDEX).sum())
    batch, = encode_generative(processor, records[1:], batch_size=1, max_length=None, chat_template=False,
                               positions=prompt + 1)
    assert batch["input_ids"].shape[1] == prompt + 1 and int((batch["labels"] != IGNORE_INDEX).sum()) == 1
    with pytest.raises(LmmcError, match=f"takes {prompt} positions with its image's tokens, leaving none of the "
                                        f"decoder's {prompt}"):
        encode_generative(processor, records[1:], batch_size=1, max_length=None, chat_template=False, positions=prompt)


# ---- block-sequential calibration of the decoder ---------------------------------------------------

@pytest.mark.parametrize("kind", [*KINDS, "qwen2"])
def test_captured_decoder_inputs_carry_the_projected_image_features(kind):
    art = make_artifact(kind)
    model, adapter = art.teacher, art.adapter
    batches = art.calib.calib_batches("text")
    captured = capture_block_inputs(model, adapter.tower("language"), batches, torch.device("cpu"))
    assert len(captured) == len(batches)
    embed = model.get_input_embeddings()
    for (args, kwargs), batch in zip(captured, batches):
        hidden = args[0] if args else kwargs["hidden_states"]
        image = batch["input_ids"] == LLAVA_IMAGE_TOKEN
        with torch.no_grad():
            features = adapter.image_features(model, batch["pixel_values"])
            tokens = embed(batch["input_ids"])
        assert int(image.sum()) == len(batch["input_ids"]) * adapter.image_tokens.count(model.config)
        torch.testing.assert_close(hidden[image], features.reshape(-1, features.shape[-1]), rtol=0, atol=0)
        torch.testing.assert_close(hidden[~image], tokens[~image], rtol=0, atol=0)
        assert kwargs.get("past_key_values") is None and kwargs.get("cache") is None  # nothing accumulates


# ---- local pruners ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clip", "idefics3"])
@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"nm": "2:4"}])
def test_pruners_hit_the_asked_sparsity_in_every_matrix_of_every_tower(kind, name, pattern):
    art = make_artifact(kind)
    metrics = run(art, name, **pattern)
    found = prunable_linears(art.student, art.adapter)
    assert set(art.masks) == {pl.param for pl in found}
    assert set(metrics["sparsity_per_tower"]) == {"vision", "language", "projector"}
    assert metrics["dense_nm"] == []
    for pl in found:
        w = pl.module.weight
        mask = art.masks[pl.param]
        assert torch.equal(w != 0, mask), pl.param  # the mask is what was zeroed
        if "nm" in pattern:
            zeros = (~mask).reshape(w.shape[0], -1, 4).sum(-1)
            assert torch.equal(zeros, torch.full_like(zeros, 2)), pl.param
        elif name == "sparsegpt":  # its column blocks choose across rows: exactly half of the matrix
            assert int((~mask).sum()) == w.numel() // 2, pl.param
        else:
            assert torch.equal((~mask).sum(1), torch.full((w.shape[0],), w.shape[1] // 2)), pl.param
    assert metrics["sparsity"] == pytest.approx(0.5)


def test_wanda_calibrates_the_projector_on_the_pruned_vision_tower():
    art = make_artifact("clip")
    dense = {pl.param: pl.module.weight.detach().clone() for pl in prunable_linears(art.teacher, art.adapter)}
    run(art, "wanda", sparsity=0.5)
    student = art.student
    linear_1 = student.model.multi_modal_projector.linear_1
    rows = []
    handle = linear_1.register_forward_pre_hook(lambda _m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in art.calib.calib_batches("image"):
            ADAPTER.image_features(student, batch["pixel_values"])
    handle.remove()
    norms = torch.cat(rows).pow(2).sum(0).sqrt()
    param = "model.multi_modal_projector.linear_1.weight"
    expected = row_mask(dense[param].abs() * norms, 0.5)
    assert torch.equal(art.masks[param], expected)
    # and not the statistics of the dense vision tower: those pick another mask
    rows.clear()
    handle = art.teacher.model.multi_modal_projector.linear_1.register_forward_pre_hook(
        lambda _m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in art.calib.calib_batches("image"):
            ADAPTER.image_features(art.teacher, batch["pixel_values"])
    handle.remove()
    assert not torch.equal(row_mask(dense[param].abs() * torch.cat(rows).pow(2).sum(0).sqrt(), 0.5), expected)


# ---- ECoFLaP -----------------------------------------------------------------------------------------

def test_next_token_objective_is_the_models_own_language_modelling_loss():
    art = make_artifact("clip")
    objective = NextTokenObjective(art.student, ADAPTER)
    steps = objective_batches(art.calib, ADAPTER, samples=7, batch_size=3)
    assert [len(step["text"]["input_ids"]) for step in steps] == [3, 3, 1]  # one sample is a whole loss
    for step in steps:
        batch = step["text"]
        with torch.no_grad():
            expected = art.student(**batch, use_cache=False).loss
            got = objective(step, torch.device("cpu"))
        assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("kind", ["siglip", "idefics3"])
def test_ecoflap_replaying_the_blocks_before_a_matrix_scores_as_whole_forwards(kind, monkeypatch):
    """The blocks before a perturbed matrix replay their outputs, the decoder's too: the same scores."""
    from contextlib import nullcontext

    from lmmc.objectives import make_objective
    from lmmc.passes import ecoflap

    art = make_artifact(kind)
    objective = make_objective(art.student.eval(), art.adapter)
    steps = objective_batches(art.calib, art.adapter, 8, 4)
    linears = prunable_linears(art.student, art.adapter)
    replayed = ecoflap.zeroth_order_scores(objective, linears, steps, 1e-3, 0, torch.device("cpu"))
    monkeypatch.setattr(ecoflap, "_replayed", lambda *args: nullcontext())
    assert replayed == ecoflap.zeroth_order_scores(objective, linears, steps, 1e-3, 0, torch.device("cpu"))


@pytest.mark.parametrize("kind, granularity", [("siglip", "tower"), ("siglip", "layer"), ("idefics3", "tower")])
def test_ecoflap_spreads_one_budget_over_vision_projector_and_language(kind, granularity):
    art = make_artifact(kind)
    alloc = run(art, "ecoflap", sparsity=0.5, granularity=granularity, samples=8, batch_size=4)
    assert set(alloc["per_tower"]) == {"vision", "projector", "language"}
    assert alloc["planned_sparsity"] == pytest.approx(0.5, abs=1e-4)
    picked = {t: alloc["per_tower"][t]["sparsity"] for t in alloc["per_tower"]}
    assert len({round(v, 3) for v in picked.values()}) == 3  # the scores moved the budget between towers
    assert all(v <= 0.6 + 1e-9 for v in picked.values())  # p_max = sparsity + 0.1
    pruned = run(art, "wanda")
    assert pruned["targets"] == "allocation"
    assert pruned["sparsity"] == pytest.approx(0.5, abs=0.005)
    for tower, planned in picked.items():
        assert pruned["sparsity_per_tower"][tower] == pytest.approx(planned, abs=0.005)
    for pl in prunable_linears(art.student, art.adapter):
        zeros = int((pl.module.weight == 0).sum())
        assert abs(zeros - art.allocation[pl.param] * pl.module.weight.numel()) <= 1


# ---- compile ---------------------------------------------------------------------------------------

def _compile(tmp_path: Path, model: Path, calib: Path, calibration: dict, passes=None, args=(), **recipe_extra):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"samples": 12, "eval_samples": 4, "batch_size": 4,
                                                      **calibration},
                                      "passes": passes or [{"wanda": {"sparsity": 0.5}}], **recipe_extra}))
    return CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "--calib", str(calib),
                                     "-o", str(tmp_path / "out"), *args])


@pytest.mark.parametrize("kind", ["clip", "idefics3"])
def test_compile_prunes_a_saved_model_and_saves_the_student(tmp_path, kind):
    teacher = tmp_path / "teacher"
    model = save_tiny_idefics3(teacher) if kind == "idefics3" else save_tiny_llava(teacher, kind)
    adapter = get_adapter("idefics3" if kind == "idefics3" else "llava")
    result = _compile(tmp_path, model, write_pairs(tmp_path), {"chat_template": True}, validate=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["calibration"] == 12 and report["calibration"]["held_out"] == 4
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5)
    assert set(report["sparsity"]["sparsity_per_tower"]) == {"vision", "language", "projector"}
    assert "50.0% (vision 50.0%, language 50.0%, projector 50.0%)" in result.output
    assert report["validated"] is False and report["onnx"] == {}
    student_dir = out / "student"
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "chat_template.jinja"} <= {p.name for p in student_dir.iterdir()}
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(student_dir)
    for pl in prunable_linears(reloaded, adapter):
        w = pl.module.weight
        assert int((w == 0).sum()) == w.numel() // 2, pl.param
    processor = transformers.AutoProcessor.from_pretrained(student_dir)
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == LLAVA_IMAGE_TOKEN


@pytest.mark.parametrize("case, message", [
    ("no images", "sample 1 has no image; this generative image-text model reads image-text records"),
    ("no chat template", "the recipe sets calibration.chat_template: true, but the processor of"),
])
def test_bad_generative_input_exits_2_with_one_clear_error(tmp_path, case, message):
    model = save_tiny_llava(tmp_path / "teacher", "clip", chat_template=case != "no chat template")
    calib = write_pairs(tmp_path, images=case != "no images")
    result = _compile(tmp_path, model, calib, {"chat_template": True}, validate=False)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


TEXT_ONLY_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} "
                      "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}: {% endif %}")


def test_a_distill_chat_template_without_a_corpus_is_refused_not_ignored(tmp_path):
    model = save_tiny_llava(tmp_path / "teacher", "clip")
    result = _compile(tmp_path, model, write_pairs(tmp_path), {}, validate=False, args=["--dry-run"],
                      passes=[{"distill": {"steps": 2, "batch_size": 2, "chat_template": True}}])
    assert result.exit_code == 2, result.output
    assert "distill: chat_template applies to corpus prompts, and this distill has no corpus" in result.output


@pytest.mark.parametrize("case", ["template without the image", "distill's template without one"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_chat_template_that_cannot_place_the_image_exits_2(tmp_path, case, dry_run):
    """Both reached the processor and came back as an internal error (exit 3), in the dry run too."""
    model = save_tiny_llava(tmp_path / "teacher", "clip", chat_template=case == "template without the image")
    pairs = write_pairs(tmp_path)
    if case == "template without the image":
        (model / "chat_template.jinja").write_text(TEXT_ONLY_TEMPLATE)
        result = _compile(tmp_path, model, pairs, {"chat_template": True}, validate=False,
                          args=["--dry-run"] if dry_run else [])
        message = "the processor's chat template writes the image token '<image>' 0 time(s) for one image, not once"
    else:
        result = _compile(tmp_path, model, pairs, {}, validate=False, args=["--dry-run"] if dry_run else [],
                          passes=[{"distill": {"steps": 2, "chat_template": True, "corpus": str(pairs)}}])
        message = "chat_template is asked for, but the model's processor has no chat template"
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_the_image_token_may_stand_once_in_a_prompt_and_nowhere_else(tmp_path):
    processor = tiny_llava_processor("clip")
    path = write_pairs(tmp_path, n=2)
    records = [{**json.loads(line), "image": str(tmp_path / json.loads(line)["image"])}
               for line in path.read_text().splitlines()]
    placed = [{**records[1], "prompt": f"{processor.image_token}\n{records[1]['prompt']}"}]
    ours, theirs = (encode_generative(processor, r, batch_size=1, max_length=None, chat_template=False)[0]
                    for r in (records[1:], placed))
    assert torch.equal(ours["input_ids"], theirs["input_ids"])  # where lmmc puts it when the prompt has none
    model = save_tiny_llava(tmp_path / "teacher", "clip")
    lines = path.read_text().splitlines()
    for field, value, message in [
            ("text", "the <image> water", "the text of sample 1 holds the image token '<image>'"),
            ("prompt", "<image> and <image> ?", "the prompt of sample 1 holds the image token '<image>' 2 time(s)")]:
        rec = {**json.loads(lines[0]), field: value}
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
        for dry in ([], ["--dry-run"]):
            result = _compile(tmp_path, model, bad, {}, args=dry, validate=False)
            assert result.exit_code == 2, result.output
            assert message in result.output
            assert not (tmp_path / "out").exists()


def test_max_length_and_the_image_tokens_together_must_fit_the_positions(tmp_path):
    model = save_tiny_llava(tmp_path / "teacher", "clip")  # 128 positions; an image becomes 16 tokens
    result = _compile(tmp_path, model, write_pairs(tmp_path), {"max_length": 120}, args=["--dry-run"], validate=False)
    assert result.exit_code == 2, result.output
    assert ("calibration.max_length = 120 text tokens, with the 16 an image becomes, take 136 positions, but this "
            "model's text tower takes at most 128 tokens") in result.output
    assert "set calibration.max_length to 112 or less" in result.output
    assert _compile(tmp_path, model, write_pairs(tmp_path), {"max_length": 112}, args=["--dry-run"],
                    validate=False).exit_code == 0


@pytest.mark.parametrize("passes", [[{"distill": {"steps": 2, "corpus": str(CORPUS)}}],
                                    [{"antgmm": {"keep": 0.5, "distill": {"corpus": str(CORPUS)},
                                                 "distill_steps_per_segment": 2}}]])
def test_a_plain_text_distillation_corpus_for_a_generative_model_is_refused_at_plan_time(tmp_path, passes):
    model = save_tiny_llava(tmp_path / "teacher", "clip")
    result = _compile(tmp_path, model, write_pairs(tmp_path), {}, passes=passes, validate=False)
    assert result.exit_code == 2, result.output
    assert "is not a .jsonl, but this generative image-text model (llava) distils on image-text records" \
        in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_compile_skips_only_the_exports_and_checks_that_do_not_handle_generative_models():
    from lmmc.compile import skipped

    onnx_pass = get_pass("onnx")
    step = onnx_pass(onnx_pass.Config())
    generative_step = type("GenerativeOnnx", (onnx_pass,), {"generative": True})(onnx_pass.Config())
    wanda = get_pass("wanda")(get_pass("wanda").Config())
    assert skipped(ADAPTER, step) is not getattr(onnx_pass, "generative", False)
    assert not skipped(ADAPTER, generative_step) and not skipped(ADAPTER, wanda)
    assert not skipped(get_adapter("clip"), step)


def test_chat_template_on_an_encoder_exits_2(tmp_path):
    from tests.conftest import save_tiny

    model = save_tiny("bert", tmp_path / "bert")
    calib = tmp_path / "texts.txt"
    calib.write_text("\n".join(f"the water is cold {i}" for i in range(16)))
    result = _compile(tmp_path, model, calib, {"chat_template": True}, validate=False)
    assert result.exit_code == 2, result.output
    assert "calibration.chat_template: true applies to generative models" in result.output
    assert not (tmp_path / "out").exists()
