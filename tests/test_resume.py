"""Resuming compiles: the work area's lock, fingerprint and saved state, and whole `lmmc compile` runs
killed with SIGKILL at a pass boundary and inside distillation, then resumed to the very bytes of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny, tiny_model

from lmmc.adapters import block_list, get_adapter, head_dim
from lmmc.artifact import Artifact, ExportRecord, PassRecord
from lmmc.errors import LmmcError
from lmmc.recipe import parse_recipe
from lmmc.resume import (INPUTS_FILE, OWNER_FILE, WorkArea, changed_inputs, describe_inputs, pass_seed,
                         work_path)
from lmmc.surgery import keep_channels_, keep_heads_

RECIPE = {
    "calibration": {"random": True, "samples": 32, "eval_samples": 32, "batch_size": 8},
    "passes": [{"antgmm": {"keep": 0.5}}, {"wanda": {"sparsity": 0.5}},
               {"distill": {"steps": 40, "batch_size": 4, "dev_samples": 4, "eval_every": 8, "lr": 3e-3,
                            "checkpoint_every": 2, "progress": False}}],
    "export": ["onnx"],
    # No latency timing: it would export the teacher in every finished run, and the runs compare outputs.
    "validate": {"max_runtime_diff": 1e-4, "latency": False, "threads": 1},
}


def inputs(tmp_path: Path, **recipe_changes) -> dict:
    return describe_inputs(str(tmp_path / "teacher"), parse_recipe({**RECIPE, **recipe_changes}))


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    return save_tiny("bert", tmp_path / "teacher")


# --- the work area ----------------------------------------------------------------------------------------

def test_a_live_compile_holds_its_area_and_a_second_one_is_refused(tmp_path, teacher):
    first = WorkArea(tmp_path / "out")
    first.claim(inputs(tmp_path), resume=False)
    owner = json.loads((work_path(tmp_path / "out") / OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["lmmc_work_area"] == 1
    (first.output / "half-written.onnx").write_bytes(b"x")
    with pytest.raises(LmmcError, match=rf"another lmmc compile \(pid {os.getpid()} on .*wait for it"):
        WorkArea(tmp_path / "out").claim(inputs(tmp_path), resume=False)
    with pytest.raises(LmmcError, match="another lmmc compile"):
        WorkArea(tmp_path / "out").claim(inputs(tmp_path), resume=True)
    with pytest.raises(LmmcError, match="another lmmc compile"):  # what a dry run checks
        WorkArea(tmp_path / "out").check_claim(inputs(tmp_path), resume=False)
    assert (first.output / "half-written.onnx").read_bytes() == b"x"  # a live run's area is never emptied
    first.release()  # a dead run's area: the lock is free, and a dry run has nothing to refuse
    WorkArea(tmp_path / "out").check_claim(inputs(tmp_path), resume=False)
    first.finish()
    assert not work_path(tmp_path / "out").exists()


def test_a_dead_runs_area_is_reported_and_emptied(tmp_path, teacher, capsys):
    dead = WorkArea(tmp_path / "out")
    dead.claim(inputs(tmp_path), resume=False)
    (dead.output / "half-written.onnx").write_bytes(b"x")
    (dead.scratch(2, "distill") / "step-000004").mkdir(parents=True)
    dead.release()  # what the kernel does for a killed process: the lock goes, the files stay

    fresh = WorkArea(tmp_path / "out")
    fresh.claim(inputs(tmp_path), resume=False)
    assert "removing" in capsys.readouterr().err
    area = work_path(tmp_path / "out")
    assert sorted(p.name for p in area.iterdir()) == [INPUTS_FILE, OWNER_FILE, "lock", "output"]
    assert list(fresh.output.iterdir()) == []
    fresh.finish()


def test_a_corpus_distilled_on_between_antgmm_stages_is_checked_too(tmp_path, teacher):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the water is cold\n")
    nested = [{"antgmm": {"keep": 0.5, "distill": {"corpus": str(corpus)}, "distill_steps_per_segment": 2}}]
    before = inputs(tmp_path, passes=nested)
    corpus.write_text("the water is warm\n")
    assert changed_inputs(before, inputs(tmp_path, passes=nested)) == [
        f"the data of passes[0].antgmm.distill.corpus ('{corpus}') changed"]


def test_each_file_of_a_corpus_list_is_checked(tmp_path, teacher):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for f in files:
        f.write_text("the water is cold\n")
    passes = [{"distill": {"corpus": [str(f) for f in files], "steps": 1}}]
    before = inputs(tmp_path, passes=passes)
    files[1].write_text("the water is warm\n")
    assert changed_inputs(before, inputs(tmp_path, passes=passes)) == [
        f"the data of passes[0].distill.corpus[1] ('{files[1]}') changed"]


def test_a_pass_added_or_removed_is_named_not_written_out(tmp_path, teacher):
    """A pass list of another length: the passes beyond the shorter list by name, not both lists with every
    default (a line of kilobytes)."""
    before = inputs(tmp_path)
    fewer = inputs(tmp_path, passes=RECIPE["passes"][:1])
    assert changed_inputs(before, fewer) == ["recipe passes[1] removed: wanda", "recipe passes[2] removed: distill"]
    assert changed_inputs(fewer, before) == ["recipe passes[1] added: wanda", "recipe passes[2] added: distill"]


def test_resume_refuses_changed_inputs_and_keeps_the_area(tmp_path, teacher):
    dead = WorkArea(tmp_path / "out")
    dead.claim(inputs(tmp_path), resume=False)
    (dead.output / "kept").write_text("1")
    dead.release()
    changed = inputs(tmp_path, passes=[{"antgmm": {"keep": 0.6}}, *RECIPE["passes"][1:]])
    with pytest.raises(LmmcError, match=r"recipe passes\[0\]\.antgmm\.keep: 0\.5 -> 0\.6.*without --resume"):
        WorkArea(tmp_path / "out").claim(changed, resume=True)
    assert (dead.output / "kept").read_text() == "1"
    # The same files named another way (relative, with a trailing slash) are the same model.
    saved = json.loads((work_path(tmp_path / "out") / INPUTS_FILE).read_text())
    other_name = describe_inputs(os.path.relpath(teacher) + "/", parse_recipe(RECIPE))
    assert other_name["model"]["ref"] != saved["model"]["ref"] and changed_inputs(saved, other_name) == []
    # The model's weights changed (same path, other bytes).
    tiny_model("vit").save_pretrained(tmp_path / "other")
    (teacher / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    assert changed_inputs(json.loads((work_path(tmp_path / "out") / INPUTS_FILE).read_text()),
                          inputs(tmp_path)) == [f"the files of model '{teacher}' changed"]
    # The same inputs resume and keep the output built so far.
    again = WorkArea(tmp_path / "out")
    again.claim(json.loads((work_path(tmp_path / "out") / INPUTS_FILE).read_text()), resume=True)
    assert (again.output / "kept").read_text() == "1"
    again.finish()


def test_a_work_area_of_other_lmmc_code_is_not_resumed(tmp_path, teacher, monkeypatch):
    """The version number stays the same across builds: a work area an older build left was resumed as its
    own, its passes' results (a bug since fixed) kept in silence, and new defaults named as recipe edits."""
    import lmmc.resume

    dead = WorkArea(tmp_path / "out")
    dead.claim(inputs(tmp_path), resume=False)
    (dead.output / "kept").write_text("1")
    dead.release()
    monkeypatch.setattr(lmmc.resume, "code_digest", lambda: "0" * 64)
    changed = inputs(tmp_path, passes=[{"antgmm": {"keep": 0.6}}, *RECIPE["passes"][1:]])
    with pytest.raises(LmmcError) as err:
        WorkArea(tmp_path / "out").claim(changed, resume=True)
    assert "interrupted under another build of lmmc (version 0.1.0, its code changed since)" in str(err.value)
    assert "Run without --resume" in str(err.value) and "antgmm" not in str(err.value)
    assert (dead.output / "kept").read_text() == "1"


