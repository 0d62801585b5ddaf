#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86-64, no internet): the packages megamor needs that
# its image lacks, at the versions this venv runs, into .whl/ (git-ignored; the device tool's
# `carry: [".whl"]` takes them along; evals/gpu_check_device.sh installs them there).
#   usage: evals/gpu_wheels.sh [PYTHON]      (make gpu-wheels)
set -euo pipefail
PY=${1:-.venv/bin/python}
DEST=.whl
# omegaconf: every config; pydantic & co and hjson: deepspeed; typing-extensions: pydantic's minimum.
PKGS="omegaconf hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions"
pins=$("$PY" -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $PKGS)
ds=$("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" $pins
# DeepSpeed without its CUDA ops: a pure-Python wheel (ops are JIT-built, or unused, there).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$ds"
ls -1 "$DEST"
du -sh "$DEST"
# One version of each package: two stop the whole install there. Other wheels in the folder
# (flash-attn, say) are the user's and stay; an older duplicate is named, not deleted.
"$PY" - "$DEST" <<'PYEOF'
import collections, pathlib, sys
names = collections.defaultdict(list)
for w in pathlib.Path(sys.argv[1]).glob("*.whl"):
    names[w.name.split("-")[0].lower().replace("_", "-")].append(w.name)
dups = {n: v for n, v in names.items() if len(v) > 1}
if dups:
    sys.exit("gpu_wheels: several versions in the folder (remove all but one): " + "; ".join(", ".join(v) for v in dups.values()))
PYEOF
