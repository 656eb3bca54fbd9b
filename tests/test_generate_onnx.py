"""Generative export: vision + projector and a KV-cache decoder in ONNX Runtime reproduce PyTorch's greedy
generate token for token, with CLIP and SigLIP towers, Llama and Qwen2 decoders, left padding and pruned
decoder layers."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from PIL import Image

import lmmc
from conftest import assert_greedy_matches_pytorch, greedy_reference, save_tiny, tiny_model, tiny_vocab
from lmmc.cli import main
from lmmc.adapters import block_list, get_adapter
from lmmc.errors import LmmcError
from lmmc.runtime import open_generative
from lmmc.export.generative import DECODER, export_generative
from lmmc.runtime.generate import Generator, generative_prompt
from lmmc.student import load_student, save
from lmmc.surgery import keep_blocks_, keep_channels_, keep_heads_

SIDE, PATCH = 32, 8
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=SIDE,
              patch_size=PATCH)
# Ids follow tiny_vocab: [PAD]=0, [CLS]=2, [SEP]=3; the image token is added after its 99 entries.
DECODER_CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, vocab_size=100, max_position_embeddings=256, pad_token_id=0,
                   bos_token_id=2, eos_token_id=3, initializer_range=0.3)
NEW_TOKENS = 32


def tiny_llava(vision: str, tmp: Path, decoder: str = "llama",
               layers: int = 2) -> tuple[torch.nn.Module, transformers.LlavaProcessor]:
    """A seeded tiny LLaVA whose greedy output varies (a wide initialisation keeps it from repeating one
    token) and the processor that expands its image token: CLIP drops its CLS feature, SigLIP has none.
    The decoder is Llama or Qwen2 (q/k/v with biases)."""
    tokenizer = transformers.BertTokenizer(vocab=str(tiny_vocab(tmp / "vocab.txt")), padding_side="left",
                                          model_input_names=["input_ids", "attention_mask"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if vision == "clip":
        vision_cfg = transformers.CLIPVisionConfig(**VISION)
        images = transformers.CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
        select, extra, layer = "default", 1, -2
    else:
        vision_cfg = transformers.SiglipVisionConfig(**VISION)
        images = transformers.SiglipImageProcessor(size={"height": SIDE, "width": SIDE})
        select, extra, layer = "full", 0, -1
    text_cfg = (transformers.LlamaConfig if decoder == "llama" else transformers.Qwen2Config)(**{**DECODER_CFG, "num_hidden_layers": layers})
    cfg = transformers.LlavaConfig(vision_config=vision_cfg, text_config=text_cfg,
                                   image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                   vision_feature_select_strategy=select, vision_feature_layer=layer,
                                   image_seq_length=(SIDE // PATCH) ** 2)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    processor = transformers.LlavaProcessor(images, tokenizer, patch_size=PATCH, vision_feature_select_strategy=select,
                                            num_additional_image_tokens=extra)
    return model, processor


def prune(model: torch.nn.Module) -> torch.nn.Module:
    """Layer 0 keeps one of its two GQA groups (q heads 2-3 with k/v head 1); layer 1 keeps 48 of 96 SwiGLU
    channels (gate and up rows, down columns) — weights sliced by hand, configs untouched."""
    layers = model.model.language_model.layers
    attn = layers[0].self_attn
    d = attn.head_dim
    q_keep, kv_keep = torch.arange(2 * d, 4 * d), torch.arange(d, 2 * d)

    def cut(lin: torch.nn.Linear, rows=None, cols=None) -> torch.nn.Linear:
        w, b = lin.weight.data, lin.bias
        w, b = (w[rows], b[rows] if b is not None else None) if rows is not None else (w, b)
        w = w[:, cols] if cols is not None else w
        new = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        new.weight.data = w.clone()
        if b is not None:
            new.bias.data = b.data.clone()
        return new

    attn.q_proj, attn.k_proj, attn.v_proj = cut(attn.q_proj, q_keep), cut(attn.k_proj, kv_keep), cut(attn.v_proj, kv_keep)
    attn.o_proj = cut(attn.o_proj, cols=q_keep)
    mlp = layers[1].mlp
    keep = torch.arange(0, 96, 2)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = cut(mlp.gate_proj, keep), cut(mlp.up_proj, keep), cut(mlp.down_proj, cols=keep)
    return model


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["<image>\nthe picture of a house on the road is", "<image>\ncold water"]


@pytest.fixture(scope="module", params=["clip", "siglip", "pruned-qwen2"])
def exported(request, tmp_path_factory):
    """(model, processor, Generator) for a tiny LLaVA exported once per module; the pruned one has a
    CLIP tower and a Qwen2 decoder."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp(request.param)
    pruned = request.param == "pruned-qwen2"
    model, processor = tiny_llava("clip" if pruned else request.param, tmp, "qwen2" if pruned else "llama")
    if pruned:
        model = prune(model)
    export_generative(model, tmp / "onnx")
    yield model, processor, Generator(tmp / "onnx", threads=1, preprocessor=processor)
    torch.set_num_threads(before)


