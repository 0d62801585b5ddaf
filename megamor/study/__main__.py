"""python -m megamor.study configs/studies/X.yaml [key=value ...] [--plan | --index I | --report | --submit]

Trains every variant x seed of the study at its FLOP (or token) budget, one after another,
evaluates each and writes the report (table + plots). Rerunning resumes an unfinished run
from its newest checkpoint and recomputes nothing that is done. Several study processes may
run at once (on one machine, or on machines sharing the folder): each takes a lock on a run
(RUN/study.lock) and skips runs another live process holds. A finished run's result is kept
beside the report (REPORT/run_results/), so a committed report keeps the study's progress
when the run folders are gone.

  --plan     prepare raw-text data (if the study has some), print each run's budget and exit
  --index I  train and evaluate run I only (a SLURM array task; see slurm/study.sbatch)
  --report   only write the report from the results present
  --time-limit MINUTES  start only runs whose estimated time fits in MINUTES from now
  --submit   prepare the data, then submit the runs as a SLURM job array and the report as a
             job that waits for it (extra sbatch options after --sbatch, e.g. --sbatch --partition=gpu)

Exit codes: 0 done, 2 bad configuration, else the failing run's megamor.train exit code
(75: stopped by a signal after a checkpoint; rerun to resume). With --index, 75 also when
another live study process still holds the run after waiting for its lock to go stale.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from megamor.cli import ArgumentParser, report
from megamor.config import ConfigError
from megamor.env import repo_root
from megamor.study import archive
from megamor.study.config import load_study
from megamor.study.data import check_settings, data_paths, is_prepared, prepare
from megamor.study.report import write_report
from megamor.study.scaling import write_scaling_report
from megamor.train.runlock import RunLock, RunLockedError, read_holder
from megamor.train.signals import EXIT_CONFIG, EXIT_PREEMPTED

if TYPE_CHECKING:  # plan imports torch, which `--help` need not load
    from megamor.study.plan import RunSpec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m megamor.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="configs/studies/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="study keys, e.g. seeds=[1] out_dir=/tmp/s")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan", action="store_true")
    g.add_argument("--index", type=int, default=None)
    g.add_argument("--report", action="store_true")
    g.add_argument("--submit", action="store_true")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="start no run whose estimated time (from the finished runs) would end more than MINUTES "
                        "from now: on a machine or allocation that ends, a run cut short is lost with its folder")
    p.add_argument("--sbatch", nargs=argparse.REMAINDER, default=[],
                   help="extra sbatch options (with --submit): everything after it, so give it last")
    # Overrides may come after the options, as in megamor.train and megamor.plan (--sbatch,
    # an option, still takes the rest of the line).
    return p.parse_intermixed_args(argv)


def _command(args: argparse.Namespace) -> str:
    return " ".join(["python -m megamor.study", shlex.quote(args.config), *map(shlex.quote, args.overrides)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megamor.study.plan import plan_runs  # lazy, as run/timing below: they import torch (keeps `--help` fast)

    try:
        if args.time_limit is not None and not args.time_limit > 0:
            raise ConfigError("--time-limit", f"must be a positive number of minutes, got {args.time_limit}")
        try:
            study = load_study(args.config, args.overrides)
        except (TypeError, KeyError) as e:  # OmegaConf merging an override of the wrong shape
            raise ConfigError("overrides", f"{' '.join(args.overrides)}: {e}") from None
        if args.index is not None and not is_prepared(study):
            raise ConfigError("data", f"not prepared under {data_paths(study)[0].parent}: run "
                                      f"`{_command(args)} --plan` (or --submit) first")
        shards, tok = data_paths(study)
        check_settings(study)  # data prepared with other settings: refused (--report and --plan too)
        runs = plan_runs(study, shards, tok)  # every run's config checked before any work
        if not args.report and not (args.plan and study.data.shards):  # --plan needs no ready shards
            prepare(study)
        for r in runs:  # a kept result or run folder counts only for the run it was made for (--report too)
            archive.check(r, tok, study, shards)
        if args.index is not None and not 0 <= args.index < len(runs):
            raise ConfigError("--index", f"{args.index} is out of range: the study has {len(runs)} runs (0-{len(runs) - 1})")
    except (ConfigError, FileNotFoundError) as e:
        report("megamor.study", e, "configuration error")
        return EXIT_CONFIG
    except RuntimeError as e:  # data preparation failed (its own message is above)
        print(f"megamor.study: {e}", file=sys.stderr)
        return 1

    from megamor.study.run import STUDY_LOCK, RunFailed, is_done, load_result, run_one

    if args.plan:
        from megamor.study.budget import off_budget_note
        from megamor.study.timing import estimate_minutes

        est = estimate_minutes(runs)
        print(f"{'#':>3} {'run':<28} {'GFLOPs/token':>13} {'steps':>7} {'tokens':>13} {'FLOPs':>10} {'minutes':>8}  done")
        for r, m in zip(runs, est):
            mins = f"{m:8.1f}" if m is not None else f"{'?':>8}"
            print(f"{r.index:>3} {r.name:<28} {r.budget.flops_per_token / 1e9:>13.4f} {r.budget.steps:>7} "
                  f"{r.budget.tokens:>13,} {r.budget.flops:>10.3e} {mins}  {'yes' if is_done(r) else 'no'}")
        print(f"GFLOPs/token and FLOPs: {study.flops_label} (the study's flops.convention)")
        note = off_budget_note([(r.name, r.budget) for r in runs])
        if note:
            print(note)
        left = [m for r, m in zip(runs, est) if not is_done(r)]
        if any(m is not None for m in left):
            print(f"runs left: {len(left)}, ~{sum(m or 0.0 for m in left) / 60:.1f} h at the speed of the finished runs "
                  "(minutes: measured for finished runs, else estimated from their seconds per FLOP)")
        return 0
    if args.submit:
        return submit(args, len(runs))
    todo = runs if args.index is None else [runs[args.index]]
    deadline = None if args.time_limit is None else time.time() + 60.0 * args.time_limit
    if not args.report:
        for r in todo:
            if is_done(r):
                try:
                    run_one(study, r)  # loads it (and keeps a copy beside the report)
                except ConfigError as e:  # its run folder changed since the check above
                    print(f"megamor.study: configuration error: {e}", file=sys.stderr)
                    return EXIT_CONFIG
                continue
            late = too_late(runs, r, deadline)
            if late:
                print(f"megamor.study: {r.name} not started: {late}", flush=True)
                continue
            lock = RunLock(r.run_dir, file=STUDY_LOCK, owner="study process")
            try:
                # --index (one SLURM array task, maybe requeued onto another node): the run is this
                # process's to train, so wait for a dead holder's lock to go stale instead of skipping
                acquire(lock, wait_s=2 * lock.stale_s + 10 if args.index is not None else 0.0)
            except RunLockedError as e:
                if args.index is not None:
                    print(f"megamor.study: {r.name}: {e}", file=sys.stderr)
                    return EXIT_PREEMPTED  # as megamor.train's 75: rerun later
                holder = read_holder(lock.path)
                who = holder.describe(time.time()) if holder else "its lock is being taken"
                print(f"megamor.study: {r.name} skipped: another study process has it ({who}; {lock.path})", flush=True)
                continue
            try:
                run_one(study, r)
            except RunFailed as e:
                print(f"megamor.study: {e}", file=sys.stderr)
                return e.rc
            except ConfigError as e:  # e.g. evaluation data made with another tokenizer than the run's
                print(f"megamor.study: configuration error: {e}", file=sys.stderr)
                return EXIT_CONFIG
            finally:
                lock.release()
        if args.index is not None:
            return 0

    try:
        results = [load_result(r) for r in runs if is_done(r)]
    except ConfigError as e:  # a damaged kept result (--report reads them only here)
        print(f"megamor.study: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    pending = [r.name for r in runs if not is_done(r)]
    write = write_scaling_report if study.budgets else write_report  # several budgets: the scaling report
    path = write(study, results, pending, _command(args))
    print(f"megamor.study: {len(results)}/{len(runs)} runs done; report: {path}")
    return 0


def acquire(lock: RunLock, wait_s: float) -> None:
    """Take `lock`, retrying for up to `wait_s` seconds while a live (or not yet stale) holder has it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            return
        except RunLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(5.0, max(0.1, lock.stale_s / 4)))


