"""The collective watchdog in a real 2-rank torchrun run: one rank frozen (SIGSTOP), the job
ends within a minute instead of hanging for the process group's 30 min, and resumes exactly."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import psutil
import pytest

from megamor.env import repo_root

from .helpers import Run, assert_ok, launch, train_command, train_env, wait_for_step, workers_by_rank

STEPS = ["trainer.max_steps=20", "checkpoint.every_steps=4", "eval.at_end=false", "checkpoint.save_final=false"]


@pytest.mark.launch
def test_frozen_rank_ends_the_job_within_a_minute_and_the_run_resumes_exactly(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_command(tiny_config, run_dir, [*STEPS, "parallel.collective_timeout_s=20"], 2, "torchrun", tmp_path)
    proc = subprocess.Popen(cmd, cwd=repo_root(), env=train_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_step(run_dir, 12, proc, timeout=300)  # a few heartbeats in
        rank1 = workers_by_rank(proc.pid)[1]
        rank1.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=180)
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert ended < 60, f"the job took {ended:.0f} s to end:\n{out[-3000:]}"
    lines = [ln for ln in out.splitlines() if "stopped answering" in ln]
    assert len(lines) == 1, out[-3000:]
    line = lines[0]
    assert "rank 0: stuck for" in line and "rank 1 stopped answering" in line and "exiting 75" in line, line
    # The silent rank's last heartbeat names a step; it may lag by one beat (2 s here), which on a
    # quiet machine can be step 0 of this fast run, so only its form is checked.
    assert " at step " in line and re.search(r"last heartbeat: step \d+ ", line), line
    assert not rank1.is_running() or rank1.status() == psutil.STATUS_ZOMBIE
    assert not (run_dir / "trainer.lock").exists()  # freed for the requeued attempt
    stalled = Run(run_dir, None).losses()  # type: ignore[arg-type]

    resumed = launch(tiny_config, run_dir, STEPS, nproc=2)
    assert_ok(resumed)
    assert "resumed from step " in resumed.output
    ref = launch(tiny_config, tmp_path / "ref", STEPS, nproc=2)
    assert_ok(ref)
    assert resumed.losses() == ref.losses() and len(ref.losses()) == 20
    assert all(resumed.losses()[s] == v for s, v in stalled.items())  # the steps logged before the stall too


@pytest.mark.launch
def test_three_ranks_one_frozen_every_live_rank_exits_75_with_one_line(tiny_config, tmp_path):
    """The others follow: ranks 0 and 1 both wait on frozen rank 2; each ends with one line and
    exit 75 (its own watchdog, or the collective that failed when the first one left), no traceback."""
    import re

    run_dir = tmp_path / "run"
    cmd = train_command(tiny_config, run_dir, ["trainer.max_steps=1000", "checkpoint.every_steps=0", "batch.global_batch_size=6",
                                               "parallel.collective_timeout_s=20"], 3, "torchrun", tmp_path)
    proc = subprocess.Popen(cmd, cwd=repo_root(), env=train_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_step(run_dir, 8, proc, timeout=300)
        workers_by_rank(proc.pid)[2].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=180)
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert ended < 60, f"the job took {ended:.0f} s to end:\n{out[-3000:]}"
    lines = [ln for ln in out.splitlines() if ln.startswith("megamor.train: rank") and "exiting 75" in ln]
    assert sorted(ln.split()[2] for ln in lines) == ["0:", "1:"], out[-4000:]
    assert not re.search(r"megamor\.train: rank \d failed", out), out[-4000:]
