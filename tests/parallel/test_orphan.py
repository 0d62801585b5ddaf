"""A launched worker follows its launcher: SIGTERM at once when it dies, SIGKILL after a grace period."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

CHILD = """
import signal, sys, time
from megamor.parallel.orphan import exit_with_launcher
mode, marker = sys.argv[1], sys.argv[2]
def on_term(*_):
    open(marker, "w").write("term")
    if mode == "clean":
        sys.exit(75)
signal.signal(signal.SIGTERM, on_term)
exit_with_launcher("torch", grace_s=2.0)
print("armed", flush=True)
while True:
    time.sleep(0.05)
"""

# The launcher: starts the worker in a new session (as torchrun does) and prints its pid.
PARENT = """
import subprocess, sys, time
p = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], start_new_session=True,
                     stdout=subprocess.PIPE, text=True)
assert p.stdout.readline().strip() == "armed"
print(p.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _run(tmp_path, mode: str) -> str:
    """Kill the launcher; wait for its worker to be gone; what the worker's SIGTERM handler recorded."""
    marker = tmp_path / f"{mode}.marker"
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, mode, str(marker)], stdout=subprocess.PIPE,
                              text=True, env=env)
    worker = int(parent.stdout.readline())
    t0 = time.time()
    parent.kill()
    parent.wait()
    while not _gone(worker) and time.time() - t0 < 20:
        time.sleep(0.05)
    assert _gone(worker), "the worker outlived its launcher"
    return marker.read_text() if marker.exists() else ""


def test_worker_stops_cleanly_when_its_launcher_is_killed(tmp_path):
    marker = _run(tmp_path, "clean")
    assert marker == "term"  # it was asked to stop (SIGTERM), and did


def test_worker_ignoring_the_stop_is_killed_after_the_grace(tmp_path):
    marker = _run(tmp_path, "stubborn")
    assert marker == "term"  # asked first, then killed: it would never have exited by itself


def test_plain_process_is_not_watched():
    from megamor.parallel.orphan import exit_with_launcher

    assert exit_with_launcher("single") is False
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# A tool that starts a trainer as a plain child (megamor.study): the child is armed with
# child_follows_parent, so SIGKILLing the tool stops the child too (SIGTERM: a trainer saves, exits 75).
TOOL = """
import subprocess, sys
from megamor.parallel.orphan import child_follows_parent
child = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(600)"
subprocess.run([sys.executable, "-c", child], preexec_fn=child_follows_parent() if sys.argv[1] == "armed" else None)
"""


def _child_after_tool_killed(armed: str, wait_s: float = 10.0) -> tuple[int, bool]:
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tool = subprocess.Popen([sys.executable, "-c", TOOL, armed], stdout=subprocess.PIPE, text=True, env=env)
    child = int(tool.stdout.readline())
    tool.kill()
    tool.wait()
    t0 = time.time()
    while not _gone(child) and time.time() - t0 < wait_s:
        time.sleep(0.05)
    return child, _gone(child)


def test_a_child_started_with_child_follows_parent_dies_with_it():
    child, gone = _child_after_tool_killed("plain", wait_s=2.0)  # what the study did: the child trains on
    try:
        assert not gone
    finally:
        if not gone:
            os.kill(child, signal.SIGKILL)
    assert _child_after_tool_killed("armed")[1], "the armed child outlived the tool that started it"


# A launcher that is pid 1 (a container whose entrypoint is torchrun): its worker's parent is 1
# from the start, which is not a dead launcher. The worker arms, then reports after a few polls.
PID1_LAUNCHER = """
import subprocess, sys
worker = '''
import os, signal, sys, time
from megamor.parallel.orphan import POLL_S, exit_with_launcher
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(1))
exit_with_launcher("torch", grace_s=60.0)
time.sleep(3 * POLL_S)
print("ppid", os.getppid(), "sigterm", bool(got), flush=True)
'''
sys.exit(subprocess.run([sys.executable, "-c", worker]).returncode)
"""


def test_a_launcher_that_is_pid_1_is_not_taken_for_dead():
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a new pid namespace")
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID1_LAUNCHER],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ppid", "1", "sigterm", "False"], r.stdout + r.stderr
