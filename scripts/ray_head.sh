#!/usr/bin/env bash
# Start the Ray head node of a hapo-verl GPU cluster (run on the first node, inside the environment that has
# verl 0.9.1 + vLLM 0.24.0 + torch; hapo-verl itself is installed per job by `hapo-verl submit`).
#
#   bash scripts/ray_head.sh [--dry-run] [--no-auth] [--dashboard-host ADDR]     (flags in any order)
#   HEAD_IP=10.0.0.1 NUM_GPUS=8 bash scripts/ray_head.sh
#
# By default the head runs with Ray's token authentication (RAY_AUTH_MODE=token, Ray >= 2.52) and binds the
# dashboard / job API to the head's cluster address (HEAD_IP), not to every interface. The token is the one Ray
# reads (RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token); when there is none, the
# script creates ~/.ray/auth_token with `ray get-auth-token --generate`. Copy that file to every worker node and
# to the machine you submit from. Reach the dashboard from elsewhere through an SSH tunnel:
#   ssh -N -L 8265:HEAD_IP:8265 user@head        then   RAY_ADDRESS=http://127.0.0.1:8265
#
#   --dry-run              print the commands (with the environment they get) and run nothing
#   --no-auth              start without authentication (RAY_AUTH_MODE=disabled); prints a warning
#   --dashboard-host ADDR  bind the dashboard / job API to ADDR instead of HEAD_IP (0.0.0.0: every interface,
#                          warned about)
#
# Environment: HEAD_IP (default: the first address of `hostname -I`), RAY_PORT (6379), DASHBOARD_PORT (8265),
# NUM_GPUS (default: the GPUs listed by `nvidia-smi -L`; without nvidia-smi, --num-gpus is left out and Ray
# detects the GPUs itself), RAY (the ray executable, default: ray), RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (read
# by Ray), RAY_AUTH_MODE (must be unset or token unless --no-auth). See docs/gpu_cluster.md.
set -euo pipefail
PROG="ray_head.sh"
# shellcheck source=ray_common.sh
source "${BASH_SOURCE[0]%/*}/ray_common.sh"
usage() { sed -n '4,/^set -euo/{/^set -euo/d;p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }

DRY_RUN=0 AUTH=1 DASHBOARD_HOST=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-auth) AUTH=0 ;;
    --dashboard-host) [[ $# -ge 2 && -n "$2" ]] || die "--dashboard-host needs an address"
                      DASHBOARD_HOST="$2"; shift ;;
    --dashboard-host=*) DASHBOARD_HOST="${1#*=}"; [[ -n "$DASHBOARD_HOST" ]] || die "--dashboard-host needs an address" ;;
    -h|--help) usage; exit 0 ;;
    *) usage; die "unknown argument '$1' (allowed: --dry-run, --no-auth, --dashboard-host ADDR)" ;;
  esac
  shift
done

RAY="${RAY:-ray}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
[[ "$RAY_PORT" =~ ^[0-9]+$ ]] || die "RAY_PORT must be a port number, got '$RAY_PORT'"
[[ "$DASHBOARD_PORT" =~ ^[0-9]+$ ]] || die "DASHBOARD_PORT must be a port number, got '$DASHBOARD_PORT'"

# the head's cluster address: what the workers join and what the dashboard listens on
if [[ -z "${HEAD_IP:-}" ]]; then
  HEAD_IP="$(hostname -I 2>/dev/null | awk '{print $1}' || true)"
  [[ -n "$HEAD_IP" ]] || die "cannot find this node's cluster address with 'hostname -I': set HEAD_IP to the address the other nodes reach this node at"
fi
DASHBOARD_HOST="${DASHBOARD_HOST:-$HEAD_IP}"

set_gpu_args

# authentication
if (( AUTH )); then
  if [[ -n "${RAY_AUTH_MODE:-}" && "$RAY_AUTH_MODE" != "token" ]]; then
    die "RAY_AUTH_MODE=$RAY_AUTH_MODE is set in the environment, but this script starts Ray with token authentication (RAY_AUTH_MODE=token): unset RAY_AUTH_MODE, or pass --no-auth to start without authentication"
  fi
  ray_env=(RAY_AUTH_MODE=token)
else
  ray_env=(RAY_AUTH_MODE=disabled)
  warn "--no-auth: the Ray cluster runs WITHOUT authentication. Anyone who reaches ${DASHBOARD_HOST}:${DASHBOARD_PORT} (dashboard / job API) or ${HEAD_IP}:${RAY_PORT} can submit jobs, i.e. run any code on every node of the cluster."
fi
case "$DASHBOARD_HOST" in
  0.0.0.0|::|'[::]') warn "--dashboard-host $DASHBOARD_HOST: the dashboard / job API listens on every interface of this node, not only on the cluster address $HEAD_IP" ;;
esac

cmd=("$RAY" start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --dashboard-host="$DASHBOARD_HOST"
     --dashboard-port="$DASHBOARD_PORT" "${gpu_args[@]}" --disable-usage-stats)
gen_cmd=()
if (( AUTH )); then
  if find_token; then
    note "token: $TOKEN_SOURCE"
  else
    gen_cmd=("$RAY" get-auth-token --generate)
    note "token: none yet: '${RAY} get-auth-token --generate' writes one to $TOKEN_FILE"
  fi
fi

if (( DRY_RUN )); then
  if [[ ${#gen_cmd[@]} -gt 0 ]]; then echo "$(show "${ray_env[@]}" "${gen_cmd[@]}") >/dev/null"; fi
  show "${ray_env[@]}" "${cmd[@]}"
  note "--dry-run: nothing was started"
  exit 0
fi

if (( AUTH )); then check_ray_for_auth; fi
if [[ ${#gen_cmd[@]} -gt 0 ]]; then
  echo "+ $(show "${ray_env[@]}" "${gen_cmd[@]}") >/dev/null"
  env "${ray_env[@]}" "${gen_cmd[@]}" >/dev/null   # prints the token: keep it off the terminal
fi
echo "+ $(show "${ray_env[@]}" "${cmd[@]}")"
env "${ray_env[@]}" "${cmd[@]}"

echo
echo "head: ${HEAD_IP}:${RAY_PORT}   dashboard / job API: http://${DASHBOARD_HOST}:${DASHBOARD_PORT}"
if (( AUTH )); then
  find_token || die "no token at $TOKEN_FILE after 'ray get-auth-token --generate'"
  echo "token: $TOKEN_SOURCE -- copy it to every worker node and to the machine you submit from, e.g."
  echo "         scp ~/.ray/auth_token NODE:.ray/auth_token   (or a file on shared storage + RAY_AUTH_TOKEN_PATH)"
  echo "on each worker node:  bash scripts/ray_worker.sh ${HEAD_IP}:${RAY_PORT}"
else
  echo "on each worker node:  bash scripts/ray_worker.sh ${HEAD_IP}:${RAY_PORT} --no-auth"
fi
echo "from another machine: ssh -N -L ${DASHBOARD_PORT}:${DASHBOARD_HOST}:${DASHBOARD_PORT} user@$(hostname 2>/dev/null || echo HEAD)"
echo "then:                 RAY_ADDRESS=http://127.0.0.1:${DASHBOARD_PORT} HAPO_OUTPUT_DIR=/shared/runs bash scripts/submit.sh RECIPE"
