"""Latency timing shared by bench, validation, the export passes and the latency model: candidates
interleaved in visits, so drift hits all alike and no run is timed in the previous candidate's wake."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

from lmmc.errors import LmmcError

K = TypeVar("K", bound=Hashable)

PER_VISIT = 3  # timed runs per visit, after one untimed run


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container or taskset narrows), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_threads_start(threads: int, option: str) -> None:
    """Start and stop `threads` threads, so a count the process may not start is refused in words: a limit on
    its memory ('ulimit -v', which each thread's stack counts against) or its processes ('ulimit -u') made a
    runtime fail deep inside, with a message that names neither."""
    stop = threading.Event()
    started: list[threading.Thread] = []
    try:
        for _ in range(threads - 1):  # the calling thread is one of them
            started.append(threading.Thread(target=stop.wait, daemon=True))
            started[-1].start()
    except RuntimeError as err:
        raise LmmcError(f"{option} {threads}: this process cannot start {threads} threads ({err}); a limit on its "
                        f"memory ('ulimit -v') or processes ('ulimit -u') stops it. Ask for fewer: it may run on "
                        f"{usable_cpus()} CPU(s)") from None
    finally:
        stop.set()
        for t in started:
            if t.is_alive():
                t.join()


def time_interleaved(runs: Mapping[K, Callable[[], object]], repeats: int, warmup: int = 1,
                     per_visit: int = PER_VISIT, on_round: Callable[[], object] | None = None,
                     sync: Callable[[], object] | None = None, settle_s: float = 0.0) -> dict[K, list[float]]:
    """Milliseconds of `repeats` or more timed runs per candidate (whole visits).

    Candidates take turns in rounds, the first one rotating each round so drift hits all alike. Each turn
    (a visit) starts with one untimed run, then times `per_visit` runs back to back. The untimed run
    absorbs what the previous candidate leaves behind: its runtime's worker threads still spinning on the
    cores (ONNX Runtime's and OpenMP's do by default) and its weights in the caches. Timed one run per
    turn, a candidate is timed in its neighbour's wake: on two cores an OpenVINO INT8 model then took 1.6x
    as long after an ONNX Runtime one as alone, since a rotating start leaves every neighbour the same
    (BENCHMARKS.md, "Timing"). `warmup` whole rounds come first and are discarded; `on_round` is called
    after every round (a progress bar), `sync` before and after every timed run (a GPU's). With `settle_s`,
    the untimed runs go on until that long has passed in the visit: a run of a few milliseconds is over
    before the previous candidate's worker threads stop spinning."""
    if repeats < 1 or per_visit < 1:
        raise ValueError(f"repeats = {repeats}, per_visit = {per_visit}: time at least one run")
    keys = list(runs)
    times: dict[K, list[float]] = {k: [] for k in keys}
    for r in range(warmup + math.ceil(repeats / per_visit)):
        for j in range(len(keys)):
            key = keys[(r + j) % len(keys)]
            run = runs[key]
            visit = time.perf_counter()
            run()
            while time.perf_counter() - visit < settle_s:
                run()
            for _ in range(per_visit):
                if sync is not None:
                    sync()
                start = time.perf_counter()
                run()
                if sync is not None:
                    sync()
                if r >= warmup:
                    times[key].append((time.perf_counter() - start) * 1e3)
        if on_round is not None:
            on_round()
    return times
