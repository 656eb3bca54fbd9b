"""Peak memory of the `ort` pass's static INT8 calibration on a base-size vision tower, by the rows ONNX
Runtime's calibration graph reads a run: a SigLIP-B/16 image tower (12 blocks x 768, 224 x 224 images,
random weights) exported as the `onnx` pass does, then quantised as the pass does on 256 images in the
pass's batches of 32, fed whole (32 rows a run) and cut into runs of `export.ort.CALIBRATION_ROWS`.

    .venv/bin/python benchmarks/calibration_memory.py [--images 256] [--rows 32 8]

Each setting runs in a process of its own after the export, so its peak resident memory is its own; the
quantised graphs' scales are compared, since min-max ranges do not depend on the batching.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
import numpy as np, onnx
import lmmc.export.ort as ort_pass
folder, rows, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ort_pass.CALIBRATION_ROWS = rows
rng = np.random.default_rng(0)
feeds = [{"pixel_values": rng.normal(size=(32, 3, 224, 224)).astype(np.float32)} for _ in range(images // 32)]
started = time.perf_counter()
ort_pass.quantize_static_onnx(Path(folder, "vision.onnx"), Path(folder, f"vision.{rows}.onnx"), feeds)
seconds = time.perf_counter() - started
scales = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in onnx.load(f"{folder}/vision.{rows}.onnx").graph.initializer
          if i.name.endswith("_scale")}
json.dump(scales, open(f"{folder}/scales.{rows}.json", "w"))
print(json.dumps({"rows": rows, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": seconds}))
"""


def export(folder: Path) -> None:
    import torch
    from transformers import SiglipConfig, SiglipModel

    from lmmc.adapters import get_adapter
    from lmmc.export.onnx import export_tower

    torch.manual_seed(0)
    vision = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12,
                  image_size=224, patch_size=16)
    text = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=1, vocab_size=100)
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
    export_tower(model, get_adapter("siglip").tower("vision"), folder / "vision.onnx")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="calibration images (a multiple of 32)")
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 8], help="rows a calibration run reads")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        export(folder)
        print(f"exported the SigLIP-B/16 image tower in {time.perf_counter() - started:.0f} s", flush=True)
        results = []
        for rows in args.rows:
            run = subprocess.run([sys.executable, "-c", CHILD, tmp, str(rows), str(args.images)], capture_output=True,
                                 text=True)
            if run.returncode:
                sys.exit(f"the calibration at {rows} rows a run failed:\n{run.stderr[-3000:]}")
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        first = json.loads((folder / f"scales.{args.rows[0]}.json").read_text())
        print(f"\n{args.images} images in batches of 32, static QDQ as the ort pass makes it\n")
        print("| rows a run | peak RSS MiB | seconds | scales equal to the first row's |")
        print("|---:|---:|---:|---|")
        for r in results:
            same = json.loads((folder / f"scales.{r['rows']}.json").read_text()) == first
            print(f"| {r['rows']} | {r['peak_mib']:.0f} | {r['seconds']:.1f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
