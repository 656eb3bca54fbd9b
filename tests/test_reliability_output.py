"""What a compile may replace at --out: only an earlier lmmc output holding nothing lmmc does not write, and
only if it is still that when the compile ends. A directory that appears at --out while a compile runs (or
an earlier output swapped for someone else's files) is left untouched, and the finished work stays
resumable."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import lmmc.compile
from lmmc.cli import main
from lmmc.report_html import render
from lmmc.resume import work_path
from tests.conftest import save_tiny

RECIPE = {"calibration": {"random": True, "samples": 8, "eval_samples": 4, "batch_size": 4},
          "passes": [{"magnitude": {"sparsity": 0.5}}], "export": [], "validate": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny teacher, the recipe, and an earlier output of that compile to copy where a test needs one."""
    folder = tmp_path_factory.mktemp("setup")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    model = save_tiny("bert", folder / "teacher")
    result = compile_(model, recipe, folder / "earlier")
    assert result.exit_code == 0, result.output
    return model, recipe, folder / "earlier"


@pytest.mark.parametrize("threads", [1, 2])
def test_the_report_names_the_threads_and_package_versions_the_bytes_depend_on(setup, tmp_path, threads):
    """Two compiles of one recipe differ where the thread count or a package's version did; the report says
    which, as the output's files alone could not."""
    import importlib.metadata
    import platform

    import torch

    model, recipe, _ = setup
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert compile_(model, recipe, tmp_path / "out").exit_code == 0
    finally:
        torch.set_num_threads(before)
    env = json.loads((tmp_path / "out" / "report.json").read_text())["environment"]
    assert env["device"] == "cpu" and env["torch_threads"] == threads
    assert env["python"] == platform.python_version()
    assert env["packages"]["torch"] == importlib.metadata.version("torch")
    assert env["packages"]["onnxruntime"] == importlib.metadata.version("onnxruntime")
    assert "tensorrt" not in env["packages"]  # a package not installed is left out, not guessed


def compile_(model: Path, recipe: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["compile", str(model), "-r", str(recipe), "-o", str(out), "--device", "cpu",
                                     *extra])


def intrude(monkeypatch, out: Path, make) -> None:
    """Run `make(out)` just before the compile moves its output into place."""
    real = lmmc.compile.write_report_html

    def write_then_intrude(folder):
        real(folder)
        make(out)
    monkeypatch.setattr(lmmc.compile, "write_report_html", write_then_intrude)


