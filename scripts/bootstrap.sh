#!/usr/bin/env bash
# Create .venv at the repository root (if missing) and install hapo-verl into it.
# Usage: scripts/bootstrap.sh [extras]   e.g. scripts/bootstrap.sh test
#
# torch: a torch already in .venv is kept when it is >= 2.6 (what setup.py requires), whatever its build, so a
# GPU machine can install the torch its CUDA (and vLLM) needs first, e.g. verl[vllm]==0.9.1 pins torch 2.11.0.
# Only when .venv has no torch does this script install torch 2.13.0, the version this project is tested with
# (on a machine without CUDA pip takes the CPU wheel; an unpinned requirement would pull a multi-GB CUDA build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
TORCH_PIN="2.13.0"
TORCH_MIN="2.6"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
INSTALLED="$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [ -z "$INSTALLED" ]; then
  echo "[bootstrap] no torch in .venv: installing torch==$TORCH_PIN"
  .venv/bin/pip install --disable-pip-version-check -q "torch==$TORCH_PIN"
elif ! .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.__version__ >= '$TORCH_MIN' else 1)"; then
  echo "[bootstrap] torch $INSTALLED in .venv is older than $TORCH_MIN, which hapo-verl needs." >&2
  echo "[bootstrap] install torch >= $TORCH_MIN into .venv (tested: $TORCH_PIN; verl[vllm]==0.9.1 pins 2.11.0) and rerun." >&2
  exit 1
elif [[ "$INSTALLED" != "$TORCH_PIN" && "$INSTALLED" != "$TORCH_PIN"+* ]]; then
  echo "[bootstrap] keeping torch $INSTALLED found in .venv (this project is tested with $TORCH_PIN; not replaced)"
else
  echo "[bootstrap] keeping torch $INSTALLED found in .venv"
fi
EXTRAS="${1:-}"
TARGET="."
if [ -n "$EXTRAS" ]; then TARGET=".[$EXTRAS]"; fi
.venv/bin/pip install --disable-pip-version-check -q -e "$TARGET"
