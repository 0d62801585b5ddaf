#!/usr/bin/env python
"""Benchmark: how to spend a small CPU on a study. One training process with all the threads
against as many processes as threads with one thread each, running at once (what several
`python -m megamor.study` processes sharing out a study do).

    python evals/bench_study_workers.py                       # 2 threads: 1 x 2 against 2 x 1
    python evals/bench_study_workers.py --threads 4 --steps 80

Each row trains the scaling study's models (configs/experiments/small_cpu.yaml at the study's
widths) with real `python -m megamor.train` processes for --steps steps, without evaluation
or checkpoints, and reads their logged tokens/s (the first log window, with warm-up, is left
out). FLOPs/s = tokens/s x the model's training FLOPs per token (3 x forward). The ratio is the
processes' summed FLOPs/s against the one process's, measured in the same run. Results:
--out (markdown) and BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
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
from megamor.model.flops import flops_per_token

EXPERIMENT = "configs/experiments/small_cpu.yaml"
ROWS = [  # (row, model config, extra overrides): the scaling study's 1x and 3x shapes
    ("vanilla 1x (d 192)", "configs/model/33m/vanilla.yaml", []),
    ("MoR-expert-3 1x (d 192)", "configs/model/33m/mor_expert_3.yaml", []),
    ("MoR-expert-3 3x (d 256)", "configs/model/33m/mor_expert_3.yaml", ["model.d_model=256", "model.d_ff=688"]),
]


def overrides(model_config: str, extra: list[str], steps: int, run_dir: Path, data: Path) -> list[str]:
    return [f"model_config={model_config}", *extra, f"run_dir={run_dir}", f"trainer.max_steps={steps}",
            f"data.train=[{data / 'shards'}]", f"data.valid=[{data / 'shards'}]", f"data.tokenizer={data / 'tokenizer'}",
            "logging.every_steps=10", "eval.every_steps=0", "eval.at_end=false", "checkpoint.every_steps=0",
            "checkpoint.save_final=false", "wandb.mode=disabled"]


def tokens_per_s(run_dir: Path) -> float:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rates = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]  # first window: warm-up
    return statistics.median(rates)


def train_at_once(n: int, threads: int, ov: list[list[str]]) -> list[float]:
    """n trainers started together, `threads` threads each; each one's tokens/s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    procs = [subprocess.Popen([sys.executable, "-m", "megamor.train", "--config", EXPERIMENT, *o], cwd=repo_root(),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for o in ov[:n]]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"megamor.train exited {p.returncode}: {err[-2000:]}")
    return [tokens_per_s(Path(next(x for x in o if x.startswith("run_dir=")).split("=", 1)[1])) for o in ov[:n]]


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="the machine's cores")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--data", type=Path, default=Path("runs/studies/scaling_cpu/data"),
                    help="a prepared study data folder (tokenizer/, shards/): `python -m megamor.study "
                         "configs/studies/scaling_cpu.yaml --plan` makes it")
    ap.add_argument("--out", type=Path, default=Path("evals/results/study_workers.md"))
    args = ap.parse_args()
    from megamor.train.config import load_experiment  # loads torch: after the arguments are parsed

    data = args.data.resolve()
    if not (data / "shards" / "manifest.json").is_file():
        print(f"bench_study_workers: no prepared data in {data} (see --data)", file=sys.stderr)
        return 2
    lines = [f"# One process x {args.threads} threads against {args.threads} processes x 1 thread", "",
             (f"`python evals/bench_study_workers.py --threads {args.threads} --steps {args.steps}`; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{__import__('torch').__version__}, {time.strftime('%Y-%m-%d')}"), "",
             (f"| model | 1 x {args.threads}: tokens/s | {args.threads} x 1: tokens/s (sum) | GFLOP/s 1 x {args.threads} "
             f"| GFLOP/s {args.threads} x 1 | ratio |"), "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_config, extra in ROWS:
            ov = [overrides(model_config, extra, args.steps, Path(tmp) / f"{name[:4]}-{i}-{time.time_ns()}", data)
                  for i in range(args.threads)]
            exp = load_experiment([EXPERIMENT], ov[0])
            train_flops = 3 * flops_per_token(exp.model, exp.data.seq_len)
            one = train_at_once(1, args.threads, ov)[0]
            ov = [[o if not o.startswith("run_dir=") else o + "-b" for o in x] for x in ov]
            many = sum(train_at_once(args.threads, 1, ov))
            row = (f"| {name} | {one:,.0f} | {many:,.0f} | {one * train_flops / 1e9:.1f} | {many * train_flops / 1e9:.1f} "
                   f"| {many / one:.2f}x |")
            print(row, flush=True)
            lines.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
