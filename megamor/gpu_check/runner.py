"""Run each part in a fresh process under its own time limit, inside the run's total budget.

A fresh process per part: a hung CUDA kernel, a sticky CUDA error or a compile that runs long
ends with that process (the whole process group is killed at the limit, inductor's compile
workers with it), and the next part starts on a clean device. Records the part finished before
it was cut are kept; the checks it did not reach are written as timed out (or as errors when
the process crashed), so every check of every part appears in the report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from megamor.env import pythonpath_with_repo
from megamor.gpu_check.common import ERROR, META, PARITY, SKIPPED, SPEED, TIMED_OUT, Record, read_records
from megamor.gpu_check.parts import Part

GRACE_S = 5.0  # after SIGTERM, before SIGKILL
MIN_START_S = 5.0  # a part is not started with less of the run's budget left


@dataclass
class PartResult:
    part: Part
    outcome: str  # ok | timed out | failed | skipped
    seconds: float = 0.0
    limit: float = 0.0
    note: str = ""
    records: list[Record] = field(default_factory=list)

    @property
    def meta(self) -> dict:
        return next((r.data for r in self.records if r.kind == META), {})


def seconds_text(s: float) -> str:
    return f"{s:.0f}" if s >= 10 else f"{s:g}"


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_tail(log_path: Path, start: int, lines: int = 1) -> str:
    """The last non-empty lines this part wrote to the shared log (from byte `start`)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " / ".join(kept[-lines:])[:300].replace("|", "/")


def _fill_missing(part: Part, on_gpu: bool, records: list[Record], status: str, note: str) -> list[Record]:
    seen = {r.name for r in records}
    return records + [Record(part.kind, part.name, n, status, note=note) for n in part.names(on_gpu) if n not in seen]


def run_part(part: Part, limit: float, child_args: list[str], rows: Path, log: IO[str], log_path: Path,
             on_gpu: bool) -> PartResult:
    started = time.time()
    cmd = [sys.executable, "-m", "megamor.gpu_check.child", "--part", part.name, "--rows", str(rows),
           "--deadline", f"{started + limit:.3f}", *child_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath_with_repo()}
    log.write(f"\n===== part {part.name} (limit {seconds_text(limit)} s): {' '.join(cmd)}\n")
    log.flush()
    start = log.tell()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc, timed_out = proc.returncode, True
    seconds = time.time() - started
    log.flush()
    records = read_records(rows)
    if timed_out:
        note = f"timed out after {seconds_text(limit)} s"
        return PartResult(part, "timed out", seconds, limit, note, _fill_missing(part, on_gpu, records, TIMED_OUT, note))
    if rc != 0:
        note = f"exited with code {rc}: {_log_tail(log_path, start)}"
        return PartResult(part, "failed", seconds, limit, note, _fill_missing(part, on_gpu, records, ERROR, note))
    # A part that returned without writing one of its checks, or wrote one not in its list, is a
    # bug of the part (parts.py and the part disagree): say so.
    note = "ok"
    expected = part.names(on_gpu)
    missing = [n for n in expected if n not in {r.name for r in records}]
    extra = [r.name for r in records if r.kind in (PARITY, SPEED) and r.name not in expected]
    if missing:
        note = f"ok, but {len(missing)} check(s) were never written"
        records = _fill_missing(part, on_gpu, records, ERROR, "the part ended without writing this check")
    if extra:
        note = f"ok, but wrote check(s) not listed in parts.py: {', '.join(extra)}"
    return PartResult(part, "ok", seconds, limit, note, records)


def skipped(part: Part, on_gpu: bool, note: str) -> PartResult:
    return PartResult(part, "skipped", note=note, records=_fill_missing(part, on_gpu, [], SKIPPED, note))


def part_limit(own: float, left: float, later: float, fixed: bool) -> float:
    """A part's limit: its own, plus what earlier parts left unused (the budget left beyond the
    later parts' own limits) unless its limit was given on the command line; never past the
    run's budget."""
    return min(left, own if fixed else max(own, left - later))


def run_all(parts: list[Part], limits: dict[str, float], budget: float, child_args: list[str], work: Path,
            log_path: Path, on_gpu: bool, fixed: set[str] = frozenset(), progress: IO[str] = sys.stderr
            ) -> list[PartResult]:
    run_start = time.time()
    results: list[PartResult] = []
    with open(log_path, "a") as log:
        for i, part in enumerate(parts):
            left = budget - (time.time() - run_start)
            if left < MIN_START_S:
                res = skipped(part, on_gpu, f"skipped: the run's {budget:.0f} s budget was spent")
            else:
                later = sum(limits[p.name] for p in parts[i + 1 :])
                limit = part_limit(limits[part.name], left, later, part.name in fixed)
                res = run_part(part, limit, child_args, work / f"{part.name}.jsonl", log, log_path, on_gpu)
            results.append(res)
            counts: dict[str, int] = {}
            for r in res.records:
                if r.kind in (PARITY, SPEED):
                    counts[r.status] = counts.get(r.status, 0) + 1
            summary = ", ".join(f"{n} {s}" for s, n in counts.items())
            print(f"[{time.time() - run_start:6.1f} s] {part.name}: {res.outcome} in {res.seconds:.1f} s ({summary})"
                  + ("" if res.note == "ok" else f"; {res.note}"), file=progress, flush=True)
    return results
