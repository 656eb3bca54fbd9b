"""Plots for the compile report, drawn headless (a bare Figure, no pyplot state) into PNG files or bytes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# Wide enough to read in a browser window, small enough to keep report.html light.
_WIDTH = 9.0
_DPI = 100


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def tower_colours(towers: list[str]) -> dict[str, Any]:
    return {t: colormaps["tab10"](i % 10) for i, t in enumerate(towers)}


def _tower_legend(ax, colours: dict[str, Any], extra: list[tuple[Any, str]] = ()) -> None:
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend([*handles, *(h for h, _ in extra)], [*colours, *(label for _, label in extra)], fontsize=8,
              loc="upper right")


def allocation_figure(groups: list[dict[str, Any]], target: float, title: str) -> Figure:
    """Bars of the allocated sparsity per group, coloured by tower, with the global target as a line;
    below them the importance score behind each group, when the allocation has scores."""
    colours = tower_colours(list(dict.fromkeys(row["tower"] for row in groups)))
    x = range(len(groups))
    bar_colours = [colours[row["tower"]] for row in groups]
    has_scores = any(row["score"] is not None for row in groups)
    fig = Figure(figsize=(max(6.0, 0.22 * len(groups) + 2.0), 6.0 if has_scores else 3.5))
    axes = fig.subplots(2 if has_scores else 1, 1, sharex=True, squeeze=False)
    top = axes[0][0]
    top.bar(x, [row["sparsity"] for row in groups], color=bar_colours)
    line = top.axhline(target, color="black", linestyle="--", linewidth=1)
    top.set_ylabel("sparsity")
    top.set_ylim(0, 1)
    top.set_title(title)
    _tower_legend(top, colours, [(line, f"target {target:.0%}")])
    if has_scores:
        bottom = axes[1][0]
        bottom.bar(x, [row["score"] or 0.0 for row in groups], color=bar_colours)
        bottom.set_ylabel("importance score")
    axes[-1][0].set_xticks(list(x), [row["group"] for row in groups], rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


def plot_allocation(groups: list[dict[str, Any]], target: float, path: Path, title: str) -> None:
    """The allocation figure saved as a PNG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    allocation_figure(groups, target, title).savefig(path, dpi=110)


def sparsity_figure(matrices: list[tuple[str, str, float]], per_tower: dict[str, float]) -> Figure:
    """Achieved sparsity per weight matrix (label, tower, sparsity), coloured by tower, with each
    tower's overall sparsity as a dashed line in its colour."""
    colours = tower_colours(list(dict.fromkeys([*per_tower, *(t for _, t, _ in matrices)])))
    fig = Figure(figsize=(min(max(_WIDTH, 0.16 * len(matrices) + 2.0), 30.0), 4.2))
    ax = fig.subplots()
    x = range(len(matrices))
    ax.bar(x, [s for _, _, s in matrices], color=[colours[t] for _, t, _ in matrices])
    lines = [(ax.axhline(s, color=colours[t], linestyle="--", linewidth=1), f"{t} overall {s:.1%}")
             for t, s in per_tower.items()]
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title("sparsity per weight matrix")
    ax.set_xticks(list(x), [label for label, _, _ in matrices], rotation=90, fontsize=6)
    _tower_legend(ax, colours, lines)
    fig.tight_layout()
    return fig


def structure_figure(towers: dict[str, dict[str, Any]]) -> Figure:
    """Per tower, heads and FFN width kept in each teacher layer. `towers[name]` holds `layers` (teacher
    layer count), `kept` ({teacher layer: (heads, ffn)}; a layer missing from it was removed) and the
    teacher's `heads` and `ffn` per layer (None when unknown, then no reference line)."""
    fig = Figure(figsize=(_WIDTH, 2.6 * len(towers) + 0.6))
    axes = fig.subplots(len(towers), 2, squeeze=False)
    for row, (name, t) in zip(axes, towers.items()):
        x = list(range(t["layers"]))
        for ax, i, what in ((row[0], 0, "heads"), (row[1], 1, "ffn")):
            kept = [t["kept"][layer][i] if layer in t["kept"] else 0 for layer in x]
            ax.bar(x, kept, color=["tab:blue" if layer in t["kept"] else "white" for layer in x])
            for layer in x:
                if layer not in t["kept"]:
                    ax.annotate("removed", (layer, 0), ha="center", va="bottom", rotation=90, fontsize=7,
                                color="tab:red")
            if t[what] is not None:
                ax.axhline(t[what], color="black", linestyle="--", linewidth=1, label=f"teacher {t[what]}")
                ax.legend(fontsize=8, loc="lower right")
            ax.set_title(f"{name}: {'attention heads' if what == 'heads' else 'FFN width'} kept", fontsize=10)
            ax.set_xticks(x, [str(layer) for layer in x], fontsize=7)
            ax.set_xlabel("teacher layer", fontsize=8)
    fig.tight_layout()
    return fig


