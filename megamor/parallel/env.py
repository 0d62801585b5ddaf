"""Which process am I? One answer for every launcher.

torchrun and the deepspeed launcher set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT. `srun` running one task per GPU sets SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS
instead; a plain `python -m ...` sets nothing. `resolve_launch_env()` fills the torch.distributed
variables for all three cases (without starting anything), so the rest of the code reads one
set of variables.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

from megamor.parallel.launch import slurm_hosts

DEFAULT_SLURM_PORT_BASE = 20000


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torch (torchrun / deepspeed launcher) | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list ("n[1-3],m" -> "n1")."""
    return slurm_hosts(nodelist)[0]


def slurm_master_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of one srun step: the same on every task without talking (job and
    step id), different for the steps of one job, which may run side by side in one allocation
    (one port for all of them: EADDRINUSE). Step 0 keeps the job's port (20000 + job id % 10000);
    5003 is coprime to 10000, so steps 0..9999 of a job all get different ports."""
    return DEFAULT_SLURM_PORT_BASE + (job_id + 5003 * step_id) % 10000


def resolve_launch_env(env: MutableMapping[str, str] | None = None) -> LaunchEnv:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in `env` (default os.environ)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torch"
        env.setdefault("LOCAL_RANK", env.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env.get("SLURM_STEP_ID") is not None:
        # srun, one task per process. (Inside an sbatch script without srun, SLURM_PROCID is 0
        # and SLURM_NTASKS the allocation's task count: SLURM_STEP_ID tells a real step.)
        launcher = "slurm"
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            env["MASTER_ADDR"] = first_slurm_host(nodelist)
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(slurm_master_port(int(env.get("SLURM_JOB_ID", "0")), int(env["SLURM_STEP_ID"])))
    else:
        launcher = "single"
        env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"] = "0", "0", "1"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return LaunchEnv(
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env["WORLD_SIZE"]),
        master_addr=env["MASTER_ADDR"],
        master_port=int(env["MASTER_PORT"]),
        launcher=launcher,
    )


def peek_world_size(env: MutableMapping[str, str] | None = None) -> int:
    """The world size the launcher asks for, read without changing anything."""
    env = dict(os.environ if env is None else env)
    return resolve_launch_env(env).world_size


def peek_local_world_size(env: MutableMapping[str, str] | None = None) -> int | None:
    """Processes on this node as the launcher says (torchrun's LOCAL_WORLD_SIZE, srun's
    SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE like "2(x2)"), or None when unknown."""
    env = os.environ if env is None else env
    if "RANK" in env and "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    if env.get("SLURM_STEP_ID") is not None and "SLURM_PROCID" in env:
        raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        counts = {int(part.split("(")[0]) for part in raw.split(",") if part.split("(")[0].isdigit()}
        if len(counts) == 1:
            return counts.pop()
    return None
