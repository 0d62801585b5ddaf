"""Benchmark: tensor x data parallelism on this machine, and per-rank memory of the 360M model.

1. Step time of the 33M MoR config at TP=1, TP=2, TP=2 + sequence parallelism, DP=4 and
   TP=2 x DP=2 (gloo processes on the CPU), with the share of time in collectives
   (megamor/plan/bench.py says what a step is); with --compile also TP=2 (+SP) with every
   layer torch.compiled (inductor; the first, compiling, step is not timed).
2. Activation bytes per rank, measured: what one training forward keeps for its backward
   (saved-tensor hooks, megamor.observe.activation_memory) at TP=1, TP=2 and TP=2 + SP, with
   activation checkpointing off and on.
3. Per-rank memory of configs/experiments/360m_tp2.yaml (16/4 heads) at TP=1, 2, 4 on 8 GPUs,
   ZeRO-2 bf16, micro 16 x 2048, from the analytic model in megamor/parallel/memory.py.

    python evals/bench_tp.py [--seq-len 256] [--micro 4] [--steps 3] [--compile] [--out evals/results/tp.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from megamor.cli import ArgumentParser
from megamor.model import load_model_config

# torch loads in the tables' functions, after the arguments are parsed (--help answers at once)

LAYOUTS = [(1, 1, False), (2, 2, False), (2, 2, True), (4, 1, False), (4, 2, False)]  # (world, tp, sp)
COMPILED = [(2, 2, False), (2, 2, True)]


def timing_table(model_file: str, micro: int, seq: int, steps: int, compiled: bool = False) -> list[str]:
    from megamor.plan.bench import layout_step_worker
    from megamor.testing.distributed import run_distributed

    cfg = dataclasses.asdict(load_model_config(model_file))
    rows = ["| layout | processes | step (s) | in collectives (s) | comm share | tokens/s (all ranks) |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/res.jsonl"
        runs = [(*layout, False) for layout in LAYOUTS] + ([(*layout, True) for layout in COMPILED] if compiled else [])
        for world, tp, sp, comp in runs:
            run_distributed(layout_step_worker, world_size=world, args=(cfg, tp, micro, seq, steps, out, sp, comp))
        for line in Path(out).read_text().splitlines():
            r = json.loads(line)
            name = f"TP={r['tp']}" + (f" x DP={r['dp']}" if r["dp"] > 1 else "") if r["tp"] > 1 else f"DP={r['dp']}"
            name += (" + SP" if r.get("sp") else "") + (" compiled" if r.get("compiled") else "")
            # Compiled layers run their collectives inside the graph, where they cannot be timed.
            comm = "in graph" if r.get("compiled") else f"{r['comm_s']:.3f}"
            share = "-" if r.get("compiled") else f"{r['comm_s'] / r['step_s']:.0%}"
            rows.append(f"| {name} | {r['world']} | {r['step_s']:.3f} | {comm} | {share} | "
                        f"{r['tokens_per_step'] / r['step_s']:.0f} |")
    return rows


def activation_table(model_file: str, micro: int, seq: int) -> list[str]:
    from megamor.plan.bench import activation_bytes_worker
    from megamor.testing.distributed import run_distributed

    cfg = dataclasses.asdict(load_model_config(model_file))
    head = ("| layout | checkpointing | activation bytes / rank | vs TP=2 without SP | of which LM loss | "
            "without the LM loss | vs TP=2 without SP |")
    rows = [head, "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/act.jsonl"
        for ckpt in (False, True):
            for tp, sp in ((1, False), (2, False), (2, True)):
                run_distributed(activation_bytes_worker, world_size=tp, args=(cfg, tp, sp, ckpt, micro, seq, out))
        res = [json.loads(line) for line in Path(out).read_text().splitlines()]
    for r in res:
        base = next(b for b in res if b["tp"] == 2 and not b["sp"] and b["ckpt"] == r["ckpt"])
        name = f"TP={r['tp']}" + (" + SP" if r["sp"] else "")
        rest, base_rest = r["bytes"] - r["loss_bytes"], base["bytes"] - base["loss_bytes"]
        rows.append(f"| {name} | {'on' if r['ckpt'] else 'off'} | {r['bytes'] / 2**20:.1f} MiB | "
                    f"{r['bytes'] / base['bytes']:.2f}x | {r['loss_bytes'] / 2**20:.1f} MiB | {rest / 2**20:.1f} MiB | "
                    f"{rest / base_rest:.2f}x |")
    return rows


def memory_table(config: str, gpus: int = 8) -> list[str]:
    from megamor.parallel.memory import GiB, rank_memory
    from megamor.train.config import load_experiment

    exp = load_experiment([config], ["data.train=[x]"])
    rows = [f"| TP x DP ({gpus} GPUs) | params/rank | weights | grads | optimizer | activations (ckpt off / on) | total (ckpt off / on) |",
            "|---|---|---|---|---|---|---|"]
    for tp in (1, 2, 4):
        kw = {"tp": tp, "dp": gpus // tp, "zero_stage": 2, "precision": "bf16", "micro_batch": exp.batch.micro_batch_size,
                  "seq_len": exp.data.seq_len}
        off = rank_memory(exp.model, **kw, activation_checkpointing=False)
        on = rank_memory(exp.model, **kw, activation_checkpointing=True)
        rows.append(f"| {tp} x {gpus // tp} | {off['params_per_rank'] / 1e6:.0f}M | {off['params'] / GiB:.2f} GiB | "
                    f"{off['grads'] / GiB:.2f} GiB | {off['optimizer'] / GiB:.2f} GiB | "
                    f"{off['activations'] / GiB:.1f} / {on['activations'] / GiB:.1f} GiB | "
                    f"{off['total'] / GiB:.1f} / {on['total'] / GiB:.1f} GiB |")
    return rows


def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/33m/mor_expert_3.yaml")
    p.add_argument("--memory-config", default="configs/experiments/360m_tp2.yaml")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time TP=2 (+SP) with compiled layers")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    lines = []
    if not a.skip_timing:
        lines += [f"Step time, {a.model}, micro {a.micro} x {a.seq_len} per data-parallel rank, fp32, CPU gloo:", ""]
        lines += timing_table(a.model, a.micro, a.seq_len, a.steps, a.compile) + [""]
    title = f"Activation bytes per rank (saved for backward, one training forward), {a.model}, micro {a.micro} x {a.seq_len}, fp32:"
    lines += [title, ""] + activation_table(a.model, a.micro, a.seq_len) + [""]
    lines += [f"Per-rank memory, {a.memory_config} (analytic):", ""] + memory_table(a.memory_config)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
