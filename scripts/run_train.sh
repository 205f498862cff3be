#!/usr/bin/env bash
# Launch titan with torchrun. Extra arguments go to titan (e.g. --training.steps 10).
#
# One node (NGPU processes; on a CPU-only machine NGPU is the number of gloo processes):
#   NGPU=8 CONFIG_FILE=train_configs/llama3_8b.toml ./scripts/run_train.sh
# Several nodes: run the same command on every node, pointing at one node's address (torchrun's c10d rendezvous
# assigns the ranks; no node is special except the one hosting the endpoint):
#   NNODES=2 NGPU=8 RDZV_ENDPOINT=node0:29500 CONFIG_FILE=train_configs/llama3_70b.toml ./scripts/run_train.sh
# Environment set for the workers unless already set: PYTORCH_ALLOC_CONF (expandable segments), NCCL's flight
# recorder (TORCH_NCCL_TRACE_BUFFER_SIZE, TORCH_NCCL_DUMP_ON_TIMEOUT, TORCH_NCCL_DEBUG_INFO_TEMP_FILE) and, on several
# nodes, GLOO_SOCKET_IFNAME (see below and docs/parallelism.md).
# Automatic recovery: `--max_restarts N` (or MAX_RESTARTS=N) relaunches torchrun up to N times after a crash (a killed
# or failed worker); with checkpoint.enable each relaunch resumes from the newest complete checkpoint. Failures that
# would only repeat (bad config: exit 2, too many skipped steps: 3, a failed save: 4) and stop signals are not
# retried. torchrun's own --max-restarts does not recover on gloo in torch 2.13 (restarted workers cannot create
# their process subgroups), a fresh torchrun does.
set -euo pipefail

CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_model.toml}
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [ -z "${NGPU:-}" ]; then
  NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$NGPU" -gt 0 ] || NGPU=1
fi

args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --max_restarts) [ $# -ge 2 ] || { echo "run_train.sh: error: --max_restarts needs a number" >&2; exit 2; }
      MAX_RESTARTS=$2; shift 2 ;;
    --max_restarts=*) MAX_RESTARTS=${1#*=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
check_count() {  # $1: what, $2: its value, $3: the least it may be; at most 6 digits (10^12 ranks is a typo)
  case "$2" in
    ''|*[!0-9]*|???????*) echo "run_train.sh: error: $1 must be a whole number in [$3, 999999] (got '$2')" >&2; exit 2 ;;
  esac
  [ "$2" -ge "$3" ] || { echo "run_train.sh: error: $1 must be a whole number in [$3, 999999] (got '$2')" >&2; exit 2; }
}
check_count --max_restarts "$MAX_RESTARTS" 0
check_count NGPU "$NGPU" 1
check_count NNODES "$NNODES" 1

if [ "$NNODES" -eq 1 ]; then
  rdzv=(--standalone)
else
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (the same on every node) for a multi-node run}"
  rdzv=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-titan}")
fi
# One process checks the config first (keys, values, degrees against the world size, tokenizer): bad input is then
# one line and exit code 2, not one line per rank followed by torchrun's ChildFailedError traceback. --help and
# --dry_run are one-process commands: they run as such.
train=(-m titan.train --config "$CONFIG_FILE" ${args[@]+"${args[@]}"})
for arg in ${args[@]+"${args[@]}"}; do
  case "$arg" in -h|--help|--dry_run) exec python "${train[@]}" ;; esac
done
python "${train[@]}" --check --world_size $((NNODES * NGPU))

# The CUDA caching allocator grows segments instead of caching fixed blocks: less fragmentation and fewer
# cudaMalloc retries near the memory limit (the metrics line counts them). A setting of the user's wins, under
# either name (PYTORCH_CUDA_ALLOC_CONF is the pre-2.9 one).
if [ -z "${PYTORCH_ALLOC_CONF:-}${PYTORCH_CUDA_ALLOC_CONF:-}" ]; then
  export PYTORCH_ALLOC_CONF=expandable_segments:True
