"""`python -m megamor.gpu_check [--tiny] [--out report.md] [--only a,b] [--limit part=seconds] ...`

Runs the parts (megamor.gpu_check.parts) one after another, each in its own process under its
own limit, and writes the markdown report (atomically), a .json twin and a .log of every part's
output beside it. Exit 0: every parity check passed or was skipped with a reason; 1: a parity
check failed, raised or timed out (with --strict also a speed figure short of its target);
2: bad arguments (one line).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megamor.cli import tool_name
from megamor.gpu_check.parts import BY_NAME, PARTS
from megamor.gpu_check.report import as_json, exit_code, markdown
from megamor.gpu_check.runner import run_all
from megamor.utils.atomic import atomic_open, write_json

PROG = "python -m megamor.gpu_check"
DEFAULT_OUT = Path("runs/gpu_check/report.md")
GPU_BUDGET_S = 540.0  # the whole run, on one GPU (the device tool allows 600 s a command)
TINY_BUDGET_S = 900.0


class BadArgs(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the usage too)
        raise BadArgs(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy models on the CPU (CI): CUDA-only checks skipped, targets n/a")
    p.add_argument("--out", type=Path, default=None, help=f"markdown report (default {DEFAULT_OUT}; .json and .log beside it)")
    p.add_argument("--only", action="append", default=[], metavar="PART[,PART]",
                   help=f"run only these parts (of: {', '.join(BY_NAME)})")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                   help="one part's time limit, exactly (otherwise a part may also use what earlier parts left unused)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run (default {GPU_BUDGET_S:.0f}; --tiny {TINY_BUDGET_S:.0f}); later parts are skipped")
    p.add_argument("--device", default=None, help="default cuda; --tiny: cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU basis (default: the device's datasheet bf16 peak)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the compile parity part (default inductor; aot_eager skips code generation)")
    p.add_argument("--strict", action="store_true", help="speed figures short of their targets fail the run too")
    p.add_argument("--list", action="store_true", help="print the parts and their limits, and exit")
    a = p.parse_args(argv)
    names = [n.strip() for item in a.only for n in item.split(",") if n.strip()]
    for n in names:
        if n not in BY_NAME:
            raise BadArgs(f"--only: unknown part {n!r} (parts: {', '.join(BY_NAME)})")
    a.parts = [part for part in PARTS if not names or part.name in names]
    a.limits = {part.name: part.limit_tiny if a.tiny else part.limit_gpu for part in PARTS}
    a.fixed = set()  # parts whose limit the command line gave: they get exactly that
    for item in a.limit:
        name, eq, value = item.partition("=")
        if name not in BY_NAME or not eq:
            raise BadArgs(f"--limit {item!r}: expected PART=SECONDS with PART one of {', '.join(BY_NAME)}")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise BadArgs(f"--limit {item!r}: seconds must be a positive number, got {value!r}")
        a.limits[name] = seconds
        a.fixed.add(name)
    a.budget = a.budget if a.budget is not None else (TINY_BUDGET_S if a.tiny else GPU_BUDGET_S)
    if not a.budget > 0:
        raise BadArgs(f"--budget: must be positive, got {a.budget}")
    if a.peak_tflops is not None and not a.peak_tflops > 0:
        raise BadArgs(f"--peak-tflops: must be positive, got {a.peak_tflops}")
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    if not (a.device == "cpu" or a.device.startswith("cuda")):
        raise BadArgs(f"--device: cpu or cuda[:N], got {a.device!r}")
    a.out = a.out or DEFAULT_OUT
    if a.out.suffix != ".md":
        raise BadArgs(f"--out {a.out}: give a .md path (the .json and .log go beside it)")
    return a


def commit() -> str:
    """HEAD of the checkout (marked when it has uncommitted changes); $MEGAMOR_COMMIT where the
    copy carries no git metadata (a GPU machine gets the working tree only)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20, check=False).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MEGAMOR_COMMIT") or "unknown (no git metadata here; set MEGAMOR_COMMIT)"


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse_args(argv)
    except BadArgs as e:
        print(f"{tool_name(PROG)}: error: {e}", file=sys.stderr)
        return 2
    if a.list:
        for part in PARTS:
            print(f"{part.name:12s} {part.kind:7s} limit {part.limit_gpu:.0f} s (GPU), {part.limit_tiny:.0f} s (--tiny)")
        return 0
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"{PROG}: --device {a.device}: no CUDA device is visible; the full check needs a GPU "
                  "(on a CPU run --tiny)", file=sys.stderr)
            return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = a.out.with_suffix(".log")
    log_path.write_text("")  # this run's log (the previous run's report, json and log are replaced)
    child_args = ["--device", a.device] + (["--tiny"] if a.tiny else [])
    if a.peak_tflops:
        child_args += ["--peak-tflops", str(a.peak_tflops)]
    if a.compile_backend:
        child_args += ["--compile-backend", a.compile_backend]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        results = run_all(a.parts, a.limits, a.budget, child_args, Path(work), log_path, a.device.startswith("cuda"),
                          a.fixed)
    info = {"tiny": a.tiny, "commit": commit(), "command": f"{PROG} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)), "wall_s": time.time() - started,
            "budget_s": a.budget, "log": str(log_path), "limits": {p.name: a.limits[p.name] for p in a.parts}}
    code = exit_code(results, a.strict)
    text = markdown(results, info, code)
    with atomic_open(a.out, "w") as f:
        f.write(text)
    write_json(a.out.with_suffix(".json"), as_json(results, info, code))
    print(text)
    print(f"report: {a.out} (exit {code})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