def users_folder(out: Path) -> None:
    out.mkdir()
    (out / "thesis.tex").write_text("mine")


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_that_appears_at_out_during_the_compile_is_kept_and_the_work_resumes(setup, tmp_path, monkeypatch,
                                                                                      one_thread, force):
    model, recipe, earlier = setup
    out = tmp_path / "out"
    if force:  # an earlier lmmc output, swapped for the user's own folder while the compile runs
        shutil.copytree(earlier, out)
        intrude(monkeypatch, out, lambda o: (shutil.rmtree(o), users_folder(o)))
    else:
        intrude(monkeypatch, out, users_folder)
    result = compile_(model, recipe, out, *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    change = "is no longer an earlier lmmc output" if force else "appeared"
    assert f"--out '{out}' {change} while the compile ran; it was left untouched" in result.output
    assert "run the same command with --resume" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "mine"
    assert (work_path(out) / "state-01").is_dir()  # the finished pass is kept
    if force:
        return
    monkeypatch.undo()
    (out / "thesis.tex").rename(tmp_path / "thesis.tex")
    out.rmdir()
    # a run killed while it wrote its last files leaves their partial copies and its list of files
    (work_path(out) / "output" / ".report.html.tmp-4440").write_text("half a page")
    assert (work_path(out) / "output" / lmmc.compile.FILE_LIST).is_file()
    resumed = compile_(model, recipe, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["magnitude"] and report["sparsity"]["sparsity"] == 0.5
    assert not work_path(out).exists()
    listed = json.loads((out / lmmc.compile.FILE_LIST).read_text())
    assert list(listed) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.name != lmmc.compile.FILE_LIST)
    assert not (out / ".report.html.tmp-4440").exists()


@pytest.mark.parametrize("what", ["file", "link"])
def test_a_file_or_link_put_at_out_during_a_forced_compile_is_kept(setup, tmp_path, monkeypatch, one_thread, what):
    model, recipe, earlier = setup
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    shutil.copytree(earlier, out)

    def swap(o: Path) -> None:
        shutil.rmtree(o)
        o.write_text("notes") if what == "file" else o.symlink_to(elsewhere)
    intrude(monkeypatch, out, swap)
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2, result.output
    assert "is no longer an earlier lmmc output while the compile ran" in result.output
    assert (out.read_text() == "notes") if what == "file" else (out.is_symlink() and out.resolve() == elsewhere)
    assert (elsewhere / "keep.txt").read_text() == "x"


def test_force_refuses_a_folder_of_the_users_that_holds_a_copied_student(setup, tmp_path):
    """student/lmmc.json alone is no proof: a project folder the user copied a student into is not replaced."""
    model, recipe, earlier = setup
    project = tmp_path / "project"
    shutil.copytree(earlier / "student", project / "student")
    (project / "thesis.tex").write_text("mine")
    result = compile_(model, recipe, project, "--force")
    assert result.exit_code == 2, result.output
    assert f"'{project}' is not one (it holds thesis.tex, which lmmc did not write); it was left untouched" \
        in result.output
    assert (project / "thesis.tex").read_text() == "mine" and (project / "student" / "lmmc.json").is_file()
    assert not work_path(project).exists()


def test_an_earlier_output_with_lmmcs_own_leftovers_is_still_an_earlier_output(setup, tmp_path):
    from lmmc.compile import check_output
    from lmmc.recipe import load_recipe

    model, recipe, earlier = setup
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    (out / ".report.html.tmp-4242").write_text("a killed `lmmc report`'s partial page")
    (out / "bench.json").write_text('{"kind": "lmmc bench"}')
    (out / ".lmmc-incoming-651" / "student").mkdir(parents=True)  # a copy into a volume --out, killed
    (out / ".lmmc-incoming-651" / "student" / "lmmc.json").write_text("{")
    assert check_output(out, str(model), load_recipe(recipe), recipe, force=True) == out.resolve()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(lmmc.compile.LmmcError, match=r"it holds notes.txt, which lmmc did not write"):
        check_output(out, str(model), load_recipe(recipe), recipe, force=True)


@pytest.mark.parametrize("name, text, why", [
    ("bench.json", '{"my": "own benchmark numbers"}', "which lmmc did not write"),
    ("report.html", "<html>my own notes page</html>", "which lmmc wrote and which was changed since")])
def test_force_keeps_an_earlier_output_holding_the_users_own_bench_json_or_report_html(setup, tmp_path, name, text,
                                                                                        why):
    """lmmc bench and lmmc report refuse to replace such a file; a forced compile refuses it alike."""
    model, recipe, earlier = setup
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    (out / name).write_text(text)
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2, result.output
    assert f"(it holds {name}, {why}); it was left untouched" in result.output
    assert (out / name).read_text() == text


def test_force_replaces_an_earlier_output_whose_page_lmmc_report_redrew(setup, tmp_path):
    """lmmc report redraws report.html with bench's figures (a recipe's bench section does too): the page
    then differs from the digest the compile listed, and --force refused lmmc's own output as edited."""
    model, recipe, earlier = setup
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    report = json.loads((out / "report.json").read_text())
    report["parameters"]["student"] += 1  # a page drawn from other figures, as bench's add to it
    page = render(report, out)
    assert page != (out / "report.html").read_text()
    (out / "report.html").write_text(page)
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 0, result.output
    # the same page with the user's notes in it, lmmc's generator tag kept, is theirs
    (edited / "report.html").write_text((edited / "report.html").read_text().replace("<body>", "<body><p>notes</p>"))
    mine = (edited / "report.html").read_bytes()
    result = compile_(model, recipe, edited, "--force")
    assert result.exit_code == 2 and "it holds report.html, which lmmc wrote and which was changed since" \
        in result.output, result.output
    assert (edited / "report.html").read_bytes() == mine


def test_a_dry_run_refuses_a_file_of_the_users_where_the_work_area_goes(setup, tmp_path):
    model, recipe, _ = setup
    work_path(tmp_path / "out").write_text("data")
    result = compile_(model, recipe, tmp_path / "out", "--dry-run")
    assert result.exit_code == 2, result.output
    assert "is in the way of the compile's work area but was not made by lmmc" in result.output
    assert work_path(tmp_path / "out").read_text() == "data"


@pytest.fixture
def mounted(tmp_path):
    """mount(source_or_None, target, *options): a bind mount of `source`, or a tmpfs; unmounted after the
    test. Skips where this process may not mount."""
    points = []

    def mount(source, target, *options):
        target.mkdir(exist_ok=True)
        args = ["mount", "--bind", str(source), str(target)] if source else ["mount", "-t", "tmpfs", *options,
                                                                              "tmpfs", str(target)]
        if subprocess.run(args, capture_output=True).returncode:
            pytest.skip("mounting needs privileges this process lacks")
        points.append(target)
        return target
    yield mount
    for point in reversed(points):
        subprocess.run(["umount", str(point)], capture_output=True)


def test_a_bind_mount_of_the_same_filesystem_at_out_is_filled_in_place(setup, tmp_path, mounted, one_thread):
    """Renames cannot cross into a bind mount even on one filesystem: the output is copied into it."""
    model, recipe, earlier = setup
    (tmp_path / "volume").mkdir()
    out = mounted(tmp_path / "volume", tmp_path / "out")
    assert lmmc.compile.is_mount(out) and not os.path.ismount(out)
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 0, result.output
    assert lmmc.compile.is_mount(out) and (tmp_path / "volume" / "student" / "lmmc.json").is_file()
    again = compile_(model, recipe, out, "--force")  # an earlier output in the mount, replaced
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in earlier.iterdir())


