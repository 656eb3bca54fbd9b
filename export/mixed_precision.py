"""Mixed precision: each block matrix INT8 or fp32, chosen by the pooled-embedding cosine that quantising it
costs against the fp32 student on the calibration batches, in a search whose cost is bounded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import Field

from lmmc.adapters import Adapter, TowerSpec, prunable_linears
from lmmc.config import Config

# feed -> pooled embeddings of one quantised variant
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


class MixedConfig(Config):
    """`mixed:` under an INT8 export: the fidelity budget and the bounds of the search."""

    max_cosine_drop: float = Field(gt=0, lt=1, description="largest 1 - mean cosine of the mixed artifact's pooled "
                                   "embeddings to the fp32 student's, on the calibration batches; the most "
                                   "costly matrices stay fp32 until it holds")
    search_batches: int = Field(4, gt=0, description="calibration batches the costs are measured on (the "
                                "quantiser still calibrates on every batch)")
    max_rounds: int = Field(3, gt=0, description="most quantisations of the artifact itself: when the chosen "
                            "matrices miss the budget once re-calibrated, the next costliest is kept fp32")


def block_matrices(model: torch.nn.Module, adapter: Adapter, tower: TowerSpec, plain: Path) -> dict[str, str]:
    """MatMul node of the plain export -> the PyTorch module (a block linear of `tower`) whose weight it
    multiplies by, in graph order, through the export's initialiser map `<tower>.names.json`."""
    from lmmc.export.tensorrt import node_modules

    names = json.loads(plain.with_suffix(".names.json").read_text())
    linears = {p.param.removesuffix(".weight") for p in prunable_linears(model, adapter) if p.tower == tower.name}
    return {node: module for node, module in node_modules(plain, names).items() if module in linears}


def _cosine_drop(run: Runner, feeds: list[dict[str, np.ndarray]], reference: list[np.ndarray]) -> float:
    """1 - mean row-wise cosine of the runner's pooled embeddings to the fp32 ones."""
    from lmmc.export.validate import cosine

    return 1.0 - float(np.concatenate([cosine(r, run(f)) for f, r in zip(feeds, reference)]).mean())


def choose_precisions(matrices: dict[str, str], revert: Callable[[set[str]], Runner],
                      quantise: Callable[[list[str]], Runner], feeds: list[dict[str, np.ndarray]],
                      reference: list[np.ndarray], cfg: MixedConfig) -> dict[str, Any]:
    """Pick the matrices to keep fp32 and write the artifact; return the choice table and figures.

    `revert(nodes)` runs the fully quantised search model with those MatMul nodes' quantisers removed (no
    re-calibration: cheap); `quantise(nodes)` writes the artifact with those nodes kept fp32 through the
    library's own quantiser and runs it. A matrix's cost is the cosine drop of the model with that matrix
    alone quantised, less the drop with none of them quantised (what the quantisers outside the block
    matrices cost: the attention scores' products). The costliest are kept fp32, fewest first, until the
    search model meets the budget; then the artifact is quantised and measured, one more matrix kept per
    round while it misses. Cost: one search quantisation, at most 2N + 2 runs of the search batches and
    `max_rounds` quantisations."""
    nodes = list(matrices)
    every = set(nodes)
    int8_drop = _cosine_drop(revert(set()), feeds, reference)
    outside = _cosine_drop(revert(every), feeds, reference)
    cost = {n: _cosine_drop(revert(every - {n}), feeds, reference) - outside for n in nodes}
    order = sorted(nodes, key=lambda n: -cost[n])
    keep, predicted = 0, int8_drop
    while predicted > cfg.max_cosine_drop and keep < len(order):
        keep += 1
        predicted = _cosine_drop(revert(set(order[:keep])), feeds, reference)
    rounds = []
    while True:
        measured = _cosine_drop(quantise(order[:keep]), feeds, reference)
        rounds.append({"fp32_matrices": keep, "cosine_drop": measured})
        if measured <= cfg.max_cosine_drop or keep == len(order) or len(rounds) == cfg.max_rounds:
            break
        keep += 1
    fp32 = set(order[:keep])
    # With every block matrix fp32, what still drops is quantisation outside them (the attention scores'
    # products, the embeddings): more rounds cannot help.
    fix = ("every block matrix is fp32 already, and the drop left is the quantisation outside them; raise "
           "max_cosine_drop" if keep == len(order) else "raise mixed.max_rounds or max_cosine_drop")
    warnings = [] if measured <= cfg.max_cosine_drop else [
        f"the mixed artifact's cosine drop {measured:.4g} stays above max_cosine_drop {cfg.max_cosine_drop} "
        f"with {keep} of {len(order)} matrices in fp32 after {len(rounds)} rounds; {fix}"]
    return {
        "max_cosine_drop": cfg.max_cosine_drop, "search_batches": len(feeds),
        "int8_cosine_drop": int8_drop, "fp32_matrices_cosine_drop": outside, "predicted_cosine_drop": predicted,
        "cosine_drop": measured,
        "rounds": rounds, "warnings": warnings,
        "fp32_matrices": [matrices[n] for n in nodes if n in fp32],
        "matrices": [{"matrix": matrices[n], "node": n, "precision": "fp32" if n in fp32 else "int8",
                      "cosine_cost": cost[n]} for n in nodes],
    }
