"""Stop requests from the outside world (SIGTERM, SIGUSR1, SIGINT), turned into a clean stop.

A handler only raises a flag; the trainer folds the flag into an all-reduce, so every rank
sees the same decision at the same point even when the signal reached only some of them
(SLURM signals every task, torchrun forwards to its workers, an operator may `kill` one
process). The flag is agreed on:
  - before the first optimizer step (a signal during set-up: nothing new to save),
  - at every optimizer step's end (inside the per-step all-reduce),
  - before every validation batch (one small all-reduce each), so a long validation pass is
    cut short instead of finishing first.
The run then saves a complete checkpoint (unless the newest one is already this step's) and
exits with EXIT_PREEMPTED. The handlers are installed before the process group starts, so no
phase of a run dies on these signals without an answer.

SIGINT (Ctrl-C) is a stop request like SIGTERM: save, exit 75. A second SIGINT raises
KeyboardInterrupt at once (no checkpoint; exit 1) for when the save itself must be abandoned.

Exit codes (`python -m megamor.train`), for launchers and sbatch scripts:
    0   finished (max steps reached, final checkpoint saved)
    1   failed (an exception, too many non-finite steps in a row, a checkpoint write failed, a
        checkpoint that cannot be used, more than trainer.max_restarts_without_progress automatic
        restarts in a row from one checkpoint); the full list: docs/operations.md, "Exit codes"
    2   bad configuration, or the run folder is locked by another trainer (nothing started), or
        another trainer took the lock while this one ran (it stops before writing more), or a
        run folder that cannot be trusted (tags exist but none validates; a file the
        weights-only loader refuses)
    75  stopped by SIGTERM/SIGUSR1/SIGINT after saving a complete checkpoint: rerun the same
        command to resume (EX_TEMPFAIL; slurm/train.sbatch requeues on it); or a rank waited
        longer than parallel.collective_timeout_s on a rank that stopped answering
        (megamor/parallel/watchdog.py): nothing saved, rerun to resume from the newest checkpoint
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from megamor.utils.atomic import atomic_open

if TYPE_CHECKING:
    from typing_extensions import Self

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_FILE_ENV = "MEGAMOR_EXIT_FILE"


def write_exit_file(code: int) -> None:
    """$MEGAMOR_EXIT_FILE gets `code` (slurm/train.sbatch decides on a requeue from it: under
    `srun --kill-on-bad-exit` srun's own status may be a killed rank's, not the reason). A
    failure already there is kept: the ranks a failing rank cut off may still write 75."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not path:
        return
    if code == EXIT_PREEMPTED:
        try:
            before = int(Path(path).read_text().strip())
        except (OSError, ValueError):
            before = None
        if before not in (None, EXIT_OK, EXIT_PREEMPTED):
            return
    with atomic_open(Path(path), "w") as f:
        f.write(f"{code}\n")


class StopRequested(Exception):
    """Raised out of validation when the ranks agreed to stop; the trainer saves and exits 75."""


class StoppedInSetup(Exception):
    """Raised on every rank when a stop signal ended the set-up before training began (e.g. during
    a universal conversion): the stop line and exit status are written; exit 75."""


class StopRequest:
    """Installs handlers for STOP_SIGNALS; `requested` turns true on the first one."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt("second SIGINT: stopping without a checkpoint")

    def install(self) -> StopRequest:
        for s in STOP_SIGNALS:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
