"""Atomic file writes: write a hidden temp file beside the target, fsync, rename over it
(folders: `replace_dir`).

A reader therefore sees either nothing or a complete file under the final name; a killed
writer leaves only a `.NAME.tmp-*` file, which never matches a final name and is swept later.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to stable storage (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path, durable: bool = True) -> None:
    """Rename a finished (already fsynced, if durable) temp file to its final name."""
    os.replace(tmp, final)
    if durable:
        fsync_path(final.parent)


@contextmanager
def atomic_open(final: str | Path, mode: str = "wb", durable: bool = True) -> Iterator[IO[Any]]:
    """durable=False skips fsync: still atomic for readers and against a killed process, but not
    against power loss; for intermediate files whose reuse is checked anyway."""
    final = Path(final)
    tmp = temp_path(final)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        commit(tmp, final, durable)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any, durable: bool = True) -> None:
    with atomic_open(path, "w", durable) as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def remove_temps(folder: Path, prefix: str = "") -> int:
    """Delete leftover temp files (from killed writers) whose final name starts with prefix."""
    n = 0
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        if is_temp(p) and p.name[1:].startswith(prefix):
            p.unlink(missing_ok=True)
            n += 1
    return n


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` (a sibling of `final`, same filesystem) in `final`'s place,
    then delete the folder it replaced. Readers see the old folder or the new one, never a mix;
    where RENAME_EXCHANGE is unsupported, two renames leave a moment with no folder at all."""
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # now the old folder
    else:
        old = final.with_name(f".{final.name}.old{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    fsync_path(final.parent)