def reference(model, enc, **kwargs) -> np.ndarray:
    return greedy_reference(model, enc, NEW_TOKENS, **kwargs)


def test_greedy_matches_pytorch_token_for_token(exported):
    model, processor, gen = exported
    enc = processor(images=images(2), text=PROMPTS, padding=True, return_tensors="np")
    assert (enc["attention_mask"][1] == 0).sum() > 0  # the second prompt is left-padded
    assert_greedy_matches_pytorch(model, gen, enc, NEW_TOKENS)


def test_no_end_id_in_the_generation_config_means_no_end(tmp_path):
    """transformers' generate reads end ids from the generation config only; the decoder config's own
    eos_token_id, a token this model does generate, must not stop the exported model where it goes on."""
    torch.manual_seed(0)
    model, processor = tiny_llava("clip", tmp_path)
    enc = processor(images=images(2), text=PROMPTS, padding=True, return_tensors="np")
    model.generation_config.eos_token_id = None
    free = reference(model, enc)
    model.config.text_config.eos_token_id = int(free[0, 5])
    export_generative(model, tmp_path / "onnx")
    gen = Generator(tmp_path / "onnx", threads=1, preprocessor=processor)
    assert gen.spec["eos_token_id"] == []
    got = gen.generate_ids(enc["pixel_values"], enc["input_ids"], enc["attention_mask"], NEW_TOKENS)
    np.testing.assert_array_equal(got.tokens, free)


def test_end_token_stops_rows_like_pytorch(exported):
    model, processor, gen = exported
    enc = processor(images=images(2), text=PROMPTS, padding=True, return_tensors="np")
    free = reference(model, enc)
    eos = int(free[0, 5])  # row 0 ends at step 6 at the latest; row 1 goes on, then pads
    want = reference(model, enc, eos_token_id=eos, pad_token_id=0)
    got = gen.generate_ids(enc["pixel_values"], enc["input_ids"], enc["attention_mask"], NEW_TOKENS, eos_token_id=eos)
    np.testing.assert_array_equal(got.tokens, want)
    stop = list(want[0]).index(eos)
    assert (got.tokens[0, stop + 1:] == 0).all()


def test_generate_text_from_an_image(exported):
    model, processor, gen = exported
    image = images(1)[0]
    text = gen.generate(image, "the picture of a house on the road is", max_new_tokens=12)
    # the prompt as calibration and validation write it
    enc = processor(images=image, text=generative_prompt(processor, "the picture of a house on the road is", False),
                    return_tensors="np")
    want = reference(model, enc)[0, :12]
    assert text == processor.tokenizer.decode(want, skip_special_tokens=True)
    assert text


