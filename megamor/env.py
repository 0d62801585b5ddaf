"""Settings read from the environment, in one place."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The offline datasets folder: $MEGAMOR_DATA_DIR, else ../shared/data beside the repo."""
    env = os.environ.get("MEGAMOR_DATA_DIR")
    return Path(env) if env else (_REPO_ROOT.parent / "shared" / "data")


def repo_root() -> Path:
    return _REPO_ROOT


def pythonpath_with_repo() -> str:
    """$PYTHONPATH with the folder holding the megamor package first: a child process started in
    another folder imports this megamor even when it is not installed."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(_REPO_ROOT), *rest])


# -- CPU threads ---------------------------------------------------------------------------
# OpenMP's default lets idle worker threads spin for a while between parallel regions (libgomp:
# 300k spins): alone on a machine that is free speed, but two processes sharing the cores burn
# each other's time spinning (issue 27: `make demo` 18x slower beside one other process).
# PASSIVE (no spin) fixed that but cost a demo alone 7-14% (a wake-up at every parallel region);
# a bounded spin of 3,000 keeps the lone speed (0.98-1.01x) and still runs two demos at once
# 1.5-1.9x faster each (BENCHMARKS.md "Threads on a shared CPU"; evals/bench_threads.py).
# The settings must be in the environment before torch loads OpenMP, so entry points call
# `thread_defaults()` before importing torch; an explicit setting is never overridden.
SPIN_COUNT = "3000"  # GOMP_SPINCOUNT (libgomp, torch's OpenMP on Linux)
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read_quota_v2(path: Path) -> float | None:
    """cgroup v2 cpu.max: "QUOTA PERIOD" (microseconds) or "max PERIOD" (no limit)."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _read_quota_v1(folder: Path) -> float | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us; a quota of -1 means no limit."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota (in cores) of this process's cgroup and its ancestors, or None if unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    limits: list[float] = []
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        rel = rel.strip().lstrip("/")
        if controllers == "":  # v2: the quota is the tightest cpu.max from here up to the root
            folder = root / rel
            while True:
                q = _read_quota_v2(folder / "cpu.max")
                if q is not None:
                    limits.append(q)
                if folder == root or root not in folder.parents:
                    break
                folder = folder.parent
        elif "cpu" in controllers.split(","):
            # v1: the controller's mount, with this process's path below it unless (as in most
            # containers) the mount already is this process's cgroup.
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                for folder in (mount / rel, mount):
                    q = _read_quota_v1(folder)
                    if q is not None:
                        limits.append(q)
    return min(limits) if limits else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (whole cores)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        n = min(n, int(quota))
    return max(1, n)


def thread_defaults(environ: MutableMapping[str, str] | None = None, local_processes: int = 1,
                    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Fill GOMP_SPINCOUNT (a bounded spin, unless the user set it or OMP_WAIT_POLICY) and
    OMP_NUM_THREADS (the usable cores shared among this node's `local_processes`); returns the
    thread count. MEGAMOR_THREAD_DEFAULTS=off leaves both to OpenMP (its spinning, torch's core
    count)."""
    env = os.environ if environ is None else environ
    off = env.get("MEGAMOR_THREAD_DEFAULTS", "").strip().lower() in ("off", "0", "false", "no")
    if not off and "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:  # either is the user's policy
        env["GOMP_SPINCOUNT"] = SPIN_COUNT
    mine = max(1, usable_cpus(root, proc_cgroup) // max(1, local_processes))
    given = env.get("OMP_NUM_THREADS", "").strip()
    if not given and not off:
        env["OMP_NUM_THREADS"] = str(mine)
        return mine
    try:  # the outermost level of a nested setting such as "4,2"
        return max(1, int(given.split(",")[0]))
    except ValueError:
        return mine
