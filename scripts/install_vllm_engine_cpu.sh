#!/usr/bin/env bash
# Build .venv-vllm-cpu/ at the repository root: the third-party vllm-cpu 0.32.0 build (a real vLLM engine on
# CPU, with the Model Runner V2 custom-logits-processor interface) on the CPU torch 2.13.0, plus pytest, with
# hapo-verl importable from this checkout (a .pth file: no verl there, which the processors do not import).
# It is separate from .venv because vllm-cpu pins transformers >= 5.16, which verl 0.9.1 does not accept;
# .venv keeps vLLM 0.24.0 (verl's pin, scripts/install_vllm_cpu.sh).
#
# Used by tests/test_vllm_processor_v2_on_cpu.py (V2 and dual-class processor tests) and
# tests/test_vllm_engine_on_cpu.py (scripts/vllm_cpu_engine_check.py), through tests/vllm_cpu_env.py.
# Idempotent: when the versions below are installed and the last build succeeded it returns in about a second.
# Its outcome is written to .venv-vllm-cpu/hapo-install-status ("ok", or "failed: <step> ..."), the pip output
# to .venv-vllm-cpu/hapo-install.log; the tests read them (under CI=true a failed build fails them).
# Usage: bash scripts/install_vllm_engine_cpu.sh        (PYTHON=python3.11 to choose the interpreter)
# torch 2.13.0+cpu comes from pip's configured indexes / find-links (on our machines a local wheel; elsewhere
# point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index).
set -Eeuo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ENV=.venv-vllm-cpu
PY="$ENV/bin/python"
STATUS="$ENV/hapo-install-status"
LOG="$ENV/hapo-install.log"
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0+cpu
# vllm-cpu requires them, but PyPI serves CUDA builds that break `import vllm` against the CPU torch
UNWANTED=(torchvision torchaudio torchcodec)
PTH=hapo_verl_checkout.pth

satisfied() {  # versions only, no vLLM import: the fast path of a second run
  [ -x "$PY" ] && [ "$(head -n1 "$STATUS" 2>/dev/null)" = ok ] || return 1
  "$PY" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" "$ROOT" "$PTH" "${UNWANTED[@]}" <<'PY' 2>/dev/null
import sys, sysconfig
from importlib import metadata
from pathlib import Path
vllm_v, torch_v, root, pth, *unwanted = sys.argv[1:]
def version(d):
    try:
        return metadata.version(d)
    except metadata.PackageNotFoundError:
        return None
pth_file = Path(sysconfig.get_paths()["purelib"]) / pth
ok = (version("vllm-cpu") == vllm_v and version("torch") == torch_v and version("pytest") is not None
      and not any(version(d) for d in unwanted)
      and pth_file.is_file() and pth_file.read_text().strip() == root)
sys.exit(0 if ok else 1)
PY
}

if satisfied; then
  echo "install_vllm_engine_cpu.sh: $ENV already has vllm-cpu $VLLM_CPU_VERSION, torch $TORCH_VERSION, pytest"
  exit 0
fi

mkdir -p "$ENV"
: >"$LOG"
echo "building" >"$STATUS"
STEP="start"
fail() {
  local rc=$?
  {
    echo "failed: step '$STEP' exited $rc (scripts/install_vllm_engine_cpu.sh; full log: $LOG)"
    echo "--- last lines of the log ---"
    tail -n 25 "$LOG"
  } >"$STATUS"
  cat "$STATUS" >&2
  exit "$rc"
}
trap fail ERR
run() {  # run a step, its output into the log
  STEP="$*"
  echo "install_vllm_engine_cpu.sh: $STEP"
  "$@" >>"$LOG" 2>&1
}
PIP=("$PY" -m pip install --disable-pip-version-check --no-input)

SECONDS=0
if [ ! -x "$PY" ]; then
  run "${PYTHON:-python3}" -m venv "$ENV"
fi
version_of() { "$PY" -c "import sys; from importlib import metadata as m; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true; }
if [ "$(version_of torch)" != "$TORCH_VERSION" ]; then
  run "${PIP[@]}" "torch==$TORCH_VERSION"
fi
if [ "$(version_of vllm-cpu)" != "$VLLM_CPU_VERSION" ]; then
  echo "torch==$TORCH_VERSION" >"$ENV/hapo-constraints.txt"   # never let a dependency replace the CPU torch
  run "${PIP[@]}" -c "$ENV/hapo-constraints.txt" "vllm-cpu==$VLLM_CPU_VERSION"
fi
if [ -z "$(version_of pytest)" ]; then
  run "${PIP[@]}" "pytest>=8" "pytest-timeout>=2.3"
fi
for dist in "${UNWANTED[@]}"; do
  if [ -n "$(version_of "$dist")" ]; then
    run "$PY" -m pip uninstall -y "$dist"
  fi
done
STEP="write the .pth that puts this checkout on the path"
"$PY" -c "import sys, sysconfig, pathlib; (pathlib.Path(sysconfig.get_paths()['purelib']) / sys.argv[1]).write_text(sys.argv[2] + '\n')" \
  "$PTH" "$ROOT"
# what the tests need: the engine, the V2 interface, our processors (V1, V2 and dual class), pytest
verify_env() {
  "$PY" - <<'PY'
import pytest, torch, vllm
from vllm import LLM  # noqa: F401
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState  # noqa: F401
from hapo_verl.vllm import processor_fqcn, processors
assert processors.HAS_V2_INTERFACE and processors.HapoAdaptiveTemperatureV2 is not None, "no V2 interface"
assert processor_fqcn().endswith(":HapoAdaptiveTemperature"), processor_fqcn()
print("vllm", vllm.__version__, "torch", torch.__version__, "pytest", pytest.__version__)
PY
}
run verify_env
trap - ERR
echo ok >"$STATUS"
echo "install_vllm_engine_cpu.sh: $ENV ready in ${SECONDS}s ($(du -sh "$ENV" | cut -f1)): $(tail -n1 "$LOG")"
