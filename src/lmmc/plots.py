"""Plots for the compile report, drawn headless into PNG files (a bare Figure, no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_allocation(groups: list[dict[str, Any]], target: float, path: Path, title: str) -> None:
    """Bars of the allocated sparsity per group, coloured by tower, with the global target as a line;
    below them the importance score behind each group, when the allocation has scores."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    towers = list(dict.fromkeys(row["tower"] for row in groups))
    colours = {t: colormaps["tab10"](i % 10) for i, t in enumerate(towers)}
    x = range(len(groups))
    bar_colours = [colours[row["tower"]] for row in groups]
    has_scores = any(row["score"] is not None for row in groups)
    fig = Figure(figsize=(max(6.0, 0.22 * len(groups) + 2.0), 6.0 if has_scores else 3.5))
    axes = fig.subplots(2 if has_scores else 1, 1, sharex=True, squeeze=False)
    top = axes[0][0]
    top.bar(x, [row["sparsity"] for row in groups], color=bar_colours)
    top.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    top.set_ylabel("sparsity")
    top.set_ylim(0, 1)
    top.set_title(title)
    handles = [Rectangle((0, 0), 1, 1, color=colours[t]) for t in towers]
    top.legend([*handles, top.get_lines()[0]], [*towers, f"target {target:.0%}"], fontsize=8, loc="upper right")
    if has_scores:
        bottom = axes[1][0]
        bottom.bar(x, [row["score"] or 0.0 for row in groups], color=bar_colours)
        bottom.set_ylabel("importance score")
    axes[-1][0].set_xticks(list(x), [row["group"] for row in groups], rotation=90, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
