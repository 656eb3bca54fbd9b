"""Global selection of structured units to remove under a cost budget, with per-layer floors.

One ranking over every layer of every tower, so the kept widths come out non-uniform: a layer whose
units matter less gives up more of them. Each layer keeps at least its floor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable


@dataclass(frozen=True)
class Unit:
    """A removable unit: the layer it belongs to, its index there, its importance and what it costs."""

    group: Hashable
    index: int
    score: float
    cost: float


@dataclass(frozen=True)
class Selection:
    removed: list[Unit]
    removed_cost: float
    removable_cost: float  # the most the floors let this selection remove


def select_units(units: list[Unit], remove: float, floors: dict[Hashable, int]) -> Selection:
    """Pick units to remove, costing as close to `remove` as whole units allow.

    Every layer first protects its `floors[group]` most important units. The rest are ranked by
    importance per unit of cost, lowest first (ours: units of one stage differ in cost only across
    towers of different widths, where a cheap unit must save less to be worth keeping), and taken while
    that brings the removed cost nearer to `remove`."""
    by_group: dict[Hashable, list[Unit]] = {}
    for unit in units:
        by_group.setdefault(unit.group, []).append(unit)
    candidates: list[Unit] = []
    for group, members in by_group.items():
        ranked = sorted(members, key=lambda u: (-u.score, u.index))
        candidates.extend(ranked[floors.get(group, 0):])
    candidates.sort(key=lambda u: (u.score / u.cost if u.cost else float("inf"), str(u.group), u.index))
    removed: list[Unit] = []
    total = 0.0
    for unit in candidates:
        if total + unit.cost / 2 >= remove:
            break
        removed.append(unit)
        total += unit.cost
    return Selection(removed, total, sum(u.cost for u in candidates))