def test_a_reloaded_structured_student_generates_like_pytorch(tmp_path, one_thread):
    """lmmc's own surgery: a GQA group fewer in one block, a narrower SwiGLU in another, the middle block
    removed (the last one renumbered for the cache); the student format reloads it, and ONNX follows."""
    model, processor = tiny_llava("siglip", tmp_path, layers=3)
    language = get_adapter("llava").tower("language")
    blocks = block_list(model, language)[1]
    keep_heads_(blocks[0], language, model.model.language_model.layers[0].self_attn.head_dim, [2, 3])
    keep_channels_(blocks[2], language, range(0, 96, 3))
    keep_blocks_(model, language, [0, 2])
    save(model, tmp_path / "student", {})
    student = load_student(tmp_path / "student")
    export_generative(student, tmp_path / "onnx")
    gen = Generator(tmp_path / "onnx", threads=1)
    assert [s.shape[1] for s in gen.decoder.inputs if s.name.endswith(".key")] == [1, 2]
    enc = processor(images=images(2), text=PROMPTS, padding=True, return_tensors="np")
    want = reference(student, enc)
    np.testing.assert_array_equal(want, reference(model, enc))
    got = gen.generate_ids(enc["pixel_values"], enc["input_ids"], enc["attention_mask"], NEW_TOKENS)
    assert want.shape == (2, NEW_TOKENS) and len(np.unique(want)) >= 4
    np.testing.assert_array_equal(got.tokens, want)


def test_export_refuses_a_model_without_a_decoder(tmp_path):
    with pytest.raises(LmmcError, match="not a generative vision-language model"):
        export_generative(tiny_model("clip"), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_runtime_refuses_a_folder_without_the_decoder(tmp_path, exported):
    _, _, gen = exported
    with pytest.raises(LmmcError, match="no generative.json"):
        Generator(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(gen.folder, copy)
    (copy / DECODER).unlink()
    with pytest.raises(LmmcError, match="lacks decoder.onnx"):
        Generator(copy)
    with pytest.raises(LmmcError, match=r"token ids must lie in \[0, 100\)"):
        gen.generate_ids(None, np.array([[5, 100]]))
    with pytest.raises(LmmcError, match="input_ids must be integer token ids; got float64"):
        gen.generate_ids(None, np.array([[5.5, 6.0]]))
    with pytest.raises(LmmcError, match=r"max_new_tokens must be a whole number of at least 1; got 2.5"):
        gen.generate_ids(None, np.array([[5, 6]]), max_new_tokens=2.5)
    # no row (it returned a token a row anyway), or no token
    for empty in (np.zeros((0, 3), dtype=np.int64), np.zeros((1, 0), dtype=np.int64), np.array([5, 6])):
        with pytest.raises(LmmcError, match=re.escape(f"with at least one token and one row; got shape {empty.shape}")):
            gen.generate_ids(None, empty)
    with pytest.raises(LmmcError, match="attention_mask must hold 0 .padding. and 1"):
        gen.generate_ids(None, np.array([[5, 6]]), np.array([[0, 0]]))
    with pytest.raises(LmmcError, match="pads a row on the right; .* padding_side = 'left'"):
        gen.generate_ids(None, np.array([[5, 6, 7], [5, 6, 0]]), np.array([[1, 1, 1], [1, 1, 0]]))
    assert gen.generate_ids(None, np.array([[5, 6]]), max_new_tokens=np.int64(2)).tokens.shape[1] <= 2
    # left padding without its mask read the padding as tokens
    pad = gen.spec["pad_token_id"]
    with pytest.raises(LmmcError, match="rows padded on the left but no attention_mask"):
        gen.generate_ids(None, np.array([[pad, 5, 6], [5, 6, 7]]))
    # [None] and "3" raised raw errors, 2.5 was cut to 2, and ids past the vocabulary could never stop a row
    for eos in ([None], "3", 2.5, -1, 100, True):
        with pytest.raises(LmmcError, match=re.escape(f"eos_token_id must be a token id, or a list of them, in "
                                                      f"[0, 100); got {eos!r}")):
            gen.generate_ids(None, np.array([[5, 6]]), eos_token_id=eos)
    # past the decoder's positions it went on, as PyTorch does, with whatever the position table gave
    limit = gen.spec["max_positions"]
    with pytest.raises(LmmcError, match=f"a prompt of 2 tokens .* and {limit} new tokens take {limit + 1} positions, "
                                        f"and the decoder has {limit}"):
        gen.generate_ids(None, np.array([[5, 6]]), max_new_tokens=limit)
    (copy / DECODER).write_bytes((gen.folder / DECODER).read_bytes())
    table = copy / "embed_tokens.npy"
    for broken, message in [
            (lambda: table.write_bytes(table.read_bytes()[:200]), "the token table .* cannot be read"),
            (lambda: np.save(table, gen.embeddings[:10]), r"holds float32 of shape \[10, \d+\], and the decoder reads a "
                                                          r"float table of 100 rows x \d+ columns"),
            # another model's larger vocabulary, read by this decoder's ids
            (lambda: np.save(table, np.concatenate([gen.embeddings, gen.embeddings[:3]])),
             r"holds float32 of shape \[103, \d+\], and the decoder reads a float table of 100 rows"),
            (lambda: (copy / "generative.json").write_text("{oops"), "generative.json is not JSON"),
            (lambda: (copy / "generative.json").write_text("{}"), "generative.json lacks what generation reads"),
            # an edited spec naming a graph elsewhere, which loaded
            (lambda: (copy / "generative.json").write_text(json.dumps({**gen.spec, "decoder": str(gen.folder / DECODER)})),
             f"names '{gen.folder / DECODER}', which is not a file in '{copy}'"),
            (lambda: (copy / "generative.json").write_text(json.dumps({**gen.spec, "embeddings": "../embed_tokens.npy"})),
             "names '../embed_tokens.npy', which is not a file in")]:
        broken()
        with pytest.raises(LmmcError, match=message):
            Generator(copy)
        np.save(table, gen.embeddings)


def compile_with(model_dir: Path, out: Path, recipe: dict) -> tuple[int, str]:
    path = out.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(path), "-o", str(out)])
    return result.exit_code, result.output


