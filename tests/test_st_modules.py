"""The files of a sentence-transformers directory as the installed sentence-transformers writes and reads
them: the pooling config of sentence-transformers 3 and later, broken files refused with one clear error,
do_lower_case, a default prompt, and CLS / weighted-mean pooling under left padding. Each embedding is
compared with sentence-transformers' own encode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentence_transformers as st
import torch
import transformers
import yaml
from click.testing import CliRunner

from lmmc.cli import main
from lmmc.errors import LmmcError
from lmmc.modelio import load_teacher
from lmmc.pooling import read_modules
from lmmc.runtime import open_dir
from tests.conftest import compile_tiny_text, save_tiny, tiny_vocab

TEXTS = ["the water is cold", "a man was on the road and the house of the man", "python", "data of a function"]
MIXED_CASE = ["The Water is COLD", "A man was on the Road and the House of the man", "the water is cold", "Of"]


def st_dir(path: Path, pooling: dict, normalize: bool = False, bert_config: dict | None = None) -> Path:
    """Turn a saved BERT directory into a sentence-transformers one whose Pooling config is `pooling`."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, **pooling}))
    (path / "sentence_bert_config.json").write_text(json.dumps(bert_config or {"max_seq_length": 32,
                                                                              "do_lower_case": False}))
    return path


def lmmc_embeddings(path: Path, texts: list[str]) -> torch.Tensor:
    """The teacher's pooled embedding as lmmc computes it, on one padded batch of `texts`."""
    model, adapter, preprocessor = load_teacher(str(path))
    enc = preprocessor["tokenizer"](texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return adapter.towers[0].embed(model, {"input_ids": enc["input_ids"],
                                              "attention_mask": enc["attention_mask"]})[1]


def st_embeddings(path: Path, texts: list[str]) -> torch.Tensor:
    return st.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)


# --- the pooling config of sentence-transformers 3 and later: one "pooling_mode" --------------------------

@pytest.mark.parametrize("pooling_mode, modes", [
    ("cls", ["cls"]), ("max", ["max"]), ("mean_sqrt_len_tokens", ["mean_sqrt_len"]),
    ("lasttoken", ["lasttoken"]), (["weightedmean"], ["weightedmean"]),
    # concatenated in the list's order, which need not be the order of the legacy flags
    (["mean", "cls"], ["mean", "cls"]), (["max", "mean", "cls"], ["max", "mean", "cls"]),
])
def test_a_pooling_mode_key_is_read_as_sentence_transformers_reads_it(tmp_path, pooling_mode, modes):
    path = st_dir(save_tiny("bert", tmp_path / "m"),
                  {"embedding_dimension": 32, "pooling_mode": pooling_mode, "include_prompt": True})
    assert list(read_modules(str(path)).modes) == modes
    ours, theirs = lmmc_embeddings(path, TEXTS), st_embeddings(path, TEXTS)
    assert ours.shape == theirs.shape == (len(TEXTS), 32 * len(modes))
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_include_prompt_false_matters_only_to_a_model_with_prompts(tmp_path):
    """sentence-transformers leaves out only a prompt's tokens: without prompts it pools every token."""
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode": "cls", "include_prompt": False})
    assert read_modules(str(path)).modes == ("cls",)
    assert torch.allclose(lmmc_embeddings(path, TEXTS), st_embeddings(path, TEXTS), atol=1e-5)
    (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: ",
                                                                                     "passage": ""}}))
    with pytest.raises(LmmcError, match="include_prompt: false\), and the model declares prompts \(query\); "
                                        "lmmc encodes texts without prompts"):
        read_modules(str(path))