def test_a_volumes_lost_and_found_is_left_where_it_is(setup, tmp_path, mounted, one_thread):
    """An ext4 volume (a Kubernetes claim mounted at --out) holds its filesystem's lost+found from the start."""
    model, recipe, earlier = setup
    out = mounted(None, tmp_path / "out")
    (out / "lost+found").mkdir()
    (out / "lost+found" / "#1234").write_text("a recovered block")
    for _ in range(2):  # into the empty volume, then over the earlier output in it
        result = compile_(model, recipe, out, "--force")
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in earlier.iterdir()), "lost+found"])
        assert (out / "lost+found" / "#1234").read_text() == "a recovered block"
    (out / "notes.txt").write_text("mine")  # anything else is still the user's
    refused = compile_(model, recipe, out, "--force")
    assert refused.exit_code == 2 and "it holds notes.txt, which lmmc did not write" in refused.output


def test_what_a_killed_first_copy_into_a_volume_left_is_cleared_by_force(setup, tmp_path, mounted, one_thread):
    model, recipe, earlier = setup
    out = mounted(None, tmp_path / "out")
    for left in (".lmmc-incoming-777/student", ".lmmc-replaced-778/onnx"):
        (out / left).mkdir(parents=True)
        (out / left / "lmmc.json").write_text("{")
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in earlier.iterdir())


