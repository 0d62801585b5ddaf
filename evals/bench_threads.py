#!/usr/bin/env python
"""Benchmark: demo-sized training runs side by side on a shared CPU, before and after the
thread defaults of megamor.env (issue 27: `make demo` 18x slower beside one other process).

    python evals/bench_threads.py [--steps 12] [--out evals/results/threads.md]

Each run is `python -m megamor.train --config configs/experiments/demo.yaml` on the demo
corpus (prepared once, as `make demo` does) for --steps steps. Settings:
  before   OMP_NUM_THREADS=2 and OpenMP's own wait policy (the old Makefile's export;
           MEGAMOR_THREAD_DEFAULTS=off keeps megamor from filling anything in)
  after    nothing set: megamor.env.thread_defaults picks a bounded spin (GOMP_SPINCOUNT) and the usable cores
For each: one run alone, then two runs at once; the four are run back to back. Tokens/s of a
run = its logged windows after the first (start-up and warm-up excluded). The machine's load
(`uptime`) is recorded before and after: other jobs on the cores move every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megamor.cli import ArgumentParser
from megamor.demo import CONFIG, prepare_data
from megamor.env import repo_root, usable_cpus
from megamor.utils.atomic import atomic_open

SETTINGS = {
    "before": {"OMP_NUM_THREADS": "2", "MEGAMOR_THREAD_DEFAULTS": "off"},
    "after": {},
    # what the defaults could be instead, measured side by side (--settings)
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin300": {"GOMP_SPINCOUNT": "300"},
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "spin3k": {"GOMP_SPINCOUNT": "3000"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin100k": {"GOMP_SPINCOUNT": "100000"},
}


def _env(extra: dict[str, str], tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MEGAMOR_THREAD_DEFAULTS", "GOMP_SPINCOUNT")}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", TMPDIR=str(tmp), **extra)
    return env


def _command(run_dir: Path, tok: Path, shards: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "megamor.train", "--config", CONFIG, f"run_dir={run_dir}", f"data.train=[{shards}]",
            f"data.valid=[{shards}]", f"data.tokenizer={tok}", f"trainer.max_steps={steps}", "eval.every_steps=0",
            "eval.at_end=false", f"checkpoint.every_steps={steps}", f"logging.log_every={max(1, steps // 4)}",
            "logging.progress_bar=false",
            "wandb.mode=disabled", "trainer.device_tflops_probe=false"]


def _tokens_per_s(run_dir: Path) -> float:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["perf/tokens_per_s"] for r in recs if "perf/tokens_per_s" in r][1:]
    if not windows:
        raise SystemExit(f"bench_threads: {run_dir} logged no window after the first; use more --steps")
    return len(windows) / sum(1.0 / w for w in windows)  # equal tokens per window: the harmonic mean


def run_group(name: str, n: int, work: Path, tok: Path, shards: Path, steps: int) -> list[float]:
    """`n` runs of setting `name` started together; their tokens/s."""
    procs = []
    for i in range(n):
        run_dir = work / f"{name}-{n}-{i}"
        log = open(work / f"{name}-{n}-{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((run_dir, log, subprocess.Popen(_command(run_dir, tok, shards, steps), cwd=repo_root(),
                                                     env=_env(SETTINGS[name], work), stdout=log, stderr=log)))
    out = []
    for run_dir, log, p in procs:
        rc = p.wait()
        log.close()
        if rc != 0:
            raise SystemExit(f"bench_threads: {name} run failed (rc {rc}); see {log.name}")
        out.append(_tokens_per_s(run_dir))
    return out


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="steps per run (logged in 4 windows; the first is dropped)")
    p.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary one)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--settings", default="before,after",
                   help=f"comma-separated, the first is the baseline (of: {', '.join(SETTINGS)})")
    args = p.parse_args()
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if len(names) < 2 or unknown:
        p.error(f"--settings: need a baseline and at least one other of {', '.join(SETTINGS)} (got {args.settings!r})")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_threads-"))
    tok, shards = prepare_data(work / "data", workers=2)
    lines = [f"usable cores {usable_cpus()}, demo config, {args.steps} steps per run", f"load before: {_uptime()}", ""]
    results: dict[tuple[str, int], list[float]] = {}
    t0 = time.time()
    for n in (1, 2):  # the settings back to back, alone then in pairs
        for name in names:
            results[name, n] = run_group(name, n, work, tok, shards, args.steps)
            print(f"{name} x{n}: {', '.join(f'{v:.0f}' for v in results[name, n])} tok/s", flush=True)
    base = names[0]
    lines += [f"load after: {_uptime()} ({time.time() - t0:.0f}s of runs)", "",
              "| runs at once | setting | tok/s each | vs " + base + " (mean) |", "|---|---|---|---:|"]
    for n in (1, 2):
        b = statistics.mean(results[base, n])
        for name in names:
            vals = results[name, n]
            lines.append(f"| {n} | {name} {SETTINGS[name] or '(megamor defaults)'} | {', '.join(f'{v:.0f}' for v in vals)} | "
                         f"{statistics.mean(vals) / b:.2f}x |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        with atomic_open(Path(args.out), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
