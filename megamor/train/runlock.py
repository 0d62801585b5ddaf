"""One trainer per run folder: a lock file with its holder and a heartbeat. (The study runner
takes the same kind of lock, `RUN/study.lock`, so that several study processes share out runs.)

`RUN/trainer.lock` is created exclusively (O_EXCL) by rank 0 and holds JSON: host, pid, the
process's start time in clock ticks since boot, start time, heartbeat time, a random token, what
identifies its PID space (its PID namespace, `/proc/self/ns/pid`, and the kernel's boot id) and,
under SLURM, its job (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID) and
SLURM_RESTART_COUNT. A thread rewrites the heartbeat every `heartbeat_s` seconds. A second
trainer on the same folder finds the file and refuses, naming the holder, unless the lock is stale:
  - the holder is in this process's PID space (same host name, PID namespace and boot id): stale
    only when its process is gone (its pid is free, or now belongs to a process that started
    later). A live holder keeps the lock however old its heartbeat: a paused process (SIGSTOP,
    Ctrl-Z, `scontrol suspend`, a debugger, swapping) writes no heartbeat but will go on writing
    the folder when it resumes;
  - the holder is an earlier restart of this very SLURM job (same job and array task, lower
    SLURM_RESTART_COUNT): SLURM ended it before requeueing the job (e.g. its node failed), so the
    lock is stale at once, however fresh its heartbeat;
  - otherwise (another host, or the same host name in another PID namespace: a container, whose
    processes cannot be seen from here; or a lock that does not say, from an older version): stale
    when its heartbeat is older than `stale_s`. A heartbeat in the future means the two hosts'
    clocks disagree: its age says nothing, so the starter watches the file for up to `stale_s`
    seconds and takes the lock only if the heartbeat never changes;
  - an empty or unparseable lock file (a starter that crashed between creating and writing it, or
    a full disk; a live starter writes it microseconds after creating it): stale once it has been
    so for `EMPTY_S` seconds (its mtime that old, or watched for that long).
A stale lock is replaced with a warning. The holder removes the file when it ends; a SIGKILLed
trainer leaves it behind, and the next trainer in the same PID space sees the pid is gone. A
holder whose lock was taken anyway (a holder judged by its heartbeat paused past `stale_s`, or the
file replaced by hand) finds out from `check()`, which the trainer calls before every write to the
run folder, and stops (exit 2) instead of writing beside the new holder. The heartbeat is written
to a temp file first; the holder then reads the lock and renames the temp file over it at once,
and reads again if it was paused in between, so a paused holder cannot overwrite a newcomer's
lock unless the pause falls between that last check and the rename.

MEGAMOR_LOCK_HEARTBEAT_S and MEGAMOR_LOCK_STALE_S override the defaults (5 s, 60 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from megamor.utils.atomic import temp_path

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")
LOCK_FILE = "trainer.lock"
HEARTBEAT_S = 5.0
STALE_S = 60.0
SKEW_S = 5.0  # a heartbeat up to this far in the future is ordinary clock jitter between hosts
EMPTY_S = 5.0  # an empty or unparseable lock this old is a starter's crash, not a write in progress
PAUSE_S = 1.0  # a heartbeat writer that took longer than this (or stale_s / 4) from its read to its rename was paused


class RunLockedError(RuntimeError):
    """The run folder belongs to another live trainer (exit 2)."""


class RunLockLostError(RuntimeError):
    """Another trainer took this run folder's lock while we held it (exit 2, nothing more written)."""


@dataclass
class Holder:
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    proc_start: int | None = None  # the pid's start in clock ticks since boot (tells a reused pid apart)
    pid_ns: str | None = None  # readlink /proc/self/ns/pid: pids mean the same only within one namespace
    boot_id: str | None = None  # /proc/sys/kernel/random/boot_id: ... and within one boot of one kernel
    slurm_job: str | None = None  # SLURM_JOB_ID
    slurm_array: str | None = None  # SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID, for an array task
    slurm_restart: int | None = None  # SLURM_RESTART_COUNT (0 when unset in a SLURM job)

    def describe(self, now: float) -> str:
        if not self.token:  # read_holder's placeholder for an empty or unparseable file
            return f"an empty or unparseable lock file, last written {max(now - self.heartbeat, 0.0):.0f} s ago"
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", SLURM job {self.slurm_job} restart {self.slurm_restart}" if self.slurm_job is not None else ""
        return f"host {self.host} pid {self.pid}{job}, started {start}, {heartbeat_age(self.heartbeat, now)}"


