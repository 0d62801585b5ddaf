"""The MoR paper's decoding protocol (Bae et al., 2025, Sec. 4.2 / Appendix E), lockstep against
depth-wise schedule, in one run (`python evals/bench_decode.py --protocol paper`).

Requests have no prefix (`--prompt-len` tokens, default 1: a BOS-like token) and generation
lengths drawn from a normal distribution (`--gen-mean`, `--gen-std`; the paper: mean 256 on a
GPU); `--requests` of them queue for the engine. Models: vanilla, MoR-expert-2/3/4 and a vanilla
with as many layers as MoR-4 (34 at 360M), routers calibrated to their capacities. Two batch
settings: the fixed batch (`--batch`, the paper's 32) and the relative maximum batch, batch x
(maximum batch of the model / of its vanilla) with maximum batch = (GPU memory - bf16
parameters) / KV bytes per sequence, from `megamor.plan`'s memory model for `--gpu` (H100: about
42/47/47 for MoR-2/3/4 against vanilla at 360M, 50 for MoR-4 against the 34-layer vanilla; the
paper reads 42/48/51).

Every row: tokens per second (and per CPU second), the same without the key/value-write time
(the paper's figure; measured in a separate run whose writes are synchronised and timed), and
the shared block's mean occupancy (items per block call / block batch; steady: while requests
were still queued), a device-independent figure. `--warmup` untimed runs come first.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megamor.inference.calibrate import calibrate_decoding
from megamor.inference.depthwise_static import default_buckets
from megamor.inference.engine import Engine
from megamor.model import MoRLM, load_model_config
from megamor.model.config import ModelConfig
from megamor.model.flops import flops_per_token
from megamor.plan.hardware import gpu_spec
from megamor.plan.memory import kv_cache_bytes, model_state_bytes

PAPER_VARIANTS = ("vanilla", "mor_expert_2", "mor_expert_3", "mor_expert_4", "vanilla_as_mor_expert_4")
# torch's linear, and oneDNN's on packed weights (the engine's default on a CPU, megamor.inference.packed_linear)
LINEAR_OPS = ("<built-in method torch._C._nn.linear>", "<built-in method torch._ops.mkldnn._linear_pointwise>")
ADMISSION_FILE = "inference/engine.py"  # Engine._prefill: the admissions' forward
SAME_LAYERS = "vanilla_as_"  # prefix: the vanilla shape with the named variant's number of layers


def variant_config(size: str, variant: str) -> ModelConfig:
    if variant.startswith(SAME_LAYERS):
        cfg = load_model_config(Path(size) / "vanilla.yaml")
        cfg.n_layers = load_model_config(Path(size) / f"{variant[len(SAME_LAYERS):]}.yaml").n_layers
        return cfg
    return load_model_config(Path(size) / f"{variant}.yaml")


def baseline_of(variant: str) -> str:
    """The vanilla a variant is compared with: same layer count for MoR-4 when that vanilla runs."""
    return f"{SAME_LAYERS}{variant}" if variant == "mor_expert_4" else "vanilla"


def max_batch(cfg: ModelConfig, gpu: str, seq_len: int) -> float:
    """Sequences of seq_len tokens whose KV cache (bf16, expected over routed depths) fits in the
    GPU's memory beside the bf16 parameters (megamor.plan's memory model)."""
    free = gpu_spec(gpu).memory_bytes - model_state_bytes(cfg, "bf16", 1, 1, 0)["params"]
    return free / kv_cache_bytes(cfg, 1, seq_len)


def relative_batch(size: str, variant: str, base: str, batch: int, gpu: str, seq_len: int) -> int:
    """The paper's relative maximum batch: batch x max_batch(variant) / max_batch(its vanilla)."""
    return max(1, round(batch * max_batch(variant_config(size, variant), gpu, seq_len)
                        / max_batch(variant_config(size, base), gpu, seq_len)))


