"""One trainer per run folder: a lock file with its holder and a heartbeat. (The study runner
takes the same kind of lock, `RUN/study.lock`, so that several study processes share out runs.)

`RUN/trainer.lock` is created exclusively (O_EXCL) by rank 0 and holds JSON: host, pid,
start time, heartbeat time and a random token. A thread rewrites the heartbeat every
`heartbeat_s` seconds. A second trainer on the same folder finds the file and refuses, naming
the holder, unless the lock is stale:
  - the holder is on this host and its pid is gone (killed, crashed, machine rebooted), or
  - its heartbeat is older than `stale_s` (a holder on another host that died, or a pid reused).
A stale lock is replaced with a warning. The holder removes the file when it ends; a SIGKILLed
trainer leaves it behind, and the next trainer on the same host sees the pid is gone.

MEGAMOR_LOCK_HEARTBEAT_S and MEGAMOR_LOCK_STALE_S override the defaults (5 s, 60 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megamor.data.atomic import atomic_open

if TYPE_CHECKING:
    from typing_extensions import Self

LOCK_FILE = "trainer.lock"
HEARTBEAT_S = 5.0
STALE_S = 60.0


class RunLockedError(RuntimeError):
    """The run folder belongs to another live trainer (exit 2)."""


@dataclass
class Holder:
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str

    def describe(self, now: float) -> str:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host} pid {self.pid}, started {start}, heartbeat {now - self.heartbeat:.0f} s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_holder(path: Path) -> Holder | None:
    """The lock's holder; a lock still being written (empty, partial) counts as fresh from its mtime."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        d = json.loads(text)
        return Holder(str(d["host"]), int(d["pid"]), float(d["started"]), float(d["heartbeat"]), str(d["token"]))
    except (ValueError, KeyError, TypeError):
        return Holder("?", 0, mtime, mtime, "")


def stale_reason(h: Holder, now: float, stale_s: float) -> str | None:
    if h.host == socket.gethostname() and h.pid > 0 and not _pid_alive(h.pid):
        return f"its process {h.pid} on this host is gone"
    if now - h.heartbeat > stale_s:
        return f"no heartbeat for {now - h.heartbeat:.0f} s (> {stale_s:.0f} s)"
    return None


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class RunLock:
    def __init__(self, run_dir: str | Path, heartbeat_s: float | None = None, stale_s: float | None = None,
                 file: str = LOCK_FILE, owner: str = "trainer"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / file
        self.owner = owner  # who holds such locks, in messages
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else _env_float("MEGAMOR_LOCK_HEARTBEAT_S", HEARTBEAT_S)
        self.stale_s = stale_s if stale_s is not None else _env_float("MEGAMOR_LOCK_STALE_S", STALE_S)
        self.holder: Holder | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockedError naming the live holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            now = time.time()
            me = Holder(socket.gethostname(), os.getpid(), now, now, secrets.token_hex(8))
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(me)))
            self.holder = me
            self._thread = threading.Thread(target=self._beat, name="megamor-run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunLockedError(f"{self.path}: could not take the lock (another {self.owner} keeps starting on {self.run_dir})")

    def _take_if_stale(self) -> None:
        old = read_holder(self.path)
        if old is None:
            return  # released meanwhile: try again
        now = time.time()
        reason = stale_reason(old, now, self.stale_s)
        if reason is None:
            raise RunLockedError(
                f"run folder {self.run_dir} is in use by another {self.owner} ({old.describe(now)}; {self.path}): stop it "
                f"first or use another run_dir; if it is certainly gone, delete {self.path}")
        aside = self.path.with_name(f".{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another starter moved it first
        moved = read_holder(aside)
        if moved is not None and moved.token != old.token:  # we moved a fresh lock taken meanwhile: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)  # a stale lock is garbage: nothing else refers to it
        print(f"megamor: replaced a stale lock {self.path} ({old.host} pid {old.pid}: {reason})",
              file=sys.stderr, flush=True)

    def _beat(self) -> None:
        assert self.holder is not None
        while not self._stop.wait(self.heartbeat_s):
            current = read_holder(self.path)
            if current is None or current.token != self.holder.token:
                self.lost = True
                print(f"megamor: WARNING: lost the run-folder lock {self.path} (now: "
                      f"{current.describe(time.time()) if current else 'missing'}); another {self.owner} may write this "
                      "run folder", file=sys.stderr, flush=True)
                return
            self.holder.heartbeat = time.time()
            try:
                with atomic_open(self.path, "w", durable=False) as f:
                    f.write(json.dumps(asdict(self.holder)))
            except OSError as e:  # a full disk must not kill training; staleness shows in the file's age
                print(f"megamor: WARNING: cannot refresh {self.path}: {e}", file=sys.stderr, flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current = read_holder(self.path)
        if self.holder is not None and current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
