"""Block-sequential calibration: capture each tower's block inputs once, then visit blocks in order,
feeding every block the outputs of the blocks before it as they are *after* pruning.

Offload: when the model lives on another device than the one pruning runs on (the model on CPU, the
execution device a GPU), only the block being visited is moved to the execution device, and back to the
model's device before the next one is. The rest of the model (embeddings, other blocks, the LM head)
never leaves its device: capturing a tower's first block inputs runs on the model's device and only the
captured inputs move. Memory on the execution device then peaks at one block's weights plus the
calibration activations (every batch's block inputs and outputs, and the statistics of the block's
linears); the model's device holds the whole model once."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lmmc.adapters import Adapter, TowerModule, TowerSpec, block_list
from lmmc.data import Batch


class StopForward(Exception):
    """Raised by a hook to end a forward early: nothing after that point is needed."""


BlockInput = tuple[tuple, dict]  # the (args, kwargs) one block was called with


def block_output(output: Any) -> torch.Tensor:
    """The hidden state in a block's output (blocks return it alone or first in a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block was called with, positionally or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


def without_cache(args: tuple, kwargs: dict) -> BlockInput:
    """A block's call less the forward's key/value cache (a decoder-configured BERT gets one): replayed
    with it, the block would append its keys to the cache at every call."""
    from transformers.cache_utils import Cache

    return (tuple(None if isinstance(a, Cache) else a for a in args),
            {k: v for k, v in kwargs.items() if not isinstance(v, Cache)})


def first_block_input(model: nn.Module, tower: TowerSpec, forward: Callable[[], Any]) -> BlockInput | None:
    """Call `forward` (a forward of `model` through `tower`) only up to the tower's first block and return
    the arguments that block was called with; None when the forward never reached it."""
    _, blocks = block_list(model, tower)
    captured: list[BlockInput] = []

    def hook(_mod, args, kwargs):
        captured.append(without_cache(args, kwargs))
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward()
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


def capture_block_inputs(model: nn.Module, tower: TowerSpec, batches: list[Batch],
                         device: torch.device) -> list[BlockInput]:
    """Run the tower up to its first block for every batch and keep that block's call arguments."""
    runner = TowerModule(model, tower)
    captured: list[BlockInput] = []
    with torch.no_grad():
        for batch in tqdm(batches, desc=f"calibrating {tower.name} tower", unit="batch", leave=False,
                          disable=device.type == "meta"):  # a dry run's plan, over shapes only
            inp = first_block_input(model, tower, lambda: runner(*[batch[name].to(device) for name in runner.names]))
            if inp is not None:
                captured.append(inp)
    return captured


Side = tuple[bool, tuple, dict]  # a block's call less its hidden state: (passed positionally, other args, kwargs)


def capture_side_inputs(model: nn.Module, tower: TowerSpec, batches: list[Batch],
                        device: torch.device) -> dict[str, list[Side]] | None:
    """For a tower whose blocks attend differently (ModernBERT's sliding-window layers among its global
    ones: each kind is called with a mask and rotary embeddings of its own), the call of the first block
    of each attention type less its hidden state, per batch; None when every block takes block 0's."""
    _, blocks = block_list(model, tower)
    kinds = [getattr(b, "attention_type", None) for b in blocks]
    if len(set(kinds)) < 2:
        return None
    firsts = {blocks[kinds.index(k)]: k for k in dict.fromkeys(kinds)}
    last = max(firsts, key=lambda b: kinds.index(firsts[b]))
    runner = TowerModule(model, tower)
    sides: dict[str, list[Side]] = {k: [] for k in firsts.values()}

    def hook(mod, args, kwargs):
        args, kwargs = without_cache(args, kwargs)
        sides[firsts[mod]].append((True, args[1:], kwargs) if args else
                                  (False, (), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        if mod is last:  # every kind seen: the rest of the forward is not needed
            raise StopForward

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in firsts]
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    runner(*[batch[name].to(device) for name in runner.names])
                except StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return sides


def token_mask(batch: Batch) -> torch.Tensor | None:
    """Which positions hold real tokens; padding must not shape calibration statistics."""
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    args, kwargs = inp
    return block_output(block(*args, **kwargs))


def advance(block: nn.Module, inputs: list[BlockInput], sides: list[Side] | None = None) -> list[BlockInput]:
    """The next block's inputs: this block's outputs replace the hidden state, the rest is reused, or is
    `sides` (the next block's own call per batch, see capture_side_inputs)."""
    out = []
    with torch.no_grad():
        for b, (args, kwargs) in enumerate(inputs):
            hidden = run_block(block, (args, kwargs))
            if sides is not None:
                positional, rest, own = sides[b]
                out.append(((hidden, *rest), own) if positional else ((), {**own, "hidden_states": hidden}))
            elif args:
                out.append(((hidden, *args[1:]), kwargs))
            else:
                out.append(((), {**kwargs, "hidden_states": hidden}))
    return out


def home_device(model: nn.Module) -> torch.device:
    """The device the model's weights live on (its first parameter's)."""
    return next(model.parameters()).device


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (through tuples, lists and dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def visit_blocks(model: nn.Module, adapter: Adapter, batches_for: Callable[[TowerSpec], list[Batch]],
                 device: torch.device) -> Iterator[tuple[TowerSpec, int, nn.Module, list[BlockInput], list[Batch]]]:
    """Yield (tower, index, block, its calibration inputs, the source batches) block by block.

    The consumer may change the block (prune it) before asking for the next one; the next block's
    inputs are computed afterwards, through the changed block. A model on another device than `device`
    is offloaded (module docstring): the yielded block and inputs are on `device`, the block goes back
    once the next block's inputs are computed."""
    home = home_device(model)
    offload = home != device
    for tower in adapter.towers:
        batches = batches_for(tower)
        _, blocks = block_list(model, tower)
        inputs = capture_block_inputs(model, tower, batches, home)
        sides = capture_side_inputs(model, tower, batches, home)
        if offload:
            inputs, sides = to_device(inputs, device), to_device(sides, device)
        for i, block in enumerate(blocks):
            if offload:
                block.to(device)
            try:
                yield tower, i, block, inputs, batches
                if i + 1 < len(blocks):
                    inputs = advance(block, inputs, None if sides is None else sides[blocks[i + 1].attention_type])
            finally:
                if offload:
                    block.to(home)


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


def input_square_sums(block: nn.Module, linears: dict[str, nn.Linear], inputs: list[BlockInput],
                      batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Σx² per input feature of each linear (by role) over the real tokens of the calibration inputs."""
    sums = {role: torch.zeros(lin.in_features, device=lin.weight.device) for role, lin in linears.items()}
    collect_linear_inputs(block, linears, inputs, batches, lambda role, rows: sums[role].add_(rows.pow(2).sum(0)))
    return sums
