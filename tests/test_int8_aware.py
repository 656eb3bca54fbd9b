"""INT8-aware distillation: fake quantisation of the block linears' inputs, and when the run applies it."""
from __future__ import annotations

import pytest
import torch

from lmmc.adapters import prunable_linears
from lmmc.int8_aware import fake_quant
from lmmc.passes.distill import DistillPass as Distill
from test_distill import tiny_art, trainer


def test_fake_quant_rounds_to_256_levels_that_hold_zero_and_clips_with_a_straight_through_gradient():
    x = torch.tensor([-3.0, -1.0, -0.013, 0.0, 0.37, 2.0, 5.0], requires_grad=True)
    y = fake_quant(x, torch.tensor([-1.0, 2.0]))
    scale = 3.0 / 255
    zero = round(1.0 / scale)                                   # 85: the level that is 0.0
    want = (torch.clamp(torch.round(x.detach() / scale) + zero, 0, 255) - zero) * scale
    assert torch.allclose(y, want, atol=1e-6)
    assert y[3] == 0.0 and y[0] == y[1] and y[-1] == y[-2]      # zero exact; outside the range clipped
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # a range on one side of zero is widened to hold it: ReLU zeros and padding stay exact
    assert fake_quant(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 1.0])).tolist() == [0.0, 1.0]


def test_the_last_share_of_a_run_trains_on_quantised_inputs_and_the_student_leaves_without_hooks():
    art = tiny_art("bert")
    cfg = Distill.Config(steps=10, batch_size=8, lr=1e-3, dev_samples=8, eval_every=2, progress=False, int8_aware=0.4)
    t = trainer(art, cfg)
    linears = [pl.module for pl in prunable_linears(art.student, art.adapter)]
    seen: list[int] = []  # distinct values a training step's first linear read

    def count(_module, args, _output):
        if torch.is_grad_enabled():
            seen.append(int(args[0].detach().unique().numel()))
    probe = linears[0].register_forward_hook(count)
    m = t.fit()
    probe.remove()
    assert len(seen) == 10 and m["int8_aware_from"] == 6
    assert min(seen[:6]) > 256 and max(seen[6:]) <= 256
    # the best step is picked among the quantised ones; the student ends as plain linears
    assert m["kept_step"] in (8, 10) and [c["step"] for c in m["curve"]] == [2, 4, 6, 8, 10]
    assert all(not lin._forward_pre_hooks for lin in linears)
    assert len(t.int8.ranges) == len(linears)


def test_a_run_stopped_in_its_int8_aware_part_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    from lmmc.train import Checkpoints
    cfg = dict(steps=9, batch_size=8, lr=3e-3, dev_samples=8, eval_every=3, progress=False, int8_aware=0.5,
               checkpoint_every=3, checkpoint_dir=str(tmp_path))
    save = Checkpoints.save

    def save_then_stop(self, name, files, state):
        path = save(self, name, files, state)
        if name == "step-000006":
            raise KeyboardInterrupt
        return path
    monkeypatch.setattr(Checkpoints, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        Distill(Distill.Config(**cfg)).run(tiny_art("bert"))
    monkeypatch.setattr(Checkpoints, "save", save)
    resumed_art, plain_art = tiny_art("bert"), tiny_art("bert")
    resumed = Distill(Distill.Config(**cfg, resume=True)).run(resumed_art)
    plain = Distill(Distill.Config(**{**cfg, "checkpoint_dir": None, "checkpoint_every": 0})).run(plain_art)
    assert resumed["resumed_from"] == 6 and resumed["int8_aware_from"] == plain["int8_aware_from"] == 4
    assert [c["score"] for c in resumed["curve"]] == [c["score"] for c in plain["curve"]]
    for (name, a), b in zip(resumed_art.student.state_dict().items(), plain_art.student.state_dict().values()):
        assert torch.equal(a, b), name
