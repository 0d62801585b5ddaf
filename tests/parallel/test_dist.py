"""Process-group start-up on CPU (megamor.parallel.dist)."""

from __future__ import annotations

import os
import subprocess
import sys

from megamor.env import repo_root

# Runs in a fresh interpreter: init_distributed sets process-wide state (the default group,
# LOCAL_SIZE). An audit hook sees every process the interpreter starts.
SCRIPT = """
import os, sys
spawned = []
sys.addaudithook(lambda event, args: spawned.append(args[1]) if event == "subprocess.Popen" else None)
from deepspeed.accelerator import get_accelerator
from megamor.parallel import dist as pdist
env, device = pdist.init_distributed()
spawned.clear()  # start-up may probe the machine once; the steps must not
counts = [get_accelerator().device_count() for _ in range(3)]  # ZeRO-3 asks once per gradient reduce
print(os.environ.get("LOCAL_SIZE"), counts, spawned)
pdist.shutdown()
"""


def _run(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_SIZE", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                            "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", **extra_env})
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=repo_root(), env=env, capture_output=True, text=True, check=False,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_cpu_device_count_is_the_local_world_size_without_starting_a_process():
    """DeepSpeed's CPU accelerator ran `numactl --hardware` on every device_count() (a fork of
    the trainer per ZeRO-3 gradient reduce; a test signalling "rank 1" once hit the fork)."""
    assert _run({}) == "1 [1, 1, 1] []"


def test_a_launcher_set_local_size_is_kept():
    """The deepspeed launcher sets LOCAL_SIZE itself; it is not overwritten."""
    assert _run({"LOCAL_SIZE": "3"}) == "3 [3, 3, 3] []"
