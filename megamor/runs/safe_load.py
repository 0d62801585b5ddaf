"""Loading checkpoint files without running code from them.

A `.pt` file is a pickle: loaded with `weights_only=False` it can call any function (a planted
`os.system` runs as the trainer). Every load of a run folder or `--checkpoint` file therefore
goes through torch's weights-only unpickler, which rebuilds tensors and plain containers only,
plus the few classes listed in SAFE_GLOBALS (what DeepSpeed 0.19 puts in its checkpoints, and
the numpy RNG state of checkpoints written before megamor stored plain lists).

DeepSpeed calls `torch.load(..., weights_only=False)` itself in many places (engine load,
ZeRO shards, zero_to_fp32, ds_to_universal). `safe_torch_load()` replaces `torch.load` for the
duration of a `with` block by a wrapper that forces `weights_only=True`, so those calls are
covered without patching DeepSpeed's files. A refused file raises UnsafeCheckpointError naming
the file; nothing from it has run.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from megamor.runs.patching import ReentrantPatch

# Set for subprocesses (ds_to_universal): torch then forces weights_only=True at every load.
FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something the weights-only loader refuses (code, unknown classes)."""


def safe_globals() -> list[Any]:
    """Classes DeepSpeed's checkpoints need beyond tensors and plain Python types."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32")]
    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum, _reconstruct, np.ndarray, np.dtype,
            *dtypes]


_original_load: Callable[..., Any] = torch.load


def _describe(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return str(f)
    return str(getattr(f, "name", "<file object>"))


def load(f: Any, map_location: Any = "cpu", **kw: Any) -> Any:
    """torch.load with weights_only=True and SAFE_GLOBALS; a refusal names the file."""
    kw.pop("weights_only", None)
    if kw.pop("pickle_module", None) is not None:
        raise UnsafeCheckpointError(f"{_describe(f)}: a custom pickle module cannot be used safely")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return _original_load(f, map_location=map_location, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        if not first:  # not a disallowed object but unreadable bytes: the caller says "damaged"
            raise
        raise UnsafeCheckpointError(
            f"{_describe(f)}: refused to load: it holds objects the weights-only loader does not allow "
            f"(possibly planted code){': ' + first if first else ''}") from None


def _forced_load(f: Any, map_location: Any = None, pickle_module: Any = None, **kw: Any) -> Any:
    if pickle_module is not None:
        kw["pickle_module"] = pickle_module
    return load(f, map_location=map_location, **kw)


_LOAD_PATCH = ReentrantPatch(torch, "load", _forced_load)


def safe_torch_load() -> AbstractContextManager[None]:
    """Within the block, every `torch.load` (DeepSpeed's too) is weights-only. Re-entrant."""
    return _LOAD_PATCH.active()


def file_error(path: Path, e: BaseException) -> str:
    """One line for a load that failed for another reason (truncated, not a torch file)."""
    return f"{path}: cannot read as a torch checkpoint: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
