#!/usr/bin/env python
"""Benchmark: training throughput (tokens/s) and MFU of megamor's models on a DeepSpeed engine,
beside Hugging Face's LlamaForCausalLM of the vanilla shape trained the same way in the same
process (same engine config, optimizer, precision, batch, synthetic tokens).

    python evals/bench_train.py                          # CPU: 33m vanilla, recursive_3, mor_expert_3 + HF
    python evals/bench_train.py --sizes 135m 360m 1_7b   # GPU (bf16): the paper sizes
    python evals/bench_train.py --out evals/results/train.md

Each model trains `--steps` timed steps after `--warmup` steps; models alternate over
`--rounds` rounds and the median step time counts (the machine may be shared). MFU uses the
FLOPs each step really needed (the routed token counts through megamor's FLOP formula; the
HF model is counted with the vanilla formula) against the device peak (bf16 datasheet figure
on GPUs, a timed matmul on CPU). "CPU-time tokens/s" divides by this process's CPU seconds
per thread instead of wall seconds: the steadier figure when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from megamor.env import repo_root
from megamor.model import ModelConfig, MoRLM, load_model_config
from megamor.train.metrics import batch_forward_flops, peak_tflops

CPU_VARIANTS = ["vanilla", "recursive_3", "mor_expert_3"]


@dataclass
class Result:
    name: str
    params_m: float
    step_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)

    def median(self, xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")


def ds_config(micro: int, precision: str, zero: int) -> dict:
    return {
        "train_batch_size": micro,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,
    }


def build(name: str, cfg: ModelConfig, device: torch.device, micro: int, precision: str, zero: int):
    import deepspeed

    from megamor.train.config import OptimConfig
    from megamor.train.optim import build_optimizer

    torch.manual_seed(0)
    if name == "hf_llama":
        from transformers import LlamaForCausalLM

        from megamor.model.hf import llama_config

        hf_cfg = llama_config(cfg)
        hf_cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(hf_cfg)
    else:
        model = MoRLM(cfg)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    opt = build_optimizer(model, OptimConfig(), device)  # the trainer's AdamW and parameter groups
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(micro, precision, zero))
    return engine, n_params


def train_steps(name: str, engine, cfg: ModelConfig, x: torch.Tensor, steps: int, res: Result | None) -> None:
    inputs, targets = x[:, :-1], x[:, 1:]
    B, T = inputs.shape
    for _ in range(steps):
        if x.is_cuda:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        if name == "hf_llama":
            loss = engine(input_ids=x, labels=x).loss  # HF shifts labels itself
            tokens_per_step: list[int] = []
        else:
            out = engine(inputs, targets=targets)
            loss = out.loss + out.aux_loss
            tokens_per_step = out.stats.tokens_per_step if out.stats is not None else []
        engine.backward(loss)
        engine.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        if res is not None:
            res.step_s.append(time.perf_counter() - t)
            res.cpu_s.append((time.process_time() - c) / max(1, torch.get_num_threads()))
            res.flops.append(3.0 * batch_forward_flops(cfg, B, T, tokens_per_step))


def run(args: argparse.Namespace) -> dict:
    from megamor.parallel.dist import init_distributed

    _, device = init_distributed()
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    peak = peak_tflops(device, args.precision, args.peak_tflops, probe_cpu=True)
    models: list[tuple[str, ModelConfig]] = []
    for size in args.sizes:
        variants = args.variants or (CPU_VARIANTS if device.type == "cpu" else ["vanilla", "mor_expert_3"])
        for v in variants:
            cfg = load_model_config(repo_root() / "configs" / "model" / size / f"{v}.yaml")
            cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
            models.append((f"{size}/{v}", cfg))
        if not args.no_hf:
            vanilla = load_model_config(repo_root() / "configs" / "model" / size / "vanilla.yaml")
            models.append((f"{size}/hf_llama", vanilla))
    g = torch.Generator().manual_seed(0)
    built = {}
    results: dict[str, Result] = {}
    for label, cfg in models:
        kind = "hf_llama" if label.endswith("hf_llama") else "megamor"
        engine, n = build(kind, cfg, device, args.micro_batch, args.precision, args.zero)
        built[label] = (kind, engine, cfg)
        results[label] = Result(label, n / 1e6)
    for r in range(args.rounds):
        for label, (kind, engine, cfg) in built.items():
            x = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g).to(device)
            train_steps(kind, engine, cfg, x, args.warmup if r == 0 else 0, None)
            train_steps(kind, engine, cfg, x, args.steps, results[label])
    tokens = args.micro_batch * args.seq_len
    rows = []
    for label, res in results.items():
        step, cpu = res.median(res.step_s), res.median(res.cpu_s)
        fl = res.median(res.flops)
        rows.append({
            "model": label, "params_m": round(res.params_m, 2), "step_s": step, "tokens_per_s": tokens / step,
            "cpu_time_tokens_per_s": tokens / cpu if cpu > 0 else None,
            "tflops_per_step": fl / 1e12, "mfu": (fl / step / 1e12 / peak) if peak else None,
        })
    for row in rows:
        size = row["model"].split("/")[0]
        hf = next((r for r in rows if r["model"] == f"{size}/hf_llama"), None)
        if hf and row["model"].endswith("/vanilla"):
            row["vs_hf"] = row["tokens_per_s"] / hf["tokens_per_s"]
            row["vs_hf_cpu_time"] = (row["cpu_time_tokens_per_s"] or 0) / (hf["cpu_time_tokens_per_s"] or 1)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "peak_tflops": peak, "precision": args.precision, "zero_stage": args.zero, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "steps": args.steps, "rounds": args.rounds, "rows": rows,
        "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
    }


def markdown(res: dict) -> str:
    lines = [
        (f"Device: {res['device']}; peak {res['peak_tflops']:.3g} TFLOP/s ({'timed matmul' if 'CPU' in res['device'] else 'datasheet'}); "
         f"{res['precision']}, ZeRO-{res['zero_stage']}, batch {res['micro_batch']} x {res['seq_len']} tokens, "
         f"median of {res['steps']} steps x {res['rounds']} rounds; torch {res['torch']}."),
        "",
        "| model | params (M) | step (s) | tokens/s | CPU-time tokens/s | TFLOP/step | MFU | megamor / HF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        vs = f"{r['vs_hf']:.2f} (CPU-time {r['vs_hf_cpu_time']:.2f})" if "vs_hf" in r else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        cpu_t = f"{r['cpu_time_tokens_per_s']:.0f}" if r["cpu_time_tokens_per_s"] else ""
        lines.append(f"| {r['model']} | {r['params_m']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {cpu_t} | "
                     f"{r['tflops_per_step']:.3f} | {mfu} | {vs} |")
    lines += ["", f"Command: `{res['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    p.add_argument("--sizes", nargs="+", default=["135m", "360m", "1_7b"] if gpu else ["33m"])
    p.add_argument("--variants", nargs="+", default=None, help=f"model files per size (default CPU: {CPU_VARIANTS})")
    p.add_argument("--seq-len", type=int, default=2048 if gpu else 512)
    p.add_argument("--micro-batch", type=int, default=8 if gpu else 4)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here (and .json beside it)")
    args = p.parse_args(argv)
    res = run(args)
    md = markdown(res)
    print(md)
    if args.out:
        from megamor.eval.cli import write_text

        write_text(args.out, "# Training throughput (evals/bench_train.py)\n\n" + md + "\n")
        write_text(args.out.with_suffix(".json"), json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
