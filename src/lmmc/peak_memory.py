"""The child side of `lmmc bench`'s peak memory: a fresh process that loads one deployment and runs it once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# Only the runtime being measured is imported: torch and transformers take seconds to import, and the bench
# starts one of these processes for every row of its table.


def _vm(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field_name)


def reset_peak() -> float:
    """Resets VmHWM so that the peaks of what ran so far (the imports) do not count; VmRSS now, MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _vm("VmRSS")


def print_peak_increase(before: float) -> None:
    """Prints, for `bench.memory_process`, how far VmHWM rose above `before` (MiB)."""
    print(json.dumps({"peak_rss_increase_mib": _vm("VmHWM") - before}))


def encoder_child() -> None:
    """argv = JSON spec of one encoder deployment. Prints the peak RSS increase of loading it and running the
    saved feed once, MiB."""
    spec = json.loads(sys.argv[1])
    # The runtime is loaded before the baseline (libraries, the modelling code, OpenVINO's CPU plugin):
    # what is measured is what this model adds to a process that already runs the runtime.
    if spec["backend"] == "pytorch":
        import torch
        import transformers

        from lmmc.bench import torch_runner
        from lmmc.modelio import local_dir, resolve_config

        torch.set_num_threads(spec["threads"])
        config, adapter = resolve_config(spec["model"], spec["trust_remote_code"])
        auto = getattr(transformers, adapter.auto_class)
        with torch.device("meta"):  # imports the modelling code (about 1,400 modules) without any weights
            auto.from_config(config)
    elif spec["backend"] == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        from lmmc.runtime.openvino import core

        core().get_versions("CPU")
    from lmmc.runtime import load

    feed = dict(np.load(spec["feed"]))
    before = reset_peak()
    if spec["backend"] == "pytorch":
        model = auto.from_pretrained(str(local_dir(spec["model"]) or spec["model"]), dtype=torch.float32,
                                     use_safetensors=True).eval()
        run = torch_runner(model, adapter.tower(spec["tower"]))
    else:
        run = load(spec["path"], spec["backend"], spec["threads"], inference_precision=spec["inference"],
                   static_shape=tuple(spec["static"]) if spec["static"] else None).run
    run(feed)
    print_peak_increase(before)
