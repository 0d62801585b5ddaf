"""Starting and stopping the process group, and the few collectives the trainer uses.

The backend follows the device: NCCL on CUDA, gloo on CPU (DeepSpeed with
DS_ACCELERATOR=cpu). DeepSpeed's `init_distributed` is used so its `comm` layer and the
torch.distributed default group are the same group.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megamor.parallel.ds_noise import quiet_deepspeed
from megamor.parallel.env import LaunchEnv, resolve_launch_env


def default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(timeout_minutes: float = 30.0, verbose: bool = False) -> tuple[LaunchEnv, torch.device]:
    """Map the launcher's variables, pick the device, start the default process group
    (DeepSpeed's start-up noise quieted unless `verbose` or MEGAMOR_DS_VERBOSE=1)."""
    import deepspeed  # lazy: a process group's start needs it, importing this module does not

    env = resolve_launch_env()
    device = default_device(env.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        with quiet_deepspeed(verbose):
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                timeout=datetime.timedelta(minutes=timeout_minutes),
                rank=env.rank,
                world_size=env.world_size,
            )
        release_shm_names(env.rank, env.world_size)
    return env, device


def shm_buffer_path(rank: int) -> str:
    """The /dev/shm file DeepSpeed's CPU backend maps for `rank`'s shared-memory all-reduce
    (named in its shm.cpp after the user id, MASTER_ADDR, MASTER_PORT and the rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_names(rank: int, world_size: int) -> None:
    """DeepSpeed's CPU backend, when LOCAL_SIZE equals the world size (the deepspeed launcher
    on one node sets it), maps one 69 MB /dev/shm file per rank for its shared-memory
    all-reduce and never unlinks it: every run left its ranks' files behind until /dev/shm
    (RAM) filled. Once every rank has mapped every peer's file (the barrier: each rank maps
    them inside init_distributed), each rank unlinks its own name; the mappings stay valid and
    the memory is freed when the last rank exits, so a run killed after start-up leaves nothing
    (one killed during the process group's start still can)."""
    if os.environ.get("DS_ACCELERATOR") != "cpu" or os.environ.get("LOCAL_SIZE") != str(world_size):
        return
    barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(rank))


def shutdown() -> None:
    """Destroy every process group and drop DeepSpeed's cached world group, so that the gloo
    groups nothing else holds are freed (their worker threads joined) while Python is alive."""
    if dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and getattr(groups, "_WORLD_GROUP", None) is not None:
        groups._WORLD_GROUP = None
    gc.collect()


def exit_without_finalizing(code: int) -> None:
    """End a finished process with `code`: flush, run the atexit handlers (W&B, logging), then
    os._exit, skipping the interpreter's finalization. Process groups still referenced from C++
    (the default gloo group always is) keep native worker threads until then, and tearing them
    down under a finalizing interpreter can abort a run that has already finished (SIGABRT,
    "terminate called without an active exception", seen on rank 1 of 2-rank CPU runs after
    the last checkpoint); the launcher would then report a failure for a complete run."""
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing to save
                stream.flush()
        os._exit(code)


_collective: str | None = None  # the collective the main thread is in (read by megamor.parallel.watchdog)


def current_collective() -> str | None:
    return _collective


@contextlib.contextmanager
def _in(name: str) -> Iterator[None]:
    global _collective
    outer, _collective = _collective, name
    try:
        yield
    finally:
        _collective = outer


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        with _in("barrier"):
            dist.barrier()


def all_reduce_(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """In-place all-reduce; a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        with _in("all_reduce"):
            dist.all_reduce(t, op=op, group=group)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (pickled; for small things like paths and decisions)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    with _in("broadcast_object_list"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any | None] = [None] * dist.get_world_size()
    with _in("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out

