"""INT8-aware distillation: the inputs of a student's linears pass through 8-bit fake quantisation."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Per-tensor asymmetric 8-bit, as ONNX Runtime's static QDQ and NNCF's transformer preset quantise activations.
_QMIN, _QMAX = 0, 255
# How far each step's range moves a tracked range: about the last 20 batches count.
_MOMENTUM = 0.05


def fake_quant(x: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """`x` rounded to the 256 levels that span [lo, hi] = `span` (widened to hold 0, which must stay exact
    for padding and ReLU zeros), values outside clipped. The gradient passes straight through inside the
    range and is zero outside it."""
    lo, hi = span[0].clamp(max=0.0), span[1].clamp(min=0.0)
    scale = ((hi - lo) / (_QMAX - _QMIN)).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(_QMIN, _QMAX).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x.float(), scale.reshape(1), zero.reshape(1), _QMIN, _QMAX).to(x.dtype)


class Int8Aware:
    """Forward pre-hooks on `linears` ({name: module}) that fake-quantise each one's input. A forward with
    gradients (a training step) first moves the linear's tracked range toward the batch's min and max; the
    range starts at the first batch's."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.linears = linears
        self.ranges: dict[str, torch.Tensor] = {}  # [lo, hi], float32, on the linear's device
        self.handles: list[Any] = []

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> None:
        if not self.handles:
            self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in self.linears.items()]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if torch.is_grad_enabled() or name not in self.ranges:
                with torch.no_grad():
                    now = torch.stack(torch.aminmax(x.float()))
                    old = self.ranges.get(name)
                    self.ranges[name] = now if old is None else old.lerp(now, _MOMENTUM)
            return (fake_quant(x, self.ranges[name]), *args[1:])
        return hook

    def state_dict(self) -> dict[str, Any]:
        return {"attached": self.attached, "ranges": {k: v.tolist() for k, v in self.ranges.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = {k: next(m.parameters()).device for k, m in self.linears.items()}
        self.ranges = {k: torch.tensor(v, dtype=torch.float32, device=device[k]) for k, v in state["ranges"].items()}
        if state["attached"]:
            self.attach()
        else:
            self.detach()
