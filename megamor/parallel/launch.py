"""Launch commands for megamor.train, one place for every launcher.

    python -m megamor.parallel.launch hostfile --out hostfile [--slots 8]   # from SLURM's node list

The wrappers in launch/ call these; tests use them to start real multi-process runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

TRAIN_MODULE = "megamor.train"


def torchrun_command(nproc_per_node: int, args: Sequence[str], module: str = TRAIN_MODULE, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, log_dir: str | Path | None = None,
                     python: str = sys.executable) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`). Several nodes: run it once per node with
    the same rdzv_endpoint (host:port of the first node)."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("several nodes need rdzv_endpoint (host:port of the first node)")
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    if log_dir is not None:
        cmd += [f"--log-dir={log_dir}"]
    return cmd + ["-m", module, *args]


def deepspeed_command(num_gpus: int, args: Sequence[str], module: str = TRAIN_MODULE, hostfile: str | Path | None = None,
                      master_port: int | None = None, python: str = sys.executable) -> list[str]:
    """The deepspeed launcher. With a hostfile it starts `slots` processes on every host (over
    pdsh/ssh); without one, num_gpus processes here."""
    cmd = [python, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    else:
        cmd += ["--num_gpus", str(num_gpus)]
    if master_port is not None:
        cmd += ["--master_port", str(master_port)]
    return cmd + ["--module", module, *args]


def slurm_hosts(nodelist: str | None = None) -> list[str]:
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise RuntimeError("not inside a SLURM allocation (SLURM_JOB_NODELIST is unset)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def write_hostfile(path: str | Path, hosts: Sequence[str], slots: int) -> Path:
    """DeepSpeed's hostfile format: one `host slots=N` line per node."""
    p = Path(path)
    p.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    return p


def _gpus_here() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megamor.parallel.launch")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hostfile", help="write a DeepSpeed hostfile from the SLURM allocation")
    h.add_argument("--out", required=True)
    h.add_argument("--slots", type=int, default=None, help="processes per node (default: SLURM_GPUS_ON_NODE or GPUs here)")
    args = p.parse_args(argv)
    if args.cmd == "hostfile":
        slots = args.slots or int(os.environ.get("SLURM_GPUS_ON_NODE") or 0) or _gpus_here()
        path = write_hostfile(args.out, slurm_hosts(), slots)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
