"""Checkpoint writes that fail with a clear line: which file, which error (ENOSPC, EDQUOT...).

torch.save to a path writes through a C++ stream that loses errno (a full disk reads
`basic_ios::clear: iostream error` or `unexpected pos`); to a Python file object the OSError
comes back intact. `python_file_saves()` routes DeepSpeed's path saves through Python files
while a checkpoint is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from megamor.runs.patching import ReentrantPatch


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the file and the error."""


_original_save: Callable[..., Any] = torch.save


def _save_via_python(obj: Any, f: Any, *args: Any, **kw: Any) -> None:
    if not isinstance(f, (str, os.PathLike)):
        return _original_save(obj, f, *args, **kw)
    try:
        with open(f, "wb") as fh:
            _original_save(obj, fh, *args, **kw)
    except Exception as e:
        cause = os_error_in(e)  # torch's zip writer re-raises a failed write as "unexpected pos"
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, os.fspath(f)) from None


def os_error_in(e: BaseException | None) -> OSError | None:
    """The OSError among an exception and its context chain, if any."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, OSError) and e.errno:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


_SAVE_PATCH = ReentrantPatch(torch, "save", _save_via_python)


def python_file_saves() -> AbstractContextManager[None]:
    """Within the block, `torch.save` to a path (DeepSpeed's too) writes through a Python file."""
    return _SAVE_PATCH.active()
