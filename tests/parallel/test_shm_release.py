"""DeepSpeed's CPU shared-memory all-reduce leaves no /dev/shm files behind (dist.release_shm_names).

Two real ranks start the process group as the deepspeed launcher leaves them (LOCAL_SIZE equal
to the world size, which turns the shared-memory path on), then all-reduce through that path
after their names are gone."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from megamor.env import repo_root
from megamor.parallel.env import free_port
from tests.train.helpers import train_env

WORKER = """
import os, torch
import deepspeed.comm as ds_comm
from megamor.parallel.dist import init_distributed, shm_buffer_path, shutdown
env, _ = init_distributed()
from deepspeed.comm import comm as ds_backend  # its `cdb` (deepspeed.comm's own name is a stale None)
print("shm path on", getattr(ds_backend.cdb, "shm_comm_op", None) is not None, flush=True)
print("named", os.path.exists(shm_buffer_path(env.rank)), flush=True)
t = torch.full((1024,), float(env.rank + 1))
ds_comm.inference_all_reduce(t)
print("sum", float(t[0]), float(t[-1]), flush=True)
shutdown()
"""


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this system")
def test_shm_buffers_are_unlinked_once_every_rank_mapped_them(tmp_path):
    port = str(free_port())
    base = {**train_env(tmp_path), "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=repo_root(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
        leftovers = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")
        for f in leftovers:  # this test's own files only (its port): a failure must not fill RAM
            os.unlink(f)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "shm path on True" in out, out[-3000:]  # DeepSpeed's shared-memory op was built and set up
        assert "named False" in out and "sum 3.0 3.0" in out, out[-3000:]
    assert leftovers == []
