"""Workers exit when their launcher dies.

torchrun starts its workers in new sessions (start_new_session=True), so a SIGKILL of
torchrun's process group, or of the deepspeed launcher, or an srun that loses its step, leaves
workers training on and writing the run folder. `exit_with_launcher()` makes a launched worker
follow its parent:
  - Linux's parent-death signal (prctl PR_SET_PDEATHSIG, via ctypes) delivers SIGTERM the
    moment the parent dies (the trainer's stop handler saves and exits 75);
  - a watchdog thread checks the parent pid every second (for systems without prctl, and as the
    clock for the hard stop): when the process has been re-parented it sends SIGTERM itself,
    then kills the process after `grace_s` seconds if the graceful stop has not finished (e.g.
    a collective waiting for a peer that died with the launcher).
A plain process (no launcher) is left alone: its parent is a shell.
`child_follows_parent()` is the same rule from the other side: a tool that starts a trainer
(megamor.study) arms it so the trainer stops when the tool is killed.
MEGAMOR_ORPHAN_GRACE_S overrides the grace period (default 30 s).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
GRACE_S = 30.0
POLL_S = 1.0


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig); False where unavailable (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _orphaned(parent: int) -> None:
    print(f"megamor.train: pid {os.getpid()}: launcher (pid {parent}) is gone: stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def _watch(parent: int, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    _orphaned(parent)
    time.sleep(grace_s)
    print(f"megamor.train: pid {os.getpid()}: no clean stop {grace_s:.0f} s after the launcher died: killing",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with_launcher(launcher: str, grace_s: float | None = None) -> bool:
    """Follow the parent process if started by a launcher (torch, slurm). Returns whether armed."""
    if launcher == "single":
        return False
    if grace_s is None:
        try:
            grace_s = float(os.environ.get("MEGAMOR_ORPHAN_GRACE_S", GRACE_S))
        except ValueError:
            grace_s = GRACE_S
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    # A parent of 1 is not taken for a dead launcher: in a container whose entrypoint is torchrun
    # (or `unshare --pid`), the launcher is pid 1. Watched like any parent, it cannot change (when
    # a namespace's pid 1 exits the kernel kills the rest). Missed: a launcher that died in the
    # moment before this line (neither the watch nor PDEATHSIG can tell it from that container).
    threading.Thread(target=_watch, args=(parent, grace_s), name="megamor-orphan-watchdog", daemon=True).start()
    return True


def child_follows_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for subprocess: the child gets `sig` when this process dies, even by
    SIGKILL (a study killed with its trainer child running: SIGTERM makes the trainer save and
    exit 75 instead of training on as an orphan). Linux only; elsewhere a no-op. The signal is
    tied to the thread that starts the child: start it from a thread that lives as long as the
    process (the main thread)."""
    parent = os.getpid()
    prctl = None
    if sys.platform.startswith("linux"):
        try:  # looked up here: the child between fork and exec should run as little as possible
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None

    def arm() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: nothing will signal us
            os.kill(os.getpid(), sig)

    return arm
