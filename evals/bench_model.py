"""Benchmark: does MoR's routing save compute for real, and what do the KV caches buy?

1. Forward+backward time of MoR expert-choice (N_r=3) against the same model with routing off
   (capacity 1.0 at every step: every token through every recursion), beside the FLOP ratio.
   "Realised/FLOP saving" = (1 - time ratio) / (1 - FLOP ratio); 1.0 means every FLOP saved
   turned into time saved.
2. Decoding tokens/s with recursion-wise caching and recursive KV sharing against no cache.

    python evals/bench_model.py [--config configs/model/33m/mor_expert_3.yaml] [--seq-len 1024]

3. With `--seq-lens` and `--batch-sizes` (comma lists): a throughput grid instead, MoR against
   routing off in every cell (tokens/s, ms/token, peak memory), written as CSV (`--csv`) and
   markdown beside it (megamor.observe.throughput):

    python evals/bench_model.py --seq-lens 128,256,512 --batch-sizes 1,4,8 --csv evals/results/model_grid.csv
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

from megamor.cli import ArgumentParser
from megamor.model import load_model_config
from megamor.model.flops import forward_flops

# torch loads in the benchmarks' functions, after the arguments are parsed (--help answers at once)


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds of this process). CPU time is the steadier figure
    on a shared machine; both are printed."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def bench_training(cfg, seq_len: int, batch: int, repeats: int) -> None:
    import torch

    from megamor.model import MoRLM

    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.router.capacity = [1.0] * cfg.num_recursions
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    rows = []
    for name, c in (("routing off (all tokens, all steps)", dense_cfg), ("MoR expert choice", cfg)):
        torch.manual_seed(0)
        model = MoRLM(c).train()
        out = model(x)
        flops = forward_flops(c, seq_len, [n / batch for n in out.stats.tokens_per_step])

        def step(model=model):
            model.zero_grad(set_to_none=True)
            o = model(x, targets=x)
            (o.loss + o.aux_loss).backward()

        rows.append((name, _time(step, repeats), flops, out.stats.tokens_per_step))
    (_, t_dense, f_dense, _), (_, t_mor, f_mor, _) = rows
    print(f"\n## Forward+backward, seq {seq_len}, batch {batch}, fp32, {torch.get_num_threads()} threads")
    print("| model | tokens per step | wall s/iter | CPU s/iter | FLOPs/seq (fwd) |")
    print("|---|---|---:|---:|---:|")
    for name, (wall, cpu), f, n in rows:
        print(f"| {name} | {n} | {wall:.3f} | {cpu:.3f} | {f / 1e9:.2f} G |")
    flop_ratio = f_mor / f_dense
    for label, i in (("wall", 0), ("CPU", 1)):
        ratio = t_mor[i] / t_dense[i]
        print(f"{label} time ratio MoR/off = {ratio:.3f}; FLOP ratio = {flop_ratio:.3f}; "
              f"realised/FLOP saving = {(1 - ratio) / (1 - flop_ratio):.2f}")


def bench_decoding(cfg, prompt_len: int, new_tokens: int, batch: int) -> None:
    import torch

    from megamor.inference.generate import generate
    from megamor.model import MoRLM

    print(f"\n## Decoding, prompt {prompt_len}, {new_tokens} new tokens, batch {batch}, greedy")
    print("| KV mode | tokens/s | vs no cache |")
    print("|---|---:|---:|")
    base = None
    for kv, use_cache in (("recursion_wise", False), ("recursion_wise", True), ("shared", True)):
        c = copy.deepcopy(cfg)
        c.kv_mode = kv
        torch.manual_seed(0)
        model = MoRLM(c).eval()
        prompts = torch.randint(0, c.vocab_size, (batch, prompt_len)).tolist()
        t0 = time.perf_counter()
        generate(model, prompts, new_tokens, use_cache=use_cache)
        tps = batch * new_tokens / (time.perf_counter() - t0)
        base = base or tps
        name = "no cache (recompute prefix)" if not use_cache else kv.replace("_", "-") + " cache"
        print(f"| {name} | {tps:.1f} | {tps / base:.2f}x |")


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        print(f"bench_model.py: error: {flag} must be a comma list of positive integers, not {text!r}", file=sys.stderr)
        sys.exit(2)
    return values


def bench_grid(cfg, seq_lens: list[int], batch_sizes: list[int], mode: str, repeats: int, csv_path: str) -> None:
    import torch

    from megamor.model import MoRLM
    from megamor.observe.throughput import grid_markdown, throughput_grid, write_grid_csv

    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.router.capacity = [1.0] * cfg.num_recursions
    models = {}
    for name, c in (("routing off", dense_cfg), ("MoR expert choice", cfg)):
        torch.manual_seed(0)
        models[name] = MoRLM(c)
    rows = throughput_grid(models, seq_lens, batch_sizes, mode=mode, repeats=repeats)
    table = grid_markdown(rows)
    print(table)
    out = write_grid_csv(rows, csv_path)
    md = out.with_suffix(".md")
    md.write_text(f"# Throughput grid ({mode}, {torch.get_num_threads()} threads)\n\n"
                  f"Command: `python evals/bench_model.py --seq-lens {','.join(map(str, seq_lens))} "
                  f"--batch-sizes {','.join(map(str, batch_sizes))} --grid-mode {mode} --repeats {repeats} "
                  f"--csv {csv_path}`\n\n{table}\n")
    print(f"wrote {out} and {md}")


def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/model/33m/mor_expert_3.yaml")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seq-lens", help="grid: comma list of sequence lengths")
    ap.add_argument("--batch-sizes", help="grid: comma list of batch sizes")
    ap.add_argument("--grid-mode", default="train", help="grid: train (forward+backward) or forward (checked against "
                    "megamor.observe.throughput.MODES after parsing: that module loads torch)")
    ap.add_argument("--csv", default="evals/results/model_grid.csv", help="grid: CSV output (markdown beside it)")
    args = ap.parse_args()
    import torch

    from megamor.observe.throughput import MODES

    if args.grid_mode not in MODES:
        ap.error(f"argument --grid-mode: invalid choice: {args.grid_mode!r} (choose from {', '.join(MODES)})")
    cfg = load_model_config(args.config)
    if cfg.router.type != "expert_choice":
        raise SystemExit(f"{args.config}: the benchmark needs an expert-choice MoR config")
    print(f"config {args.config}, torch {torch.__version__}")
    if args.seq_lens or args.batch_sizes:
        seq_lens = _int_list("--seq-lens", args.seq_lens or str(args.seq_len))
        batch_sizes = _int_list("--batch-sizes", args.batch_sizes or str(args.batch))
        bench_grid(cfg, seq_lens, batch_sizes, args.grid_mode, args.repeats, args.csv)
        return
    bench_training(cfg, args.seq_len, args.batch, args.repeats)
    bench_decoding(cfg, args.prompt_len, args.new_tokens, args.batch)


if __name__ == "__main__":
    main()