def heartbeat_age(heartbeat: float, now: float) -> str:
    age = now - heartbeat
    if age < -SKEW_S:
        return f"heartbeat {-age:.0f} s in the future (its host's clock is ahead of this one's)"
    return f"heartbeat {max(age, 0.0):.0f} s ago"


def _proc_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc; None elsewhere or if gone).
    Ticks since boot do not move when the wall clock is set, unlike a start time in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text[text.rindex(")") + 2 :].split()[19])  # field 22; the name (field 2) may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _read_first_line(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pid_ns() -> str | None:
    """This process's PID namespace, e.g. 'pid:[4026531836]' (None where /proc cannot tell)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read_first_line("/proc/sys/kernel/random/boot_id")


def _slurm() -> tuple[str | None, str | None, int | None]:
    """This process's SLURM job, array task and restart count (None, None, None outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID") or None
    if job is None:
        return None, None, None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    array = f"{array_job}_{task}" if array_job and task else None
    try:
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restart = None
    return job, array, restart


def this_process() -> Holder:
    """A lock held by this process, heartbeat now."""
    now = time.time()
    job, array, restart = _slurm()
    return Holder(socket.gethostname(), os.getpid(), now, now, secrets.token_hex(8), _proc_start(os.getpid()),
                  _pid_ns(), _boot_id(), job, array, restart)


def same_pid_space(h: Holder) -> bool:
    """Whether `h`'s pid means a process this one can see: same host name, PID namespace and boot.
    A lock that does not say (an older version's, or a system without /proc) is not."""
    ns, boot = _pid_ns(), _boot_id()
    return (h.host == socket.gethostname() and h.pid > 0 and ns is not None and boot is not None
            and h.pid_ns == ns and h.boot_id == boot)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _opt(d: dict, key: str, kind: Callable[[Any], T]) -> T | None:
    """An optional field (absent from locks written by older versions)."""
    return kind(d[key]) if d.get(key) is not None else None


