"""Temporary folders of killed processes are removed by the next process that makes one; live ones stay."""
import fcntl
import os
import tempfile

from lmmc.scratch import LOCK, scratch_folder


def test_a_killed_process_folder_goes_and_a_live_or_new_one_stays(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the system's temporary folder, as bench uses it
    for name in ("lmmc-bench-dead", "lmmc-bench-live", "lmmc-bench-new", "lmmc-bench-nolock", "lmmc-mixed-dead"):
        (tmp_path / name / "teacher-text.onnx").parent.mkdir()
        (tmp_path / name / "teacher-text.onnx").write_bytes(b"onnx")
        if name != "lmmc-bench-nolock":
            (tmp_path / name / LOCK).touch()
            if name != "lmmc-bench-new":  # made long ago; a folder in its first minute may not be locked yet
                os.utime(tmp_path / name / LOCK, (0, 0))
    (tmp_path / "lmmc-bench-link").symlink_to(tmp_path / "lmmc-bench-dead")
    with open(tmp_path / "lmmc-bench-live" / LOCK, "r+") as live:
        fcntl.flock(live, fcntl.LOCK_EX)
        with scratch_folder("lmmc-bench-") as mine:
            assert (mine / LOCK).is_file() and mine.parent == tmp_path
            left = sorted(p.name for p in tmp_path.iterdir() if p != mine)
    assert left == ["lmmc-bench-link", "lmmc-bench-live", "lmmc-bench-new", "lmmc-bench-nolock", "lmmc-mixed-dead"]
    assert not mine.exists()
