"""The distill pass under torchrun with `parallel: fsdp` (torch's FSDP2 on two gloo ranks on CPU): the
weights after N steps equal DDP's and one process's (same data order, same global batch), a Wanda 50 %
student keeps its zeros, each rank holds half of the optimiser state, and a checkpoint written sharded
resumes in a single process, and sharded again, to the weights of an uninterrupted run. Also: OPTIMA on
CLIP, a tiny LLaVA, keep_best, a scalar parameter, and fsdp in a single process (unsharded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Two micro-batches per step (FSDP reduce-scatters each, DDP only the last), a dev evaluation mid-run
# (it calls the student outside the engine's forward), checkpoints every two steps.
BERT_CFG = dict(steps=6, batch_size=8, grad_accum=2, lr=1e-3, schedule="all", dev_samples=8, eval_every=3,
                keep_best=False, progress=False, checkpoint_every=2)
# OPTIMA over both CLIP towers: modules trained one at a time leave blocks unused, a step can stop the
# forward early, and the contrastive loss gathers embeddings across ranks.
CLIP_CFG = dict(steps=6, batch_size=8, grad_accum=2, lr=1e-3, schedule="optima", blocks_per_arm=1, window=8,
                dev_samples=8, eval_every=3, keep_best=False, progress=False)
# A tiny LLaVA: token-level KL on answer logits, vision and decoder blocks as units, the projector in the root.
LLAVA_CFG = dict(steps=4, batch_size=8, lr=2e-3, dev_samples=8, eval_every=2, keep_best=False, progress=False)
TOL = 3e-5  # float sums taken in another order over shards, after a few optimiser steps


def wanda_bert():
    from test_distill import tiny_art

    from lmmc.pipeline import get_pass, run_pass

    art = tiny_art("bert", sparsity=0)
    wanda = get_pass("wanda")
    run_pass(wanda(wanda.Config(sparsity=0.5)), art)
    return art


def run(art, **cfg) -> tuple[dict, int]:
    """Distil as the pass does; also count this rank's elements of AdamW's first moment."""
    from test_distill import Distill, trainer

    t = trainer(art, Distill.Config(**cfg))
    held = []
    unshard = t._unshard

    def counting_unshard():  # the optimiser state is let go when the sharded run ends
        held.append(sum(s["exp_avg"].to_local().numel() if hasattr(s["exp_avg"], "to_local")
                        else s["exp_avg"].numel() for s in t.optimizer.state.values()))
        unshard()

    t._unshard = counting_unshard
    try:
        metrics = t.fit()
    finally:
        t.restore_flags()
    return metrics, held[0]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_fsdp_trains_the_weights_of_ddp_and_of_one_process_and_keeps_wanda_zeros(ranks, one_thread):
    art = wanda_bert()
    start = weights(art.student)
    single, held_single = run(art, **BERT_CFG)
    expected = weights(art.student)

    for rank in range(2):
        fsdp = load_file(str(ranks / f"bert-fsdp-rank{rank}.safetensors"))
        ddp = load_file(str(ranks / f"bert-ddp-rank{rank}.safetensors"))
        assert close(fsdp, expected) <= TOL and close(fsdp, ddp) <= TOL
        for name, mask in art.masks.items():
            assert mask.float().mean() == 0.5, name
            assert int(fsdp[name][~mask].count_nonzero()) == 0, name
        info = json.loads((ranks / f"bert-rank{rank}.json").read_text())
        assert info["fsdp"]["world_size"] == 2 and info["fsdp"]["masked_weights_nonzero"] == 0
        # Sharded: each rank holds half of AdamW's state (rows of odd-sized matrices pad one rank's share).
        assert info["ddp_held"] == held_single
        assert 0.5 * held_single <= info["fsdp_held"] <= 0.52 * held_single
    # The runs did train: the weights moved far more than the tolerance.
    assert close(expected, start) > 1e-3


def test_a_checkpoint_written_under_fsdp_resumes_in_one_process_and_under_fsdp(ranks, tmp_path, one_thread):
    art = wanda_bert()
    run(art, **BERT_CFG)
    uninterrupted = weights(art.student)

    # The sharded run's checkpoints with its final one gone, as if it had been killed after step 4.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ranks / "ckpt", ckpt)
    [run_dir] = ckpt.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "final", "step-000002", "step-000004"]
    step4 = load_file(str(run_dir / "step-000004" / "weights.safetensors"))
    # Whole tensors, not one rank's shards.
    assert {k.removeprefix("student."): v.shape for k, v in step4.items()} == \
        {k: v.shape for k, v in uninterrupted.items()}
    shutil.rmtree(run_dir / "final")

    art = wanda_bert()
    metrics, _ = run(art, **BERT_CFG, checkpoint_dir=str(ckpt), resume=True)
    assert metrics["resumed_from"] == 4
    assert close(weights(art.student), uninterrupted) <= TOL

    # And sharded again: the optimiser state and weights cut back into shards.
    for rank in range(2):
        resumed = load_file(str(ranks / f"bert-fsdp-resumed-rank{rank}.safetensors"))
        assert close(resumed, uninterrupted) <= TOL


def test_fsdp_optima_on_both_clip_towers_matches_one_process(ranks, one_thread):
    from test_distill import tiny_art

    art = tiny_art("clip")
    single, _ = run(art, **CLIP_CFG)
    for rank in range(2):
        fsdp = load_file(str(ranks / f"clip-fsdp-rank{rank}.safetensors"))
        assert close(fsdp, weights(art.student)) <= TOL
        info = json.loads((ranks / f"clip-rank{rank}.json").read_text())
        assert info["arm_picks"] == single["arm_picks"]


def test_parallel_is_checked_and_a_single_process_runs_fsdp_unsharded(one_thread):
    from pydantic import ValidationError
    from test_distill import Distill, tiny_art

    with pytest.raises(ValidationError, match="parallel"):
        Distill.Config(parallel="zero")
    runs = {}
    for parallel in ("ddp", "fsdp"):
        art = tiny_art("bert")
        run(art, **{**BERT_CFG, "checkpoint_every": 0}, parallel=parallel)
        runs[parallel] = weights(art.student)
    assert close(runs["ddp"], runs["fsdp"]) == 0.0


def test_fsdp_keeps_the_best_weights_it_held_as_shards(ranks):
    # The run's start was made to score best, so keep_best must hand back exactly the starting weights.
    for rank in range(2):
        info = json.loads((ranks / f"best-rank{rank}.json").read_text())
        assert info["kept_step"] == 0 and info["moved"] == 0.0 and info["moved_before_kept"] > 1e-3


def kept_best_run(rank: int, out: Path) -> None:
    """Under fsdp, a run whose starting weights score best (their shards kept as the best) ends with them."""
    from test_distill import Distill, tiny_art, trainer

    art = tiny_art("bert")
    start = weights(art.student)
    t = trainer(art, Distill.Config(**{**BERT_CFG, "checkpoint_every": 0, "keep_best": True, "parallel": "fsdp"}))
    evaluate, record = t.evaluate, t._record
    moved = []

    def declining():  # the start scores best
        return {**evaluate(), "score": -t.step}

    def recording(result):  # the last call is the final evaluation's, before the best weights come back
        moved.append(close(whole_student(t), start))
        record(result)

    t.evaluate, t._record = declining, recording
    try:
        metrics = t.fit()
    finally:
        t.restore_flags()
    (out / f"best-rank{rank}.json").write_text(json.dumps(
        {"kept_step": metrics["kept_step"], "moved": close(weights(art.student), start), "moved_before_kept": moved[-1]}))


def whole_student(t) -> dict[str, torch.Tensor]:
    from lmmc.train import whole

    return {k.removeprefix("student."): v for k, v in whole(t.objective.state_dict()).items() if k.startswith("student.")}


def test_a_scalar_stays_whole_and_its_gradient_is_averaged_over_the_ranks(ranks):
    for rank in range(2):
        info = json.loads((ranks / f"scalar-rank{rank}.json").read_text())
        assert info["grad"] == pytest.approx(info["expected"], rel=1e-6)
        assert info["restored"] == 0.0


def scalar_run(rank: int, out: Path) -> None:
    """FSDP2 cannot shard a scalar parameter: shard_copy leaves it whole and averages its gradient."""
    from lmmc.train import setup_distributed, shard_copy, unshard_into

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = torch.nn.Linear(4, 4)
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * self.block(x).sum()

    torch.manual_seed(0)
    model = Scaled()
    start = weights(model)
    with torch.no_grad():  # d loss / d scale on each rank's input, averaged
        expected = sum(float(model.block(torch.full((1, 4), r + 1.0)).sum()) for r in range(2)) / 2
    sharded = shard_copy(model, ["block"], torch.device("cpu"), setup_distributed(torch.device("cpu")).group)
    sharded(torch.full((1, 4), rank + 1.0)).backward()
    grad = float(sharded.scale.grad)
    unshard_into(model, sharded)
    (out / f"scalar-rank{rank}.json").write_text(json.dumps(
        {"grad": grad, "expected": expected, "restored": close(weights(model), start)}))


def pruned_llava():
    import conftest
    from test_generative_distill import pruned

    return pruned(conftest.tiny_llava())


def test_fsdp_distils_a_generative_student_as_one_process_does(ranks, one_thread):
    art = pruned_llava()
    single, _ = run(art, **LLAVA_CFG)
    for rank in range(2):
        fsdp = load_file(str(ranks / f"llava-fsdp-rank{rank}.safetensors"))
        assert close(fsdp, weights(art.student)) <= TOL
        for name, mask in art.masks.items():
            assert int(fsdp[name][~mask].count_nonzero()) == 0, name
        info = json.loads((ranks / f"llava-rank{rank}.json").read_text())
        assert info["dev_after"]["score"] == pytest.approx(single["dev_after"]["score"], abs=1e-5)


if __name__ == "__main__":
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_distill import tiny_art

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    record = {}
    for parallel in ("ddp", "fsdp"):
        art = wanda_bert()
        extra = {"checkpoint_dir": str(out / "ckpt")} if parallel == "fsdp" else {}
        metrics, held = run(art, **BERT_CFG, parallel=parallel, **extra)
        record[parallel], record[f"{parallel}_held"] = metrics, held
        save_file(weights(art.student), str(out / f"bert-{parallel}-rank{rank}.safetensors"))
    (out / f"bert-rank{rank}.json").write_text(json.dumps(record))

    # A sharded run resumed sharded, from step 4 of the checkpoints above.
    if rank == 0:
        shutil.copytree(out / "ckpt", out / "ckpt-resume")
        for final in (out / "ckpt-resume").glob("*/final"):
            shutil.rmtree(final)
    dist.barrier()
    art = wanda_bert()
    metrics, _ = run(art, **BERT_CFG, parallel="fsdp", checkpoint_dir=str(out / "ckpt-resume"), resume=True)
    assert metrics["resumed_from"] == 4
    save_file(weights(art.student), str(out / f"bert-fsdp-resumed-rank{rank}.safetensors"))

    art = tiny_art("clip")
    metrics, _ = run(art, **CLIP_CFG, parallel="fsdp")
    save_file(weights(art.student), str(out / f"clip-fsdp-rank{rank}.safetensors"))
    (out / f"clip-rank{rank}.json").write_text(json.dumps({"arm_picks": metrics["arm_picks"]}))

    kept_best_run(rank, out)
    scalar_run(rank, out)

    art = pruned_llava()
    metrics, _ = run(art, **LLAVA_CFG, parallel="fsdp")
    save_file(weights(art.student), str(out / f"llava-fsdp-rank{rank}.safetensors"))
    (out / f"llava-rank{rank}.json").write_text(json.dumps({"dev_after": metrics["dev_after"]}))
    dist.destroy_process_group()
