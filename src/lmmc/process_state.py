"""Library calls leave the caller's process as they found it: the hub's offline switch, the global random
states and the exporter's log levels; and signals held where an interrupt must wait."""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def kept() -> Iterator[None]:
    """Runs the body, then puts back what lmmc and the libraries it loads change for its run: the hub set
    offline when it cannot be reached, the seed each pass sets and what libraries draw from Python's and
    numpy's generators (rich, as NNCF imports it), the exporter loggers quietened."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()  # before the imports, which may draw
    import torch
    from huggingface_hub import constants

    from lmmc.export.onnx import EXPORTER_LOGGERS

    offline_env, offline_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    levels = {name: logging.getLogger(name).level for name in EXPORTER_LOGGERS}
    # the GPUs' generators only where the caller has started CUDA: forking them would start it on every GPU
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        constants.HF_HUB_OFFLINE = offline_flag
        if offline_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline_env
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# The signals lmmc's handler turned into KeyboardInterrupt during this command. One raised while a finaliser
# (a __del__ the garbage collector runs) executes is printed as "Exception ignored" and lost, and the command
# would run on to its end and exit 0: the steps of a compile raise it again.
INTERRUPTS: list[int] = []


def interrupt(signum: int, frame: object) -> None:
    """lmmc's handler for SIGINT and SIGTERM while a command runs."""
    INTERRUPTS.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def raise_lost_interrupt() -> None:
    """Raise again an interrupt a finaliser swallowed; called between steps, where stopping is clean."""
    if INTERRUPTS:
        raise KeyboardInterrupt(signal.Signals(INTERRUPTS[-1]).name)


@contextmanager
def interrupts_deferred() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM for the body; yields the signals that came, for the caller to act on after it:
    while an output is swapped in, or while C++ code that calls back into Python runs (OpenVINO's frontend
    turned an interrupt raised in its callback into a conversion error, or aborted the process)."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield came
        return
    held = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
