#!/usr/bin/env bash
# Join a worker node to the hapo-verl Ray cluster started by scripts/ray_head.sh.
#
#   bash scripts/ray_worker.sh HEAD_IP[:PORT] [--dry-run] [--no-auth]     (flags in any position)
#   HEAD_ADDRESS=10.0.0.1:6379 NUM_GPUS=8 bash scripts/ray_worker.sh
#
# The worker uses the head's token authentication (RAY_AUTH_MODE=token, Ray >= 2.52) and needs the head's
# token: copy the head's ~/.ray/auth_token to ~/.ray/auth_token here, or point RAY_AUTH_TOKEN_PATH at a copy
# on shared storage, or set RAY_AUTH_TOKEN.
#
#   --dry-run   print the command (with the environment it gets) and run nothing
#   --no-auth   join a head started with --no-auth (RAY_AUTH_MODE=disabled); prints a warning
#
# Environment: HEAD_ADDRESS (when no HEAD argument is given), RAY_PORT (6379, when HEAD has no port), NUM_GPUS
# (default: the GPUs listed by `nvidia-smi -L`; without nvidia-smi, --num-gpus is left out and Ray detects the
# GPUs itself), NODE_IP (this node's cluster address, passed as --node-ip-address; default: Ray picks it),
# RAY (the ray executable, default: ray), RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (read by Ray), RAY_AUTH_MODE
# (must be unset or token unless --no-auth).
# The node needs the same software image as the head (verl 0.9.1, vLLM 0.24.0, torch) and, for the recipes'
# data, the path in $HAPO_DATA_DIR on shared storage. See docs/gpu_cluster.md.
set -euo pipefail
PROG="ray_worker.sh"
# shellcheck source=ray_common.sh
source "${BASH_SOURCE[0]%/*}/ray_common.sh"
usage() { echo "usage: $PROG HEAD_IP[:PORT] [--dry-run] [--no-auth]   (or HEAD_ADDRESS=HEAD_IP:PORT $PROG)" >&2; }

DRY_RUN=0 AUTH=1 HEAD=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-auth) AUTH=0 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage; die "unknown option '$1' (allowed: --dry-run, --no-auth)" ;;
    *) [[ -z "$HEAD" ]] || { usage; die "one head address expected, got '$HEAD' and '$1'"; }
       HEAD="$1" ;;
  esac
  shift
done
HEAD="${HEAD:-${HEAD_ADDRESS:-}}"
if [[ -z "$HEAD" ]]; then usage; exit 2; fi
RAY_PORT="${RAY_PORT:-6379}"
[[ "$RAY_PORT" =~ ^[0-9]+$ ]] || die "RAY_PORT must be a port number, got '$RAY_PORT'"
[[ "$HEAD" == *:* ]] || HEAD="${HEAD}:${RAY_PORT}"
RAY="${RAY:-ray}"

set_gpu_args
node_args=()
if [[ -n "${NODE_IP:-}" ]]; then node_args=(--node-ip-address="$NODE_IP"); fi

NO_TOKEN="no Ray auth token on this node: copy the head's token here (scp HEAD:.ray/auth_token $TOKEN_FILE), or set RAY_AUTH_TOKEN_PATH to a copy on shared storage; --no-auth only for a head started with --no-auth"
if (( AUTH )); then
  if [[ -n "${RAY_AUTH_MODE:-}" && "$RAY_AUTH_MODE" != "token" ]]; then
    die "RAY_AUTH_MODE=$RAY_AUTH_MODE is set in the environment, but this script joins with token authentication (RAY_AUTH_MODE=token): unset RAY_AUTH_MODE, or pass --no-auth to join a head started with --no-auth"
  fi
  ray_env=(RAY_AUTH_MODE=token)
  if find_token; then
    note "token: $TOKEN_SOURCE"
  elif (( DRY_RUN )); then
    warn "$NO_TOKEN"
  else
    die "$NO_TOKEN"
  fi
else
  ray_env=(RAY_AUTH_MODE=disabled)
  warn "--no-auth: joining a Ray cluster that runs WITHOUT authentication: anyone who reaches the head's ports can run any code on every node, this one included."
fi

cmd=("$RAY" start --address="$HEAD" "${node_args[@]}" "${gpu_args[@]}" --disable-usage-stats)
if (( DRY_RUN )); then
  show "${ray_env[@]}" "${cmd[@]}"
  note "--dry-run: nothing was started"
  exit 0
fi
if (( AUTH )); then check_ray_for_auth; fi
echo "+ $(show "${ray_env[@]}" "${cmd[@]}")"
env "${ray_env[@]}" "${cmd[@]}"