def test_calibration_file_bytes_are_part_of_the_fingerprint(tmp_path, teacher):
    data = tmp_path / "calib.txt"
    data.write_text("one sentence\nanother sentence\n")
    recipe = {**RECIPE, "calibration": {"path": str(data), "samples": 1, "eval_samples": 2}}
    before = describe_inputs(str(teacher), parse_recipe(recipe))
    data.write_text("one sentence\nanother sentence, edited\n")
    after = describe_inputs(str(teacher), parse_recipe(recipe))
    assert changed_inputs(before, after) == [f"the data of calibration ('{data}') changed"]


def test_images_a_jsonl_names_are_part_of_the_fingerprint(tmp_path, teacher):
    """A .jsonl holds image paths, not images: an image changed in place must still stop --resume, for the
    calibration data and for a distillation corpus alike."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"picture {i}", "image": f"img/{i}.png"}) for i in range(3)))
    distill = {**RECIPE["passes"][2]["distill"], "corpus": str(data)}
    recipe = parse_recipe({**RECIPE, "calibration": {"path": str(data), "samples": 1, "eval_samples": 2},
                           "passes": [*RECIPE["passes"][:2], {"distill": distill}]})
    dead = WorkArea(tmp_path / "out")
    dead.claim(describe_inputs(str(teacher), recipe), resume=False)
    dead.release()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "img" / "1.png")  # same name, other pixels
    changes = [f"the data of calibration ('{data}') changed", f"the data of passes[2].distill.corpus ('{data}') changed"]
    assert changed_inputs(json.loads((work_path(tmp_path / "out") / INPUTS_FILE).read_text()),
                          describe_inputs(str(teacher), recipe)) == changes
    with pytest.raises(LmmcError) as err:
        WorkArea(tmp_path / "out").claim(describe_inputs(str(teacher), recipe), resume=True)
    assert str(err.value).startswith(f"cannot resume the compile to '{tmp_path / 'out'}': since it was interrupted, "
                                     f"{'; '.join(changes)}. Restore what changed")


def test_resume_without_a_work_area_says_there_is_nothing_to_resume(tmp_path, teacher):
    with pytest.raises(LmmcError, match="nothing to resume.*without --resume"):
        WorkArea(tmp_path / "out").claim(inputs(tmp_path), resume=True)
    assert not work_path(tmp_path / "out").exists()


def test_a_dry_run_with_resume_refuses_what_the_resume_would(tmp_path, teacher):
    from click.testing import CliRunner

    from lmmc.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    args = ["compile", str(teacher), "-r", str(recipe), "-o", str(tmp_path / "out"), "--resume", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--resume: nothing to resume for --out" in result.output, result.output
    # the run refused it too, leaving the folders it had made for --out
    deep = tmp_path / "new" / "deeper" / "out"
    result = CliRunner().invoke(main, [*args[:5], str(deep), "--resume"])
    assert result.exit_code == 2 and "--resume: nothing to resume for --out" in result.output, result.output
    assert not (tmp_path / "new").exists()
    dead = WorkArea(tmp_path / "out")
    dead.claim(inputs(tmp_path), resume=False)
    dead.release()
    assert CliRunner().invoke(main, args).exit_code == 0
    recipe.write_text(yaml.safe_dump({**RECIPE, "passes": [{"antgmm": {"keep": 0.6}}, *RECIPE["passes"][1:]]}))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "recipe passes[0].antgmm.keep: 0.5 -> 0.6" in result.output, result.output


def test_resume_from_a_model_directory_that_moved_says_so(tmp_path, teacher):
    """The interrupted run read the teacher from a folder that has moved since: said as such, with the fix, not
    as a hub id missing from the cache; from its new path the compile resumes (the model is known by its files)."""
    from click.testing import CliRunner

    from lmmc.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    dead = WorkArea(tmp_path / "out")
    dead.claim(inputs(tmp_path), resume=False)
    dead.release()
    teacher.rename(tmp_path / "moved")
    args = ["-r", str(recipe), "-o", str(tmp_path / "out"), "--resume", "--dry-run"]
    result = CliRunner().invoke(main, ["compile", str(teacher), *args])
    assert result.exit_code == 2
    assert (f"--resume: the model directory '{teacher}' that the interrupted compile to '{tmp_path / 'out'}' read "
            f"is not there any more; if it moved, give its new path") in " ".join(result.output.split())
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "moved"), *args])
    assert result.exit_code == 0, result.output


def test_resume_after_a_stop_between_placing_the_output_and_removing_the_area(tmp_path, teacher, monkeypatch):
    """The output was complete in --out; --resume restored a state whose exports had moved there with it
    and blamed the user's input ("artifact ... does not exist"), with --force too."""
    from click.testing import CliRunner

    from lmmc.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "passes": [{"magnitude": {"sparsity": 0.5}}]}))
    out = tmp_path / "out"
    args = ["compile", str(teacher), "-r", str(recipe), "-o", str(out)]
    for force in ([], ["--force"]):
        with monkeypatch.context() as m:  # stopped where the area is removed: it stays, unlocked
            m.setattr(WorkArea, "finish", WorkArea.release)
            assert CliRunner().invoke(main, [*args, *force]).exit_code == 0
        assert (out / "report.json").is_file() and WorkArea(out).latest_state() is not None
        files = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
        if force:  # the dry run passed it, and the run then refused it
            dry = CliRunner().invoke(main, [*args, "--resume", "--dry-run", *force])
            assert dry.exit_code == 2 and "nothing is left to resume (run without --dry-run to have the work area " \
                                          "removed)" in " ".join(dry.output.split()), dry.output
            assert WorkArea(out).latest_state() is not None
        result = CliRunner().invoke(main, [*args, "--resume", *force])
        assert result.exit_code == 2, result.output
        assert f"error: --resume: the compile to '{out}' had finished and was stopped while removing its work " \
               f"area '{work_path(out)}' (now removed): its output is complete in '{out}'. Nothing is left to " \
               f"resume" in " ".join(result.output.split()), result.output
        assert not work_path(out).exists()
        assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == files
    # a plain run over that state says the area it removes was a finished compile's, not one to resume
    with monkeypatch.context() as m:
        m.setattr(WorkArea, "finish", WorkArea.release)
        assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
    result = CliRunner().invoke(main, [*args, "--force"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"lmmc: removing '{work_path(out)}', left by a compile (pid {os.getpid()} on " in said
    assert "stopped after it had put its output in place" in said and "--resume" not in said


def test_a_folder_by_the_areas_name_that_lmmc_did_not_make_is_left_alone(tmp_path, teacher):
    area = work_path(tmp_path / "out")
    area.mkdir()
    (area / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(LmmcError, match="not made by lmmc"):
            WorkArea(tmp_path / "out").claim(inputs(tmp_path), resume=resume)
    assert (area / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("link", ["output", "lock", f".{INPUTS_FILE}.tmp", "output/onnx"])
def test_a_work_area_holding_a_link_is_left_alone(tmp_path, teacher, link):
    """A dead run's area, planted with a link where lmmc writes: --resume wrote the whole output through an
    'output' link into the folder it named, and the lock was created through a 'lock' link even without it."""
    dead = WorkArea(tmp_path / "out")
    dead.claim(inputs(tmp_path), resume=False)
    dead.release()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("mine")
    area = work_path(tmp_path / "out")
    if (area / link).is_dir():
        (area / link).rmdir()
    else:
        (area / link).unlink(missing_ok=True)
    (area / link).symlink_to(elsewhere if link.startswith("output") else elsewhere / "target")
    for resume in (False, True):
        with pytest.raises(LmmcError, match=rf"holds a symbolic link \('{link}'\), which lmmc never makes"):
            WorkArea(tmp_path / "out").claim(inputs(tmp_path), resume=resume)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mine.txt"] and (area / link).is_symlink()


def test_only_rank_0_writes(tmp_path, teacher, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    area = WorkArea(tmp_path / "out")
    area.claim(inputs(tmp_path), resume=False)
    art = Artifact("m", get_adapter("bert"), tiny_model("bert"), tiny_model("bert"))
    area.save(art, 1, 0.0)
    assert not work_path(tmp_path / "out").exists()
    assert area.output.is_dir() and not area.output.is_relative_to(tmp_path)
    area.release()
    assert not area.output.exists()


def test_pass_seeds_depend_on_the_recipe_seed_and_the_pass_only():
    seeds = {pass_seed(s, i) for s in range(3) for i in range(5)}
    assert len(seeds) == 15 and all(0 <= s < 2 ** 63 for s in seeds)
    assert pass_seed(1, 2) == pass_seed(1, 2)


def test_saved_state_reloads_a_shrunk_student_masks_and_records_exactly(tmp_path, teacher):
    model = tiny_model("bert")
    adapter = get_adapter("bert")
    tower = adapter.towers[0]
    _, blocks = block_list(model, tower)
    keep_heads_(blocks[0], tower, head_dim(model, tower), [0, 2])
    keep_channels_(blocks[1], tower, list(range(0, 64, 3)))
    weight = blocks[1].intermediate.dense.weight
    masks = {"encoder.layer.1.intermediate.dense.weight": torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5}
    area = WorkArea(tmp_path / "out")
    area.claim(inputs(tmp_path), resume=False)
    art = Artifact("m", adapter, tiny_model("bert"), model, workdir=area.output, masks=masks,
                   allocation={"encoder.layer.0.attention.self.query.weight": 0.123456789},
                   records=[PassRecord("antgmm", {"keep": 0.5}, 1.5, {"kept": [1, 2]})],
                   onnx={"text": area.output / "onnx" / "text.onnx"},
                   exports=[ExportRecord("text", "onnxruntime", "int8", "static", area.output / "ort" / "t.onnx",
                                         source="fused")])
    area.save(art, 1, 3.25)
    (area.scratch(1, "distill") / "step-000002").mkdir(parents=True)
    area.save(art, 2, 4.5)
    names = sorted(p.name for p in work_path(tmp_path / "out").iterdir())
    assert names == [INPUTS_FILE, OWNER_FILE, "lock", "output", "state-02"]  # older state and scratch gone

    back = Artifact("m", adapter, tiny_model("bert"), tiny_model("bert"))
    assert area.restore(back) == (2, 4.5)
    assert back.student.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(back.student.state_dict()[name], value), name
    assert torch.equal(back.masks[next(iter(masks))], next(iter(masks.values())))
    assert back.allocation == art.allocation and back.records == art.records
    assert back.onnx == art.onnx and back.exports == art.exports
    state = work_path(tmp_path / "out") / "state-02" / "state.json"
    kept = state.read_text()
    state.write_text(kept.replace('"onnx/text.onnx"', '"../../elsewhere/text.onnx"'))  # a graph outside the area
    with pytest.raises(LmmcError, match="damaged \\(ValueError: '../../elsewhere/text.onnx' lies outside"):
        area.restore(Artifact("m", adapter, tiny_model("bert"), tiny_model("bert")))
    state.write_text(kept)
    saved = work_path(tmp_path / "out") / "state-02" / "masks.safetensors"
    whole = saved.read_bytes()
    saved.unlink()  # resumed as a dense student, exit 0, where the recipe asked for 50 % sparsity
    with pytest.raises(LmmcError, match="the saved state '.*state-02' is damaged \\(FileNotFoundError"):
        area.restore(Artifact("m", adapter, tiny_model("bert"), tiny_model("bert")))
    saved.write_bytes(whole[:40])   # cut short
    with pytest.raises(LmmcError, match="the saved state '.*state-02' is damaged \\(SafetensorError"):
        area.restore(Artifact("m", adapter, tiny_model("bert"), tiny_model("bert")))
    area.finish()


def test_an_area_whose_empty_output_folder_went_missing_is_resumed_not_removed(tmp_path):
    """A saved state without the output folder read as a compile stopped after placing its output: --resume
    removed its finished passes, saying the output had been moved away."""
    area = WorkArea(tmp_path / "out")
    area.claim(inputs(tmp_path), resume=False)
    area.save(Artifact("m", get_adapter("bert"), tiny_model("bert"), tiny_model("bert")), 1, 1.0)
    area.release()
    area.output.rmdir()  # empty before the first export: a temp cleaner's prey
    assert not area.left_after_placing()
    area.placing()
    assert area.left_after_placing()  # the mark, and the output moved away with its folder


# --- whole compiles, killed and resumed ----------------------------------------------------------------

LMMC = [sys.executable, "-c", "import sys; from lmmc.cli import main; sys.exit(main())"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def compile_args(model: Path, recipe: Path, out: Path, *extra: str) -> list[str]:
    return [*LMMC, "compile", str(model), "--recipe", str(recipe), "--out", str(out), "--device", "cpu", *extra]


def run_lmmc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600, env=ENV)


def kill_when(args: list[str], ready, what: str, sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Start a compile and send it `sig` as soon as `ready()` holds (polled every 5 ms); return its exit
    status and stderr."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"the compile ended before {what}: {proc.stderr.read()[-3000:]}")
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    return proc.returncode, err


def states(area: Path) -> list[str]:
    return sorted(p.name for p in area.glob("state-*"))


def assert_same_output(a: Path, b: Path) -> None:
    def listing(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in [*(root / "student").rglob("*"), *(root / "onnx").rglob("*")]
                      if p.is_file())

    files = listing(a)
    assert files == listing(b)
    assert any(f.suffix == ".onnx" for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_sigkilled_compiles_resume_to_the_bytes_of_an_uninterrupted_run(tmp_path, teacher):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    plain, resumed = tmp_path / "plain", tmp_path / "resumed"

    # A compile stopped by SIGTERM after its first pass keeps its work and says how to resume.
    code, err = kill_when(compile_args(teacher, recipe, plain), lambda: bool(states(work_path(plain))),
                          "its first pass finished", signal.SIGTERM)
    assert code == 130 and "--resume" in err, (code, err[-3000:])
    # A kill can land between writing a new state and deleting the one before; the newest counts.
    kept = states(work_path(plain))
    # --resume against a changed recipe is refused, naming the change.
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**RECIPE, "passes": [{"antgmm": {"keep": 0.6}}, *RECIPE["passes"][1:]]}))
    refused = run_lmmc(*compile_args(teacher, changed, plain, "--resume"))
    assert refused.returncode == 2
    assert "passes[0].antgmm.keep: 0.5 -> 0.6" in refused.stderr and "without --resume" in refused.stderr
    assert states(work_path(plain)) == kept
    # Without --resume the stopped run's area is reported and removed, and the compile runs from the start.
    done = run_lmmc(*compile_args(teacher, recipe, plain))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removing" in done.stderr and f"{int(kept[-1][len('state-'):])} pass(es) finished" in done.stderr
    assert not work_path(plain).exists()
    report = json.loads((plain / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["antgmm", "wanda", "distill", "onnx", "validate"]
    assert report["passes"][2]["metrics"]["resumed_from"] is None
    assert "checkpoint" not in report["passes"][2]["metrics"]  # it was in the work area, now removed

    # SIGKILLed at the boundary after wanda (pass 2 of 5), resumed, SIGKILLed inside distillation, resumed.
    code, _ = kill_when(compile_args(teacher, recipe, resumed), lambda: (work_path(resumed) / "state-02").is_dir(),
                        "wanda finished")
    assert code == -signal.SIGKILL and states(work_path(resumed))[-1] == "state-02"
    checkpoints = work_path(resumed) / "pass-02-distill"
    code, _ = kill_when(compile_args(teacher, recipe, resumed, "--resume"),
                        lambda: any(checkpoints.glob("*/step-000004")), "distillation saved step 4")
    assert code == -signal.SIGKILL and states(work_path(resumed))[-1] == "state-02"
    assert not any(checkpoints.glob("*/final"))
    last = run_lmmc(*compile_args(teacher, recipe, resumed, "--resume"))
    assert last.returncode == 0, last.stderr[-3000:]
    assert not work_path(resumed).exists()
    final = json.loads((resumed / "report.json").read_text())
    distill = final["passes"][2]["metrics"]
    assert isinstance(distill["resumed_from"], int) and distill["resumed_from"] >= 4
    # The killed process's share of the pass counts in the pass's seconds and in the compile's.
    assert final["passes"][2]["seconds"] > distill["seconds_before_resume"] > 0
    assert final["seconds"] >= sum(p["seconds"] for p in final["passes"])
    assert [c["score"] for c in distill["curve"]] == [c["score"] for c in report["passes"][2]["metrics"]["curve"]]
    assert_same_output(plain, resumed)


def test_a_compile_stopped_inside_its_first_pass_with_checkpoints_says_to_resume(tmp_path, teacher):
    """No pass had finished, but the distillation's checkpoints had: the advice to run without --resume
    would have thrown them away."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "passes": [{"distill": {**RECIPE["passes"][2]["distill"],
                                                                         "steps": 100000}}]}))
    out = tmp_path / "out"
    code, err = kill_when(compile_args(teacher, recipe, out),
                          lambda: any(work_path(out).glob("pass-*/**/step-*/state.json")), "a checkpoint", signal.SIGTERM)
    assert code == 130 and states(work_path(out)) == [], (code, err[-3000:])
    assert f"no pass finished, and the running one kept checkpoints in '{work_path(out)}': run the same command " \
           f"with --resume" in " ".join(err.split())
    assert "without --resume" not in err


def test_an_interrupt_a_finaliser_swallowed_stops_the_distillation_at_its_next_step(tmp_path, teacher,
                                                                                     monkeypatch):
    """A KeyboardInterrupt raised inside a __del__ is lost; the distillation ran on to its last step."""
    from click.testing import CliRunner

    from lmmc.cli import main
    from lmmc.distiller import Trainer

    class Finalised:
        def __del__(self):  # what SIGTERM's delivery runs, inside a finaliser
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)

    real, steps = Trainer.train_step, []

    def step_then_lose_an_interrupt(self):
        steps.append(self.step)
        if len(steps) == 3:
            Finalised()  # collected at once: its KeyboardInterrupt is ignored
        return real(self)
    monkeypatch.setattr(Trainer, "train_step", step_then_lose_an_interrupt)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "passes": [RECIPE["passes"][2]]}))
    result = CliRunner().invoke(main, ["compile", str(teacher), "-r", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 130 and len(steps) == 3, (len(steps), result.output)
    assert result.output.splitlines()[-1] == "interrupted by SIGTERM; the output directory was not written"


def killed_at_second_rename(into: str, before: str = "") -> str:
    """A compile (python -c) that SIGKILLs itself once a second entry is renamed into a folder for which `into`
    (an expression of `target`, a pathlib.Path) holds; `before` runs first."""
    return ("import os, pathlib, signal, sys\n" + before +
            "real, moved = pathlib.Path.rename, []\n"
            "def rename(self, target):\n"
            "    done = real(self, target)\n"
            f"    if {into.replace('target', 'pathlib.Path(target)')}:\n"
            "        moved.append(target)\n"
            "        if len(moved) == 2:\n"
            "            os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return done\n"
            "pathlib.Path.rename = rename\n"
            "from lmmc.cli import main\n"
            "sys.exit(main())\n")


def output_files(root: Path) -> dict:
    """Each file of an output with its digest, but those that record the run (timings, the list of files)."""
    from lmmc.resume import hash_files

    return {p.relative_to(root): hash_files(p) for p in root.rglob("*") if p.is_file() and
            p.name not in ("report.json", "report.html", ".lmmc-files.json")}


@pytest.mark.parametrize("then", [["--resume"], ["--force"]])
def test_a_kill_while_filling_an_empty_out_is_finished_by_the_next_run(tmp_path, teacher, then):
    """An empty --out is filled entry by entry; SIGKILL in the middle left it half filled, and both --resume and
    --force refused it as a folder lmmc had not written."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "passes": [{"magnitude": {"sparsity": 0.5}}]}))
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert run_lmmc(*compile_args(teacher, recipe, whole)).returncode == 0
    out.mkdir()
    killed = killed_at_second_rename(f"target.parent == pathlib.Path({str(out)!r})")
    args = compile_args(teacher, recipe, out, "--force")
    result = run_lmmc(sys.executable, "-c", killed, *args[3:])
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert 0 < len(list(out.iterdir())) < len(list(whole.iterdir()))
    result = run_lmmc(*compile_args(teacher, recipe, out, *then))
    assert f"lmmc: finished putting in '{out}' the output of a compile that was stopped while it moved there" \
        in result.stderr
    if then == ["--resume"]:
        assert result.returncode == 2 and "Nothing is left to resume" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr
    assert output_files(out) == output_files(whole) and not work_path(out).exists()


def test_a_kill_while_moving_an_earlier_output_aside_in_a_volume_is_finished_by_the_next_run(tmp_path, teacher,
                                                                                           monkeypatch):
    """A volume --out (a mount point, which renames cannot cross) takes a copy of the new output, then moves the
    earlier one's entries aside one by one; SIGKILL there left the two mixed."""
    from click.testing import CliRunner

    import lmmc.compile
    from lmmc.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "passes": [{"magnitude": {"sparsity": 0.5}}]}))
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert run_lmmc(*compile_args(teacher, recipe, whole)).returncode == 0
    other = tmp_path / "other.yaml"  # the earlier output: another sparsity
    other.write_text(yaml.safe_dump({**RECIPE, "passes": [{"magnitude": {"sparsity": 0.3}}]}))
    assert run_lmmc(*compile_args(teacher, other, out)).returncode == 0
    volume = f"import lmmc.compile\nlmmc.compile.is_mount = lambda p: pathlib.Path(p) == pathlib.Path({str(out)!r})\n"
    killed = killed_at_second_rename("target.parent.name.startswith('.lmmc-replaced-')", volume)
    args = compile_args(teacher, recipe, out, "--force")
    result = run_lmmc(sys.executable, "-c", killed, *args[3:])
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert any(p.name.startswith(".lmmc-incoming-") for p in out.iterdir())
    monkeypatch.setattr(lmmc.compile, "is_mount", lambda p: Path(p) == out)
    result = CliRunner().invoke(main, [*args[3:], "--resume"])
    assert result.exit_code == 2 and "finished putting in" in result.output, result.output
    assert "Nothing is left to resume" in result.output
    assert output_files(out) == output_files(whole) and not work_path(out).exists()


def test_a_kill_between_moving_the_earlier_output_aside_and_placing_the_new_one_loses_neither(tmp_path, teacher,
                                                                                              monkeypatch):
    """SIGKILL there left --out missing, the earlier output hidden in the work area, and the next plain run
    removed it with the rest of the area without a word: had that run failed too, the user had nothing."""
    from click.testing import CliRunner

    from lmmc.cli import main
    from lmmc.resume import REPLACED_DIR, hash_files

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "passes": [{"magnitude": {"sparsity": 0.5}}]}))
    out = tmp_path / "out"
    assert run_lmmc(*compile_args(teacher, recipe, out)).returncode == 0
    earlier = {p.relative_to(out): hash_files(p) for p in out.rglob("*") if p.is_file()}
    killed = ("import os, pathlib, signal, sys\n"
              "real = pathlib.Path.rename\n"
              "def rename(self, target):\n"
              "    moved = real(self, target)\n"
              f"    if pathlib.Path(target).name == {REPLACED_DIR!r}:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return moved\n"
              "pathlib.Path.rename = rename\n"
              "from lmmc.cli import main\n"
              "sys.exit(main())\n")
    args = compile_args(teacher, recipe, out, "--force")
    result = run_lmmc(sys.executable, "-c", killed, *args[3:])
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists() and (work_path(out) / REPLACED_DIR).is_dir()
    # the next plain run puts the earlier output back before anything else; here it then fails on its input

    def unreadable(*args, **kwargs):
        raise LmmcError("the teacher's weights cannot be read")
    monkeypatch.setattr("lmmc.compile.load_teacher", unreadable)
    result = CliRunner().invoke(main, args[3:])
    assert result.exit_code == 2, result.output
    assert f"lmmc: put the earlier output back at '{out}'" in result.output
    assert {p.relative_to(out): hash_files(p) for p in out.rglob("*") if p.is_file()} == earlier
    assert not work_path(out).exists()
