"""The run-folder lock: exclusive, names its holder, heartbeats, detects stale holders."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from megamor.train.runlock import LOCK_FILE, RunLock, RunLockedError, read_holder


def _write_lock(run_dir, host, pid, heartbeat_age):
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid, "started": now - 100,
                                                 "heartbeat": now - heartbeat_age, "token": "someone"}))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_holder_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path / "run") as first:
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path / "run").acquire()
        msg = str(e.value)
        assert f"host {socket.gethostname()} pid {first.holder.pid}" in msg and LOCK_FILE in msg and "\n" not in msg
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released
    RunLock(tmp_path / "run").acquire().release()


def test_heartbeat_is_refreshed(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.1) as lock:
        before = read_holder(lock.path).heartbeat
        time.sleep(0.5)
        assert read_holder(lock.path).heartbeat > before
        assert read_holder(lock.path).token == lock.holder.token


def test_live_holder_on_another_host_is_respected_until_its_heartbeat_stops(tmp_path, capsys):
    _write_lock(tmp_path, "elsewhere", 1, heartbeat_age=5)
    with pytest.raises(RunLockedError, match="host elsewhere pid 1"):
        RunLock(tmp_path, stale_s=60).acquire()
    _write_lock(tmp_path, "elsewhere", 1, heartbeat_age=120)
    with RunLock(tmp_path, stale_s=60) as lock:
        assert read_holder(lock.path).token == lock.holder.token
    assert "no heartbeat for 120 s" in capsys.readouterr().err


def test_dead_pid_on_this_host_is_stale_at_once(tmp_path, capsys):
    _write_lock(tmp_path, socket.gethostname(), _dead_pid(), heartbeat_age=1)
    with RunLock(tmp_path, stale_s=3600):
        pass
    assert "is gone" in capsys.readouterr().err
    assert not list(tmp_path.glob(f".{LOCK_FILE}.stale-*"))  # the stale lock moved aside was removed


def test_lock_taken_over_meanwhile_is_reported_lost(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.1).acquire()
    _write_lock(tmp_path, "elsewhere", 1, heartbeat_age=0)
    time.sleep(0.5)
    assert lock.lost
    lock.release()
    assert read_holder(tmp_path / LOCK_FILE).host == "elsewhere"  # someone else's lock is not removed


@pytest.mark.launch
def test_second_trainer_refused_then_torchrun_sigkill_leaves_no_worker(tiny_config, tmp_path):
    """A real 2-process torchrun run holds the folder: a second trainer exits 2 naming it. Then
    SIGKILL of torchrun's whole process group: its workers (in their own sessions) stop too."""
    import os
    import signal

    import psutil

    from megamor.env import repo_root
    from megamor.train.signals import EXIT_CONFIG
    from tests.train.helpers import launch, train_command, train_env, wait_for_step

    run_dir = tmp_path / "run"
    cmd = train_command(tiny_config, run_dir, ["trainer.max_steps=100000", "checkpoint.every_steps=0"], 2, "torchrun",
                        tmp_path)
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo_root(), env=train_env(tmp_path, {"MEGAMOR_ORPHAN_GRACE_S": "30"}),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step(run_dir, 2, proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "megamor.train" in " ".join(p.cmdline())]
        assert len(workers) == 2
        rank0 = next(p for p in workers if p.environ().get("RANK") == "0")

        second = launch(tiny_config, run_dir, ["trainer.max_steps=100000"], timeout=240)
        assert second.rc == EXIT_CONFIG, second.output[-3000:]
        refusal = [line for line in second.output.splitlines() if "in use by another trainer" in line]
        assert len(refusal) == 1 and f"pid {rank0.pid}" in refusal[0]

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 90
        alive = workers
        while alive and time.time() < deadline:
            alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.2)
        assert not alive, f"workers outlived torchrun: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # The workers were asked to stop (parent-death signal), saved and released the folder.
    out = (tmp_path / "torchrun.log").read_text()
    from megamor.runs.tags import newest_complete

    assert newest_complete(run_dir) is not None and not (run_dir / LOCK_FILE).exists(), out[-3000:]
    RunLock(run_dir).acquire().release()
