#!/usr/bin/env python
"""Benchmark: token choice against expert choice, forward+backward, at equal FLOPs.

Both models have the same shape (a `mor_expert_N` config and its `mor_token_N` sibling). Each
step's FLOPs come from the tokens that really ran each recursion step (megamor.model.flops), so
the comparison is time per FLOP: "token/expert" = (token s/GFLOP) / (expert s/GFLOP); 1.0 means
token choice costs exactly what its routed compute costs relative to expert choice. "Slots run"
counts what the gathered steps really compute: B x the gathered length (expert choice: k_r,
the same in every row; token choice: the fullest row's count, bucketed), so the gap between
"tokens" and "slots" is padding that the useful-FLOP count does not include.

    python evals/bench_routing.py [--size 33m] [--nr 3] [--seq-len 512] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING

from megamor.cli import ArgumentParser
from megamor.env import repo_root
from megamor.model import load_model_config
from megamor.model.flops import forward_flops

if TYPE_CHECKING:  # torch loads after the arguments are parsed (--help answers at once)
    import torch

    from megamor.model import MoRLM


def timed_steps(model: MoRLM, x: torch.Tensor, repeats: int) -> tuple[float, float, list[int], list[int]]:
    """(median wall s, median CPU s, tokens per recursion step, slots run per step) of
    forward+backward."""
    from megamor.model.mor import bucket_length
    from megamor.model.routers import top_k_size

    def step() -> tuple[list[int], list[int]]:
        model.zero_grad(set_to_none=True)
        out = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
        (out.loss + out.aux_loss).backward()
        B, T = out.stats.depth.shape
        rows = [(out.stats.depth > r).sum(1).max().item() for r in range(len(model.steps))]
        slots = [B * (T if r == 0 else bucket_length(n, T)) for r, n in enumerate(rows)]
        if model.routers is not None:
            slots = [B * top_k_size(c, T) for c in model.cfg.capacities]
        return out.stats.tokens_per_step, slots

    counts, slots = step()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu), counts, slots


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="33m")
    p.add_argument("--nr", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    import torch

    from megamor.model import MoRLM

    torch.set_flush_denormal(True)
    x = torch.randint(0, 1000, (a.batch, a.seq_len + 1))
    rows = []
    for kind in ("expert", "token"):
        cfg = load_model_config(repo_root() / "configs" / "model" / a.size / f"mor_{kind}_{a.nr}.yaml")
        torch.manual_seed(0)
        model = MoRLM(cfg).train()
        wall, cpu, counts, slots = timed_steps(model, x, a.repeats)
        gflops = 3 * a.batch * forward_flops(cfg, a.seq_len, [n / a.batch for n in counts]) / 1e9
        rows.append((kind, counts, slots, gflops, wall, cpu))
    print(f"{a.size} N_r={a.nr}, batch {a.batch} x {a.seq_len}, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {a.repeats}")
    print("| routing | tokens per step | slots run per step | GFLOP/step (3x fwd) | wall s | CPU s | wall s/TFLOP | CPU s/TFLOP |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for kind, counts, slots, gf, wall, cpu in rows:
        print(f"| {kind} choice | {counts} | {slots} | {gf:.1f} | {wall:.3f} | {cpu:.3f} | {1e3 * wall / gf:.2f} | {1e3 * cpu / gf:.2f} |")
    (_, _, _, gf_e, w_e, c_e), (_, _, _, gf_t, w_t, c_t) = rows
    print(f"token/expert time per FLOP: wall {(w_t / gf_t) / (w_e / gf_e):.2f}x, CPU time {(c_t / gf_t) / (c_e / gf_e):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
