#!/usr/bin/env python
"""Benchmark: wall time of `TOOL --help` in this tree against a baseline commit (not a test).

    python evals/bench_cli_help.py --baseline 056f7e4 [--repeats 5] [TOOL ...]

The baseline's files are extracted (`git archive`) to a temporary folder and each tool's help
runs there and here alternately, `--repeats` times, in the same environment; printed: the
median seconds of each and the ratio before / after. A help that loads torch pays its import
(seconds on a busy CPU); one that parses first answers in the interpreter's start-up time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megamor.cli import ArgumentParser
from megamor.env import repo_root

TOOLS = ["megamor.convert", "megamor.export", "megamor.adapt", "megamor.model.summary",
         "evals/bench_eval.py", "evals/bench_train.py", "evals/lm_eval_megamor.py"]


def command(tool: str) -> list[str]:
    return [sys.executable, tool, "--help"] if tool.endswith(".py") else [sys.executable, "-m", tool, "--help"]


def timed_help(tool: str, root: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}
    t = time.perf_counter()
    subprocess.run(command(tool), cwd=root, env=env, capture_output=True, stdin=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tools", nargs="*", default=TOOLS, help="modules (megamor.X) or scripts (evals/X.py)")
    p.add_argument("--baseline", required=True, help="git commit to compare against (e.g. the branch's base)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    here = repo_root()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        archive = subprocess.run(["git", "-C", str(here), "archive", a.baseline], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"median of {a.repeats}, baseline {a.baseline} vs this tree, run alternately")
        print("| tool | before s | after s | before / after |")
        print("|---|---:|---:|---:|")
        for tool in a.tools:
            before, after = [], []
            for _ in range(a.repeats):
                before.append(timed_help(tool, base))
                after.append(timed_help(tool, here))
            b, f = statistics.median(before), statistics.median(after)
            print(f"| `{tool} --help` | {b:.2f} | {f:.2f} | {b / f:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
