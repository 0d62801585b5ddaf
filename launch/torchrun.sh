#!/usr/bin/env bash
# Train with torchrun on this machine, or on several (run once per node with the same MASTER_ADDR).
#   NPROC=8 launch/torchrun.sh --config configs/experiments/360m.yaml [key=value ...]
#   NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh --config ...        # on every node
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # else the active environment
NPROC=${NPROC:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NNODES" -gt 1 ]; then
  exec "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR to the first node}:${MASTER_PORT:-29500}" \
    -m megamor.train "$@"
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m megamor.train "$@"
