#!/usr/bin/env bash
# Write a DeepSpeed hostfile (`host slots=N` per node) for the current SLURM allocation.
#   launch/hostfile_from_slurm.sh hostfile [slots]
set -euo pipefail
OUT=${1:-hostfile}
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where it was called, not the repository
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # else the active environment
exec "$PY" -m megamor.parallel.launch hostfile --out "$OUT" ${2:+--slots "$2"}
