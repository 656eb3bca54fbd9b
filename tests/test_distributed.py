"""The distill pass under torchrun: two gloo ranks on CPU, each on half of every batch, end with the
weights of one process on the whole batch (same seed, same global batch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

# OPTIMA over four modules of both CLIP towers (the contrastive loss gathers embeddings across ranks),
# two micro-batches per step (DDP's no_sync path), and held-out evaluation on every rank.
DDP_CFG = dict(steps=6, batch_size=8, grad_accum=2, lr=1e-3, schedule="optima", blocks_per_arm=1, window=8,
               dev_samples=8, eval_every=3, keep_best=False, progress=False)
# A run on a clock: each rank reads its own clock, so without one agreed reading they could stop a step apart
# and the one going on would wait for the other's all-reduce forever.
CLOCK_CFG = dict(steps=10 ** 6, minutes=0.15, batch_size=8, lr=1e-3, dev_samples=8, eval_every=0, progress=False)


def count_samples(monkeypatch) -> list[int]:
    """Count the samples each forward of the objective sees, to show the data really is sharded."""
    from lmmc.distiller import DistillLoss

    seen: list[int] = []
    forward = DistillLoss.forward

    def counting(self, inputs, *args, **kwargs):
        seen.append(next(iter(next(iter(inputs.values())).values())).shape[0])
        return forward(self, inputs, *args, **kwargs)

    monkeypatch.setattr(DistillLoss, "forward", counting)
    return seen


def test_two_gloo_ranks_match_one_process(tmp_path, one_thread, monkeypatch):
    from test_distill import Distill, tiny_art

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    seen = count_samples(monkeypatch)
    art = tiny_art("clip")
    single = Distill(Distill.Config(**DDP_CFG)).run(art)
    assert sum(seen) == 6 * 8

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["metrics"]["world_size"] == 2
        assert r["samples_seen"] == 6 * 8 // 2
        assert r["metrics"]["arm_picks"] == single["arm_picks"]
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for name, value in art.student.state_dict().items():
        assert torch.equal(weights[0][name], weights[1][name]), name
        # Two half-batch gradients averaged round differently from one whole-batch gradient, and Adam divides
        # each element by its own gradient's size, so a near-zero one moves by up to lr on a last-bit
        # difference: 2e-5 on one CPU, while a wrong shard or a missing all-reduce moves weights by ~lr (1e-3).
        assert float((weights[0][name] - value).abs().max()) <= 1e-4, name
    # The runs did train: the weights moved far more than the tolerance.
    start = tiny_art("clip").student.state_dict()
    assert max(float((art.student.state_dict()[n] - start[n]).abs().max()) for n in start) > 1e-3


def test_ranks_given_another_run_are_refused_on_every_rank(tmp_path, one_thread):
    """Rank 1 with another learning rate trained a silent mix of the two runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path), "mismatch"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.error").read_text()
        assert message.startswith("distill: rank 1 of this torchrun job would train another run than rank 0"), message
        assert message.endswith("start every rank with the same command, recipe and data")
    assert not list(tmp_path.glob("*.safetensors"))


