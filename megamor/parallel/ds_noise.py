"""Quiet DeepSpeed's start-up noise so megamor's own lines are visible.

DeepSpeed logs (and prints) routine start-up lines at WARNING level: "You are using ZeRO with
an untested optimizer" (megamor's AdamW is tested), "DeepSpeed ... built successfully" (an op
loaded from the extension cache), the accelerator it picked. Around `init_distributed` and
`deepspeed.initialize` its logger is raised to ERROR and those known lines are dropped from
stdout/stderr; anything else passes. `MEGAMOR_DS_VERBOSE=1` (or `trainer.verbose_deepspeed`)
shows everything.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout

VERBOSE_ENV = "MEGAMOR_DS_VERBOSE"

# Known start-up noise (DeepSpeed 0.19): dropped only while quieted.
NOISE = re.compile(
    r"untested optimizer"
    r"|^DeepSpeed \S+ built successfully"
    r"|Setting accelerator to CPU"
    r"|^Loading extension module \S+\.\.\.$"
    r"|^Using \S+ as PyTorch extensions root"
    r"|^(Emitting ninja build file|Building extension module|Allowing ninja to set a default number of workers)"
    r"|^ninja: no work to do"
)


def verbose_requested(configured: bool = False) -> bool:
    """MEGAMOR_DS_VERBOSE=1/0 wins over the config key."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    return configured


class _LineFilter(io.TextIOBase):
    """A text stream that forwards whole lines to `target`, except the known noise."""

    def __init__(self, target: io.TextIOBase):
        self.target, self.buf = target, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self._emit(line + "\n")
        return len(s)

    def _emit(self, text: str) -> None:
        if not NOISE.search(text):
            self.target.write(text)

    def flush(self) -> None:
        if self.buf:
            self._emit(self.buf)
            self.buf = ""
        self.target.flush()


@contextmanager
def quiet_deepspeed(verbose: bool = False) -> Iterator[None]:
    """DeepSpeed's logger at ERROR and its known noise filtered, for the duration of the block."""
    if verbose_requested(verbose):
        yield
        return
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    out, err = _LineFilter(sys.stdout), _LineFilter(sys.stderr)  # type: ignore[arg-type]
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*untested optimizer.*")
            yield
    finally:
        out.flush()
        err.flush()
        ds_logger.setLevel(level)
