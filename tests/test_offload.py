"""Block-sequential offload: a pruning pass keeps the model on its home device (the CPU) and has at most one
block on the execution device at a time.

There is no second device here, so the test gives the pass `cpu:0` as its execution device: a device that
compares unequal to the model's `cpu` (so the offload path runs) while the tensors stay computable. A
ledger wraps `nn.Module.to` and `nn.Module.cpu`, the calls lmmc moves weights with, and records for every
parameter where it was last sent: the execution device or home. It checks after every move that no more
than one block has weights away from home, and hooks on every block check where each block runs: alone
(calibration statistics, the next block's inputs) only on the execution device, and inside its tower's
forward (capturing the next tower's inputs, the projector's inputs) only at home, where the rest of the
tower is. The masks must equal those of the same pass run without offload."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import tiny_idefics3, tiny_llava, tiny_model
from torch import nn

from lmmc.adapters import block_list, get_adapter, prunable_linears
from lmmc.artifact import Artifact
from lmmc.data import random_calibration, random_generative_calibration
from lmmc.pipeline import get_pass
from lmmc.recipe import CalibrationConfig

HOME, EXEC = torch.device("cpu"), torch.device("cpu", 0)


class Ledger:
    """Where each block's parameters were last sent, and the most blocks ever away from home at once."""

    def __init__(self, model: nn.Module, adapter) -> None:
        self.blocks = {}  # id(block) -> (tower name, index, block)
        for tower in adapter.towers:
            for i, block in enumerate(block_list(model, tower)[1]):
                self.blocks[id(block)] = (tower.name, i, block)
        self.away: set[int] = set()  # ids of parameters sent to EXEC
        self.most_away = 0
        self.moves: list[tuple[str, int, str]] = []  # (tower, block, "exec"/"home") when a block changes place
        self.ran: list[tuple[str, int, str, bool]] = []  # (tower, block, where, inside its tower's forward)
        self.inside = 0

    def moved(self, module: nn.Module, device: torch.device | None) -> None:
        if device is None:  # a dtype-only .to()
            return
        ids = {id(p) for p in module.parameters()}
        before = self.where(module) if id(module) in self.blocks else None
        if device == EXEC:
            self.away |= ids
        else:
            self.away -= ids
        if before is not None and self.where(module) != before:
            tower, i, _ = self.blocks[id(module)]
            self.moves.append((tower, i, self.where(module)))
        self.most_away = max(self.most_away, len(self.blocks_away()))

    def blocks_away(self) -> list[tuple[str, int]]:
        return [(t, i) for t, i, b in self.blocks.values() if any(id(p) in self.away for p in b.parameters())]

    def where(self, block: nn.Module) -> str:
        flags = {id(p) in self.away for p in block.parameters()}
        assert len(flags) == 1, "a block's parameters were split across devices"
        return "exec" if flags.pop() else "home"


@pytest.fixture
def ledger_for(monkeypatch):
    made: list[Ledger] = []
    to, cpu = nn.Module.to, nn.Module.cpu

    def patched_to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        for ledger in made:
            ledger.moved(self, device)
        return to(self, *args, **kwargs)

    def patched_cpu(self):
        for ledger in made:
            ledger.moved(self, HOME)
        return cpu(self)

    def refuse_cuda(self, *args, **kwargs):
        raise AssertionError("a pass moved weights with .cuda(), which the ledger does not see")

    monkeypatch.setattr(nn.Module, "to", patched_to)
    monkeypatch.setattr(nn.Module, "cpu", patched_cpu)
    monkeypatch.setattr(nn.Module, "cuda", refuse_cuda)

    def make(model: nn.Module, adapter, tower_roots: dict[str, nn.Module]) -> Ledger:
        ledger = Ledger(model, adapter)
        for root in tower_roots.values():
            # Wrapped rather than hooked: capturing a tower's first block inputs ends its forward by raising.
            def forward(*args, _forward=root.forward, **kwargs):
                ledger.inside += 1
                try:
                    return _forward(*args, **kwargs)
                finally:
                    ledger.inside -= 1
            root.forward = forward
        for tower_name, i, block in ledger.blocks.values():
            def hook(mod, _args, tower_name=tower_name, i=i):
                ledger.ran.append((tower_name, i, ledger.where(mod), ledger.inside > 0))
            block.register_forward_pre_hook(hook)
        made.append(ledger)
        return ledger

    return make