def paper_requests(n: int, prompt_len: int, mean: float, std: float, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(n, generator=g) * std + mean).round().clamp(min=1).long().tolist()
    prompts = torch.randint(1, vocab, (n, prompt_len), generator=g).tolist()
    return list(zip(prompts, lengths))


@dataclass
class Run:
    tokens: int
    wall: float
    cpu: float
    write_wall: float
    write_cpu: float
    occupancy: float
    steady_occupancy: float
    shares: list[float]


def run_engine(model: MoRLM, requests: list[tuple[list[int], int]], batch: int, schedule: str,
               time_writes: bool = False, slots: int = 1, packed: bool | None = None, static: bool = False,
               bucket_slack: float = 0.0) -> Run:
    """batch: requests decoding at once (lockstep) or the block's batch (depthwise, with
    slots x batch requests in flight: 2 lets the exit buffer fill to a batch too). static: the
    engine's fixed-shape operations (CUDA graphs on GPU); their key/value writes happen inside
    them, so they are not timed apart (the run's figure then includes them). bucket_slack > 0:
    static depth-wise with per-depth buckets (`depthwise_static.default_buckets`)."""
    device = model.embed_tokens.weight.device
    longest = max(len(p) + n for p, n in requests)
    if schedule == "depthwise":
        buckets = default_buckets(model, batch, bucket_slack) if static and bucket_slack > 0 else None
        eng = Engine(model, max_batch=slots * batch, max_len=longest, schedule=schedule, block_batch=batch,
                     flush_batch=batch, packed_linear=packed, static=static, buckets=buckets)
    else:
        eng = Engine(model, max_batch=batch, max_len=longest, schedule=schedule, packed_linear=packed, static=static)
    eng.cache.time_writes = time_writes
    handles = [eng.submit(p, n) for p, n in requests]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t, c = time.perf_counter(), time.process_time()
    eng.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    tokens = sum(n for _, n in requests)
    fed = max(1, tokens - len(requests))  # tokens fed back through the model (prefill apart)
    depths = [d for h in handles for d in h.depths]
    shares = [round(sum(d > r for d in depths) / fed, 3) for r in range(len(model.steps))]
    return Run(tokens, wall, cpu, eng.cache.write_wall, eng.cache.write_cpu, eng.occupancy(), eng.occupancy(steady=True),
               shares)