def test_a_directory_saved_by_the_installed_sentence_transformers_compiles_dry(tmp_path):
    import sentence_transformers.models  # noqa: F401 - sentence-transformers 6 loads this submodule only on import

    hf = save_tiny("bert", tmp_path / "hf")
    model = st.SentenceTransformer(modules=[st.models.Transformer(str(hf), max_seq_length=32),
                                            st.models.Pooling(32, pooling_mode=("cls", "mean")),
                                            st.models.Normalize()], device="cpu")
    model.save(str(tmp_path / "st"))
    assert read_modules(str(tmp_path / "st")).modes == ("cls", "mean")
    ours = torch.nn.functional.normalize(lmmc_embeddings(tmp_path / "st", TEXTS), dim=-1)
    assert torch.allclose(ours, model.encode(TEXTS, convert_to_tensor=True), atol=1e-5)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True}, "passes": [{"magnitude": {"sparsity": 0.3}}]}))
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "st"), "-r", str(recipe), "-o",
                                       str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output


def test_a_cross_encoder_is_refused_naming_its_head(tmp_path):
    """Its scores come from a classification head lmmc would drop; its mean-pooled hidden states are no
    embedding its users get."""
    st.CrossEncoder(str(save_tiny("bert", tmp_path / "hf")), num_labels=3, device="cpu").save(str(tmp_path / "ce"))
    with pytest.raises(LmmcError, match="is a sentence-transformers CrossEncoder \\(transformer_task "
                                        "'sequence-classification'\\): its output comes from a task head"):
        read_modules(str(tmp_path / "ce"))


@pytest.mark.parametrize("pooling_mode", ["avg", ["cls", "nope"], [], 3])
def test_an_unknown_pooling_mode_is_refused(tmp_path, pooling_mode):
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"embedding_dimension": 32, "pooling_mode": pooling_mode})
    with pytest.raises(LmmcError, match="pooling_mode .* is not a pooling mode.*mean_sqrt_len_tokens"):
        read_modules(str(path))


# --- broken files: one LmmcError where they are read, the dry run included ---------------------------------

@pytest.mark.parametrize("rel, text, words", [
    ("1_Pooling/config.json", '{"pooling_mode_mean_tokens": tru', "1_Pooling/config.json' is not valid JSON"),
    ("1_Pooling/config.json", "[1, 2]", "1_Pooling/config.json' holds a JSON list, not an object"),
    ("modules.json", '{"0": {"type": "sentence_transformers.models.Transformer", "path": ""}}',
     "modules.json is not a list of modules"),
    ("modules.json", '["Transformer"]', "modules.json is not a list of modules"),
    ("sentence_bert_config.json", '{"max_seq_length": 12', "sentence_bert_config.json' is not valid JSON"),
    ("sentence_bert_config.json", '"max_seq_length"', "sentence_bert_config.json' holds a JSON str"),
    ("config_sentence_transformers.json", "{", "config_sentence_transformers.json' is not valid JSON"),
    ("sentence_bert_config.json", '{"max_seq_length": "16"}', "max_seq_length '16' is not a positive whole number"),
    ("sentence_bert_config.json", '{"max_seq_length": 0}', "max_seq_length 0 is not a positive whole number"),
    ("sentence_bert_config.json", '{"processing_kwargs": {"text": {"max_length": "8"}}}',
     "processing_kwargs.text.max_length '8' is not a positive whole number"),
    ("sentence_bert_config.json", '{"processing_kwargs": [8]}', "is not an object of modality -> settings"),
    ("sentence_bert_config.json", '{"do_lower_case": "no"}', "do_lower_case 'no' is not true or false"),
    ("modules.json", json.dumps([{"type": "sentence_transformers.models.Transformer", "path": ""},
                                 {"type": "sentence_transformers.models.Normalize", "path": "2_Normalize"},
                                 {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]),
     "modules.json lists Transformer -> Normalize -> Pooling; lmmc compiles Transformer -> Pooling"),
    ("modules.json", json.dumps([{"type": "sentence_transformers.models.Transformer", "path": ""},
                                 {"type": "sentence_transformers.models.Normalize", "path": "2_Normalize"}]),
     "modules.json lists Transformer -> Normalize; lmmc compiles"),
    # what sentence-transformers itself refuses to load
    ("modules.json", json.dumps([{"type": "sentence_transformers.models.Transformer", "path": ""},
                                 {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"},
                                 {"type": "sentence_transformers.models.Normalize"}]),
     "modules.json lists a sentence_transformers.models.Normalize module without a \"path\""),
    ("config_sentence_transformers.json", '{"prompts": {"query": "query: "}, "default_prompt_name": "search"}',
     "default_prompt_name \"search\" names no prompt"),
    ("config_sentence_transformers.json", '{"prompts": ["query: "]}', "\"prompts\" must map each prompt's name"),
    # with a config.json at the top as well, the transformer sentence-transformers loads is the folder's
    ("modules.json", json.dumps([{"type": "sentence_transformers.models.Transformer", "path": "0_Transformer"},
                                 {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]),
     "modules.json keeps the transformer in '0_Transformer/', an older sentence-transformers layout"),
])
def test_a_broken_sentence_transformers_file_is_one_error_before_anything_loads(tmp_path, rel, text, words):
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode_mean_tokens": True})
    (path / rel).write_text(text)
    with pytest.raises(LmmcError, match=words):
        read_modules(str(path))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True}, "passes": [{"magnitude": {"sparsity": 0.3}}]}))
    result = CliRunner().invoke(main, ["compile", str(path), "-r", str(recipe), "-o", str(tmp_path / "out"),
                                       "--dry-run"])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_calibration_length_above_the_deployed_cut_is_named(tmp_path):
    from tests.conftest import CORPUS

    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode": "mean"})  # max_seq_length 32
    recipe = tmp_path / "recipe.yaml"
    for length, warned in [(48, True), (32, False)]:
        recipe.write_text(yaml.safe_dump({"calibration": {"path": str(CORPUS), "max_length": length},
                                          "passes": [{"magnitude": {"sparsity": 0.3}}]}))
        result = CliRunner().invoke(main, ["compile", str(path), "-r", str(recipe), "-o", str(tmp_path / "out"),
                                           "--dry-run"])
        assert result.exit_code == 0, result.output
        assert (f"calibration.max_length = {length} is above the 32 tokens the deployed student's encode cuts a "
                f"text to" in " ".join(result.output.split())) is warned


