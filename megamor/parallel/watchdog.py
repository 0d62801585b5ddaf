"""Ranks that wait on a frozen or vanished peer: found within `parallel.collective_timeout_s`.

A rank whose peer stopped (SIGSTOP, a hung driver, a dead node whose sockets stay open) sits
in the next collective until the process group's own timeout (30 min), silently. Each rank
therefore runs a side thread that
  - writes a heartbeat into the process group's TCP store every `interval_s` seconds:
    `megamor/watchdog/{rank}` = "{counter} {step} {phase} {host} {pid}";
  - watches its own main thread, which says where it is (`at(step, phase)` from the trainer;
    `megamor.parallel.dist` names the collective it is in). Once the main thread has stayed at
    one place for half the limit, the thread starts reading the other ranks' heartbeats; at the
    limit it decides:
      * some rank stopped answering (its heartbeat did not change for at least half the limit),
        or is somewhere else (another step or phase), or the store itself does not answer:
        the rank is waiting in a collective that cannot complete. It prints one line naming the
        step, the phase and collective and those ranks, runs the exit hooks (rank 0 frees the
        run-folder lock; $MEGAMOR_EXIT_FILE gets the code), SIGKILLs the frozen ranks on its
        own host (a stopped process cannot exit by itself, and torchrun would wait 30 s on it)
        and exits EXIT_PREEMPTED (75): slurm/train.sbatch requeues the job, which resumes from
        the newest complete checkpoint. Every live rank decides the same way on its own.
      * every rank answers and is at the same place (a long first step while compiling, a
        slow save on every rank): nothing is wrong with the peers; one warning, and it waits.
A rank whose collective fails because another rank's process ended (it fired first, or died)
follows with the same exit code and one line of its own (`peer_lost`, from megamor.train),
unless that rank ended on an error: a failing rank records itself in the store first
(`record_failure`), and the ranks it cut off then exit EXIT_FAILED too. A requeue would only
repeat the error, forever.
The main thread is never interrupted from here: a rank that fires ends its process with
os._exit, because its main thread is blocked inside a C++ collective that nothing else ends.
A single process (world 1) has no peers to wait for: no thread is started.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megamor.parallel import dist as pdist

KEY = "megamor/watchdog/{rank}"
FAILED_KEY = "megamor/failed"  # the rank that ended on an error (record_failure)
# What a collective raises when another rank's process ended (gloo, NCCL): that rank's watchdog
# fired first, or it died; this rank follows with the same exit instead of a traceback.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "Broken pipe")
EXIT_STALLED = 75  # EX_TEMPFAIL, = megamor.train.signals.EXIT_PREEMPTED: requeue and resume
EXIT_FAILED = 1  # = megamor.train.signals.EXIT_FAILED


def interval_for(limit_s: float) -> float:
    """Heartbeat period: ten beats per limit, between 0.5 s and 5 s."""
    return max(0.5, min(5.0, limit_s / 10))


@dataclass
class _Peer:
    value: str  # the last heartbeat read: "counter step phase host pid"
    changed: float  # monotonic time this rank saw it change (never another host's clock)

    def describe(self) -> str:
        return f"step {self.step} {self.phase}" if self.value else "no heartbeat yet"

    @property
    def step(self) -> str:
        return self.value.split(" ")[1] if self.value.count(" ") >= 4 else "?"

    @property
    def phase(self) -> str:
        parts = self.value.split(" ")
        return " ".join(parts[2:-2]) if len(parts) >= 5 else "?"

    @property
    def host_pid(self) -> tuple[str, int]:
        parts = self.value.split(" ")
        try:
            return parts[-2], int(parts[-1])
        except (IndexError, ValueError):
            return "?", 0


def open_store(addr: str, port: int, timeout_s: float) -> Any:
    """A client of the process group's TCP store with its own short timeout (a frozen store
    host must not block the watchdog); None if it cannot be reached."""
    import torch.distributed as dist

    try:
        return dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except Exception as e:  # noqa: BLE001  any failure to connect: run without (a warning says so)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__  # torch appends C++ frames: one line
        print(f"megamor: watchdog: cannot reach the process group's store at {addr}:{port} ({why}); stalled "
              "collectives are left to the process group's timeout", file=sys.stderr, flush=True)
        return None


class Watchdog:
    def __init__(self, rank: int, world: int, limit_s: float, store: Any, interval_s: float | None = None,
                 exit_fn: Callable[[int], None] | None = None):
        self.rank, self.world, self.limit_s, self.store = rank, world, limit_s, store
        self.interval_s = interval_s if interval_s is not None else interval_for(limit_s)
        self.exit_fn = exit_fn or _hard_exit
        self.clock = time.monotonic
        self.on_fire: list[Callable[[], None]] = []  # run before the exit (free the lock, the exit file)
        self.fired: str | None = None
        self._where: tuple[int, str, float] | None = None  # (step, phase, since): set by the main thread
        self._peers: dict[int, _Peer] = {}
        self._store_ok = True
        self._stuck: threading.Thread | None = None
        self.op_timeout_s = min(10.0, 2 * self.interval_s)
        self._warned: tuple[int, str, float] | None = None
        self._counter = 0
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.limit_s > 0 and self.world > 1 and self.store is not None

    # -- the main thread's side ------------------------------------------------------------
    def at(self, step: int, phase: str) -> None:
        """The main thread is now at `phase` of optimizer step `step` (one tuple assignment)."""
        self._where = (step, phase, self.clock())

    def start(self) -> Watchdog:
        if self.enabled and self._thread is None:
            self._beat()
            self._thread = threading.Thread(target=self._run, name="megamor-collective-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- the side thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.tick() is not None:
                return

    def tick(self) -> str | None:
        """One beat and one look; returns (and acts on) the stall found, if any."""
        self._beat()
        found = self.diagnose()
        if found is not None:
            self.fire(found)
        return found

    def _beat(self) -> None:
        self._counter += 1
        where = self._where
        step, phase = (where[0], where[1]) if where else (0, "-")
        with contextlib.suppress(Exception):  # a store that does not answer shows in diagnose()
            self._bounded(self.store.set, KEY.format(rank=self.rank), f"{self._counter} {step} {phase} {self._host} {self._pid}")

    def _read_peers(self, now: float) -> bool:
        """Update what this rank knows of the others; False if the store did not answer."""
        keys = [KEY.format(rank=r) for r in range(self.world) if r != self.rank]

        def read() -> list[str]:  # a get of a missing key would wait: "" for a rank that never beat
            if self.store.check(keys):
                return [self.store.get(k).decode() for k in keys]
            return [self.store.get(k).decode() if self.store.check([k]) else "" for k in keys]

        try:
            values = self._bounded(read)
        except Exception:  # noqa: BLE001  a timeout: the store's host (or this rank's link to it) is gone
            return False
        for r, value in zip((r for r in range(self.world) if r != self.rank), values):
            seen = self._peers.get(r)
            if seen is None or seen.value != value:
                self._peers[r] = _Peer(value, now)
        return True

    def _bounded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in a helper thread, given up after `op_timeout_s`: a store client talking to a
        frozen server can block past its own timeout. One stuck call at a time, never a pile."""
        if self._stuck is not None and self._stuck.is_alive():
            raise TimeoutError("an earlier store call is still waiting")
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # noqa: BLE001  handed to the watchdog thread
                box["error"] = e

        t = threading.Thread(target=call, name="megamor-watchdog-store", daemon=True)
        t.start()
        t.join(self.op_timeout_s)
        if t.is_alive():
            self._stuck = t
            raise TimeoutError(f"the store did not answer in {self.op_timeout_s:g} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def diagnose(self) -> str | None:
        where = self._where
        if where is None or not self.enabled:
            self._peers.clear()
            return None
        step, phase, since = where
        now = self.clock()
        waited = now - since
        if waited < self.limit_s / 2:
            self._peers.clear()  # a fresh observation for every long wait
            return None
        store_ok = self._store_ok = self._read_peers(now)
        if waited < self.limit_s:
            return None
        here = f"rank {self.rank}: stuck for {waited:.0f} s at step {step} in {self._collective(phase)}"
        if not store_ok:
            return (f"{here}: the process group's store (on rank 0's host or the launcher's) does not answer: rank 0 "
                    "or its host stopped")
        silent = {r: p for r, p in self._peers.items() if now - p.changed >= self.limit_s / 2}
        away = {r: p for r, p in self._peers.items() if r not in silent and (p.step, p.phase) != (str(step), phase)}
        if not silent and not away:
            if self._warned != where:
                self._warned = where
                print(f"megamor: watchdog: {here}; every rank answers and is at the same place (a slow step?): "
                      "waiting", file=sys.stderr, flush=True)
            return None
        parts = []
        if silent:
            parts.append(f"rank{'s' if len(silent) > 1 else ''} {_ranks(silent)} stopped answering (no new heartbeat "
                         f"for {now - max(p.changed for p in silent.values()):.0f} s; last heartbeat: "
                         + ", ".join(p.describe() for p in list(silent.values())[:3]) + ")")
        if away:
            parts.append(f"rank{'s' if len(away) > 1 else ''} {_ranks(away)} "
                         + ", ".join(f"at {p.describe()}" for p in list(away.values())[:3]))
        return f"{here}: " + "; ".join(parts)

    def record_failure(self) -> None:
        """This rank ends on an error: say so in the store before its exit closes the other ranks'
        connections, so that they fail as well (peer_lost) instead of exiting 75 for a requeue."""
        if not self.enabled:
            return

        def record() -> None:
            self.store.set(FAILED_KEY, str(self.rank))
            self.store.get(FAILED_KEY)  # a set is not acknowledged: a round trip makes it visible to all

        with contextlib.suppress(Exception):  # the store's host is gone: the exit file still says 1
            self._bounded(record)

    def peer_lost(self, error: BaseException) -> tuple[int, str] | None:
        """(exit code, one line) for a collective of the loop that failed because another rank's
        process ended: EXIT_FAILED if a rank recorded a failure, else EXIT_STALLED (its watchdog
        fired, or it was killed: requeue). None for any other error, or outside the loop."""
        where = self._where
        text = str(error)
        if not self.enabled or where is None or not any(m in text for m in PEER_LOST):
            return None
        first = text.splitlines()[0] if text else type(error).__name__
        here = f"rank {self.rank}: at step {where[0]} ({where[1]}) a collective failed because another rank's process"
        try:
            failed = self._bounded(lambda: self.store.get(FAILED_KEY).decode() if self.store.check([FAILED_KEY]) else None)
        except Exception:  # noqa: BLE001  the store went with rank 0: its own exit file says whether it failed
            failed = None
        if failed is not None:
            return EXIT_FAILED, (f"{here} ended: rank {failed} failed (its traceback is above); exiting {EXIT_FAILED} "
                                 "(not requeued: a rerun would repeat the error)")
        return EXIT_STALLED, (f"{here} ended ({first[:200]}); exiting {EXIT_STALLED} (the job is requeued and resumes "
                              "from its newest checkpoint)")

    def _collective(self, phase: str) -> str:
        coll = pdist.current_collective()
        return f"{coll} ({phase})" if coll else f"{phase} (a collective inside DeepSpeed or the model)"

    def fire(self, why: str) -> None:
        """Report, run the exit hooks, stop the frozen ranks on this host, exit 75."""
        self.fired = why
        print(f"megamor.train: {why}; exiting {EXIT_STALLED} (the job is requeued and resumes from its newest "
              f"checkpoint; parallel.collective_timeout_s={self.limit_s:g})", file=sys.stderr, flush=True)
        for hook in self.on_fire:
            with contextlib.suppress(Exception):  # the exit must happen whatever a hook does
                hook()
        for p in self._peers.values() if self._store_ok else ():
            host, pid = p.host_pid
            if host == self._host and pid not in (0, self._pid) and self.clock() - p.changed >= self.limit_s / 2:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.exit_fn(EXIT_STALLED)


def _ranks(peers: dict[int, _Peer]) -> str:
    rs = sorted(peers)
    return ", ".join(map(str, rs[:8])) + (f" and {len(rs) - 8} more" if len(rs) > 8 else "")


def _hard_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
