#!/usr/bin/env bash
# Train with the deepspeed launcher. In a SLURM allocation of several nodes the hostfile is
# written from the node list (slots = GPUS_PER_NODE, else the GPUs per node) and the variables
# the runner would not forward to the other nodes go to a DS_ENV_FILE; on one node (in or out of
# SLURM) it starts NPROC processes here, without a hostfile (a hostfile means ssh, even to this
# host). Elsewhere pass HOSTFILE=path for several machines.
#   NPROC=8 launch/deepspeed.sh --config configs/experiments/360m.yaml [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # else the active environment
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # the deepspeed launcher does not set it
if [ -z "${HOSTFILE:-}" ] && [ "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" -gt 1 ]; then
  HOSTFILE=$(mktemp -t megamor-hostfile.XXXXXX)
  "$PY" -m megamor.parallel.launch hostfile --out "$HOSTFILE" ${GPUS_PER_NODE:+--slots "$GPUS_PER_NODE"} >/dev/null
fi
if [ -n "${HOSTFILE:-}" ]; then
  if [ -z "${DS_ENV_FILE:-}" ]; then
    DS_ENV_FILE=$(mktemp -t megamor-deepspeed-env.XXXXXX)
    export DS_ENV_FILE
    "$PY" -m megamor.parallel.launch deepspeed-env --out "$DS_ENV_FILE"
  fi
  exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --module megamor.train "$@"
fi
NPROC=${NPROC:-$("$PY" -m megamor.parallel.launch slots ${GPUS_PER_NODE:+--slots "$GPUS_PER_NODE"})}
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --module megamor.train "$@"
