#!/usr/bin/env bash
# Train with the deepspeed launcher. Inside a SLURM allocation the hostfile is written from the
# node list (slots = GPUs per node); elsewhere pass HOSTFILE=path or NPROC=N for this machine.
#   NPROC=8 launch/deepspeed.sh --config configs/experiments/360m.yaml [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # the deepspeed launcher does not set it
if [ -z "${HOSTFILE:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  HOSTFILE=$(mktemp -t megamor-hostfile.XXXXXX)
  $PY -m megamor.parallel.launch hostfile --out "$HOSTFILE" ${GPUS_PER_NODE:+--slots $GPUS_PER_NODE} >/dev/null
fi
if [ -n "${HOSTFILE:-}" ]; then
  exec $PY -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --module megamor.train "$@"
fi
NPROC=${NPROC:-$($PY -c 'import torch; print(max(1, torch.cuda.device_count()))')}
exec $PY -m deepspeed.launcher.runner --num_gpus "$NPROC" --module megamor.train "$@"
