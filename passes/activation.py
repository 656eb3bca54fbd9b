"""Activation swap: the FFN activation of every block replaced (GELU -> ReLU), for the distillation to adapt to."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn
from transformers.activations import ACT2FN

from lmmc.adapters import Adapter, TowerSpec, block_linears, block_list, tower_config
from lmmc.artifact import Artifact
from lmmc.data import CalibData
from lmmc.errors import LmmcError
from lmmc.pipeline import PassConfig, Pass, register
from lmmc.reconstruct import at_tokens

# Where the families keep their FFN activation: BERT, MPNet, ViT (intermediate_act_fn), CLIP and SigLIP
# (activation_fn), ModernBERT (act), Llama-style decoders (act_fn), DistilBERT (activation); and the config
# key that builds it.
ACT_ATTRS = ("intermediate_act_fn", "activation_fn", "act", "act_fn", "activation")
CONFIG_KEYS = ("hidden_act", "hidden_activation", "activation")


class ActivationConfig(PassConfig):
    to: str = Field("relu", description="the activation every FFN gets, a name transformers knows (relu, gelu, "
                    "gelu_pytorch_tanh, silu, ...)")
    towers: list[str] | None = Field(None, min_length=1, description="only these towers (default: every tower)")
    refit: float | None = Field(None, ge=0.0, description="refit each FFN's second matrix by ridge least squares "
                                "(this strength, relative to the Gram matrix's mean diagonal) so that it reads "
                                "from the new activation what it read from the old, on the calibration tokens; "
                                "blocks in order, each on what the swapped ones before it give. Needs calibration "
                                "data; not for gated FFNs")

    def check_model(self, adapter: Adapter, config: Any = None) -> None:
        names = [t.name for t in adapter.towers]
        unknown = sorted(set(self.towers or []) - set(names))
        if unknown:
            raise LmmcError(f"pass 'activation': no tower {unknown} in this {adapter.family} model; its towers "
                            f"are {names}")
        if config is None:
            return
        for tower in (adapter.tower(n) for n in self.towers or names):
            tcfg = getattr(config, tower.config_key) if tower.config_key else config
            if not any(isinstance(getattr(tcfg, k, None), str) for k in CONFIG_KEYS):
                raise _unsupported(tower, adapter)
            if self.refit is not None and tower.layout.gate:
                raise LmmcError(f"pass 'activation': refit is for FFNs without a gate; the {tower.name} tower of "
                                f"this {adapter.family} model gates its FFN. Drop refit")

    @field_validator("to")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ACT2FN:
            raise ValueError(f"unknown activation '{value}'; transformers knows {', '.join(sorted(ACT2FN))}")
        return value


def _unsupported(tower: TowerSpec, adapter: Adapter) -> LmmcError:
    return LmmcError(f"pass 'activation': the {tower.name} tower of this {adapter.family} model keeps its FFN "
                     f"activation where the pass does not look (modules {ACT_ATTRS}, config {CONFIG_KEYS}); drop "
                     f"the pass for this model")


@register
class ActivationPass(Pass):
    """Swap the FFN activation of every block (ReLU by default), config included, so the student reloads with it.

    Ours, for CPU deployment: in OpenVINO INT8 on a Xeon with AMX, the exact GELU fused into the FFN's
    first matrix product costs about 0.2 ms a block at 8 x 128 tokens, where ReLU costs almost nothing: the
    MiniLM deployment student ran 12 % faster with ReLU, and after the same distillation kept 0.006-0.011
    less cosine (BENCHMARKS.md, "Deployment", run 24). The swap changes the function, so a `distill` pass
    should follow.

    Recipe::

        passes:
          - antgmm: {keep: 0.5}
          - activation: {to: relu}
          - distill: {minutes: 15}
    """

    name = "activation"
    Config = ActivationConfig

    def check(self, available: set[str]) -> None:
        super().check(available)
        if self.config.refit is not None and "calib" not in available:
            raise LmmcError("pass 'activation': refit needs calibration data; add a calibration section to the "
                            "recipe or drop refit")

    def run(self, art: Artifact) -> dict[str, Any]:
        model, adapter = art.student, art.adapter
        self.config.check_model(adapter, model.config)
        chosen = self.config.towers or [t.name for t in adapter.towers]
        out: dict[str, Any] = {}
        for tower in (adapter.tower(n) for n in chosen):
            cfg = tower_config(model, tower)
            keys = [k for k in CONFIG_KEYS if isinstance(getattr(cfg, k, None), str)]
            blocks = block_list(model, tower)[1]
            sites = [activation_sites(block) for block in blocks]
            if not all(sites):
                raise _unsupported(tower, adapter)
            record: dict[str, Any] = {"from": getattr(cfg, keys[0]), "to": self.config.to,
                                      "modules": sum(map(len, sites))}
            left = []
            for i, block_sites in enumerate(sites):
                if self.config.refit is not None:
                    left.append(refit_fc2_(model, tower, i, ACT2FN[self.config.to], art.calib, art.device,
                                           self.config.refit))
                for module, attr in block_sites:
                    setattr(module, attr, ACT2FN[self.config.to])
            if left:
                record["refit_left"] = left
            out[tower.name] = record
            for k in keys:
                setattr(cfg, k, self.config.to)
        return {"activation": out}


def activation_sites(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every activation module in a block's FFN."""
    return [(module, attr) for module in block.modules() for attr in ACT_ATTRS
            if isinstance(getattr(module, attr, None), nn.Module)]


