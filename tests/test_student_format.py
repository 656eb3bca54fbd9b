"""The student format: shrunk students reload bit-identically, export to ONNX, and never load silently wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_model

import lmmc
from lmmc.adapters import TowerModule, block_list, example_inputs, get_adapter, head_dim, supported_model_types
from lmmc.errors import LmmcError
from lmmc.export.onnx import export_tower
from lmmc.export.validate import ort_session
from lmmc.modelio import save_student
from lmmc.student import SHRUNK_WEIGHTS, STANDARD_WEIGHTS, read_structure
from lmmc.surgery import keep_blocks_, keep_channels_, keep_heads_


def shrink(model: torch.nn.Module, seed: int = 1) -> dict[str, tuple[list[int], list[int]]]:
    """Give every layer of every tower its own head count and FFN width (random units kept)."""
    adapter = get_adapter(model.config.model_type)
    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    for t, tower in enumerate(adapter.towers):
        _, blocks = block_list(model, tower)
        heads, widths = [], []
        for i, block in enumerate(blocks):
            n_heads = 1 + (i + t) % 3  # 1..3 of 4, differing by layer and tower
            width = 17 + 11 * i + 5 * t
            keep_heads_(block, tower, head_dim(model, tower), torch.randperm(4, generator=gen)[:n_heads].tolist())
            keep_channels_(block, tower, torch.randperm(64, generator=gen)[:width].tolist())
            heads.append(n_heads)
            widths.append(width)
        shapes[tower.name] = (heads, widths)
    return shapes


def outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    adapter = get_adapter(model.config.model_type)
    out = []
    with torch.no_grad():
        for tower in adapter.towers:
            out.extend(TowerModule(model, tower)(*example_inputs(model, tower)))
    return out


def test_round_trip_is_bit_identical_with_different_shapes_in_every_layer(tiny_kind: str, tmp_path: Path) -> None:
    model = tiny_model(tiny_kind)
    shapes = shrink(model)
    save_student(model, {}, tmp_path, {"teacher": "tiny"})

    record = json.loads((tmp_path / "lmmc.json").read_text())["structure"]
    assert record["weights"] == SHRUNK_WEIGHTS
    assert (tmp_path / SHRUNK_WEIGHTS).is_file() and not (tmp_path / STANDARD_WEIGHTS).exists()
    # readable as the config beside it is (safetensors alone would write it owner-only)
    assert (tmp_path / SHRUNK_WEIGHTS).stat().st_mode & 0o777 == (tmp_path / "config.json").stat().st_mode & 0o777
    for tower, (heads, widths) in shapes.items():
        assert record["towers"][tower]["heads"] == heads
        assert record["towers"][tower]["ffn"] == widths

    loaded = lmmc.load_student(tmp_path)
    assert type(loaded) is type(model)
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_depth_pruned_student_stays_standard_and_from_pretrained_loads_it_exactly(tmp_path: Path) -> None:
    model = tiny_model("clip")
    adapter = get_adapter("clip")
    keep_blocks_(model, adapter.tower("vision"), [1])
    save_student(model, {}, tmp_path, {})

    record = json.loads((tmp_path / "lmmc.json").read_text())["structure"]
    assert record["weights"] == STANDARD_WEIGHTS
    assert record["towers"]["vision"]["teacher_layers"] == [1]
    assert record["towers"]["text"]["teacher_layers"] == [0, 1]
    plain = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    loaded = lmmc.load_student(tmp_path)
    for a, b, c in zip(outputs(model), outputs(plain), outputs(loaded)):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("ignore_mismatched_sizes", [False, True])
def test_plain_from_pretrained_on_a_shrunk_student_fails_loudly(tmp_path: Path, ignore_mismatched_sizes: bool) -> None:
    model = tiny_model("bert")
    shrink(model)
    save_student(model, {}, tmp_path, {})
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.BertModel.from_pretrained(tmp_path, ignore_mismatched_sizes=ignore_mismatched_sizes)
    # the folder says what loads it, and the loader it names does
    assert 'model = lmmc.load_student("path/to/this/folder")' in (tmp_path / "README.md").read_text()
    for a, b in zip(outputs(model), outputs(lmmc.load_student(tmp_path))):
        assert torch.equal(a, b)


def test_the_loading_note_goes_with_shrunk_students_only_and_over_no_card(tmp_path: Path) -> None:
    save_student(tiny_model("bert"), {}, tmp_path / "plain", {})
    assert not (tmp_path / "plain" / "README.md").exists()  # from_pretrained loads it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my own card")
    model = tiny_model("bert")
    shrink(model)
    save_student(model, {}, tmp_path / "mine", {})
    assert (tmp_path / "mine" / "README.md").read_text() == "my own card"


def test_onnx_export_of_shrunk_students_matches_pytorch(tiny_kind: str, tmp_path: Path) -> None:
    model = tiny_model(tiny_kind)
    shrink(model, seed=2)
    adapter = get_adapter(model.config.model_type)
    for tower in adapter.towers:
        path = tmp_path / f"{tower.name}.onnx"
        export_tower(model, tower, path)
        # Shapes other than the tracing ones, so the dynamic axes are exercised too.
        inputs = example_inputs(model, tower, batch=3, seq=11)
        with torch.no_grad():
            ref = [t.numpy() for t in TowerModule(model, tower)(*inputs)]
        session = ort_session(path, threads=1)
        got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            assert np.abs(a - b).max() <= 1e-4


def test_structure_record_is_read_from_the_weights() -> None:
    model = tiny_model("siglip")
    shapes = shrink(model, seed=3)
    structure = read_structure(model, get_adapter("siglip"))
    for tower, (heads, widths) in shapes.items():
        assert structure[tower]["heads"] == heads and structure[tower]["ffn"] == widths
        assert structure[tower]["layers"] == 2 and structure[tower]["head_dim"] == 8


def test_a_record_that_does_not_match_the_weights_is_refused(tmp_path: Path) -> None:
    model = tiny_model("bert")
    shrink(model)
    save_student(model, {}, tmp_path, {})
    meta = json.loads((tmp_path / "lmmc.json").read_text())
    meta["structure"]["towers"]["text"]["ffn"][0] += 1
    (tmp_path / "lmmc.json").write_text(json.dumps(meta))
    with pytest.raises(LmmcError, match="do not match the shapes recorded"):
        lmmc.load_student(tmp_path)



def _damage(path: Path, name: str, change) -> None:
    if name == "lmmc.json" and not isinstance(change, (str, bytes)):
        meta = json.loads((path / name).read_text())
        change(meta["structure"])
        change = json.dumps(meta)
    (path / name).write_bytes(change.encode() if isinstance(change, str) else change)


@pytest.mark.parametrize("shrunk", [True, False])
@pytest.mark.parametrize("name, change, message", [
    ("weights", lambda data: data[:1000], "cannot be read \\(Error while deserializing header.*truncated or damaged"),
    ("weights", lambda data: b"", "cannot be read .* truncated or damaged"),
    ("config.json", "{", "config.json' cannot be read as a model config .* compile it again"),
    ("lmmc.json", "{", "lmmc.json' is not valid JSON"),
    ("lmmc.json", "[]", "lmmc.json' is not of the shape lmmc writes"),
    ("lmmc.json", '{"structure": "x"}', "lmmc.json' is not of the shape lmmc writes"),
    ("lmmc.json", lambda s: s.update({"class": "GPT2Model"}), "names the class 'GPT2Model', which is no transformers "
                                                             "model of this bert config"),
    ("lmmc.json", lambda s: s.update({"weights": "../elsewhere/student.safetensors"}),
     "names the weights file '../elsewhere/student.safetensors', which is not a file name inside the student"),
    ("lmmc.json", lambda s: s.update({"weights": 5}), "names the weights file 5, which is not a file name"),
])
def test_a_damaged_student_file_is_one_clear_error(tmp_path: Path, shrunk: bool, name: str, change, message: str) -> None:
    model = tiny_model("bert")
    if shrunk:
        shrink(model)
    save_student(model, {}, tmp_path, {})
    if name == "weights":
        name = SHRUNK_WEIGHTS if shrunk else STANDARD_WEIGHTS
        change = change((tmp_path / name).read_bytes())
    _damage(tmp_path, name, change)
    with pytest.raises(LmmcError, match=message):
        lmmc.load_student(tmp_path)


@pytest.mark.parametrize("shrunk", [True, False])
def test_a_student_with_nan_weights_is_refused(tmp_path: Path, shrunk: bool) -> None:
    model = tiny_model("bert")
    if shrunk:
        shrink(model)
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 3] = float("nan")
    save_student(model, {}, tmp_path, {})
    with pytest.raises(LmmcError, match=r"student in .* has 1 NaN/Inf value\(s\) in 'encoder.layer.1.output.dense."
                                        r"weight'; the file is damaged"):
        lmmc.load_student(tmp_path)


def test_a_shrunk_student_without_its_record_says_so(tmp_path: Path) -> None:
    model = tiny_model("bert")
    shrink(model)
    save_student(model, {}, tmp_path, {})
    (tmp_path / "lmmc.json").unlink()
    with pytest.raises(LmmcError, match="has no model.safetensors, and no lmmc.json naming another weights file: "
                                        "the student is incomplete; copy the whole output of the compile again"):
        lmmc.load_student(tmp_path)

def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(LmmcError) as err:
        lmmc.load_student(tmp_path)
    assert "gpt2" in str(err.value)
    assert all(t in str(err.value) for t in supported_model_types())


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LmmcError, match="no config.json"):
        lmmc.load_student(tmp_path / "nope")


def test_the_students_tokenizer_file_cuts_and_pads_as_the_teachers(minilm: Path, tmp_path: Path) -> None:
    """Each call of a fast tokenizer sets its truncation and padding; the calibration's calls cut at its
    max_length, which the saved tokenizer.json then carried to every reader of the file (a Rust or JS server)."""
    from lmmc.modelio import load_teacher

    model, _, pre = load_teacher(str(minilm))
    pre["tokenizer"](["the water is cold", "a"], truncation=True, max_length=3, padding=True)
    save_student(model, pre, tmp_path / "student", {})
    theirs, ours = (json.loads((p / "tokenizer.json").read_text()) for p in (minilm, tmp_path / "student"))
    for key in ("truncation", "padding"):  # this tokenizers version also writes the default direction
        assert {k: ours[key][k] for k in theirs[key]} == theirs[key], key
    assert ours["truncation"]["max_length"] == 128 and ours["padding"]["strategy"] == {"Fixed": 128}


def test_a_generative_students_tokenizer_file_cuts_and_pads_as_the_teachers(tmp_path: Path) -> None:
    """A LLaVA processor calls its tokenizer as it loads, which cleared the settings before they were kept."""
    from conftest import save_tiny_llava

    from lmmc.modelio import load_teacher

    teacher = save_tiny_llava(tmp_path / "teacher")
    settings = json.loads((teacher / "tokenizer.json").read_text())
    settings["truncation"] = {"direction": "Left", "max_length": 40, "strategy": "LongestFirst", "stride": 0}
    settings["padding"] = {"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}
    (teacher / "tokenizer.json").write_text(json.dumps(settings))
    model, _, pre = load_teacher(str(teacher))
    save_student(model, pre, tmp_path / "student", {})
    ours = json.loads((tmp_path / "student" / "tokenizer.json").read_text())
    assert (ours["truncation"], ours["padding"]) == (settings["truncation"], settings["padding"])


def test_the_students_tokenizer_files_do_not_depend_on_the_hub_being_offline(tmp_path: Path, monkeypatch) -> None:
    """Loaded under HF_HUB_OFFLINE, the tokenizer kept local_files_only among its settings, which transformers
    saves: the student's tokenizer_config.json differed between an offline compile and an online one."""
    from conftest import save_tiny

    from lmmc.modelio import load_preprocessor

    teacher = save_tiny("bert", tmp_path / "teacher")
    files = {}
    for offline in ("1", "0"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline == "1")
        model = transformers.AutoModel.from_pretrained(teacher)
        save_student(model, load_preprocessor(str(teacher)), tmp_path / offline, {})
        files[offline] = json.loads((tmp_path / offline / "tokenizer_config.json").read_text())
    assert "local_files_only" not in files["1"] and files["1"] == files["0"]
