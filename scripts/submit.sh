#!/usr/bin/env bash
# Submit a recipe to the Ray cluster as a job (wrapper of `hapo-verl submit`; see docs/gpu_cluster.md).
#
#   RAY_ADDRESS=http://HEAD_IP:8265 HAPO_OUTPUT_DIR=/shared/runs HAPO_DATA_DIR=/shared/data/hapo \
#       bash scripts/submit.sh RECIPE [key=value ...]
#   bash scripts/submit.sh qwen2.5_math_1.5b_hapo --dry-run          # resolved config, output paths, commands only
#   bash scripts/submit.sh qwen2.5_math_1.5b_hapo --install none     # the image already has hapo-verl
#
# The job's runtime env installs a wheel of this checkout on every node (so the verl.plugins entry point
# registers HAPO in every worker) and uploads recipes/. Every output (checkpoints, hapo_state.json, metrics,
# TensorBoard) goes under $HAPO_OUTPUT_DIR (or trainer.output_dir=...)/<project>/<experiment>: an absolute path
# every node sees, required. `ray job submit` runs with RAY_AUTH_MODE=token and the head's token (a copy in
# ~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN); --no-auth for a cluster started with --no-auth.
# PYTHON: the interpreter to run hapo-verl with (default: .venv/bin/python of this checkout, else python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 ]]; then echo "usage: $0 RECIPE [--dry-run] [--address URL] [--no-auth] [key=value ...]" >&2; exit 2; fi
if [[ "$1" == -* ]]; then echo "$0: the recipe name comes first, got '$1'" >&2; exit 2; fi
RECIPE="$1"; shift
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python
exec "$PY" -m hapo_verl.cli submit --recipe "$RECIPE" --recipes-dir "$ROOT/recipes" "$@"