def test_modules_json_decides_over_pooling_keys_a_config_carries(tmp_path):
    """A student of lmmc's whose modules were changed in sentence-transformers keeps lmmc's keys in its
    config.json; the pooling compiled is still the one sentence-transformers runs."""
    path = save_tiny("bert", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "sentence_pooling": ["cls", "max"],
                                                  "sentence_normalize": False}))
    st_dir(path, {"pooling_mode": "mean"}, normalize=True)
    ours = lmmc_embeddings(path, TEXTS)
    assert ours.shape == (len(TEXTS), 32)
    assert torch.allclose(torch.nn.functional.normalize(ours, dim=-1), st_embeddings(path, TEXTS), atol=1e-5)
    model, _, _ = load_teacher(str(path))
    assert model.config.sentence_pooling == ["mean"] and model.config.sentence_normalize is True


def test_the_older_layout_is_refused_with_how_to_save_it_whole(tmp_path):
    import sentence_transformers.models  # noqa: F401

    hf = save_tiny("bert", tmp_path / "hf")
    st.SentenceTransformer(modules=[st.models.Transformer(str(hf)), st.models.Pooling(32, pooling_mode="cls"),
                                    st.models.Dense(32, 16), st.models.Normalize()], device="cpu").save(str(tmp_path / "st"))
    old = tmp_path / "st"
    (old / "0_Transformer").mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json", "sentence_bert_config.json"):
        if (old / f).exists():
            (old / f).rename(old / "0_Transformer" / f)
    modules = json.loads((old / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (old / "modules.json").write_text(json.dumps(modules))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True}, "passes": [{"magnitude": {"sparsity": 0.3}}]}))
    result = CliRunner().invoke(main, ["compile", str(old), "-r", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2
    assert (f"it is a sentence-transformers directory in the older layout, its transformer in '0_Transformer/'. "
            f"Save it again in the current layout, which lmmc reads whole: SentenceTransformer('{old}')"
            ) in " ".join(result.output.split())
    assert "point lmmc at" not in result.output


# --- do_lower_case -----------------------------------------------------------------------------------------

def cased_bert(path: Path) -> Path:
    """A tiny BERT whose own tokenizer keeps case: its vocabulary is lower-case, so capitals are unknown
    unless the text is lowercased first."""
    save_tiny("bert", path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    transformers.BertTokenizer(vocab=str(tiny_vocab(path / "vocab.txt")), do_lower_case=False).save_pretrained(path)
    return path


def test_do_lower_case_lowercases_every_encode_and_the_students_tokenizer(tmp_path):
    teacher = st_dir(cased_bert(tmp_path / "teacher"), {"pooling_mode": "mean"}, normalize=True,
                     bert_config={"max_seq_length": 32, "do_lower_case": True})
    # The teacher's tokenizer as lmmc loads it reads capitals as sentence-transformers does: lowercased.
    _, _, pre = load_teacher(str(teacher))
    assert pre["tokenizer"](MIXED_CASE[0])["input_ids"] == pre["tokenizer"](MIXED_CASE[0].lower())["input_ids"]
    theirs = st_embeddings(teacher, MIXED_CASE)
    ours = torch.nn.functional.normalize(lmmc_embeddings(teacher, MIXED_CASE), dim=-1)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()

    out = compile_tiny_text(teacher, tmp_path / "out", [{"magnitude": {"sparsity": 0.3}}], max_length=32)
    # The saved tokenizer lowercases wherever it is read: transformers (the C++ sample's ids), the ONNX
    # and OpenVINO artifacts through lmmc.runtime, and sentence-transformers.
    tok = transformers.AutoTokenizer.from_pretrained(out / "student")
    assert tok(MIXED_CASE[1])["input_ids"] == tok(MIXED_CASE[1].lower())["input_ids"]
    student = st.SentenceTransformer(str(out / "student"), device="cpu").encode(MIXED_CASE)
    for backend in ("onnxruntime", "openvino"):
        deployed = open_dir(out, backend=backend).encode(MIXED_CASE)
        assert np.abs(deployed - student).max() < 1e-4, backend
    assert np.abs(student - st.SentenceTransformer(str(out / "student"), device="cpu")
                  .encode([t.lower() for t in MIXED_CASE])).max() < 1e-5


def test_processing_kwargs_max_length_cuts_texts_where_sentence_transformers_does(tmp_path):
    """sentence-transformers 6 may keep the cut in processing_kwargs (over max_seq_length and the
    tokenizer's model_max_length): the student encodes a long text cut there, as sentence-transformers does."""
    import sentence_transformers.models  # noqa: F401 - sentence-transformers 6 loads this submodule only on import

    model = st.SentenceTransformer(modules=[
        st.models.Transformer(str(save_tiny("bert", tmp_path / "hf")), max_seq_length=32,
                              processing_kwargs={"text": {"max_length": 6}}),
        st.models.Pooling(32, pooling_mode="mean")], device="cpu")
    model.save(str(tmp_path / "st"))
    texts = [TEXTS[1], TEXTS[0]]  # 11 and 4 words
    out = compile_tiny_text(tmp_path / "st", tmp_path / "out", [{"magnitude": {"sparsity": 0.3}}], max_length=6)
    assert json.loads((out / "manifest.json").read_text())["preprocessing"]["text"]["max_length"] == 6
    student = st.SentenceTransformer(str(out / "student"), device="cpu").encode(texts)
    deployed = open_dir(out).encode(texts)
    assert np.abs(deployed - student).max() < 1e-4
    # the long text's embedding is the cut one's, not the whole text's
    whole = st.SentenceTransformer(str(out / "student"), device="cpu").encode(
        texts[:1], processing_kwargs={"text": {"max_length": 32}})
    assert np.abs(deployed[0] - whole[0]).max() > 1e-3


def test_do_lower_case_with_a_slow_tokenizer_is_refused():
    from lmmc.modelio import _lowercase

    class Slow:
        is_fast = False

    with pytest.raises(LmmcError, match=r"sets do_lower_case \(sentence_bert_config.json\).*slow"):
        _lowercase(Slow(), "m")


@pytest.mark.parametrize("name, settings", [
    ("sentence_xlm-roberta_config.json", {"max_seq_length": 6}),  # an older name sentence-transformers still reads
    ("sentence_bert_config.json", {"max_seq_length": 32, "tokenizer_args": {"model_max_length": 6}}),
    ("sentence_bert_config.json", {"max_seq_length": 32, "processor_kwargs": {"model_max_length": 6}}),
], ids=["older file name", "tokenizer_args", "processor_kwargs"])
def test_the_cut_of_every_settings_file_sentence_transformers_reads_is_deployed(tmp_path, name, settings):
    """sentence-transformers cuts texts at the tokenizer's model_max_length from the Transformer module's
    settings (over max_seq_length), read from the first of its settings files' names that exists; the
    student carries the same file and encodes a long text cut there."""
    teacher = st_dir(save_tiny("bert", tmp_path / "teacher"), {"pooling_mode": "mean"})
    (teacher / "sentence_bert_config.json").unlink()
    (teacher / name).write_text(json.dumps(settings))
    texts = [TEXTS[1], TEXTS[0]]  # 11 and 4 words
    assert st.SentenceTransformer(str(teacher), device="cpu").max_seq_length == 6
    out = compile_tiny_text(teacher, tmp_path / "out", [{"magnitude": {"sparsity": 0.3}}], max_length=6)
    assert json.loads((out / "manifest.json").read_text())["preprocessing"]["text"]["max_length"] == 6
    student = st.SentenceTransformer(str(out / "student"), device="cpu")
    assert student.max_seq_length == 6
    deployed = open_dir(out).encode(texts)
    assert np.abs(deployed - student.encode(texts)).max() < 1e-4
    student.max_seq_length = 32
    assert np.abs(deployed[0] - student.encode(texts[:1])[0]).max() > 1e-3


def test_settings_lmmc_does_not_apply_are_named_in_a_warning(tmp_path):
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode": "mean"},
                  bert_config={"max_seq_length": 32, "model_args": {"torch_dtype": "float32"},
                               "tokenizer_args": {"trust_remote_code": True, "model_max_length": 8}})
    assert read_modules(str(path)).warnings == ()
    (path / "sentence_bert_config.json").write_text(json.dumps(
        {"tokenizer_args": {"add_prefix_space": True}, "config_args": {"hidden_dropout_prob": 0.2}}))
    assert read_modules(str(path)).warnings == (
        f"'{path}/sentence_bert_config.json' sets add_prefix_space, hidden_dropout_prob for sentence-transformers to "
        f"apply as it loads the tokenizer or the model; lmmc loads them as saved, without these settings, so check "
        f"that the teacher's embeddings do not depend on them",)


@pytest.mark.parametrize("config, refused", [
    ({}, False), ({"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}, False),
    ({"module_input_name": "token_embeddings"}, True), ({"module_output_name": "normed"}, True)])
def test_a_normalize_module_of_anything_but_the_sentence_embedding_is_refused(tmp_path, config, refused):
    """sentence-transformers' Normalize may normalise the token embeddings instead, or write its result under
    another name: the sentence embedding its users get is then not normalised."""
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode": "mean"}, normalize=True)
    (path / "2_Normalize").mkdir()
    (path / "2_Normalize" / "config.json").write_text(json.dumps(config))
    norms = st_embeddings(path, TEXTS).norm(dim=-1)
    assert torch.allclose(norms, torch.ones(len(TEXTS))) is not refused
    if refused:
        with pytest.raises(LmmcError, match="2_Normalize/config.json': the Normalize module reads .* not the sentence "
                                            "embedding; lmmc compiles a Normalize of the pooled sentence embedding"):
            read_modules(str(path))
    else:
        modules = read_modules(str(path))
        assert modules.normalize and modules.files["2_Normalize/config.json"] == json.dumps(config)


def test_a_module_of_another_package_is_not_taken_for_sentence_transformers_own(tmp_path):
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode": "mean"})
    modules = json.loads((path / "modules.json").read_text())
    modules[1]["type"] = "my_pkg.pooling.Pooling"
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(LmmcError, match="modules.json lists a my_pkg.pooling.Pooling module \\(1_Pooling\\); lmmc "
                                        "compiles sentence-transformers' Transformer, Pooling and Normalize modules"):
        read_modules(str(path))


# --- a default prompt --------------------------------------------------------------------------------------

def test_a_default_prompt_is_named_in_a_warning(tmp_path):
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode": "mean"})
    assert read_modules(str(path)).warnings == ()
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": "query"}))
    warnings = read_modules(str(path)).warnings
    assert len(warnings) == 1 and "default_prompt_name 'query'" in warnings[0] and "'query: '" in warnings[0]
    # An empty default prompt changes nothing
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": ""}, "default_prompt_name": "query"}))
    assert read_modules(str(path)).warnings == ()


def test_the_default_prompt_goes_into_the_manifest_and_open_dir_names_it(tmp_path):
    """The student keeps config_sentence_transformers.json, so sentence-transformers prepends the prompt where
    lmmc's encode does not; nothing said so to whoever opened only the output."""
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode": "mean"})
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": "query"}))
    out = compile_tiny_text(path, tmp_path / "out", [])
    assert json.loads((out / "manifest.json").read_text())["preprocessing"]["text"]["default_prompt"] == "query: "
    with pytest.warns(UserWarning, match="declares a default prompt, 'query: ', which sentence-transformers' encode "
                                         "prepends to every text; lmmc's encode\(\) reads the texts as given"):
        deployed = open_dir(out, threads=1)
    ours = deployed.encode(["query: the water", "the water"])
    theirs = st.SentenceTransformer(str(out / "student"), device="cpu").encode(["the water"], convert_to_numpy=True)
    assert np.abs(ours[0] - theirs[0]).max() < 1e-5 and np.abs(ours[1] - theirs[0]).max() > 1e-3


# --- left padding ------------------------------------------------------------------------------------------

def left_padded(path: Path) -> Path:
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings["padding_side"] = "left"
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return path


@pytest.mark.parametrize("pooling_mode", ["cls", "weightedmean", ["cls", "weightedmean", "lasttoken"]])
def test_left_padding_pools_from_the_first_real_token(tmp_path, pooling_mode):
    path = left_padded(st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode": pooling_mode}))
    ours, theirs = lmmc_embeddings(path, TEXTS), st_embeddings(path, TEXTS)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_a_left_padded_cls_student_deploys_the_first_real_token(tmp_path):
    teacher = left_padded(st_dir(save_tiny("bert", tmp_path / "teacher"), {"pooling_mode": "cls"}, normalize=True))
    out = compile_tiny_text(teacher, tmp_path / "out", [{"magnitude": {"sparsity": 0.3}}], max_length=32)
    student = st.SentenceTransformer(str(out / "student"), device="cpu").encode(TEXTS)
    for backend in ("onnxruntime", "openvino"):  # one batch, padded on the left to its longest text
        deployed = open_dir(out, backend=backend).encode(TEXTS)
        assert np.abs(deployed - student).max() < 1e-4, backend


def test_a_cut_above_the_positions_is_lowered_and_said(tmp_path):
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode": "mean"},
                  bert_config={"max_seq_length": 1000, "do_lower_case": False})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True}, "passes": [], "validate": False}))
    result = CliRunner().invoke(main, ["compile", str(path), "-r", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert ("sentence_bert_config.json cuts texts at 1000 tokens, more than the 64 positions the model has (where "
            "sentence-transformers fails on a longer text); lmmc cuts them at 64") in " ".join(result.output.split())


def test_calibration_cuts_texts_where_the_models_users_get_them_cut_by_default(tmp_path):
    """A max_seq_length of 16: calibration and validation see what sentence-transformers and encode send (16
    tokens), not 128 (or the positions) that nobody sends; the FLOPs are counted at that length too."""
    path = st_dir(save_tiny("bert", tmp_path / "m"), {"pooling_mode_mean_tokens": True},
                  bert_config={"max_seq_length": 16, "do_lower_case": False})
    long = " ".join(["the water of the road is cold"] * 6)  # about 40 tokens
    (tmp_path / "calib.txt").write_text("\n".join(f"{long} {i}" for i in range(160)))
    recipe = {"calibration": {"path": "calib.txt", "samples": 64, "eval_samples": 32, "batch_size": 8},
              "passes": [{"magnitude": {"sparsity": 0.1}}], "validate": False}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["compile", str(path), "-r", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["flops"]["text"]["tokens"] == 16


def _hub_cache(cache: Path, repo: str, kind: str) -> Path:
    """A tiny model laid out as the hub cache holds a download by transformers: a snapshot, no records of
    absent files."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    save_tiny(kind, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    return snapshot


def test_a_hub_model_whose_tokenizer_ships_code_is_refused_as_a_local_one_is(tmp_path):
    """The check read the hub id as a local folder, found nothing there, and compiled the model."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache, "org/tokcode", "clip")
    settings = json.loads((snapshot / "tokenizer_config.json").read_text())
    (snapshot / "tokenizer_config.json").write_text(json.dumps({**settings, "auto_map": {
        "AutoTokenizer": ["tok.OwnTokenizer", None]}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True}, "passes": [{"magnitude": {}}]}))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    refused = subprocess.run([sys.executable, "-c", "import sys; from lmmc.cli import main; main(sys.argv[1:])",
                              "compile", "org/tokcode", "-r", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert ("error: 'org/tokcode' ships the code of its own tokenizer (auto_map in tokenizer_config.json), which "
            "runs only with --trust-remote-code") in " ".join(refused.stderr.split())


def test_offline_a_hub_encoder_whose_modules_the_cache_cannot_tell_is_refused(tmp_path):
    """Offline, a hub model's modules.json was read as absent whenever it was not cached (transformers caches
    only the files it loads), and a sentence-transformers model compiled with mean pooling and no Normalize.
    Absent now means the cache recorded its absence; otherwise one error says what to do. A CLIP model, which
    has no such pooling, compiles offline as before."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    bert = _hub_cache(cache, "org/enc", "bert")
    _hub_cache(cache, "org/clip", "clip")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
                                      "passes": [{"wanda": {"sparsity": 0.5}}], "export": ["onnx"]}))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def dry_run(repo: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "import sys; from lmmc.cli import main; main(sys.argv[1:])", "compile", repo, "-r", str(recipe), "-o",
                               str(tmp_path / repo.replace("/", "-")), "--dry-run"], env=env, capture_output=True,
                              text=True, timeout=300)

    refused = dry_run("org/enc")
    assert refused.returncode == 2, refused.stderr
    assert ("error: cannot tell whether the hub model 'org/enc' has modules.json, which decides its pooling as "
            "sentence-transformers runs it: the cache holds no record of it and the hub cannot be reached (") in refused.stderr
    assert ("Run once with the hub reachable (HF_HUB_OFFLINE unset) so the cache records it, or download the "
            "repository to a folder (hf download org/enc --local-dir DIR) and compile DIR\n") in refused.stderr
    assert dry_run("org/clip").returncode == 0
    absent = bert.parents[1] / ".no_exist" / "abc123" / "modules.json"  # what a look-up online leaves
    absent.parent.mkdir(parents=True)
    absent.touch()
    allowed = dry_run("org/enc")
    assert allowed.returncode == 0, allowed.stderr