GENERATIVE_RECIPE = {"calibration": {"random": True, "samples": 4, "eval_samples": 4, "batch_size": 4},
                     "passes": [{"magnitude": {"sparsity": 0.5}}], "export": [{"onnx_generative": {}}],
                     "validate": False}


def test_compile_output_generates_what_the_saved_student_generates(compiled_llava, one_thread):
    out, result = compiled_llava  # Wanda 50 % and the generative export of a saved tiny LLaVA
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generative"]["decoder"] == "onnx/decoder.onnx"
    decoder = next(a for a in manifest["artifacts"] if a["tower"] == "language")
    assert decoder["path"] == "onnx/decoder.onnx" and decoder["dynamic_axes"]["past_key_values.1.value"] == {"0": "batch", "2": "past"}
    gen = open_generative(out, threads=1)
    assert gen.spec["chat_template"] is True  # the compile calibrated and validated in the chat template
    image = images(1)[0]
    student = lmmc.load_student(out / "student")
    for template in (True, False):  # generate() writes the prompt as the compile did, unless told otherwise
        text = gen.generate(image, "the picture of a house is", max_new_tokens=16, chat_template=None if template else False)
        enc = gen.preprocessor(images=image, text=generative_prompt(gen.preprocessor, "the picture of a house is", template),
                               return_tensors="pt")
        with torch.no_grad():
            want = student.generate(**enc, max_new_tokens=16, do_sample=False)[0, enc["input_ids"].shape[1]:]
        assert text == gen.preprocessor.tokenizer.decode(want, skip_special_tokens=True)
        assert len(set(want.tolist())) >= 4
    with pytest.raises(LmmcError, match="the chat template places the picture"):
        gen.generate(image, "<image> the picture of a house is")
    with pytest.raises(LmmcError, match="takes a prompt as text .* got int and None"):
        gen.generate(image, 123)
    with pytest.raises(LmmcError, match="chat_template as True, False or None; got str and 'no'"):
        gen.generate(image, "a house", chat_template="no")
    # three grey pictures in a list stacked into one of three channels, and got an answer
    grey = [im.convert("L") for im in images(3)]
    for many in (grey, tuple(grey)):
        kind = type(many).__name__
        with pytest.raises(LmmcError, match=f"answers about one image .*; got a {kind} of 3: call it once"):
            gen.generate(many, "a house")
    with pytest.raises(LmmcError, match="holds a generative model's export, .* open it with lmmc.runtime.open_generative"):
        lmmc.runtime.open_dir(out)


