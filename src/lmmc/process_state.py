"""Library calls leave the caller's process as they found it: the hub's offline switch, the global random
states and the exporter's log levels."""
from __future__ import annotations

import logging
import os
import random
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
