#!/usr/bin/env bash
# The whole GPU benchmark (issue 5) on one GPU, with only the repo and torch (+ torchvision,
# Pillow, numpy, which come with it) installed; no network needed (random:0 weights unless
# WEIGHTS names a file). Target: under 8 minutes on one H200 (each section's time is reported).
#
#   bench/gpu_check.sh OUT_DIR            # writes OUT_DIR/gpu_report.md, gpu_report.json, gpu_bench.log
#   PYTHON=.venv/bin/python WEIGHTS=/path/vgg19_features.pth bench/gpu_check.sh OUT_DIR
set -euo pipefail

OUT="${1:?usage: bench/gpu_check.sh OUT_DIR}"
PYTHON="${PYTHON:-python3}"
WEIGHTS="${WEIGHTS:-random:0}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # the repo itself, no install needed
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true

# A hard stop at 7.5 minutes, so a hang cannot eat the 8-minute slot; the report is written at the end.
timeout 450 "$PYTHON" -m bench.gpu_bench "$OUT" --device cuda --weights "$WEIGHTS" 2>&1 | tee "$OUT/gpu_bench.log"