def refit_fc2_(model: nn.Module, tower: TowerSpec, block: int, new: nn.Module, calib: CalibData,
               device: torch.device, ridge: float) -> float:
    """Refit block `block`'s second FFN matrix for the activation `new` before it is swapped in.

    On the calibration tokens (padding left out), with h the first matrix's output, x = act(h) what the
    second matrix reads now and z = [new(h), 1]: x ≈ A z by ridge regression, then W <- W A and the
    constant's part goes to the bias. Returns the share of W x's variance about its mean left unexplained."""
    lins = block_linears(block_list(model, tower)[1][block], tower)
    fc1, fc2 = lins["fc1"][1], lins["fc2"][1]
    if fc2.bias is None:
        raise LmmcError(f"pass 'activation': refit needs a bias on the FFN's second matrix, which the {tower.name} "
                        f"tower's blocks lack; drop refit")
    width = fc1.out_features
    zz = torch.zeros(width + 1, width + 1, dtype=torch.float64)
    xz = torch.zeros(width, width + 1, dtype=torch.float64)
    xx = torch.zeros(width, width, dtype=torch.float64)
    x_sum = torch.zeros(width, dtype=torch.float64)
    seen = [0]
    old = getattr(*activation_sites(block_list(model, tower)[1][block])[0])

    def add(h: torch.Tensor) -> None:
        h = h.float()
        x, z = old(h).double().cpu(), new(h).double().cpu()
        z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
        zz.add_(z.T @ z)
        xz.add_(x.T @ z)
        xx.add_(x.T @ x)
        x_sum.add_(x.sum(0))
        seen[0] += len(x)

    at_tokens(model, tower, fc1, calib, device, add, output=True)
    n = max(seen[0], 1)
    zz, xz, xx, mean = zz / n, xz / n, xx / n, x_sum / n
    reg = ridge * zz.diagonal().mean() * torch.eye(width + 1, dtype=zz.dtype)
    a = torch.linalg.lstsq(zz + reg, xz.T, driver="gelsd").solution.T  # width x (width + 1)
    with torch.no_grad():
        w = fc2.weight.double().cpu()
        rest = xx - a @ xz.T - xz @ a.T + a @ zz @ a.T  # E (x - A z)(x - A z)^T
        spread = w @ (xx - torch.outer(mean, mean)) @ w.T
        left = float(torch.trace(w @ rest @ w.T) / torch.trace(spread)) if torch.trace(spread) > 0 else 0.0
        fitted = w @ a
        fc2.weight.copy_(fitted[:, :width].to(fc2.weight.dtype))
        fc2.bias += fitted[:, width].to(fc2.bias.dtype).to(fc2.bias.device)
    return left
