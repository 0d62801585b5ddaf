"""The names in a run folder (see megamor.runs), tag <-> step, and the errors of this layer."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"  # run_dir/checkpoints/: the tags
UNIVERSAL = "universal"  # checkpoints/universal/<tag>: universal conversions
QUARANTINE = "quarantine"  # checkpoints/quarantine/<tag>: tags that failed validation
LATEST = "latest"  # checkpoints/latest: the newest complete tag's name
MARKER = "COMPLETE"  # <tag>/COMPLETE: the completeness marker
CONFIG_FILE = "experiment.yaml"  # <tag>/experiment.yaml: the config the tag was trained with
TRAINER_STATE = "trainer_state.pt"  # <tag>/trainer_state.pt: the trainer's progress
EXPORT_FILE = "megamor.pt"  # what `python -m megamor.export` writes into an export folder
TAG_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint or run folder that cannot be used; the message says why and where."""


class NoValidCheckpointError(CheckpointError):
    """Tags exist but none validates: the trainer refuses rather than start over (exit 2)."""


class QuarantineError(CheckpointError):
    """A tag that failed validation could not be set aside with its reason (e.g. the disk is
    still full): nothing was moved; the trainer stops (exit 1)."""


def os_error_line(e: OSError, where: Path) -> str:
    """`FILE: strerror (ENAME)`: the one-line form of a failed write (disk full, quota, ...)."""
    name = errno.errorcode.get(e.errno or 0, "")
    what = e.strerror or str(e)
    return f"{e.filename or where}: {what}{f' ({name})' if name else ''}"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int | None:
    if not tag.startswith(TAG_PREFIX):
        return None
    try:
        return int(tag[len(TAG_PREFIX) :])
    except ValueError:
        return None


@dataclass(frozen=True)
class CheckpointRef:
    path: Path  # the tag folder
    step: int
    meta: dict[str, Any]  # the COMPLETE marker

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def root(self) -> Path:
        return self.path.parent


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tag_dirs(root: Path) -> list[Path]:
    """Every step_* folder of checkpoints/, oldest first."""
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and step_of(d.name) is not None),
                  key=lambda d: step_of(d.name) or 0)
