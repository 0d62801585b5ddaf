"""Run a function in N real processes joined by a gloo process group (OLMo-core style).

    run_distributed(fn, world_size=2, args=(...))   # fn(rank, world_size, *args) in each process

Exceptions in any rank are re-raised in the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from megamor.parallel.env import free_port


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    try:
        import torch

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        # Every rank done before any tears the group down: a rank that leaves while its peer is
        # still inside a collective (ZeRO-3's last gathers) aborts that peer in gloo's C++
        # ("terminate called without an active exception"), seen once under pytest workers.
        dist.barrier()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = ()) -> None:
    """fn must be importable (module level) so spawned processes can find it."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(fn, world_size, free_port(), args, errors), nprocs=world_size,
                           join=True, start_method="spawn")
    except Exception as e:
        details = []
        while not errors.empty():
            rank, tb = errors.get()
            details.append(f"--- rank {rank} ---\n{tb}")
        raise RuntimeError("distributed test failed:\n" + "\n".join(details)) from e
