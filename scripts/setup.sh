#!/usr/bin/env bash
# Create .venv (if missing) and install stylequeue with its pinned torch/torchvision.
# Usage: scripts/setup.sh [--test]   (--test also installs the test tools: pytest, moto[server])
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${STYLEQUEUE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
req=requirements.txt
[ "${1:-}" = "--test" ] && req=requirements-test.txt
# The stamp skips a reinstall when nothing changed; pip is slow to say "already satisfied" for torch.
stamp="$VENV/.stylequeue-$(cat "$req" requirements.txt pyproject.toml | sha256sum | cut -c1-16)-$(basename "$req")"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$req" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, torchvision, stylequeue" 
  touch "$stamp"
fi
