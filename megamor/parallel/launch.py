"""Launch commands for megamor.train, one place for every launcher.

    python -m megamor.parallel.launch hostfile --out hostfile [--slots 8]   # from SLURM's node list
    python -m megamor.parallel.launch slots [--slots 8]                     # processes per node
    python -m megamor.parallel.launch deepspeed-env --out FILE              # variables for other nodes

The wrappers in launch/ call these; tests use them to start real multi-process runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from megamor.cli import ArgumentParser

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


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: "a[1-2,4],b3" -> ["a[1-2,4]", "b3"]."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise ValueError(f"unbalanced ']' in SLURM node list {text!r}")
        cur += ch
    if depth:
        raise ValueError(f"unbalanced '[' in SLURM node list {text!r}")
    return [p for p in parts + [cur] if p]


def _range_values(spec: str, where: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"] (zero padding kept: width of the range's start)."""
    out = []
    for item in spec.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in SLURM node list {where!r}")
        if not hi:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in SLURM node list {where!r}")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded as `scontrol show hostnames` does:
    "gpu[01-03,07]" -> gpu01 gpu02 gpu03 gpu07; "a[1-2],b3" -> a1 a2 b3; several bracket
    groups in one name expand as a product ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2)."""
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        if "[" not in item:
            hosts.append(item)
            continue
        prefix, rest = item.split("[", 1)
        spec, suffix = rest.split("]", 1)
        for v in _range_values(spec, nodelist):
            hosts += expand_nodelist(prefix + v + suffix)
    return hosts


def slurm_hosts(nodelist: str | None = None) -> list[str]:
    """The allocation's hosts, in order: scontrol when present (it knows every syntax), else
    `expand_nodelist`."""
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise RuntimeError("not inside a SLURM allocation (SLURM_JOB_NODELIST is unset)")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        if out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pass
    return expand_nodelist(nodelist)


def write_hostfile(path: str | Path, hosts: Sequence[str], slots: int) -> Path:
    """DeepSpeed's hostfile format: one `host slots=N` line per node."""
    p = Path(path)
    p.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    return p


# The deepspeed runner starts the other nodes' processes over ssh/pdsh and forwards only the
# variables named in its EXPORT_ENVS (PYTHON*, NCCL*, ...) plus those of a .deepspeed_env file:
# without these the remote ranks would run with other threads, another accelerator, no W&B
# settings and no MEGAMOR_* settings than the first node's.
DEEPSPEED_ENV_PREFIXES = ("OMP_", "MKL_", "DS_", "MEGAMOR_", "WANDB_", "HF_", "TRANSFORMERS_", "TORCH_", "TRITON_",
                          "TOKENIZERS_")


def deepspeed_env_lines(env: dict[str, str], home: Path | None = None, cwd: Path | None = None) -> list[str]:
    """KEY=VALUE lines for a DS_ENV_FILE: this environment's variables with those prefixes, then
    the lines of ~/.deepspeed_env and ./.deepspeed_env (the runner reads neither once DS_ENV_FILE
    names another file; read last, they win as they would have)."""
    # The runner reads the file line by line: a value with a line break cannot travel.
    lines = [f"{k}={v}" for k, v in sorted(env.items())
             if k.startswith(DEEPSPEED_ENV_PREFIXES) and k != "DS_ENV_FILE" and "\n" not in v]
    for d in (home or Path.home(), cwd or Path.cwd()):
        f = d / ".deepspeed_env"
        if f.is_file():
            lines += [ln for ln in f.read_text().splitlines() if "=" in ln]
    return lines


def slots_per_node(slots: int | None = None, env: dict[str, str] | None = None) -> int:
    """Processes per node: `slots` when given, else SLURM_GPUS_ON_NODE, else the GPUs here (>= 1)."""
    env = os.environ if env is None else env
    return slots or int(env.get("SLURM_GPUS_ON_NODE") or 0) or _gpus_here()


def _gpus_here() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001  probing the GPUs must never stop the launcher: assume one
        return 1


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m megamor.parallel.launch")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hostfile", help="write a DeepSpeed hostfile from the SLURM allocation")
    h.add_argument("--out", required=True)
    h.add_argument("--slots", type=int, default=None, help="processes per node (default: SLURM_GPUS_ON_NODE or GPUs here)")
    n = sub.add_parser("slots", help="print the processes per node (as hostfile's --slots default)")
    n.add_argument("--slots", type=int, default=None, help="this number, when given")
    e = sub.add_parser("deepspeed-env", help="write the variables the deepspeed runner must forward to other nodes")
    e.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "hostfile":
        path = write_hostfile(args.out, slurm_hosts(), slots_per_node(args.slots))
        print(path)
    elif args.cmd == "slots":
        print(slots_per_node(args.slots))
    elif args.cmd == "deepspeed-env":
        Path(args.out).write_text("".join(f"{ln}\n" for ln in deepspeed_env_lines(dict(os.environ))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