def read_holder(path: Path) -> Holder | None:
    """The lock's holder; a lock still being written (empty, partial) counts as fresh from its mtime."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except (FileNotFoundError, IsADirectoryError):  # a directory there is refused by RunLock.acquire
        return None
    try:
        d = json.loads(text)
        h = Holder(str(d["host"]), int(d["pid"]), float(d["started"]), float(d["heartbeat"]), str(d["token"]),
                   _opt(d, "proc_start", int), _opt(d, "pid_ns", str), _opt(d, "boot_id", str),
                   _opt(d, "slurm_job", str), _opt(d, "slurm_array", str), _opt(d, "slurm_restart", int))
        if h.token:
            return h
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return Holder("?", 0, mtime, mtime, "")  # no token: empty or unparseable (stale_reason judges it by its mtime)


def stale_reason(h: Holder, now: float, stale_s: float, empty_s: float = EMPTY_S) -> str | None:
    """Why `h` no longer holds the lock, or None. In this PID space only a gone process frees it
    (a paused one keeps it); an earlier restart of this SLURM job is stale; any other holder is
    judged by its heartbeat's age; an empty or unparseable file by its mtime. A heartbeat in the
    future is never stale here: the caller watches it (RunLock._watch_skewed), and an empty file
    not yet `empty_s` old too (RunLock._watch_empty)."""
    if not h.token:
        if now - h.heartbeat > empty_s:
            return (f"the file is empty or unparseable, last written {now - h.heartbeat:.0f} s ago (a starter that "
                    "crashed between creating and writing it, or a full disk)")
        return None
    if same_pid_space(h):
        if not _pid_alive(h.pid):
            return f"its process {h.pid} on this host is gone"
        now_start = _proc_start(h.pid)
        if h.proc_start is not None and now_start is not None and now_start != h.proc_start:
            return f"its process {h.pid} on this host is gone (the pid now belongs to another process)"
        return None
    job, array, restart = _slurm()
    if (h.slurm_job is not None and h.slurm_job == job and h.slurm_array == array and h.slurm_restart is not None
            and restart is not None and h.slurm_restart < restart):
        return (f"it was restart {h.slurm_restart} of this SLURM job {job}, which SLURM ended before starting "
                f"this restart {restart}")
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
            me = this_process()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_non_file()
                self._take_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(me)))
            self.holder = me
            self._thread = threading.Thread(target=self._beat, name="megamor-run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunLockedError(f"{self.path}: could not take the lock (another {self.owner} keeps starting on {self.run_dir})")

    def _refuse_non_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(self.path).st_mode
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise RunLockedError(f"{self.path} is {kind}, not a lock file: move it out of the run folder")

    def _take_if_stale(self) -> None:
        old = read_holder(self.path)
        if old is None:
            return  # released meanwhile: try again
        now = time.time()
        empty_s = min(EMPTY_S, self.stale_s)
        reason = stale_reason(old, now, self.stale_s, empty_s)
        if reason is None and not old.token:
            reason = self._watch_empty(old, empty_s)
            if reason is None:
                return  # written or removed meanwhile: look again
            now = time.time()
        if reason is None and old.heartbeat - now > SKEW_S and not same_pid_space(old):
            reason = self._watch_skewed(old, now)
            now = time.time()
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
        who = f"{old.host} pid {old.pid}" if old.token else "no holder named"
        print(f"megamor: replaced a stale lock {self.path} ({who}: {reason})",
              file=sys.stderr, flush=True)

    def _watch_skewed(self, old: Holder, now: float) -> str | None:
        """A heartbeat from another host's future: watch the file for up to `stale_s` seconds (a
        bounded wait); a live holder rewrites it within its heartbeat period."""
        print(f"megamor: {self.path}: {old.host} pid {old.pid} has a {heartbeat_age(old.heartbeat, now)}: "
              f"watching it for up to {self.stale_s:.0f} s to see whether that {self.owner} is alive",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + self.stale_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.stale_s / 4))
            current = read_holder(self.path)
            if current is None or current.token != old.token or current.heartbeat != old.heartbeat:
                return None  # alive (or released / replaced meanwhile: the caller looks again)
        return f"its heartbeat is in the future (clock skew) and did not change for {self.stale_s:.0f} s"

    def _watch_empty(self, old: Holder, empty_s: float) -> str | None:
        """An empty or unparseable lock not `empty_s` old by its mtime (or dated in the future by a
        file server's clock): watch it until it has been so for `empty_s` seconds here. A starter
        writes it microseconds after creating it. None: written or removed meanwhile."""
        deadline = time.monotonic() + min(empty_s, max(empty_s - (time.time() - old.heartbeat), 0.0))
        while time.monotonic() < deadline:
            time.sleep(min(0.1, empty_s / 10))
            current = read_holder(self.path)
            if current is None or current.token:
                return None
        return (f"the file is empty or unparseable and stayed so for {empty_s:.0f} s (a starter that crashed between "
                "creating and writing it, or a full disk)")

    def check(self) -> None:
        """Raise RunLockLostError unless this process still holds the lock (one small read; the
        trainer calls it before every write to the run folder)."""
        if self.holder is None:
            return
        current = read_holder(self.path)
        why = current.describe(time.time()) if current is not None else f"{self.path} was removed"
        if self.lost or current is None or current.token != self.holder.token:
            self.lost = True
            raise RunLockLostError(f"another {self.owner} took this run folder's lock: {why} ({self.path}); "
                                   "stopped without writing more")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._write_heartbeat():
                return

    def _write_heartbeat(self) -> bool:
        """Rewrite the heartbeat unless the lock is no longer ours (then False). The new file is
        written first; the lock is read right before the rename, and read again if this process
        was paused in between (a newcomer may have taken a lock judged by its heartbeat meanwhile,
        and the rename would overwrite it)."""
        assert self.holder is not None
        beat = replace(self.holder, heartbeat=time.time())
        tmp = temp_path(self.path)
        try:
            try:
                tmp.write_text(json.dumps(asdict(beat)))
            except OSError as e:  # a full disk must not kill training; staleness shows in the file's age
                print(f"megamor: WARNING: cannot refresh {self.path}: {e}", file=sys.stderr, flush=True)
                return True
            pause_s = min(PAUSE_S, self.stale_s / 4)
            for _ in range(3):  # a filesystem slower than pause_s on every read: rename after the third
                t0, m0 = time.time(), time.monotonic()
                current = read_holder(self.path)
                if current is None or current.token != self.holder.token:
                    self.lost = True
                    print(f"megamor: WARNING: lost the run-folder lock {self.path} (now: "
                          f"{current.describe(time.time()) if current else 'missing'}); another {self.owner} may write "
                          "this run folder", file=sys.stderr, flush=True)
                    return False
                if max(time.time() - t0, time.monotonic() - m0) < pause_s:
                    break  # not paused since the read: replace it now
            try:
                os.replace(tmp, self.path)
            except OSError as e:
                print(f"megamor: WARNING: cannot refresh {self.path}: {e}", file=sys.stderr, flush=True)
                return True
            self.holder.heartbeat = beat.heartbeat
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.holder is None:
            return
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
