#!/usr/bin/env bash
# On the GPU machine, from the repo root: install the carried wheels (evals/gpu_wheels.sh made
# them here), then run the GPU check. The report, its .json and the log of every part go to
# $OUT (the device tool's returned folder) or runs/gpu_check/.
#   usage: [MEGAMOR_COMMIT=<sha>] bash evals/gpu_check_device.sh [gpu_check options]
set -euo pipefail
WHEELS=${WHEELS:-.whl}
DEST=${OUT:-runs/gpu_check}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} WANDB_MODE=${WANDB_MODE:-disabled}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 -m megamor.gpu_check --out "$DEST/gpu_check.md" "$@"