def test_every_rank_leaves_its_process_group_before_it_exits(tmp_path):
    """A gloo group left to the interpreter's teardown aborted about one exit in three (SIGABRT): torchrun
    then called a compile that had finished on every rank a failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path), "exit"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.exit").read_text() for r in range(2)] == ["group left"] * 2


def test_a_dry_run_under_torchrun_prints_its_plan_once(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from conftest import save_tiny

    import lmmc.cli

    save_tiny("bert", tmp_path / "teacher")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"calibration": {"random": True}, "passes": [{"magnitude": {}}]}))
    args = ["compile", str(tmp_path / "teacher"), "-r", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"),
            "--dry-run"]
    printed = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        result = CliRunner().invoke(lmmc.cli.main, args)
        assert result.exit_code == 0, result.output
        printed[rank] = result.stdout
    assert json.loads(printed["0"])["steps"] and printed["1"] == ""


@pytest.mark.timed
def test_ranks_on_a_clock_stop_at_the_same_step(tmp_path, one_thread):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path), "clock"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["metrics"] for r in range(2)]
    assert ranks[0]["stopped_by"] == ranks[1]["stopped_by"] == "minutes"
    assert ranks[0]["steps"] == ranks[1]["steps"] > 1
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


if __name__ == "__main__":
    import torch.distributed as dist

    out = Path(sys.argv[1])
    if sys.argv[2:] == ["exit"]:  # what each rank's process group is at exit, once lmmc set it up
        import atexit

        from lmmc.train import setup_distributed

        rank = os.environ["RANK"]
        # Registered first, so it runs after every exit handler lmmc registers.
        atexit.register(lambda: (out / f"rank{rank}.exit").write_text(
            "group left" if not dist.is_initialized() else "group still open"))
        setup_distributed(torch.device("cpu"))
        sys.exit(0)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_distill import Distill, tiny_art

    torch.set_num_threads(1)
    seen = count_samples(pytest.MonkeyPatch())
    art = tiny_art("clip")
    cfg = CLOCK_CFG if sys.argv[2:] == ["clock"] else DDP_CFG
    if sys.argv[2:] == ["mismatch"]:  # rank 1 given another learning rate
        from lmmc.errors import LmmcError

        rank = int(os.environ["RANK"])
        try:
            Distill(Distill.Config(**{**DDP_CFG, "lr": 1e-3 * (1 + rank)})).run(art)
        except LmmcError as err:
            (out / f"rank{rank}.error").write_text(str(err))
        sys.exit(0)
    metrics = Distill(Distill.Config(**cfg)).run(art)
    rank = dist.get_rank()
    save_file({k: v.contiguous().clone() for k, v in art.student.state_dict().items()},
              str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "samples_seen": sum(seen)}))
    dist.destroy_process_group()


def test_a_torchrun_compile_ends_on_every_rank_once_rank_0_wrote_the_output(tmp_path):
    """Rank 1 says where rank 0 wrote, after the output is in place (it used to print an empty list while
    rank 0 was still writing, and exit 0 even when rank 0 then failed)."""
    from conftest import save_tiny

    save_tiny("bert", tmp_path / "teacher")
    recipe = {"calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
              "passes": [{"magnitude": {"sparsity": 0.5}}, {"distill": {"steps": 2, "batch_size": 4, "dev_samples": 2}}],
              "validate": False}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--tee", "3", shutil.which("lmmc") or str(Path(sys.executable).parent / "lmmc"), "compile",
                          str(tmp_path / "teacher"), "-r", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    listed = sorted(p.name + "/" * p.is_dir() for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert f"rank 1: finished; rank 0 wrote {tmp_path / 'out'}/ ({', '.join(['.lmmc-files.json', *listed])})" \
        in run.stdout, run.stdout[-3000:]
    assert run.stdout.count("wrote ") == 2  # rank 0's own line and rank 1's


def test_a_rank_whose_rank_0_was_killed_says_where_its_work_is_kept(tmp_path):
    """Rank 0 killed (the OOM killer, say) prints nothing; rank 1 now says how to resume its work."""
    import signal
    import time

    from conftest import save_tiny

    save_tiny("bert", tmp_path / "teacher")
    recipe = {"calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 8},
              "passes": [{"magnitude": {"sparsity": 0.5}},
                         {"distill": {"steps": 100000, "batch_size": 4, "dev_samples": 2, "checkpoint_every": 2,
                                      "eval_every": 0, "progress": False}}],
              "validate": False}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             shutil.which("lmmc") or str(Path(sys.executable).parent / "lmmc"), "compile",
                             str(tmp_path / "teacher"), "-r", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    area = tmp_path / ".out.lmmc-work"
    try:
        deadline = time.monotonic() + 300
        while not any(area.glob("pass-*/**/state.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        os.kill(json.loads((area / "lmmc-work.json").read_text())["pid"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert f"lmmc: rank 0 kept its work in '{area}': run the same command with --resume" in output, output[-3000:]


def test_a_rank_whose_peer_stopped_says_so_instead_of_reporting_a_bug(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from conftest import save_tiny

    import lmmc.cli
    import lmmc.compile

    def peer_gone(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:1")

    monkeypatch.setattr(lmmc.compile, "compile_model", peer_gone)
    save_tiny("bert", tmp_path / "teacher")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"calibration": {"random": True}, "passes": [{"magnitude": {}}]}))
    args = ["compile", str(tmp_path / "teacher"), "-r", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(lmmc.cli.main, args)
    assert result.exit_code == 130 and "stopped: another rank of this torchrun job stopped first" in result.output
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, the same error is a bug
    result = CliRunner().invoke(lmmc.cli.main, args)
    assert result.exit_code == 3 and "internal error: RuntimeError" in result.output