def run_pruner(model: nn.Module, adapter, calib, device: torch.device,
               name: str = "wanda") -> tuple[dict[str, torch.Tensor], Any]:
    art = Artifact(model_ref="tiny", adapter=adapter, teacher=model, student=model, calib=calib, device=device)
    pruner = get_pass(name)
    pruner(pruner.Config(sparsity=0.5)).run(art)
    return art.masks, art


def check(ledger: Ledger, blocks: list[tuple[str, int]]) -> None:
    assert ledger.most_away == 1  # offloaded: one block at a time, and never none while pruning
    # Every block went to the execution device once, and back before the next one went.
    assert ledger.moves == [m for b in blocks for m in ((*b, "exec"), (*b, "home"))]
    assert ledger.blocks_away() == []
    alone = [(t, i, where) for t, i, where, inside in ledger.ran if not inside]
    assert alone and all(where == "exec" for *_, where in alone)
    assert all(where == "home" for t, i, where, inside in ledger.ran if inside)
    assert {(t, i) for t, i, _ in alone} == set(blocks)  # every block was calibrated on the execution device


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_wanda_on_a_generative_model_holds_one_block_on_the_execution_device(family: str, ledger_for,
                                                                             one_thread) -> None:
    model = tiny_llava() if family == "llava" else tiny_idefics3()
    adapter = get_adapter(family)
    calib = random_generative_calibration(CalibrationConfig(random=True, samples=4, eval_samples=2, batch_size=2),
                                          model, adapter)
    reference, _ = run_pruner(copy.deepcopy(model), adapter, calib, HOME)
    roots = ({"vision": model.model.vision_tower, "language": model.model.language_model} if family == "llava"
             else {"vision": model.model.vision_model, "language": model.model.text_model})
    ledger = ledger_for(model, adapter, roots)
    masks, art = run_pruner(model, adapter, calib, EXEC)
    blocks = [(t.name, i) for t in adapter.towers for i in range(len(block_list(model, t)[1]))]
    check(ledger, blocks)
    # The vision tower ran whole, at home, to capture the decoder's inputs and the projector's.
    assert any(t == "vision" and inside for t, _, _, inside in ledger.ran)
    assert masks.keys() == reference.keys() == {pl.param for pl in prunable_linears(model, adapter)}
    assert all(torch.equal(masks[k], reference[k]) for k in masks)
    assert art.student is model and all(p.device == HOME for p in model.parameters())


def test_wanda_on_an_encoder_is_unchanged_by_offload(ledger_for, one_thread) -> None:
    model = tiny_model("clip")
    adapter = get_adapter("clip")
    calib = random_calibration(CalibrationConfig(random=True, samples=8, eval_samples=2, batch_size=4), model, adapter)
    reference, _ = run_pruner(copy.deepcopy(model), adapter, calib, HOME)
    roots = {"text": model.text_model.encoder, "vision": model.vision_model.encoder}
    ledger = ledger_for(model, adapter, roots)
    masks, _ = run_pruner(model, adapter, calib, EXEC)
    check(ledger, [(t.name, i) for t in adapter.towers for i in range(len(block_list(model, t)[1]))])
    assert masks.keys() == reference.keys() and all(torch.equal(masks[k], reference[k]) for k in masks)


def test_sparsegpt_updates_the_same_weights_offloaded(ledger_for, one_thread) -> None:
    """SparseGPT also rewrites the weights it keeps: offloaded, every weight ends as it does without."""
    model = tiny_llava()
    adapter = get_adapter("llava")
    calib = random_generative_calibration(CalibrationConfig(random=True, samples=4, eval_samples=2, batch_size=2),
                                          model, adapter)
    reference = copy.deepcopy(model)
    run_pruner(reference, adapter, calib, HOME, "sparsegpt")
    ledger = ledger_for(model, adapter, {"vision": model.model.vision_tower, "language": model.model.language_model})
    run_pruner(model, adapter, calib, EXEC, "sparsegpt")
    check(ledger, [(t.name, i) for t in adapter.towers for i in range(len(block_list(model, t)[1]))])
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
