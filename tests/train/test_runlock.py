"""The run-folder lock: exclusive, names its holder, heartbeats, detects stale holders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamor.train.runlock import LOCK_FILE, RunLock, RunLockedError, RunLockLostError, _proc_start, read_holder

THIS_PID_SPACE = {"pid_ns": os.readlink("/proc/self/ns/pid"),
                  "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip()}


def _write_lock(run_dir, host, pid, heartbeat_age, proc_start=None, token="someone", **fields):
    """A lock as a holder would write it; on this host by default in this process's PID space."""
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    if host == socket.gethostname():
        fields = {**THIS_PID_SPACE, **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid, "started": now - 100, "proc_start": proc_start,
                                                 "heartbeat": now - heartbeat_age, "token": token, **fields}))


def _unshare_works(*flags: str) -> bool:
    try:
        return subprocess.run(["unshare", *flags, "true"], check=False, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# A holder in its own process: takes the lock, prints its pid, holds it until stdin closes.
HOLDER = ("import sys; from megamor.train.runlock import RunLock; lock = RunLock(sys.argv[1], heartbeat_s=0.2).acquire(); "
          "print(lock.holder.pid, flush=True); sys.stdin.read(); lock.release()")


def _start_holder(prefix: list[str], run_dir, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([*prefix, sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    line = p.stdout.readline()
    assert line.strip().isdigit(), f"the holder did not start (rc {p.poll()})"
    return p, int(line)


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


def test_paused_holder_on_this_host_keeps_the_lock_however_old_its_heartbeat(tmp_path, capsys):
    """Issue 32: a SIGSTOPped trainer writes no heartbeat but is alive; taking its lock let two
    trainers write one folder. Only a gone process frees a lock on this host."""
    import signal

    paused = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        paused.send_signal(signal.SIGSTOP)
        _write_lock(tmp_path, socket.gethostname(), paused.pid, heartbeat_age=10_000, proc_start=_proc_start(paused.pid))
        with pytest.raises(RunLockedError, match=f"in use by another trainer .*pid {paused.pid}.*heartbeat 10000 s ago"):
            RunLock(tmp_path, stale_s=1).acquire()
        assert read_holder(tmp_path / LOCK_FILE).pid == paused.pid
    finally:
        paused.kill()
        paused.wait()
    with RunLock(tmp_path, stale_s=3600):  # gone: free at once
        pass
    assert f"its process {paused.pid} on this host is gone" in capsys.readouterr().err


def test_reused_pid_on_this_host_is_stale(tmp_path, capsys):
    """The lock's pid alive but started at another time than the holder: the holder is gone."""
    import os

    _write_lock(tmp_path, socket.gethostname(), os.getpid(), heartbeat_age=0, proc_start=_proc_start(os.getpid()) - 1)
    with RunLock(tmp_path, stale_s=3600):
        pass
    assert "now belongs to another process" in capsys.readouterr().err


@pytest.mark.skipif(not _unshare_works("-Urpf", "--mount-proc"), reason="needs unprivileged PID namespaces (unshare)")
def test_live_holder_in_another_pid_namespace_on_this_host_keeps_the_lock(tmp_path):
    """Audit: a trainer in a container sharing the host's name but not its PIDs (enroot/pyxis,
    docker --uts=host, here `unshare -p`) is pid 1 there; from the host its pid looked reused and
    a second trainer replaced the live holder's lock. Its heartbeat decides instead."""
    holder, pid = _start_holder(["unshare", "-Urpf", "--mount-proc"], tmp_path)
    try:
        lock = read_holder(tmp_path / LOCK_FILE)
        assert pid == 1 and lock.host == socket.gethostname()
        with pytest.raises(RunLockedError, match=f"in use by another trainer \\(host {socket.gethostname()} pid 1,"):
            RunLock(tmp_path, stale_s=3600).acquire()
        assert read_holder(tmp_path / LOCK_FILE).token == lock.token
        assert lock.pid_ns != THIS_PID_SPACE["pid_ns"] and lock.boot_id == THIS_PID_SPACE["boot_id"]
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not (tmp_path / LOCK_FILE).exists()  # it released its own lock


@pytest.mark.parametrize("space", [{}, {"pid_ns": "pid:[4026532999]"}, {"boot_id": "another-boot"}],
                         ids=["older-version-lock", "other-pid-namespace", "other-boot"])
def test_lock_from_another_pid_space_on_this_host_name_is_judged_by_its_heartbeat(tmp_path, capsys, space):
    """A lock on this host name whose PID space differs (or is not recorded: an older version's
    lock) says nothing about this host's pids: pid 1 is alive here, and was taken for a reused pid."""
    fields = {**THIS_PID_SPACE, **space} if space else {"pid_ns": None, "boot_id": None}
    _write_lock(tmp_path, socket.gethostname(), 1, heartbeat_age=5, proc_start=1, **fields)
    with pytest.raises(RunLockedError, match=f"host {socket.gethostname()} pid 1,"):
        RunLock(tmp_path, stale_s=60).acquire()
    _write_lock(tmp_path, socket.gethostname(), 1, heartbeat_age=120, proc_start=1, **fields)
    with RunLock(tmp_path, stale_s=60):
        pass
    assert "no heartbeat for 120 s" in capsys.readouterr().err


@pytest.mark.skipif(not _unshare_works("-Urun"), reason="needs unprivileged UTS namespaces (unshare)")
def test_requeued_slurm_job_takes_the_lock_of_its_earlier_restart_killed_on_another_node(tmp_path, capsys, monkeypatch):
    """Audit: SLURM requeued a job whose node failed (its trainer SIGKILLed there, heartbeat still
    fresh); the restart was refused (exit 2, which train.sbatch does not requeue): the run ended.
    The holder, on "node017" (its own host name), is restart 0 of job 4242; this is restart 1."""
    job = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2"}
    holder, _ = _start_holder(["unshare", "-Urun", "sh", "-c", 'hostname node017 && exec "$@"', "sh"], tmp_path,
                              {**job, "SLURM_RESTART_COUNT": "0"})
    holder.kill()  # its node failed
    holder.communicate(timeout=60)
    old = json.loads((tmp_path / LOCK_FILE).read_text())
    refusals = []
    for env in ({"SLURM_RESTART_COUNT": "0"}, {"SLURM_JOB_ID": "4243", "SLURM_RESTART_COUNT": "1"},
                {"SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "1"}):
        # the same restart (another job step), another job, another array task: heartbeat only
        for k, v in {**job, **env}.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(RunLockedError, match=r"in use by another trainer \(host node017 pid \d+") as e:
            RunLock(tmp_path, stale_s=60).acquire()
        refusals.append(str(e.value))
    for k, v in {**job, "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with RunLock(tmp_path, stale_s=60) as lock:
        assert read_holder(lock.path).slurm_restart == 1
    assert time.monotonic() - t0 < 5
    assert "it was restart 0 of this SLURM job 4242, which SLURM ended before starting this restart 1" in (
        capsys.readouterr().err)
    assert (old["host"], old["slurm_job"], old["slurm_array"], old["slurm_restart"]) == ("node017", "4242", "4240_2", 0)
    assert all(", SLURM job 4242 restart 0, started " in r for r in refusals), refusals


def _crash_between_create_and_write(path) -> None:
    """A starter killed right after creating the lock exclusively, before writing it."""
    code = "import os, sys; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY); os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code, str(path)], check=False).returncode == -9


@pytest.mark.parametrize("content", ["", '{"host": "node0'], ids=["empty", "truncated"])
def test_empty_or_unparseable_lock_is_stale_once_a_few_seconds_old(tmp_path, capsys, content):
    """Audit: an empty lock (a crash between create and write, a full disk) read as "host ? pid
    0" with a fresh heartbeat and refused every starter for the whole stale window."""
    path = tmp_path / LOCK_FILE
    _crash_between_create_and_write(path)
    path.write_text(content)
    os.utime(path, (time.time() - 30, time.time() - 30))
    t0 = time.monotonic()
    with RunLock(tmp_path, stale_s=3600) as lock:
        assert read_holder(lock.path).token == lock.holder.token
    assert time.monotonic() - t0 < 2
    err = capsys.readouterr().err
    assert ("replaced a stale lock" in err and "(no holder named: the file is empty or unparseable, last written 30 s ago"
            in err), err


def test_fresh_empty_lock_is_watched_and_taken_unless_it_gets_written(tmp_path, capsys):
    import threading

    path = tmp_path / LOCK_FILE
    _crash_between_create_and_write(path)
    t0 = time.monotonic()
    with RunLock(tmp_path, stale_s=2.0) as lock:  # watched for min(5 s, stale_s)
        assert read_holder(lock.path).token == lock.holder.token
    assert 1.5 <= time.monotonic() - t0 < 10
    assert "empty or unparseable and stayed so for 2 s" in capsys.readouterr().err

    _crash_between_create_and_write(path)  # a starter writes it while we watch: a live holder
    writer = threading.Timer(0.5, lambda: _write_lock(tmp_path, "elsewhere", 7, heartbeat_age=0))
    writer.start()
    with pytest.raises(RunLockedError, match="host elsewhere pid 7"):
        RunLock(tmp_path, stale_s=60).acquire()
    writer.join()


def test_holder_paused_between_reading_and_rewriting_its_lock_does_not_overwrite_a_newcomer(tmp_path, monkeypatch):
    """A holder judged by its heartbeat (another host) is paused right after its heartbeat thread
    read the lock (still its own); meanwhile a newcomer takes the lock. On resuming it must not
    rename its heartbeat over the newcomer's lock but find it lost. (The pause: the heartbeat
    thread sleeps in its read, as a SIGSTOPped process would stand still.)"""
    import threading

    from megamor.train import runlock

    real_read = runlock.read_holder
    paused = threading.Event()

    def read_then_pause(path):
        h = real_read(path)
        if threading.current_thread().name == "megamor-run-lock" and not paused.is_set():
            paused.set()
            _write_lock(tmp_path, "elsewhere", 7, heartbeat_age=0, token="newcomer")
            time.sleep(1.5)
        return h

    monkeypatch.setattr(runlock, "read_holder", read_then_pause)
    lock = RunLock(tmp_path, heartbeat_s=0.1).acquire()
    deadline = time.monotonic() + 10
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.1)
    assert paused.is_set() and lock.lost
    assert real_read(tmp_path / LOCK_FILE).token == "newcomer"
    with pytest.raises(RunLockLostError, match="host elsewhere pid 7"):
        lock.check()
    lock.release()
    assert real_read(tmp_path / LOCK_FILE).token == "newcomer" and not list(tmp_path.glob(f".{LOCK_FILE}.tmp-*"))


def test_future_heartbeat_is_clock_skew_watched_for_a_bounded_time(tmp_path, capsys):
    _write_lock(tmp_path, "elsewhere", 7, heartbeat_age=-96_970_162)
    t0 = time.monotonic()
    with RunLock(tmp_path, stale_s=1.0) as lock:
        assert read_holder(lock.path).token == lock.holder.token
    assert 1.0 <= time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "96970162 s in the future" in err and "-96970162" not in err
    assert "clock skew" in err and "replaced a stale lock" in err


def test_future_heartbeat_that_keeps_changing_is_a_live_holder(tmp_path):
    import threading

    done = threading.Event()

    def holder_on_a_fast_clock():
        while not done.is_set():
            _write_lock(tmp_path, "elsewhere", 7, heartbeat_age=-3600)
            done.wait(0.1)

    t = threading.Thread(target=holder_on_a_fast_clock)
    t.start()
    try:
        time.sleep(0.05)
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path, stale_s=2.0).acquire()
    finally:
        done.set()
        t.join()
    assert "host elsewhere pid 7" in str(e.value) and "s in the future" in str(e.value) and "heartbeat -" not in str(e.value)


def test_lock_path_that_is_a_directory_is_one_clear_error(tmp_path):
    (tmp_path / LOCK_FILE).mkdir(parents=True)
    lock = RunLock(tmp_path)
    with pytest.raises(RunLockedError) as e:
        lock.acquire()
    assert str(e.value) == f"{tmp_path / LOCK_FILE} is a directory, not a lock file: move it out of the run folder"
    lock.release()  # nothing held: nothing to read or remove
    assert (tmp_path / LOCK_FILE).is_dir()


def test_check_raises_once_another_trainer_holds_the_lock(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=3600).acquire()
    lock.check()  # still ours
    _write_lock(tmp_path, "elsewhere", 1, heartbeat_age=0)
    with pytest.raises(RunLockLostError, match="another trainer took this run folder's lock: host elsewhere pid 1"):
        lock.check()
    lock.release()
    assert read_holder(tmp_path / LOCK_FILE).host == "elsewhere"


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

    from megamor.env import repo_root
    from megamor.train.signals import EXIT_CONFIG
    from tests.train.helpers import gone, launch, train_command, train_env, wait_for_step, workers_by_rank

    run_dir = tmp_path / "run"
    cmd = train_command(tiny_config, run_dir, ["trainer.max_steps=100000", "checkpoint.every_steps=0"], 2, "torchrun",
                        tmp_path)
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo_root(), env=train_env(tmp_path, {"MEGAMOR_ORPHAN_GRACE_S": "30"}),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step(run_dir, 2, proc)
        workers = workers_by_rank(proc.pid)
        assert sorted(workers) == [0, 1]
        rank0 = workers[0]

        second = launch(tiny_config, run_dir, ["trainer.max_steps=100000"], timeout=240)
        assert second.rc == EXIT_CONFIG, second.output[-3000:]
        refusal = [line for line in second.output.splitlines() if "in use by another trainer" in line]
        assert len(refusal) == 1 and f"pid {rank0.pid}" in refusal[0]

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 90
        alive = list(workers.values())
        while alive and time.time() < deadline:
            alive = [p for p in alive if not gone(p)]
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


@pytest.mark.launch
def test_trainer_whose_lock_was_taken_stops_before_writing_more(tiny_config, tmp_path):
    """Another host's trainer takes the lock right after step 3 (a fault writes its lock file):
    the trainer exits 2 with one line before the step-3 checkpoint, logs nothing more, writes no
    trace and leaves the new holder's lock alone."""
    from megamor.runs.tags import newest_complete
    from megamor.train.signals import EXIT_CONFIG
    from tests.train.helpers import launch

    run = launch(tiny_config, tmp_path / "run", ["checkpoint.every_steps=3", "trainer.profile.steps=[2,10]"],
                 env={"MEGAMOR_FAULTS": "lock_taken_after_step=3"})
    assert run.rc == EXIT_CONFIG, run.output[-3000:]
    lines = [ln for ln in run.output.splitlines() if "took this run folder's lock" in ln]
    assert len(lines) == 1 and lines[0].startswith("megamor.train: another trainer took this run folder's lock: "
                                                   "host elsewhere pid 1"), run.output[-3000:]
    assert "Traceback" not in run.output
    assert max(run.losses()) == 3 and newest_complete(run.run_dir) is None
    assert not (run.run_dir / "profile").exists()
    assert read_holder(run.run_dir / LOCK_FILE).token == "taken"


@pytest.mark.launch
def test_sigstopped_trainer_keeps_its_folder_and_a_second_one_is_refused(tiny_config, tmp_path):
    """Issue 32's repro with a 2 s heartbeat limit: trainer A paused (SIGSTOP) past the limit; B
    with the same command is refused (exit 2) instead of taking over; A continues and finishes.
    One writer: every step logged once, nothing quarantined."""
    import signal

    from megamor.env import repo_root
    from megamor.runs.tags import newest_complete
    from megamor.train.signals import EXIT_CONFIG
    from tests.train.helpers import Run, launch, train_command, train_env, wait_for_step

    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=30", "checkpoint.every_steps=5", "eval.at_end=false"]
    short = {"MEGAMOR_LOCK_STALE_S": "2", "MEGAMOR_LOCK_HEARTBEAT_S": "0.5"}
    a = subprocess.Popen(train_command(tiny_config, run_dir, overrides, 1, "python", tmp_path), cwd=repo_root(),
                         env=train_env(tmp_path, short), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 6, a, timeout=240)
        a.send_signal(signal.SIGSTOP)
        time.sleep(5)  # > the 2 s limit: the old rule called this lock stale
        b = launch(tiny_config, run_dir, overrides, env=short, timeout=240)
        assert b.rc == EXIT_CONFIG, b.output[-3000:]
        assert f"in use by another trainer (host {socket.gethostname()} pid {a.pid}" in b.output
        assert "replaced a stale lock" not in b.output
        a.send_signal(signal.SIGCONT)
        out, _ = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            a.kill()
            a.wait()
    assert a.returncode == 0, out[-3000:]
    assert "lost the run-folder lock" not in out
    steps = [r["step"] for r in Run(run_dir, None).records() if "train/loss" in r]  # type: ignore[arg-type]
    assert steps == list(range(1, 31))
    assert not (run_dir / "checkpoints" / "quarantine").exists()
    assert newest_complete(run_dir).step == 30 and not (run_dir / LOCK_FILE).exists()


@pytest.mark.launch
def test_trainer_lock_path_that_is_a_directory_exits_2_with_one_line(tiny_config, tmp_path):
    """Issue 32: an IsADirectoryError traceback (from releasing the lock it never took)."""
    from megamor.train.signals import EXIT_CONFIG
    from tests.train.helpers import launch

    (tmp_path / "run" / LOCK_FILE).mkdir(parents=True)
    run = launch(tiny_config, tmp_path / "run", ["trainer.max_steps=2"])
    assert run.rc == EXIT_CONFIG, run.output[-3000:]
    lines = [ln for ln in run.output.splitlines() if LOCK_FILE in ln]
    want = f"megamor.train: {tmp_path / 'run' / LOCK_FILE} is a directory, not a lock file: move it out of the run folder"
    assert lines == [want], run.output[-3000:]
    assert "Traceback" not in run.output and (tmp_path / "run" / LOCK_FILE).is_dir()


@pytest.mark.launch
def test_depth_csv_is_not_written_after_the_lock_was_taken(tiny_config, tmp_path):
    """The depth CSV (every step, no other write due at step 4) checks the lock before it writes:
    the lock taken right after step 3 leaves rows for steps 1-3 only."""
    from megamor.runs.depth_csv import read_csv
    from megamor.train.signals import EXIT_CONFIG
    from tests.train.helpers import launch

    run = launch(tiny_config, tmp_path / "run", ["trainer.max_steps=6", "logging.every_steps=6", "checkpoint.every_steps=6",
                                                 "logging.depth_hist_csv=depth.csv", "logging.depth_hist_every=1"],
                 env={"MEGAMOR_FAULTS": "lock_taken_after_step=3"})
    assert run.rc == EXIT_CONFIG, run.output[-3000:]
    assert sorted(read_csv(run.run_dir / "depth.csv")) == [1, 2, 3]
