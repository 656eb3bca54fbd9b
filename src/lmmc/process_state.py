"""Library calls leave the caller's process as they found it: the hub's offline switch, torch's global
random state and the exporter's log levels."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def kept() -> Iterator[None]:
    """Runs the body, then puts back what lmmc changes for its own run: the hub set offline when it cannot
    be reached, the seed each pass sets, the exporter loggers quietened."""
    import torch
    from huggingface_hub import constants

    from lmmc.export.onnx import EXPORTER_LOGGERS

    offline_env, offline_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    levels = {name: logging.getLogger(name).level for name in EXPORTER_LOGGERS}
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        constants.HF_HUB_OFFLINE = offline_flag
        if offline_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline_env
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
