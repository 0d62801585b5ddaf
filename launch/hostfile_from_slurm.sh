#!/usr/bin/env bash
# Write a DeepSpeed hostfile (`host slots=N` per node) for the current SLURM allocation.
#   launch/hostfile_from_slurm.sh hostfile [slots]
set -euo pipefail
cd "$(dirname "$0")/.."
exec ${PYTHON:-.venv/bin/python} -m megamor.parallel.launch hostfile --out "${1:-hostfile}" ${2:+--slots $2}