fi
# NCCL's flight recorder: every rank keeps its last collectives, and when the watchdog times one out, every rank
# writes them to $TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank> (a shared folder collects all nodes'), for
# `python -m torch.distributed.flight_recorder.fr_trace` to say which rank stopped where.
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-${TMPDIR:-/tmp}/titan_nccl_trace_rank_}
# titan's gloo groups (stop requests every step, checkpoint coordination) pick their network interface from the
# hostname's address unless told, which across nodes may be one the others cannot reach (a hang, or "connection
# refused"). Several nodes: NCCL_SOCKET_IFNAME's interface if it names one, else the one this node reaches the
# rendezvous host through.
gloo_interface() {
  local addr dev
  addr=$(getent ahostsv4 "${RDZV_ENDPOINT%:*}" 2>/dev/null | awk 'NR == 1 {print $1}')
  [ -n "$addr" ] || return 0
  dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
  if [ "$dev" = lo ]; then  # the rendezvous host is this node: the interface holding its address
    dev=$(ip -o -4 addr show 2>/dev/null | awk -v a="$addr/" 'index($4, a) == 1 {print $2; exit}')
  fi
  echo "$dev"
}
if [ "$NNODES" -gt 1 ] && [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
  case "${NCCL_SOCKET_IFNAME:-}" in
    '' | ^* | =*) GLOO_SOCKET_IFNAME=$(gloo_interface) ;;
    *) GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME ;;
  esac
  if [ -n "$GLOO_SOCKET_IFNAME" ]; then
    export GLOO_SOCKET_IFNAME
  else
    unset GLOO_SOCKET_IFNAME
    echo "run_train.sh: warning: cannot tell which network interface reaches ${RDZV_ENDPOINT%:*}; set GLOO_SOCKET_IFNAME" >&2
  fi
fi

# torchrun passes these signals on to the workers (its default list lacks SIGUSR1, which would kill torchrun, and
# with it the workers, before they could save).
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
# A signal that reaches torchrun itself (Slurm signals every process of a job step) makes it pass the signal on and
# SIGKILL the workers 30 s later (torch 2.13's default), which can be mid-save for a large model: give them 10 minutes.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
# titan itself logs on global rank 0 only (other ranks print warnings and errors).
launch=(torchrun "${rdzv[@]}" --nproc_per_node="$NGPU" "${train[@]}")

# Stop signals (SIGTERM, SIGINT from Ctrl-C, SIGUSR1) go to the workers themselves: each saves the step and exits 0,
# and torchrun then exits 0 too. Sent to torchrun (torch 2.13), they made it print its SignalException traceback and
# exit 1 although the workers had saved. So torchrun runs in a session of its own (setsid), out of reach of the
# Ctrl-C a terminal sends to its whole foreground process group, and this script passes signals on to torchrun's
# children, the workers (to torchrun itself only before it has started any).
# titan writes the exit code of a failure worth no retry here (torchrun reports every worker failure as 1).
TITAN_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/titan-exit.XXXXXX")
export TITAN_EXIT_FILE
trap 'rm -f "$TITAN_EXIT_FILE"' EXIT
session=()
if command -v setsid >/dev/null; then session=(setsid); fi
stop_workers() {  # $1: the signal
  local workers
  stopping=1
  workers=$(pgrep -P "$pid" 2>/dev/null || true)
  # shellcheck disable=SC2086
  kill -"$1" ${workers:-$pid} 2>/dev/null || true
}
stopping=0
for ((attempt = 0; ; attempt++)); do
  : >"$TITAN_EXIT_FILE"
  # A background job of a script is not a process-group leader: setsid makes its session without forking, so
  # $! is torchrun's pid.
  ${session[@]+"${session[@]}"} "${launch[@]}" &
  pid=$!
  trap 'stop_workers TERM' TERM
  trap 'stop_workers INT' INT
  trap 'stop_workers USR1' USR1
  status=0
  while :; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break  # wait returns early when a trapped signal arrives
  done
  trap - TERM INT USR1
  [ "$status" -eq 0 ] && exit 0
  code=$(cat "$TITAN_EXIT_FILE" 2>/dev/null || true)
  if [ -n "$code" ] || [ "$stopping" -eq 1 ] || [ "$attempt" -ge "$MAX_RESTARTS" ]; then
    exit "${code:-$status}"
  fi
  echo "run_train.sh: torchrun exited with $status; relaunch $((attempt + 1)) of $MAX_RESTARTS" >&2
  # The crashed run's rank 0 may still be on its way out, holding the dump folder's lock: wait for it.
  export TITAN_LOCK_WAIT=${TITAN_LOCK_WAIT:-60}
done
