"""Benchmark: training speed on one device, in one script that fits a GPU loan.

    python evals/bench_train.py                    # GPU: 135M, 360M, 1.7B within --budget 480 s
    python evals/bench_train.py --tiny             # CPU check of every part at toy sizes (~1-2 min)
    python evals/bench_train.py --parts 135m trainer lm_head --budget 200

Parts, each with its own time limit (a row that would start after its part's or the whole
run's budget is spent is skipped, and the output says so):
  <size>    plain torch loop (AdamW, fused on CUDA; bf16 autocast over fp32 weights): megamor
            vanilla / recursive / MoR expert choice / MoR token choice / MoR expert with routing
            off (capacity 1.0 at every step, same model), eager and compiled (per-layer
            torch.compile, as the trainer does), and HF `LlamaForCausalLM` of the vanilla shape,
            eager and `torch.compile`d;
  trainer   the same models through DeepSpeed as the trainer builds them (ZeRO-1, bf16 with fp32
            master weights, the trainer's optimizer, `prepare_model`), against the plain loop;
  lm_head   time and peak memory of the LM head + loss, forward+backward: full logits and an
            fp32 cross-entropy against megamor's chunked cross-entropy.

Each row: warm-up steps (compilation happens there; its time is reported), then timed steps
(device synchronised around each), median step time. MFU = the FLOPs each step needed (3 x
forward, from the tokens each recursion step really ran: megamor.model.flops) / step time /
peak (989 TFLOP/s, the H100/H200 bf16 dense figure, on GPU; a timed matmul on CPU). Ratios are
against baselines measured in the same run. Results go to --out (markdown, .json beside it).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from megamor.benchmarks.cli import TRAIN_GPU_SIZES, train_args
from megamor.env import repo_root
from megamor.model import ModelConfig, MoRLM, load_model_config
from megamor.model.flops import forward_flops
from megamor.train.metrics import cached_cpu_tflops

GPU_PEAK_TFLOPS = 989.0

# (size, N_r, micro-batch, budget s) of the GPU plan; rows within a size in priority order.
GPU_SIZES = TRAIN_GPU_SIZES
ROWS = [  # (variant, compiled)
    ("vanilla", True), ("hf_llama", False), ("mor_expert", True), ("mor_expert_off", True), ("mor_token", True),
    ("hf_llama", True), ("vanilla", False), ("recursive", True), ("mor_expert", False), ("mor_token", False),
    ("mor_expert_off", False),
]
TINY = {"vocab_size": 512, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128}


@dataclass
class Row:
    part: str
    model: str
    mode: str  # eager | compiled | deepspeed eager | deepspeed compiled
    params_m: float = 0.0
    step_s: list[float] = field(default_factory=list)
    flops: float = 0.0  # per step, 3 x forward
    tokens: int = 0  # per step
    warmup_s: float = 0.0
    peak_gb: float | None = None
    tokens_per_step: list[int] | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")


class Budget:
    """A part's deadline inside the run's deadline."""

    def __init__(self, seconds: float, run_deadline: float):
        self.deadline = min(time.perf_counter() + seconds, run_deadline)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fresh_memory(device: torch.device) -> None:
    import torch._dynamo

    torch._dynamo.reset()  # drop compiled graphs of the previous row (inductor's disk cache stays)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# -- models ---------------------------------------------------------------------------------
def model_config(size: str, variant: str, nr: int, seq_len: int, tiny: bool) -> ModelConfig:
    name = {"vanilla": "vanilla", "hf_llama": "vanilla", "recursive": f"recursive_{nr}", "mor_expert": f"mor_expert_{nr}",
            "mor_expert_off": f"mor_expert_{nr}", "mor_token": f"mor_token_{nr}"}[variant]
    overrides = [f"{k}={v}" for k, v in TINY.items()] if tiny else []
    cfg = load_model_config(repo_root() / "configs" / "model" / size / f"{name}.yaml", overrides=overrides)
    cfg.max_seq_len = max(cfg.max_seq_len, seq_len)
    if variant == "mor_expert_off":
        cfg.router.capacity = [1.0] * cfg.num_recursions  # every token through every step
    return cfg


def build_model(variant: str, cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == "hf_llama":
        from transformers import LlamaForCausalLM

        from megamor.model.hf import llama_config

        hf_cfg = llama_config(cfg)
        hf_cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(hf_cfg)
    return MoRLM(cfg)


def n_params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6


def make_step(variant: str, model: Any, x: torch.Tensor, backward: Callable, opt_step: Callable, autocast: bool):
    """One training step; returns the routed token counts (device tensor) or None."""
    dev = x.device.type

    def step() -> torch.Tensor | None:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            if variant == "hf_llama":
                loss, routed = model(input_ids=x, labels=x).loss, None  # HF shifts the labels itself
            else:
                out = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
                loss, routed = out.loss + out.aux_loss, out.stats.routed
        backward(loss)
        opt_step()
        return routed

    return step


def measure(row: Row, step: Callable, device: torch.device, cfg: ModelConfig, B: int, T: int,
            warmup: int, steps: int, budget: Budget) -> None:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    row.warmup_s = time.perf_counter() - t0
    routed = None
    for i in range(steps):
        if i > 0 and budget.left() < 0:
            row.note = f"stopped after {i} timed steps (budget)"
            break
        sync(device)
        t = time.perf_counter()
        routed = step()
        sync(device)
        row.step_s.append(time.perf_counter() - t)
    counts = [int(n) for n in routed.tolist()] if routed is not None and routed.numel() else []
    row.tokens_per_step = counts or None
    row.flops = 3.0 * B * forward_flops(cfg, T, [n / B for n in counts])  # HF: the vanilla shape, no steps
    row.tokens = B * T
    row.peak_gb = peak_gb(device)


def plain_row(part: str, size: str, variant: str, compiled: bool, cfg: ModelConfig, device: torch.device,
              B: int, T: int, a: argparse.Namespace, budget: Budget) -> Row:
    from megamor.train.compile import compile_layers

    fresh_memory(device)
    model = build_model(variant, cfg).to(device).train()
    row = Row(part, f"{size}/{variant}", "compiled" if compiled else "eager", n_params(model))
    if compiled:
        if variant == "hf_llama":
            model.compile(backend=a.backend)
        else:
            compile_layers(model, backend=a.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)

    def opt_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = make_step(variant, model, x, lambda loss: loss.backward(), opt_step, autocast=a.precision == "bf16")
    measure(row, step, device, cfg, B, T, a.warmup, a.steps, budget)
    return row  # model and optimizer go with this frame; the next row collects them


def deepspeed_row(size: str, variant: str, compiled: bool, cfg: ModelConfig, device: torch.device,
                  B: int, T: int, a: argparse.Namespace, budget: Budget) -> Row:
    """The engine as the trainer builds it (megamor.train.engine.build_engine)."""
    from megamor.train.config import experiment_from_dict
    from megamor.train.engine import build_engine

    fresh_memory(device)
    exp = experiment_from_dict({
        "model": dataclasses.asdict(cfg), "data": {"train": ["unused"], "seq_len": T},
        "batch": {"global_batch_size": B, "micro_batch_size": B},
        "trainer": {"max_steps": 1, "compile": "false"},  # compiled by build_engine, with the chosen backend
        "deepspeed": {"zero_stage": 1, "precision": a.precision},
    })
    built = build_engine(exp, device, seed=0, compile_backend=a.backend if compiled else None)
    engine = built.engine
    row = Row("trainer", f"{size}/{variant}", f"deepspeed {'compiled' if compiled else 'eager'}", n_params(built.model))
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    step = make_step(variant, engine, x, engine.backward, engine.step, autocast=False)  # DeepSpeed casts to bf16
    measure(row, step, device, exp.model, B, T, a.warmup, a.steps, budget)
    return row


def lm_head_rows(size: str, cfg: ModelConfig, device: torch.device, B: int, T: int, a: argparse.Namespace) -> list[Row]:
    """LM head + loss alone, forward+backward: full fp32 logits vs the chunked loss."""
    import torch.nn.functional as F

    from megamor.model.loss import chunked_cross_entropy

    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    h0 = torch.randn(B, T, cfg.d_model, generator=g).to(device)
    w0 = (0.02 * torch.randn(cfg.vocab_size, cfg.d_model, generator=g)).to(device)
    t = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)

    def plain(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, w)
        return F.cross_entropy(logits.float().flatten(0, 1), t.flatten())

    for name, fn in (("full logits + fp32 CE", plain), ("chunked CE (megamor)", lambda h, w: chunked_cross_entropy(h, w, t))):
        fresh_memory(device)
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        row = Row("lm_head", f"{size} LM head [{B}x{T}, V={cfg.vocab_size}]", name)

        def step(fn=fn, h=h, w=w) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                loss = fn(h, w)
            loss.backward()
            h.grad = w.grad = None

        step()
        sync(device)
        for _ in range(a.steps):
            sync(device)
            s = time.perf_counter()
            step()
            sync(device)
            row.step_s.append(time.perf_counter() - s)
        row.flops = 3 * 2.0 * B * T * cfg.d_model * cfg.vocab_size
        row.tokens = B * T
        if device.type == "cuda":
            row.peak_gb = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        rows.append(row)
    return rows


# -- the run ----------------------------------------------------------------------------------
def guarded(label: str, empty: Row, t_start: float, fn: Callable[[], Row]) -> Row:
    """Run one row; a failure (out of memory, a compile error) is reported, not fatal: a GPU
    loan is too short to lose the other rows."""
    try:
        row = fn()
        print(f"[{time.perf_counter() - t_start:6.1f} s] {label}: {row.median:.4f} s/step", flush=True)
        return row
    except Exception as e:  # noqa: BLE001 - reported in the table
        empty.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        print(f"[{time.perf_counter() - t_start:6.1f} s] {label}: {empty.note}", flush=True)
        return empty


def run(a: argparse.Namespace) -> dict:
    from megamor.parallel.dist import init_distributed

    t_start = time.perf_counter()
    run_deadline = t_start + a.budget
    _, device = init_distributed()
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    peak = a.peak_tflops or (GPU_PEAK_TFLOPS if device.type == "cuda" else cached_cpu_tflops(a.precision))
    plan = {"33m": (3, 2, 0.6 * a.budget)} if a.tiny else {s: v for s, v in GPU_SIZES.items() if s in a.parts}
    rows: list[Row] = []
    skipped: list[str] = []
    for size, (nr, B, seconds) in plan.items():
        if size not in a.parts and not a.tiny:
            continue
        budget = Budget(seconds, run_deadline)
        for variant, compiled in ROWS:
            label = f"{size}/{variant} {'compiled' if compiled else 'eager'}"
            if a.no_hf and variant == "hf_llama":
                continue
            if budget.left() <= 0:
                skipped.append(f"{label} ({size} budget of {seconds:.0f} s spent)")
                continue
            cfg = model_config(size, variant, nr, a.seq_len, a.tiny)
            rows.append(guarded(label, Row(size, f"{size}/{variant}", "compiled" if compiled else "eager"), t_start,
                                partial(plain_row, size, size, variant, compiled, cfg, device, B, a.seq_len, a, budget)))
    sizes = list(plan)
    if "trainer" in a.parts:
        size = sizes[0]
        nr, B, _ = plan[size]
        budget = Budget(a.trainer_budget, run_deadline)
        for variant in ("mor_expert", "vanilla"):
            label = f"trainer {size}/{variant}"
            if budget.left() <= 0:
                skipped.append(f"{label} (trainer budget of {a.trainer_budget:.0f} s spent)")
                continue
            cfg = model_config(size, variant, nr, a.seq_len, a.tiny)
            compiled = device.type == "cuda" or a.tiny
            rows.append(guarded(label, Row("trainer", f"{size}/{variant}", "deepspeed"), t_start,
                                partial(deepspeed_row, size, variant, compiled, cfg, device, B, a.seq_len, a, budget)))
    if "lm_head" in a.parts:
        size = sizes[0]
        nr, B, _ = plan[size]
        if run_deadline - time.perf_counter() > 0:
            rows += lm_head_rows(size, model_config(size, "vanilla", nr, a.seq_len, a.tiny), device, B, a.seq_len, a)
        else:
            skipped.append("lm_head (run budget spent)")
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    return {
        "device": dev_name, "peak_tflops": peak, "precision": a.precision, "seq_len": a.seq_len, "steps": a.steps,
        "warmup": a.warmup, "backend": a.backend, "torch": torch.__version__, "tiny": a.tiny,
        "command": "python " + " ".join(sys.argv), "elapsed_s": time.perf_counter() - t_start, "budget_s": a.budget,
        "rows": [vars(r) | {"median_s": r.median} for r in rows], "skipped": skipped,
    }


# -- report -----------------------------------------------------------------------------------
def _find(rows: list[dict], part: str, model: str, mode: str) -> dict | None:
    return next((r for r in rows if r["part"] == part and r["model"] == model and r["mode"] == mode and r["step_s"]), None)


def ratios(res: dict) -> list[str]:
    rows, out = res["rows"], []
    sizes = sorted({r["part"] for r in rows if r["part"] not in ("trainer", "lm_head")}, key=list(GPU_SIZES).index if not res["tiny"] else str)
    for size in sizes:
        for mode in ("eager", "compiled"):
            v = _find(rows, size, f"{size}/vanilla", mode)
            for hf_mode in ("eager", "compiled"):
                hf = _find(rows, size, f"{size}/hf_llama", hf_mode)
                if v and hf:
                    out.append(f"{size}: megamor vanilla {mode} / HF {hf_mode}: {hf['median_s'] / v['median_s']:.2f}x tokens/s")
            e, off, tok = (_find(rows, size, f"{size}/{n}", mode) for n in ("mor_expert", "mor_expert_off", "mor_token"))
            if e and off:
                tr, fr = e["median_s"] / off["median_s"], e["flops"] / off["flops"]
                real = (1 - tr) / (1 - fr) if fr < 1 else float("nan")
                out.append(f"{size} {mode}: MoR expert / routing off: time {tr:.3f}, FLOPs {fr:.3f}, realised {100 * real:.0f}% of the FLOP saving")
            if e and tok:
                per_flop = (tok["median_s"] / tok["flops"]) / (e["median_s"] / e["flops"])
                out.append(f"{size} {mode}: token / expert choice: step time {tok['median_s'] / e['median_s']:.2f}x, time per FLOP {per_flop:.2f}x")
        for name in ("vanilla", "mor_expert", "mor_token", "hf_llama", "recursive"):
            ea, co = _find(rows, size, f"{size}/{name}", "eager"), _find(rows, size, f"{size}/{name}", "compiled")
            if ea and co:
                out.append(f"{size}/{name}: compiled / eager: {ea['median_s'] / co['median_s']:.2f}x tokens/s")
    for r in rows:
        if r["part"] == "trainer" and r["step_s"]:
            plain = _find(rows, r["model"].split("/")[0], r["model"], r["mode"].replace("deepspeed ", ""))
            if plain:
                out.append(f"{r['model']}: DeepSpeed engine ({r['mode']}) / plain loop: {plain['median_s'] / r['median_s']:.2f}x tokens/s")
    return out


def markdown(res: dict) -> str:
    peak_src = "datasheet" if "CPU" not in res["device"] else "timed matmul"
    lines = [
        (f"Device: {res['device']}; peak {res['peak_tflops']:.3g} TFLOP/s ({peak_src}); torch {res['torch']}; "
         f"{res['precision']} (autocast over fp32 weights in the plain loop); seq {res['seq_len']}; "
         f"{res['warmup']} warm-up + median of {res['steps']} timed steps; compile backend {res['backend']}; "
         f"{res['elapsed_s']:.0f} s of a {res['budget_s']:.0f} s budget."),
        "",
        "| part | model | mode | params (M) | step (s) | tokens/s | MFU | peak mem (GB) | warm-up (s) | tokens per recursion step |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        if not r["step_s"]:
            lines.append(f"| {r['part']} | {r['model']} | {r['mode']} | | | | | | | {r['note']} |")
            continue
        s = r["median_s"]
        mfu = r["flops"] / s / 1e12 / res["peak_tflops"]
        mem = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "n/a"
        lines.append(f"| {r['part']} | {r['model']} | {r['mode']} | {r['params_m']:.1f} | {s:.4f} | {r['tokens'] / s:,.0f} | "
                     f"{100 * mfu:.1f}% | {mem} | {r['warmup_s']:.1f} | {r['tokens_per_step'] or ''} {r['note']} |")
    lines += ["", "Ratios (same run):", ""] + [f"- {x}" for x in ratios(res)]
    if res["skipped"]:
        lines += ["", "Skipped (time budget):", ""] + [f"- {x}" for x in res["skipped"]]
    lines += ["", f"Command: `{res['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return report(train_args(argv))


def report(a: argparse.Namespace) -> int:
    """Run the benchmark on parsed arguments and write its results (evals/bench_train.py parses
    before importing this module)."""
    res = run(a)
    md = markdown(res)
    print(md)
    if a.out:
        from megamor.eval.cli import write_text  # atomic, folder created

        write_text(a.out, "# Training speed (evals/bench_train.py)\n\n" + md + "\n")
        write_text(a.out.with_suffix(".json"), json.dumps(res, indent=1))
    return 0

