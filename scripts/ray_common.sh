# Shared by scripts/ray_head.sh and scripts/ray_worker.sh (sourced, after each sets PROG): messages, the printed
# command, the GPU count, Ray's token lookup and the Ray version token authentication needs.
die() { echo "$PROG: error: $*" >&2; exit 2; }
warn() { echo "$PROG: WARNING: $*" >&2; }
note() { echo "$PROG: $*" >&2; }
show() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

# GPUs: NUM_GPUS, else the GPU lines of `nvidia-smi -L` (MIG lines are indented and not counted); sets gpu_args
set_gpu_args() {
  gpu_args=()
  if [[ -n "${NUM_GPUS:-}" ]]; then
    [[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || die "NUM_GPUS must be a whole number of GPUs (0 for none), got '$NUM_GPUS'"
    gpu_args=(--num-gpus="$NUM_GPUS")
  elif command -v nvidia-smi >/dev/null 2>&1; then
    local listing
    listing="$(nvidia-smi -L 2>&1)" || die "'nvidia-smi -L' failed ($listing): set NUM_GPUS"
    gpu_args=(--num-gpus="$(grep -c '^GPU ' <<<"$listing" || true)")
  else
    note "nvidia-smi not found and NUM_GPUS unset: --num-gpus left out, Ray detects the GPUs itself (set NUM_GPUS to give the count, 0 for none)"
  fi
}

TOKEN_SOURCE="" TOKEN_FILE="${HOME:-~}/.ray/auth_token"
find_token() {  # Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token; sets TOKEN_SOURCE
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then TOKEN_SOURCE="the RAY_AUTH_TOKEN environment variable"; return 0; fi
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    [[ -s "$RAY_AUTH_TOKEN_PATH" && -r "$RAY_AUTH_TOKEN_PATH" ]] \
      || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not a readable, non-empty file (Ray refuses to start with it)"
    TOKEN_SOURCE="$RAY_AUTH_TOKEN_PATH (RAY_AUTH_TOKEN_PATH)"; return 0
  fi
  if [[ -s "$TOKEN_FILE" ]]; then TOKEN_SOURCE="$TOKEN_FILE"; return 0; fi
  return 1
}

check_ray_for_auth() {  # token authentication exists from Ray 2.52 on
  local version_text major minor
  version_text="$("$RAY" --version 2>&1 || true)"
  if [[ "$version_text" =~ version[[:space:]]+([0-9]+)\.([0-9]+) ]]; then
    major="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}"
    if (( major < 2 || (major == 2 && minor < 52) )); then
      die "token authentication (RAY_AUTH_MODE=token) needs Ray >= 2.52, '$RAY --version' says: $version_text. Upgrade Ray on every node (pip install -U 'ray[default]>=2.52'), or pass --no-auth (no authentication: not recommended)"
    fi
  else
    die "cannot read the Ray version from '$RAY --version' ($version_text); token authentication needs Ray >= 2.52"
  fi
}
