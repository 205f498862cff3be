#!/usr/bin/env bash
# Launch titan with torchrun. Extra arguments go to titan (e.g. --training.steps 10).
#
# One node (NGPU processes; on a CPU-only machine NGPU is the number of gloo processes):
#   NGPU=8 CONFIG_FILE=train_configs/llama3_8b.toml ./scripts/run_train.sh
# Several nodes: run the same command on every node, pointing at one node's address (torchrun's c10d rendezvous
# assigns the ranks; no node is special except the one hosting the endpoint):
#   NNODES=2 NGPU=8 RDZV_ENDPOINT=node0:29500 CONFIG_FILE=train_configs/llama3_70b.toml ./scripts/run_train.sh
set -euo pipefail

CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_model.toml}
NNODES=${NNODES:-1}
if [ -z "${NGPU:-}" ]; then
  NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$NGPU" -gt 0 ] || NGPU=1
fi

if [ "$NNODES" -eq 1 ]; then
  rdzv=(--standalone)
else
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (the same on every node) for a multi-node run}"
  rdzv=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-titan}")
fi

# titan itself logs on global rank 0 only (other ranks print warnings and errors).
exec torchrun "${rdzv[@]}" --nproc_per_node="$NGPU" -m titan.train --config "$CONFIG_FILE" "$@"
