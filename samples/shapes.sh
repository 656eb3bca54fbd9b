#!/usr/bin/env bash
# Train the shapes sample teacher (a small SigLIP model on drawn coloured shapes) into out/shapes/, compile it
# with samples/recipes/shapes-structured50-distill.yaml into out/shapes-structured50-distill/, and print the
# zero-shot accuracy over the 192 classes of the teacher and of every student artifact on the test images,
# which nothing trains, calibrates or distils on.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/lmmc ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1
OMP_NUM_THREADS=2 .venv/bin/python samples/teachers/shapes.py --out out/shapes
.venv/bin/lmmc compile out/shapes/model --recipe samples/recipes/shapes-structured50-distill.yaml \
    --out out/shapes-structured50-distill --force
.venv/bin/python benchmarks/digits.py --sample shapes --teacher out/shapes/model --data out/shapes/data \
    out/shapes-structured50-distill