def cosine_histogram(per_tower: dict[str, list[float]], threshold: float | None) -> Figure:
    """Distribution of the per-sample teacher-student cosine on the held-out set, one panel per tower,
    with the mean and the recipe's min_cosine gate marked."""
    fig = Figure(figsize=(_WIDTH, 3.0 * len(per_tower) + 0.4))
    axes = fig.subplots(len(per_tower), 1, squeeze=False)
    for (ax,), (name, values) in zip(axes, per_tower.items()):
        ax.hist(values, bins=min(40, max(10, len(values) // 4)), color="tab:blue")
        mean = sum(values) / len(values)
        ax.axvline(mean, color="black", linewidth=1, label=f"mean {mean:.4f}")
        if threshold is not None:
            ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"gate {threshold}")
        ax.set_title(f"{name}: cosine to the teacher, {len(values)} held-out samples", fontsize=10)
        ax.set_ylabel("samples")
        ax.legend(fontsize=8, loc="upper left")
    axes[-1][0].set_xlabel("cosine")
    fig.tight_layout()
    return fig


def distill_figure(steps: list[int], loss: list[float | None], score: list[float | None], title: str,
                   boundaries: list[int] = (), measure: str = "dev fidelity (mean cosine)") -> Figure:
    """Training loss (mean since the previous evaluation) and the dev measure against the step; dotted lines
    where a run starts, when one plot joins several."""
    fig = Figure(figsize=(_WIDTH, 3.4))
    ax = fig.subplots()
    for step in boundaries:
        ax.axvline(step, color="tab:gray", linestyle=":", linewidth=1)
    handles = []
    has_loss = [(s, v) for s, v in zip(steps, loss) if v is not None]
    if has_loss:
        handles += ax.plot(*zip(*has_loss), color="tab:orange", marker=".", label="training loss")
        ax.set_ylabel("training loss")
    dev = ax.twinx() if has_loss else ax
    handles += dev.plot(*zip(*[(s, v) for s, v in zip(steps, score) if v is not None]), color="tab:blue",
                        marker="o", label=measure)
    dev.set_ylabel(measure.split(" (")[0])
    for axis in {ax, dev}:
        axis.ticklabel_format(axis="y", useOffset=False)  # cosines near 1 read as they are, not as 1 + 1e-5
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def latency_figure(groups: dict[str, list[tuple[str, float, bool]]], unit: str) -> Figure:
    """Horizontal latency bars per group (a tower): (label, ms, is the student), the student in blue."""
    rows = sum(len(v) for v in groups.values())
    fig = Figure(figsize=(_WIDTH, 0.32 * rows + 1.0 * len(groups) + 0.4))
    axes = fig.subplots(len(groups), 1, squeeze=False)
    for (ax,), (name, bars) in zip(axes, groups.items()):
        y = range(len(bars))
        ax.barh(y, [ms for _, ms, _ in bars], color=["tab:blue" if s else "tab:gray" for _, _, s in bars])
        ax.set_yticks(list(y), [label for label, _, _ in bars], fontsize=8)
        ax.invert_yaxis()
        for i, (_, ms, _) in enumerate(bars):
            ax.annotate(f" {ms:.2f}", (ms, i), va="center", fontsize=7)
        ax.margins(x=0.1)  # room for the longest bar's label
        ax.set_title(f"{name}: {unit}", fontsize=10)
    fig.tight_layout()
    return fig


def seconds_figure(passes: list[tuple[str, float]]) -> Figure:
    """Wall time of each pass, in pass order."""
    fig = Figure(figsize=(_WIDTH, 0.3 * len(passes) + 1.0))
    ax = fig.subplots()
    y = range(len(passes))
    ax.barh(y, [s for _, s in passes], color="tab:green")
    ax.set_yticks(list(y), [name for name, _ in passes], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    fig.tight_layout()
    return fig