def test_a_file_written_into_a_volume_out_while_the_output_is_copied_in_is_kept(setup, tmp_path, mounted,
                                                                                 monkeypatch, one_thread):
    model, recipe, earlier = setup
    out = mounted(None, tmp_path / "out")
    shutil.copytree(earlier, out, dirs_exist_ok=True)
    real = lmmc.compile._stage

    def stage_then_intrude(tmp, target):
        staged = real(tmp, target)
        (target / "users_new_file.txt").write_text("mine")
        return staged
    monkeypatch.setattr(lmmc.compile, "_stage", stage_then_intrude)
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2, result.output
    assert "changed while the output was copied into it; it was left as it is" in result.output
    assert (out / "users_new_file.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in earlier.iterdir()), "users_new_file.txt"])
    assert (work_path(out) / "state-01").is_dir()


def test_a_disk_that_fills_while_weights_are_saved_is_one_error_leaving_nothing(setup, tmp_path, mounted, one_thread):
    """safetensors reports a full disk as an error of its own; it is still the full disk the user can fix."""
    model, recipe, _ = setup
    small = mounted(None, tmp_path / "small", "-o", "size=64k")  # the student's weights need about 120 kB
    result = compile_(model, recipe, small / "out")
    assert result.exit_code == 2, result.output
    assert "error: the disk is full: writing '" in result.output and "No space left on device" in result.output
    assert list(small.iterdir()) == []


def test_a_volume_out_too_small_for_the_new_output_keeps_the_earlier_one_and_the_passes(setup, tmp_path, mounted,
                                                                                         one_thread):
    """The copy into a volume --out filled it, and removing the partial copy gave the space back: the full
    disk read as an internal error (exit 3), and the finished passes were deleted."""
    import torch
    import transformers

    from tests.conftest import TINY_TEXT, save_preprocessors

    _, recipe, _ = setup
    torch.manual_seed(0)  # 12.6 MB of weights, so the space the partial copy gives back is well over 1 MiB
    model = tmp_path / "teacher"
    transformers.BertModel(transformers.BertConfig(**{**TINY_TEXT, "hidden_size": 256, "intermediate_size": 1024,
                                                      "num_hidden_layers": 4})).save_pretrained(model)
    save_preprocessors("bert", model)
    earlier = tmp_path / "earlier"
    assert compile_(model, recipe, earlier).exit_code == 0
    size = sum(p.stat().st_size for p in earlier.rglob("*") if p.is_file())
    out = mounted(None, tmp_path / "out", "-o", f"size={(size + 6 * 2 ** 20) // 1024}k")  # one output fits, not two
    shutil.copytree(earlier, out, dirs_exist_ok=True)
    files = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "error: the disk is full: writing '" in said and "The 1 finished pass(es) are kept in" in said, said
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == files
    assert (work_path(out) / "state-01").is_dir()


def test_a_full_temporary_folder_is_named_not_the_outputs_roomy_disk(setup, tmp_path, mounted, monkeypatch,
                                                                       one_thread):
    """ONNX Runtime's quantiser fills TMPDIR, and its error names no file: the message blamed the disk of
    the work area, which had gigabytes free."""
    import tempfile

    model, _, _ = setup
    small = mounted(None, tmp_path / "tmp", "-o", "size=64k")
    monkeypatch.setenv("TMPDIR", str(small))
    monkeypatch.setattr(tempfile, "tempdir", str(small))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "export": ["onnx", {"ort": {"fuse": "off", "int8": ["dynamic"]}}]}))
    result = compile_(model, recipe, tmp_path / "out")
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"error: the disk is full: a write that names no file failed (No space left on device), likely in the " \
           f"temporary folder {small}, whose disk has less room than" in said, said
    assert "point TMPDIR at another disk" in said and not (tmp_path / "out").exists()