def linear_profile(model: MoRLM, requests, batch: int, schedule: str, slots: int = 1, packed: bool | None = None,
                   static: bool = False, bucket_slack: float = 0.0) -> str:
    """Calls of torch's linear and their share of the run's CPU time (cProfile): on a CPU at
    decoding batch sizes a matmul's cost has a fixed part per call, which is what the two
    schedules trade (fewer, fuller block calls against smaller flushes). Also the time outside
    the linears, and the share of admissions (the engine's prefill), which costs both models
    alike and so holds a MoR/vanilla ratio down."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_engine(model, requests, batch, schedule, slots=slots, packed=packed, static=static, bucket_slack=bucket_slack)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    lin = [v for k, v in stats.items() if k[2] in LINEAR_OPS]
    calls, secs = sum(v[1] for v in lin), sum(v[2] for v in lin)
    admit = sum(v[3] for k, v in stats.items() if k[2] == "_prefill" and k[0].endswith(ADMISSION_FILE))
    return (f"{calls} linear calls, {secs:.2f} s = {secs / max(total, 1e-9):.0%} of the profiled run; "
            f"{total - secs:.2f} s outside them; admissions {admit / max(total, 1e-9):.0%}")


def measure(model: MoRLM, requests, batch: int, schedule: str, warmup: int, repeats: int, slots: int = 1,
            profile: bool = False, packed: bool | None = None, static: bool = False, bucket_slack: float = 0.0) -> dict:
    """One row: packed is the engine's packed_linear (None: its default; False: torch's linear);
    static, bucket_slack: the fixed-shape operations (see run_engine)."""
    spec = RowSpec(model, batch, schedule, slots, packed, static, bucket_slack)
    return measure_rows([spec], requests, warmup, repeats, profile)[0]


@dataclass
class RowSpec:
    model: MoRLM
    batch: int
    schedule: str
    slots: int = 1
    packed: bool | None = None
    static: bool = False
    bucket_slack: float = 0.0

    def run(self, requests, time_writes: bool = False) -> Run:
        return run_engine(self.model, requests, self.batch, self.schedule, time_writes=time_writes, slots=self.slots,
                          packed=self.packed, static=self.static, bucket_slack=self.bucket_slack)


def measure_rows(specs: list[RowSpec], requests, warmup: int, repeats: int, profile: bool = False) -> list[dict]:
    """Every row's figures, the rows run round-robin (warmup rounds, then `repeats` timed rounds,
    then one round with the key/value writes timed): a machine whose speed drifts (a shared CPU,
    a GPU's clocks) moves every row of a round alike, so the ratios between rows hold where
    rows measured one after another would not (issue 29: a MoR/vanilla ratio moved 1.01x-1.19x
    between sequential runs)."""
    for _ in range(warmup):
        for spec in specs:
            spec.run(requests)
    runs: list[list[Run]] = [[] for _ in specs]
    for _ in range(repeats):
        for i, spec in enumerate(specs):
            runs[i].append(spec.run(requests))
    out = []
    for spec, rs in zip(specs, runs):
        timed = spec.run(requests, time_writes=True)
        prof = (linear_profile(spec.model, requests, spec.batch, spec.schedule, spec.slots, spec.packed, spec.static,
                               spec.bucket_slack) if profile else "")
        med = sorted(rs, key=lambda r: r.cpu)[len(rs) // 2]
        wall = sorted(r.wall for r in rs)[len(rs) // 2]
        out.append({"tokens": med.tokens, "tok_s": med.tokens / wall, "tok_cpu_s": med.tokens / med.cpu,
                    "tok_s_no_kv": med.tokens / max(1e-9, wall - timed.write_wall),
                    "tok_cpu_s_no_kv": med.tokens / max(1e-9, med.cpu - timed.write_cpu),
                    "kv_write_share": timed.write_cpu / max(1e-9, timed.cpu), "occupancy": med.occupancy,
                    "steady_occupancy": med.steady_occupancy, "shares": med.shares, "profile": prof})
    return out


def predicted_ratio(base: ModelConfig, cfg: ModelConfig, shares: list[float], context: int) -> float:
    """Decode FLOPs per token of the baseline / of the model at the measured per-step shares
    (megamor.model.flops, LM head included, attention at the mean context)."""
    return flops_per_token(base, context) / flops_per_token(cfg, context, [s * context for s in shares])


def run_paper(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    variants = args.variants if args.variants_given else list(PAPER_VARIANTS)
    cfg0 = variant_config(args.size, "vanilla")
    requests = paper_requests(args.requests, args.prompt_len, args.gen_mean, args.gen_std, cfg0.vocab_size)
    context = args.prompt_len + int(args.gen_mean)
    started = time.perf_counter()
    models: dict[str, MoRLM] = {}
    for v in variants:
        torch.manual_seed(1)
        m = MoRLM(variant_config(args.size, v)).eval().to(device=device, dtype=dtype)
        if m.routers is not None or m.depth_router is not None:
            calibrate_decoding(m, [p for p, _ in requests[: 2 * args.batch]], int(args.gen_mean))
        models[v] = m
    static = device.type == "cuda" if getattr(args, "static", None) is None else args.static
    rows, specs = [], []
    for v in variants:
        base = baseline_of(v) if baseline_of(v) in models else "vanilla"
        settings = [("fixed", args.batch)]
        if not v.startswith(("vanilla", SAME_LAYERS)) and base in models:  # MoR: its memory buys a larger batch
            settings.append(("relative max", relative_batch(args.size, v, base, args.batch, args.gpu, args.kv_seq_len)))
        for setting, batch in settings:
            for schedule in getattr(args, "schedules", ("lockstep", "depthwise")):
                slots = args.depthwise_slots if schedule == "depthwise" else 1
                label = schedule if slots == 1 else f"{schedule} ({slots * batch} slots)"
                label += ", static" if static else ""
                slack = getattr(args, "depth_buckets", 0.0) if static and schedule == "depthwise" else 0.0
                slack = slack if slack and default_buckets(models[v], batch, slack) is not None else 0.0
                label += f", depth buckets x{slack:g}" if slack else ""
                rows.append({"variant": v, "base": base, "setting": setting, "batch": batch, "schedule": schedule,
                             "label": label})
                specs.append(RowSpec(models[v], batch, schedule, slots,
                                     False if getattr(args, "plain_linear", False) else None, static, slack))
    for row, res in zip(rows, measure_rows(specs, requests, args.warmup, args.repeats, args.profile)):
        row.update(res)
        print(f"  {row['variant']} {row['setting']} {row['batch']} {row['schedule']}: {res['tok_s']:.1f} tokens/s, "
              f"{res['tok_s_no_kv']:.1f} without KV writes, {res['tok_cpu_s']:.1f} tokens/CPU-s, occupancy "
              f"{res['steady_occupancy']:.2f}", file=sys.stderr, flush=True)
    return paper_report(args, rows, models, device, context, time.perf_counter() - started)


def paper_report(args, rows, models, device, context: int, wall: float) -> str:
    on_cpu = device.type == "cpu"
    key = "tok_cpu_s" if on_cpu else "tok_s"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    load = ", ".join(f"{x:.2f}" for x in _loadavg())
    lines = [
        (f"device: {dev}; torch {torch.__version__}; {args.dtype}; size {args.size}; {args.requests} requests, prompt "
         f"{args.prompt_len}, generation ~ N({args.gen_mean:g}, {args.gen_std:g}); warmup {args.warmup}, median of "
         f"{args.repeats}; relative batch from {args.gpu} memory at {args.kv_seq_len} tokens; load average {load}; "
         f"wall {wall:.0f} s"),
        f"command: python evals/bench_decode.py {' '.join(sys.argv[1:])}",
        "",
        (f"ratios from {'tokens per CPU second' if on_cpu else 'tokens per second'}, against the baseline's fixed-batch "
         "row of the same schedule, every row timed once per round, round-robin; 'no KV write' subtracts the timed "
         "key/value writes (the paper's figure)"),
        "",
        ("| model | batch | schedule | tokens/s | tokens/CPU-s | no KV write | KV write share | vs baseline | "
         "no KV write vs baseline | FLOP-predicted | occupancy (steady) | occupancy (all) | depth shares |"
         + (" profile |" if args.profile else "")),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|" + ("---|" if args.profile else ""),
    ]
    nokv = key + "_no_kv" if on_cpu else "tok_s_no_kv"
    for r in rows:
        b = next((x for x in rows if x["variant"] == r["base"] and x["schedule"] == r["schedule"]), None)
        vs = f"{r[key] / b[key]:.2f}x" if b and r["variant"] != r["base"] else "-"
        vs_nokv = f"{r[nokv] / b[nokv]:.2f}x" if b and r["variant"] != r["base"] else "-"
        pred = "-"
        if r["variant"] != r["base"] and r["base"] in models:
            pred = f"{predicted_ratio(models[r['base']].cfg, models[r['variant']].cfg, r['shares'], context):.2f}x"
        lines.append(
            f"| {r['variant']} (vs {r['base']}) | {r['setting']} {r['batch']} | {r['label']} | {r['tok_s']:.1f} | "
            f"{r['tok_cpu_s']:.1f} | {r[nokv]:.1f} | {r['kv_write_share']:.1%} | {vs} | {vs_nokv} | {pred} | "
            f"{r['steady_occupancy']:.3f} | {r['occupancy']:.3f} | {r['shares']} |"
            + (f" {r['profile']} |" if args.profile else ""))
    return "\n".join(lines) + "\n"


def _loadavg() -> tuple[float, float, float]:
    try:
        import os

        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3