def too_late(runs: list[RunSpec], run: RunSpec, deadline: float | None) -> str | None:
    """Why `run` should not start before `deadline` (None: it may start). A run with no
    estimate yet (no run has finished) starts."""
    if deadline is None:
        return None
    from megamor.study.timing import estimate_minutes

    minutes = estimate_minutes(runs)[runs.index(run)]
    left = (deadline - time.time()) / 60.0
    if minutes is not None and minutes > left:
        return f"its estimated {minutes:.0f} min exceed the {max(left, 0.0):.0f} min left of --time-limit"
    return None


def submit(args: argparse.Namespace, n_runs: int) -> int:
    """Submit from any folder: the script by its absolute path, the study file absolute, and the
    jobs run this interpreter (PYTHON, unless set) in this folder (sbatch's submit dir), as
    `--plan` ran here."""
    script = str(repo_root() / "slurm" / "study.sbatch")
    base = ["sbatch", "--parsable", *args.sbatch]
    cfg = [str(Path(args.config).resolve()), *args.overrides]
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    r = subprocess.run([*base, f"--array=0-{n_runs - 1}", script, *cfg],
                       capture_output=True, text=True, check=False, env=env)
    if r.returncode != 0:
        print(f"megamor.study: sbatch failed: {r.stderr.strip()}", file=sys.stderr)
        return 1
    job = r.stdout.strip().split(";")[0]
    r2 = subprocess.run([*base, f"--dependency=afterany:{job}", script, *cfg],
                        capture_output=True, text=True, check=False, env=env)
    if r2.returncode != 0:
        print(f"megamor.study: sbatch (report) failed: {r2.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"megamor.study: submitted runs as array job {job} (0-{n_runs - 1}), report as job {r2.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