def test_generative_export_of_an_encoder_model_is_refused(tmp_path, one_thread):
    recipe = {**GENERATIVE_RECIPE, "passes": []}
    code, output = compile_with(save_tiny("bert", tmp_path / "bert"), tmp_path / "out", recipe)
    assert code == 2 and "'onnx_generative' pass exports generative models" in output and "use the 'onnx' pass" in output
    assert not (tmp_path / "out").exists()
    dry = CliRunner().invoke(main, ["compile", str(tmp_path / "bert"), "-r", str(tmp_path / "recipe.yaml"), "-o",
                                    str(tmp_path / "out"), "--dry-run"])   # refused by the plan, before any pass
    assert dry.exit_code == 2 and "'onnx_generative' pass exports generative models" in dry.output
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "manifest.json").write_text(json.dumps({"towers": {}, "artifacts": []}))
    with pytest.raises(LmmcError, match="holds no generative export"):
        open_generative(tmp_path / "fake")


def test_the_vision_session_does_not_spin_between_the_decoders_runs(compiled_llava, tmp_path):
    out, _ = compiled_llava
    gen = open_generative(out, threads=2)
    key = "session.intra_op.allow_spinning"
    assert gen.vision.session.get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(Exception, match="does not have configuration with key"):  # the decoder keeps ORT's default
        gen.decoder.session.get_session_options().get_session_config_entry(key)
    again = pickle.loads(pickle.dumps(gen.vision))  # a worker process opens it as it was opened
    assert again.session.get_session_options().get_session_config_entry(key) == "0"
    (tmp_path / "model.xml").write_text("<net/>")  # refused before it is read
    with pytest.raises(LmmcError, match="spinning is ONNX Runtime's setting; model.xml runs on openvino"):
        lmmc.runtime.load(tmp_path / "model.xml", spinning=False)


def test_a_generative_output_replaced_while_it_is_opened_is_an_error(compiled_llava, tmp_path, monkeypatch):
    import lmmc.runtime.generate

    out, _ = compiled_llava
    shutil.copytree(out, tmp_path / "out")
    shutil.copytree(out, tmp_path / "newer")
    (tmp_path / "newer" / ".lmmc-files.json").write_text((out / ".lmmc-files.json").read_text() + " ")
    built = lmmc.runtime.generate.Generator.__init__

    def built_as_the_folder_is_replaced(self, *args, **kwargs):  # a compile --force puts its output in place
        built(self, *args, **kwargs)
        (tmp_path / "out").rename(tmp_path / "older")
        (tmp_path / "newer").rename(tmp_path / "out")

    monkeypatch.setattr(lmmc.runtime.generate.Generator, "__init__", built_as_the_folder_is_replaced)
    with pytest.raises(LmmcError, match="was replaced by a compile while it was being opened"):
        open_generative(tmp_path / "out", threads=1)


def test_a_generative_output_with_an_edited_token_table_warns_as_it_opens(compiled_llava, tmp_path):
    """Another compile's table of the same vocabulary, or an edited spec, generated other tokens without a word."""
    out, _ = compiled_llava
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    table = copy / "onnx" / "embed_tokens.npy"
    np.save(table, np.load(table) * 1.5)
    with pytest.warns(UserWarning, match="onnx/embed_tokens.npy in .* is not what the compile wrote"):
        open_generative(copy / "manifest.json", threads=1)  # its manifest's path, as open_dir takes


@pytest.mark.parametrize("lost", ["tokenizer.json", "processor_config.json"])
def test_a_generative_output_without_its_processor_files_is_one_clear_error(compiled_llava, tmp_path, lost):
    """transformers asked for sentencepiece, or for the hub, instead of naming the missing file."""
    out, _ = compiled_llava
    shutil.copytree(out, tmp_path / "out")
    (tmp_path / "out" / "student" / lost).unlink()
    with pytest.raises(LmmcError, match=f"lacks \\['student/{lost}'\\], the processor files its manifest lists; "
                                        "copy the whole output directory"):
        open_generative(tmp_path / "out", threads=1)