def fill(folder: Path) -> Path:
    """Fill the disk `folder` lies on to its last byte; returns the file that holds the space."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def test_a_disk_full_before_the_compile_starts_is_one_error_leaving_nothing(setup, tmp_path, mounted, one_thread):
    """The work area's first record fails to write: no area is left that a later run would refuse as not
    lmmc's, nor the folders made for --out."""
    model, recipe, earlier = setup
    small = mounted(None, tmp_path / "small", "-o", "size=2m")
    filler = fill(small)
    result = compile_(model, recipe, small / "deep" / "out")
    assert result.exit_code == 2, result.output
    assert "error: the disk is full: writing '" in result.output and "No space left on device" in result.output
    assert [p.name for p in small.iterdir()] == ["filler"]
    filler.unlink()
    again = compile_(model, recipe, small / "deep" / "out")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (small / "deep" / "out").iterdir()) == sorted(p.name for p in earlier.iterdir())


@pytest.mark.parametrize("error", [RuntimeError("basic_ios::clear: iostream error"),
                                   shutil.Error([("a", "b", "[Errno 28] No space left on device")])])
def test_a_full_disk_reported_in_a_libraries_own_words_is_still_a_full_disk(setup, tmp_path, mounted, monkeypatch,
                                                                              one_thread, error):
    """OpenVINO's writer says "basic_ios::clear: iostream error" when the disk fills; a copy into a volume
    gathers its failures in a shutil.Error without an errno. The finished passes are kept for --resume: the
    failure may have another cause than the space."""
    model, recipe, earlier = setup
    small = mounted(None, tmp_path / "small", "-o", "size=2m")
    real = lmmc.compile.write_report_html

    def fill_then_fail(folder):
        filler = fill(small)
        monkeypatch.setattr(lmmc.compile, "write_report_html", real)
        raise error
    monkeypatch.setattr(lmmc.compile, "write_report_html", fill_then_fail)
    result = compile_(model, recipe, small / "out")
    assert result.exit_code == 2, result.output
    said = " ".join(" ".join(str(error).split())[:200].split())
    assert (f"error: the disk is full (less than 1 MiB left) after {type(error).__name__}: {said}; "
            f"nothing was written to '{small / 'out'}'; the 1 finished pass(es) are kept in "
            f"'{work_path(small / 'out')}': free some space, then run the same command with --resume"
            ) in " ".join(result.output.split())
    assert sorted(p.name for p in small.iterdir()) == [".out.lmmc-work", "filler"]
    (small / "filler").unlink()
    resumed = compile_(model, recipe, small / "out", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in (small / "out").iterdir()) == sorted(p.name for p in earlier.iterdir())


def test_a_bug_on_a_disk_with_space_left_is_no_full_disk(setup, tmp_path, mounted, monkeypatch, one_thread):
    model, recipe, _ = setup
    small = mounted(None, tmp_path / "small", "-o", "size=8m")
    with open(small / "filler", "wb") as fh:
        fh.write(b"\0" * (6 << 20))  # 2 MiB left

    def bug(folder):
        raise ValueError("an ordinary bug")
    monkeypatch.setattr(lmmc.compile, "write_report_html", bug)
    result = compile_(model, recipe, small / "out")
    assert result.exit_code == 3 and "internal error: ValueError: an ordinary bug" in result.output
    assert "1 pass(es) finished; their results are kept" in result.output


def test_a_second_interrupt_waits_until_the_user_is_told_where_the_work_is(setup, tmp_path, monkeypatch):
    """A second SIGTERM (torchrun's, on a rank whose peer died) or SIGINT, arriving as the compile says where its
    finished passes are kept, used to cut that line off."""
    from lmmc.resume import WorkArea

    model, recipe, _ = setup

    def interrupted(folder):
        raise KeyboardInterrupt("SIGINT")
    release = WorkArea.release

    def release_then_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)
        release(self)
    monkeypatch.setattr(lmmc.compile, "write_report_html", interrupted)
    monkeypatch.setattr(WorkArea, "release", release_then_sigterm)
    result = compile_(model, recipe, tmp_path / "out")
    assert result.exit_code == 130, result.output
    assert f"1 pass(es) finished; their results are kept in '{work_path(tmp_path / 'out')}'" in result.output
    assert "interrupted by SIGTERM; the output directory was not written" in result.output
    assert not (tmp_path / "out").exists()


