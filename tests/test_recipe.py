"""Recipe parsing: typed configs, round trip, and one clear error per mistake."""

import pytest
import yaml

from lmmc.errors import LmmcError
from lmmc.recipe import load_recipe, parse_recipe
from lmmc.sparsity import NM
from tests.conftest import REPO

FULL = {
    "model": "some/model",
    "calibration": {"path": "data.txt", "samples": 32, "eval_samples": 16, "batch_size": 4, "max_length": 64, "seed": 3},
    "passes": [{"wanda": {"sparsity": 0.6}}, {"magnitude": {"nm": "2:4"}}],
    "export": ["onnx"],
    "validate": {"min_cosine": 0.9, "threads": 1},
}


def test_round_trip_parse_dump_parse_is_identical():
    first = parse_recipe(FULL)
    second = parse_recipe(yaml.safe_load(first.dump()))
    assert first == second
    assert first.dump() == second.dump()
    assert first.passes[1].config.nm == NM(2, 4)
    assert yaml.safe_load(first.dump())["passes"][1] == {"magnitude": {"sparsity": 0.5, "nm": "2:4"}}


@pytest.mark.parametrize("path", sorted((REPO / "samples" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse_and_round_trip(path, tmp_path):
    # Recipes whose data a sample script writes under out/ (samples/digits.sh) are read as --calib would
    # give it, since the test does not run the script.
    made_by_script = "out/" in yaml.safe_load(path.read_text())["calibration"].get("path", "")
    data = tmp_path / "calib.jsonl"
    data.write_text('{"image": "a.png", "text": "a photo of the handwritten digit one", "label": "one"}\n')
    recipe = load_recipe(path, calib=str(data) if made_by_script else None)
    assert parse_recipe(yaml.safe_load(recipe.dump())) == recipe


@pytest.mark.parametrize("path", sorted((REPO / "samples" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_a_shipped_recipe_written_back_is_judged_as_given(path, tmp_path):
    """report.json's recipe lists every field, defaults included: written back, every encoder recipe without an
    FP16 export was refused for its default min_cosine_fp16, and a generative one for its default timing."""
    made_by_script = "out/" in yaml.safe_load(path.read_text())["calibration"].get("path", "")
    data = tmp_path / "calib.jsonl"
    data.write_text('{"image": "a.png", "text": "a photo of the handwritten digit one", "label": "one"}\n')
    given = lambda: load_recipe(path, calib=str(data) if made_by_script else None)  # noqa: E731
    for family, kind in (("bert", "encoder"), ("llava", "generative")):
        outcomes = []
        for recipe in (given(), parse_recipe(yaml.safe_load(given().dump()))):
            try:
                recipe.check_gates(family, kind)
                outcomes.append("accepted")
            except LmmcError as err:
                outcomes.append(str(err))
        assert outcomes[0] == outcomes[1], (family, outcomes)


def test_a_recipe_with_bench_written_back_is_checked_for_threads_as_given(monkeypatch):
    """The thread check read `bench.threads` as set once written back (null), and compared None with the CPU
    count: an internal error at plan time. The default validate.threads also read as set."""
    import lmmc.compile as compile_module

    recipe = parse_recipe({"calibration": {"random": True}, "passes": [{"wanda": {"sparsity": 0.5}}],
                           "export": ["onnx"], "bench": {"repeats": 3}, "validate": {"latency_batch": 2}})
    again = parse_recipe(yaml.safe_load(recipe.dump()))
    monkeypatch.setattr(compile_module.os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert compile_module._oversubscribed(recipe) == compile_module._oversubscribed(again) == []
    busy = parse_recipe({**yaml.safe_load(recipe.dump()), "bench": {"threads": 4}})
    assert compile_module._oversubscribed(busy)[0].startswith("bench.threads = 4 is above the 1 CPU(s)")


def test_an_ecoflap_of_order_1_written_back_parses():
    """ecoflap refuses epsilon and seed with order 1; written back with their defaults, they are not set."""
    recipe = parse_recipe({"calibration": {"random": True}, "passes": [{"ecoflap": {"sparsity": 0.5, "order": 1}}, "wanda"]})
    assert yaml.safe_load(recipe.dump())["passes"][0]["ecoflap"]["epsilon"] == 1e-3
    assert parse_recipe(yaml.safe_load(recipe.dump())) == recipe


def test_a_clip_distillation_written_back_keeps_its_default_length(tmp_path):
    """A distill corpus's default max_length (128) is lowered to CLIP's 77 positions; written back it read as
    given, and the compile refused it as longer than the model's positions."""
    from lmmc.adapters import get_adapter
    from lmmc.compile import _check_lengths
    from tests.conftest import tiny_model

    corpus = tmp_path / "pairs.jsonl"
    corpus.write_text('{"image": "a.png", "text": "a photo"}\n')
    recipe = parse_recipe({"calibration": {"random": True}, "passes": [{"distill": {"corpus": str(corpus), "steps": 2}}]})
    model = tiny_model("clip")
    assert model.config.text_config.max_position_embeddings < 128
    for r in (recipe, parse_recipe(yaml.safe_load(recipe.dump()))):
        _check_lengths(model.config, get_adapter("clip"), r)
    with pytest.raises(LmmcError, match="distill.max_length"):
        _check_lengths(model.config, get_adapter("clip"), parse_recipe(
            {"calibration": {"random": True}, "passes": [{"distill": {"corpus": str(corpus), "steps": 2,
                                                                      "max_length": 100}}]}))


@pytest.mark.parametrize("change, message", [
    ({"passes": [{"prune_everything": {}}]}, "passes[0]: unknown pass 'prune_everything'; known passes here: "
                                             "activation, antgmm, distill, ecoflap"),
    ({"passes": ["wandaa"]}, "passes[0]: unknown pass 'wandaa' (did you mean wanda?); known passes here:"),
    ({"export": ["onnx", "openvno"]}, "export[1]: unknown pass 'openvno' (did you mean openvino?); known passes "
                                      "here: onnx, onnx_generative, openvino, ort, tensorrt"),
    ({"passes": [{"wanda": {"sparsty": 0.5}}]}, "sparsty: unknown key"),
    ({"passes": [{"wanda": {"sparsity": 1.0}}]}, "sparsity must be in [0, 1)"),
    ({"passes": [{"wanda": {"sparsity": -0.1}}]}, "sparsity must be in [0, 1)"),
    ({"passes": [{"wanda": {"nm": "4:4"}}]}, "0 < N < M"),
    ({"passes": [{"wanda": {"nm": "two:four"}}]}, "is not N:M"),
    ({"passes": [{"wanda": {"nm": "1_0:2_0"}}]}, "is not N:M"),
    ({"passes": ["onnx"]}, "'onnx' is an export pass; put it under 'export' in the recipe"),
    ({"export": [], "validate": {}}, "validation compares the student's ONNX export with PyTorch and the teacher, and "
                                     "the recipe exports no ONNX: add 'onnx' to its export section (before openvino or "
                                     "ort), or switch validation off with 'validate: false'"),
    ({"calibrate": {}}, "unknown key(s) ['calibrate']"),
    ({"calibration": {"samples": 0}}, "samples: Input should be greater than 0"),
    ({"calibration": {"samples": True}}, "samples: Value error, True holds a yes/no value where a number belongs"),
    ({"passes": [{"wanda": {"sparsity": False}}]}, "sparsity: Value error, False holds a yes/no value"),
    ({"passes": [{"wanda": {"sparsity": True}}]}, "sparsity: Value error, True holds a yes/no value"),
    ({"passes": [{"distill": {"layer_map": {"text": [2, True]}}}]}, "layer_map: Value error, {'text': [2, True]}"),
    ({"export": ["onnx", {"ort": {"int8": ["dynamic"], "threads": True}}]}, "threads: Value error, True holds"),
    ({"validate": {"threads": True}}, "threads: Value error, True holds"),
    ({"passes": [{"wanda": False}]}, "the parameters of 'wanda' must be a mapping, got False"),
    ({"calibration": {"random": "yes"}}, "random: Value error, 'yes' is text where yes/no belongs"),
    ({"validate": {"max_runtime_diff": float("inf")}}, "max_runtime_diff: Input should be a finite number"),
    ({"passes": [{"antgmm": {"keep": 0.5, "distill": {"lr": -1.0}, "distill_steps_per_segment": 2}}]},
     "bad 'distill' config for the distill pass:\n  lr: Input should be greater than 0"),
    # each cut distils for distill_steps_per_segment: a steps was overwritten, a clock spent by every run
    ({"passes": [{"antgmm": {"keep": 0.5, "distill": {"minutes": 1}, "distill_steps_per_segment": 2}}]},
     "distill.minutes is not read between segments: distill_steps_per_segment sets the steps after each cut"),
    ({"passes": [{"antgmm": {"keep": 0.5, "distill": {"steps": 900}, "distill_steps_per_segment": 2}}]},
     "distill.steps is not read between segments"),
    ({"passes": [{"wanda": {}}, {"antgmm": {"keep": 0.5}}]}, "passes[1] 'antgmm' removes whole units and would leave "
                                                             "the masks of 'wanda' before it pointing at the wrong"),
    ({"passes": [{"antgmm": {"keep": 0.7, "shares": {"ffn": 0.5, "hidden": 0.5}}},
                 {"antgmm": {"keep": 0.7, "shares": {"ffn": 1.0}}}]},
     "passes[1] 'antgmm' follows passes[0], whose hidden stage narrowed the residual stream"),
    ({"passes": [{"magnitude": {"nm": "2:4"}}, {"activation": {"refit": 0.001}}]},
     "passes[1] 'activation' refits each FFN's second matrix whole, which would fill the zeros 'magnitude' left"),
    ({"passes": [{"uniform": {"sparsity": 0.3}}, {"wanda": {"sparsity": 0.6}}]},
     "passes[1] 'wanda' gives sparsity 0.6, but the allocation 'uniform' before it sets every matrix's sparsity"),
    ({"passes": [{"uniform": {"sparsity": 0.7}}, {"owl": {"sparsity": 0.3}}, {"wanda": {}}]},
     "passes[1] 'owl' would replace the sparsities of the allocation 'uniform' before any pruner applied them"),
    ({"export": ["onnx", {"tensorrt": {"precision": ["fp16", "fp16"]}}]}, "lists a precision twice"),
    ({"export": ["onnx", {"openvino": {"int8": False}}, "openvino"]},
     "export[2] 'openvino' repeats export[1]: both would write the same files"),
])
def test_bad_recipes_fail_with_one_clear_message(change, message):
    with pytest.raises(LmmcError) as err:
        parse_recipe({**FULL, **change})
    assert message in str(err.value)


def test_calibration_needed_without_data():
    with pytest.raises(LmmcError, match="needs \\['calib'\\]"):
        parse_recipe({"passes": [{"wanda": {}}]})


def test_paths_inside_antgmm_distill_resolve_against_the_recipe(tmp_path):
    (tmp_path / "recipes").mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one sentence\n")
    between = {"corpus": "../corpus.txt", "checkpoint_dir": "ckpt"}
    data = {**FULL, "calibration": {**FULL["calibration"], "path": "../corpus.txt"},
            "passes": [{"antgmm": {"keep": 0.5, "distill": between, "distill_steps_per_segment": 4}}]}
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    nested = load_recipe(path).passes[0].config.distill
    assert nested == {"corpus": str(corpus), "checkpoint_dir": str(tmp_path / "recipes" / "ckpt")}
    between["corpus"] = "missing.txt"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(LmmcError, match="antgmm.distill.corpus 'missing.txt' does not exist"):
        load_recipe(path)


def test_a_list_of_corpus_files_resolves_each_against_the_recipe(tmp_path):
    (tmp_path / "recipes").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("one sentence\n")
    distill = {"corpus": ["../a.txt", str(tmp_path / "b.txt")], "steps": 1}
    data = {**FULL, "calibration": {**FULL["calibration"], "path": "../a.txt"}, "passes": [{"distill": distill}]}
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_recipe(path).passes[0].config
    assert config.corpus_paths() == [tmp_path / "a.txt", tmp_path / "b.txt"]
    distill["corpus"] = ["../a.txt", "missing.txt"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(LmmcError, match=r"distill.corpus\[1\] 'missing.txt' does not exist"):
        load_recipe(path)
    distill["corpus"] = []
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(LmmcError, match="corpus is an empty list; give at least one"):
        load_recipe(path)


def test_a_home_path_in_a_recipe_is_the_home_directory(tmp_path, monkeypatch):
    # The checkpoints went to a folder named '~' in the current directory, and '~/corpus' was "missing".
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "corpus.txt").write_text("one sentence\n")
    data = {**FULL, "calibration": {**FULL["calibration"], "path": "~/corpus.txt"},
            "passes": [{"distill": {"corpus": "~/corpus.txt", "checkpoint_dir": "~/ckpt"}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    assert recipe.calibration.path == str(tmp_path / "home" / "corpus.txt")
    assert (recipe.passes[0].config.corpus, recipe.passes[0].config.checkpoint_dir) == (
        str(tmp_path / "home" / "corpus.txt"), str(tmp_path / "home" / "ckpt"))
    # '~name' of no user is a file of that name beside the recipe, as a shell reads it (pathlib raised: exit 3)
    (tmp_path / "~corpus.txt").write_text("one sentence\n")
    path.write_text(yaml.safe_dump({**data, "calibration": {**FULL["calibration"], "path": "~corpus.txt"}}))
    assert load_recipe(path).calibration.path == str(tmp_path / "~corpus.txt")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(path, calib="~corpus.txt").calibration.path == str(tmp_path / "~corpus.txt")


def test_a_count_in_exponent_notation_is_said_to_be_text_to_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {random: true, samples: 1e1}\n")
    with pytest.raises(LmmcError, match="samples: Input should be a valid integer.* \\('1e1' is text to YAML, not a "
                                        "number; write the count in digits\\)"):
        load_recipe(recipe)


def test_a_number_with_a_leading_zero_is_decimal(tmp_path):
    recipe = tmp_path / "r.yaml"
    # YAML 1.1 reads 010 as octal eight; YAML 1.2, and whoever wrote it, as ten
    recipe.write_text("calibration: {random: true, samples: 010, eval_samples: 0o20, batch_size: 0x4, seed: 1_000}\n")
    cal = load_recipe(recipe).calibration
    assert (cal.samples, cal.eval_samples, cal.batch_size, cal.seed) == (10, 16, 4, 1000)
    recipe.write_text("calibration: {random: true, samples: 1:30}\n")  # base 60 in YAML 1.1: 90
    with pytest.raises(LmmcError, match="samples: Input should be a valid integer"):
        load_recipe(recipe)
    # so an unquoted N:M is the pattern it reads as, not the number 124 (2:4) or 64 (1:4)
    recipe.write_text("calibration: {random: true}\npasses:\n  - wanda: {nm: 2:4}\n  - sparsegpt: {nm: 1:4}\n")
    assert [str(step.config.nm) for step in load_recipe(recipe).passes] == ["2:4", "1:4"]
    # a number given where N:M belongs (a recipe built in Python from YAML 1.1's reading) is refused
    with pytest.raises(LmmcError, match='nm = 124 is a number: YAML reads an unquoted 2:4 as the base-60 number 124. '
                                        'Quote it: nm: "2:4"'):
        parse_recipe({"calibration": {"random": True}, "passes": [{"wanda": {"nm": 124}}]})


def test_yes_and_no_settings_keep_their_meaning():
    # YAML 1.1 reads an unquoted on/off as true/false: the settings spelt "on"/"off" take them back
    recipe = parse_recipe({**FULL, "export": ["onnx", {"ort": {"fuse": True}}]})
    assert recipe.export[1].config.fuse == "on"
    assert parse_recipe({**FULL, "export": ["onnx", {"ort": {"fuse": False, "fp16": True}}]}).export[1].config.fuse == "off"


def test_a_key_given_twice_is_refused_not_overridden(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {random: true, samples: 8}\npasses:\n  - wanda: {sparsity: 0.5, sparsity: 0.7}\n")
    with pytest.raises(LmmcError) as err:
        load_recipe(recipe)
    assert str(err.value) == (f"recipe '{recipe}' is not valid YAML at line 3, column 28: the key 'sparsity' appears "
                              f"twice (first 3:13); keep one")
    # a merge key brings in a mapping whose keys the explicit ones may override
    recipe.write_text("calibration: {random: true, samples: 8}\npasses:\n"
                      "  - wanda: &w {sparsity: 0.5}\n  - magnitude: {<<: *w, sparsity: 0.6}\n")
    assert [s.config.sparsity for s in load_recipe(recipe).passes] == [0.5, 0.6]
    # ... but a key twice in the merged mapping itself is a mistake, as anywhere else
    recipe.write_text("calibration:\n  <<: {samples: 32, random: true, samples: 64}\n")
    with pytest.raises(LmmcError, match="the key 'samples' appears twice \\(first 2:8\\); keep one"):
        load_recipe(recipe)


def test_a_recipe_nested_past_reading_is_one_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - wanda: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(LmmcError, match="nests lists or mappings too deeply to read"):
        load_recipe(recipe)
