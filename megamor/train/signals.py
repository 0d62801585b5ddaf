"""Stop requests from the outside world (SIGTERM, SIGUSR1), turned into a clean stop.

A handler only raises a flag; the trainer folds the flag into the per-step all-reduce it does
anyway, so every rank sees the same decision at the same step even when the signal reached
only some of them (SLURM signals every task, torchrun forwards to its workers, an operator may
`kill` one process). The run then saves a complete checkpoint and exits with EXIT_PREEMPTED.

Exit codes (`python -m megamor.train`), for launchers and sbatch scripts:
    0   finished (max steps reached, final checkpoint saved)
    1   failed (an exception, too many non-finite steps in a row, a checkpoint write failed)
    2   bad configuration (before any process group started), or a run folder that cannot be
        trusted (tags exist but none validates; a file the weights-only loader refuses)
    75  stopped by SIGTERM/SIGUSR1 after saving a complete checkpoint: rerun the same
        command to resume (EX_TEMPFAIL; slurm/train.sbatch requeues on it)
"""

from __future__ import annotations

import signal
from types import FrameType

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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

    def install(self) -> StopRequest:
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