def test_lmmc_report_on_a_full_disk_is_one_error(setup, tmp_path, mounted):
    _, _, earlier = setup
    small = mounted(None, tmp_path / "small", "-o", "size=2m")
    shutil.copytree(earlier, small / "out")
    (small / "out" / "report.html").unlink()
    fill(small)
    result = CliRunner().invoke(main, ["report", str(small / "out")])
    assert result.exit_code == 2, result.output
    assert f"cannot write '{small / 'out' / 'report.html'}': the disk is full" in " ".join(result.output.split())
    assert not (small / "out" / "report.html").exists()


def test_a_compile_stopped_before_its_first_pass_says_there_is_nothing_to_resume(setup, tmp_path, monkeypatch):
    model, recipe, _ = setup

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("SIGTERM")
    monkeypatch.setattr(lmmc.compile, "load_teacher", stopped)
    result = compile_(model, recipe, tmp_path / "out")
    assert result.exit_code == 130, result.output
    assert "lmmc: no pass finished; run the same command again (without --resume)" in result.output
    assert "--resume to continue" not in result.output


def test_a_read_only_volume_at_out_is_refused_before_any_work(setup, tmp_path, mounted):
    model, recipe, _ = setup
    out = mounted(None, tmp_path / "out", "-o", "ro")
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2, result.output
    assert f"cannot write the output: '{out}' is not writable" in result.output
    assert not work_path(out).exists()


@pytest.mark.parametrize("added", ["student/NOTES.md", "onnx/my_model_v2.onnx", "student/link"])
def test_force_keeps_an_earlier_output_holding_a_file_of_the_users_anywhere(setup, tmp_path, added):
    """Inside student/ or onnx/ too: an earlier output lists every file it wrote, and one the user added
    (or a link, which lmmc never writes) makes it the user's."""
    model, recipe, earlier = setup
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    (out / added).parent.mkdir(exist_ok=True)  # the earlier compile exported nothing: onnx/ is the user's too
    if added.endswith("link"):
        (out / added).symlink_to(tmp_path)
    else:
        (out / added).write_text("mine")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2, result.output
    assert f"{added}, which lmmc did not write); it was left untouched" in result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


@pytest.mark.parametrize("how", ["immutable", "append-only", "folder not writable"])
def test_force_refuses_an_earlier_output_holding_what_it_could_not_remove(setup, tmp_path, how):
    """Found only once the compile had run, such a file stayed in the work area, whose remains then stood in
    the way of the next compile as a folder "not made by lmmc"."""
    model, recipe, earlier = setup
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    kept = out / "student" / "config.json"
    if how == "folder not writable":
        if os.geteuid() == 0:
            pytest.skip("root removes files from a folder without write permission")
        kept.parent.chmod(0o555)
        undo, words = lambda: kept.parent.chmod(0o755), f"its folder '{kept.parent}' is not writable. It was left " \
                                                         f"untouched; make it removable (chmod u+w '{kept.parent}')"
    else:
        flag = "i" if how == "immutable" else "a"
        if subprocess.run(["chattr", f"+{flag}", str(kept)], capture_output=True).returncode != 0:
            pytest.skip("chattr needs root and a file system with attributes (ext4, xfs, btrfs)")
        # wherever a failing compile moved the file: pytest could not remove it
        undo = lambda: subprocess.run(["chattr", "-R", f"-{flag}", str(tmp_path)], capture_output=True)
        words = f"the file system keeps it ({how}). It was left untouched; make it removable (chattr -{flag} '{kept}')"
    try:
        before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        result = compile_(model, recipe, out, "--force")
        assert result.exit_code == 2, result.output
        assert f"--force would replace '{out}', but '{kept}' cannot be removed: {words}, or choose another " \
               f"--out" in " ".join(result.output.split())
        assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert not work_path(out).exists()
    finally:
        undo()
    assert compile_(model, recipe, out, "--force").exit_code == 0


