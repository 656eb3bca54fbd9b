"""Block-sequential calibration: capture each tower's block inputs once, then visit blocks in order,
feeding every block the outputs of the blocks before it as they are *after* pruning."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lmmc.adapters import Adapter, TowerModule, TowerSpec, block_list
from lmmc.data import Batch


class _Stop(Exception):
    pass


BlockInput = tuple[tuple, dict]  # the (args, kwargs) one block was called with


def capture_block_inputs(model: nn.Module, tower: TowerSpec, batches: list[Batch],
                         device: torch.device) -> list[BlockInput]:
    """Run the tower up to its first block for every batch and keep that block's call arguments."""
    _, blocks = block_list(model, tower)
    captured: list[BlockInput] = []

    def hook(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    runner = TowerModule(model, tower)
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"calibrating {tower.name} tower", unit="batch", leave=False):
                try:
                    runner(*[batch[name].to(device) for name in runner.names])
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def token_mask(batch: Batch) -> torch.Tensor | None:
    """Which positions hold real tokens; padding must not shape calibration statistics."""
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    args, kwargs = inp
    return _hidden(block(*args, **kwargs))


def advance(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The next block's inputs: this block's outputs replace the hidden state, the rest is reused."""
    out = []
    with torch.no_grad():
        for args, kwargs in inputs:
            hidden = run_block(block, (args, kwargs))
            if args:
                out.append(((hidden, *args[1:]), kwargs))
            else:
                out.append(((), {**kwargs, "hidden_states": hidden}))
    return out


def visit_blocks(model: nn.Module, adapter: Adapter, batches_for: Callable[[TowerSpec], list[Batch]],
                 device: torch.device) -> Iterator[tuple[TowerSpec, int, nn.Module, list[BlockInput], list[Batch]]]:
    """Yield (tower, index, block, its calibration inputs, the source batches) block by block.

    The consumer may change the block (prune it) before asking for the next one; the next block's
    inputs are computed afterwards, through the changed block."""
    for tower in adapter.towers:
        batches = batches_for(tower)
        _, blocks = block_list(model, tower)
        inputs = capture_block_inputs(model, tower, batches, device)
        for i, block in enumerate(blocks):
            yield tower, i, block, inputs, batches
            if i + 1 < len(blocks):
                inputs = advance(block, inputs)


def collect_linear_inputs(block: nn.Module, linears: dict[str, nn.Linear], inputs: list[BlockInput],
                          batches: list[Batch], fn: Callable[[str, torch.Tensor], None]) -> None:
    """Run the block on its calibration inputs and hand every linear's input rows (real tokens only,
    flattened to [tokens, in_features]) to `fn(role, rows)`."""
    handles = []
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(role: str):
        def hook(_mod, args):
            x = args[0].detach()
            mask = current_mask[0]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.to(x.device)]
            fn(role, x.reshape(-1, x.shape[-1]).float())
        return hook

    for role, lin in linears.items():
        handles.append(lin.register_forward_pre_hook(make_hook(role)))
    try:
        with torch.no_grad():
            for inp, batch in zip(inputs, batches):
                current_mask[0] = token_mask(batch)
                run_block(block, inp)
    finally:
        for h in handles:
            h.remove()
