"""Interleaved timing in turns: no run is timed in the previous candidate's wake; counts and warm-up."""

from __future__ import annotations

import statistics
import time

import pytest

from lmmc.timing import time_interleaved

pytestmark = pytest.mark.timed  # the timing loop is checked against sleeps


def _neighbours() -> dict[str, object]:
    """Two candidates that take 2 ms alone; a run of `noisy` leaves the next run of another candidate 8 ms
    slower (as a runtime's worker threads still spinning on the cores do; its own next run uses them)."""
    wake = {"by": None}

    def run(name: str) -> None:
        time.sleep(0.010 if wake["by"] not in (None, name) else 0.002)
        wake["by"] = "noisy" if name == "noisy" else None

    return {"noisy": lambda: run("noisy"), "quiet": lambda: run("quiet")}


def test_a_neighbours_wake_is_not_timed():
    times = time_interleaved(_neighbours(), repeats=9)
    assert statistics.median(times["quiet"]) < 6, times["quiet"]
    assert statistics.median(times["noisy"]) < 6, times["noisy"]

    # The same candidates timed one run per turn: every run of quiet follows noisy, so the check above can fail.
    runs, single = _neighbours(), []
    for _ in range(9):
        runs["noisy"]()
        start = time.perf_counter()
        runs["quiet"]()
        single.append((time.perf_counter() - start) * 1e3)
    assert statistics.median(single) > 8, single


def test_counts_rotation_and_warmup():
    order: list[str] = []
    runs = {k: (lambda k=k: order.append(k)) for k in "abc"}
    rounds: list[int] = []
    times = time_interleaved(runs, repeats=7, warmup=2, per_visit=3, on_round=lambda: rounds.append(len(order)))
    # 7 timed runs need 3 visits of 3; with 2 warm-up rounds, 5 rounds of 3 visits of 1 + 3 runs
    assert {k: len(v) for k, v in times.items()} == {"a": 9, "b": 9, "c": 9}
    assert len(order) == 5 * 3 * 4 and rounds == [12, 24, 36, 48, 60]
    firsts = [order[i * 12] for i in range(5)]
    assert firsts == ["a", "b", "c", "a", "b"]  # the first candidate of each round rotates
    assert order[:4] == ["a"] * 4 and order[4:8] == ["b"] * 4  # a visit: one untimed run, three timed


def test_a_visit_opens_with_untimed_runs_until_it_has_settled(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])  # the module's clock: runs advance it
    calls = {"a": 0, "b": 0}

    def run(key: str, seconds: float):
        def go():
            calls[key] += 1
            clock["now"] += seconds
        return go

    times = time_interleaved({"a": run("a", 0.001), "b": run("b", 0.05)}, repeats=3, warmup=0, settle_s=0.02)
    # one visit each: "a" runs untimed until 20 ms have passed (20 runs), then 3 timed; "b"'s one run outlasts it
    assert calls == {"a": 23, "b": 4}
    assert {k: [round(t, 6) for t in v] for k, v in times.items()} == {"a": [1.0] * 3, "b": [50.0] * 3}