@pytest.mark.parametrize("edited", ["student/config.json", "manifest.json"])
def test_force_keeps_an_earlier_output_whose_file_the_user_edited(setup, tmp_path, edited):
    """A file lmmc wrote and the user then changed holds the user's bytes under lmmc's name: the list of
    files records what each held, and --force keeps the output."""
    model, recipe, earlier = setup
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    (out / edited).write_text((out / edited).read_text().replace("{", '{"mine": 1, ', 1))
    mine = (out / edited).read_bytes()
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2, result.output
    assert f"(it holds {edited}, which lmmc wrote and which was changed since); it was left untouched" in result.output
    assert (out / edited).read_bytes() == mine


def test_force_names_a_file_added_apart_from_one_edited(setup, tmp_path):
    model, recipe, earlier = setup
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    (out / "student" / "notes.txt").write_text("mine")
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace("{", '{"mine": 1, ', 1))
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2, result.output
    assert ("(it holds student/notes.txt, which lmmc did not write; and manifest.json, which lmmc wrote and which "
            "was changed since); it was left untouched") in " ".join(result.output.split())


@pytest.mark.parametrize("how", ["a file where lmmc wrote a folder", "a list that calls the file a folder"])
def test_force_keeps_a_users_file_that_the_list_names_as_a_folder(setup, tmp_path, how):
    """The list's folders (no digest) were never checked to be folders still: --force removed the file."""
    model, recipe, earlier = setup
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    if how == "a file where lmmc wrote a folder":
        shutil.rmtree(out / "student")
        mine = out / "student"
    else:
        mine = out / "student" / "user_data.bin"
        listed = json.loads((out / ".lmmc-files.json").read_text())
        (out / ".lmmc-files.json").write_text(json.dumps({**listed, "student/user_data.bin": None}))
    mine.write_text("mine")
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2, result.output
    assert f"{mine.relative_to(out).as_posix()}, which lmmc did not write); it was left untouched" in result.output
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("listed", ["none", "names alone"])
def test_force_keeps_an_output_without_the_list_of_its_files(setup, tmp_path, listed):
    """An output whose files were not listed, or listed by name alone (older lmmc's), cannot show that nothing
    was added to it or edited in it: an edited report.json was deleted under a list of names."""
    model, recipe, earlier = setup
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    if listed == "none":
        (out / lmmc.compile.FILE_LIST).unlink()
    else:
        names = list(json.loads((out / lmmc.compile.FILE_LIST).read_text()))
        (out / lmmc.compile.FILE_LIST).write_text(json.dumps(names))
        (out / "report.json").write_text('{"my": "notes", "lmmc_version": "mine"}')
    mine = (out / "report.json").read_bytes()
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2 and "it has no .lmmc-files.json with the digests" in result.output, result.output
    assert (out / "report.json").read_bytes() == mine
    (out / "report.json").unlink()  # student/lmmc.json alone marks an output as well
    result = compile_(model, recipe, out, "--force")
    assert result.exit_code == 2 and "it has no .lmmc-files.json with the digests" in result.output, result.output


