#!/usr/bin/env bash
# Train the digits sample teacher (a small CLIPModel on scikit-learn's handwritten digits) into out/digits/,
# compile it with every digits recipe into out/digits-*/, and print the zero-shot accuracy of the teacher
# and of every student on the test images, which nothing trains, calibrates or distils on.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/lmmc ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1
# The teacher trains on two threads; more threads than free cores only slows a shared machine down.
OMP_NUM_THREADS=2 .venv/bin/python samples/teachers/digits.py --out out/digits
outputs=()
for recipe in ecoflap-wanda60 wanda60 structured50-distill structured25-distill; do
  .venv/bin/lmmc compile out/digits/model --recipe "samples/recipes/digits-$recipe.yaml" --out "out/digits-$recipe" --force
  outputs+=("out/digits-$recipe")
done
.venv/bin/python benchmarks/digits.py --teacher out/digits/model --data out/digits/data "${outputs[@]}"