def test_an_interrupt_a_finaliser_swallowed_still_stops_the_compile(setup, tmp_path, monkeypatch):
    """A signal whose KeyboardInterrupt is raised while the garbage collector runs a __del__ is printed as
    "Exception ignored" and lost: the compile ran on to its end, wrote its output and exited 0."""
    from lmmc.pipeline import load_passes

    model, recipe, earlier = setup
    step = load_passes()["magnitude"]
    real = step.run

    class Finalised:
        def __del__(self):  # what SIGTERM's delivery runs, inside a finaliser
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)

    def run_then_lose_an_interrupt(self, art):
        metrics = real(self, art)
        Finalised()  # collected at once: its KeyboardInterrupt is ignored
        return metrics
    monkeypatch.setattr(step, "run", run_then_lose_an_interrupt)
    printed = []  # what Python's hook would print as "Exception ignored in ..."
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    out = tmp_path / "out"
    result = compile_(model, recipe, out)
    monkeypatch.undo()
    assert printed == []  # the signal is recorded and raised again, not printed as a bug
    assert result.exit_code == 130, result.output
    assert "lmmc: 1 pass(es) finished" in result.output and not out.exists()
    assert result.output.splitlines()[-1] == "interrupted by SIGTERM; the output directory was not written"
    resumed = compile_(model, recipe, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "student" / "model.safetensors").read_bytes() == (earlier / "student" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("empty", [False, True])
def test_a_sigterm_while_the_output_is_swapped_in_waits_until_it_is_whole(setup, tmp_path, monkeypatch, empty):
    """kill (SIGTERM) lands between moving the earlier output aside and moving the new one in: --out must
    not be left without either, and the message must not say that nothing was written."""
    model, recipe, earlier = setup
    out = tmp_path / "out"
    out.mkdir() if empty else shutil.copytree(earlier, out)
    real_rename, renames = Path.rename, []

    def rename_then_kill(self, target):
        moved = real_rename(self, target)
        renames.append(target)
        if len(renames) == 1:  # what SIGTERM's delivery runs, without signalling the test process itself
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        return moved
    monkeypatch.setattr(Path, "rename", rename_then_kill)
    result = compile_(model, recipe, out, "--force")
    monkeypatch.undo()
    assert result.exit_code == 130, result.output
    assert f"interrupted by SIGTERM as the output was put in place; it is complete in '{out}'" in result.output
    listed = json.loads((out / lmmc.compile.FILE_LIST).read_text())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted([*listed, lmmc.compile.FILE_LIST])
    assert (out / "report.json").stat().st_mtime > (earlier / "report.json").stat().st_mtime
    assert not work_path(out).exists()


def test_bad_input_leaves_no_folders_and_a_failed_resume_keeps_the_saved_passes(setup, tmp_path):
    model, recipe, _ = setup
    broken = tmp_path / "nan-teacher"
    shutil.copytree(model, broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    result = compile_(broken, recipe, tmp_path / "deep" / "er" / "out")
    assert result.exit_code == 2 and "NaN" in result.output, result.output
    assert not (tmp_path / "deep").exists()

    from lmmc.compile import _give_up
    from lmmc.resume import WorkArea

    for resume in (True, False):
        area = WorkArea(tmp_path / "out")
        (area.path / "state-01").mkdir(parents=True, exist_ok=True)  # a pass the interrupted run finished
        _give_up(area, resume, [])
        assert (area.path / "state-01").is_dir() == resume


def test_compiles_called_from_two_threads_at_once_run_one_after_the_other(setup, tmp_path):
    """Two compiles at once in one process both failed inside torch.export (an error of its own, not
    LmmcError, and two work areas left); they now take turns and write what one compile alone writes."""
    import threading

    from lmmc.compile import compile_model
    from lmmc.recipe import parse_recipe

    model, _, _ = setup
    recipe = parse_recipe({**RECIPE, "export": ["onnx"]})
    alone = compile_model(str(model), recipe, tmp_path / "alone")
    barrier, failed = threading.Barrier(2), []

    def run(name: str) -> None:
        barrier.wait()
        try:
            compile_model(str(model), recipe, tmp_path / name)
        except Exception as e:  # noqa: BLE001 - the test reports what either thread raised
            failed.append(repr(e))

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == []
    onnx = [(tmp_path / name / "onnx" / "text.onnx").read_bytes() for name in ("alone", "a", "b")]
    assert onnx[0] == onnx[1] == onnx[2]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["sparsity"] == alone["sparsity"]
