"""Decoding benchmark: the engine on vanilla / recursive / MoR-expert / MoR-token models of one
size, against Hugging Face `generate` (LlamaForCausalLM with the vanilla weights; dynamic and
static cache) and megamor's plain `generate()`, in one run so the ratios compare like with like.

MoR routers are calibrated to their capacities on sample tokens first (megamor.inference.
calibrate): random routers would send every token one way. Every part runs under its own time
limit; a part that runs out is reported as such and the rest goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamor.benchmarks.cli import DECODE_DTYPES, DECODE_VARIANTS, decode_args
from megamor.inference.calibrate import calibrate_decoding
from megamor.inference.engine import Engine
from megamor.inference.generate import generate
from megamor.inference.graph_step import default_buckets
from megamor.model import MoRLM, load_model_config
from megamor.model.hf import llama_config, to_llama_state_dict
from megamor.utils.atomic import atomic_open

VARIANTS = DECODE_VARIANTS
# vanilla_eq: the vanilla shape with as many layers as recursive_3 has unique ones, i.e. the
# vanilla model with the shared variants' parameter count (vanilla has their unrolled compute).
EQUAL_PARAMS_OF = "recursive_3"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
assert sorted(DTYPES) == sorted(DECODE_DTYPES)


@dataclass
class Result:
    name: str
    tokens_per_s: float | None = None  # wall clock
    seconds: float | None = None
    tokens_per_cpu_s: float | None = None  # per CPU second of this process (steadier on a shared CPU)
    kv_held_mb: float | None = None
    kv_reserved_mb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise PartTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def _result(n_tokens: int, times: list[tuple[float, float]], **kw) -> Result:
    wall = sorted(t[0] for t in times)[len(times) // 2]
    cpu = sorted(t[1] for t in times)[len(times) // 2]
    return Result("", n_tokens / wall, wall, tokens_per_cpu_s=n_tokens / max(cpu, 1e-9), **kw)


def build(size: str, variant: str, device: torch.device, dtype: torch.dtype, calib: list[list[int]], calib_new: int,
          seed: int) -> MoRLM:
    """A randomly initialised model of <size>/<variant>.yaml; routers calibrated on the engine's
    decoding of the `calib` prompts."""
    torch.manual_seed(seed)
    if variant == "vanilla_eq":
        cfg = load_model_config(Path(size) / "vanilla.yaml")
        cfg.n_layers = load_model_config(Path(size) / f"{EQUAL_PARAMS_OF}.yaml").num_unique_layers
    else:
        cfg = load_model_config(Path(size) / f"{variant}.yaml")
    model = MoRLM(cfg).eval()
    model = model.to(device=device, dtype=dtype)
    if model.routers is not None or model.depth_router is not None:
        calibrate_decoding(model, calib, calib_new)
    return model


def bench_engine(model: MoRLM, prompts: list[list[int]], new: int, static: bool, compile: bool = False,
                 slack: float = 1.25, repeats: int = 1) -> Result:
    """One untimed run (warm-up: CUDA graph capture, compilation; measures peak KV bytes and
    routing shares), then the timed runs (median)."""
    device = model.embed_tokens.weight.device
    S = len(prompts)
    buckets = default_buckets(model, S, slack) if static else None

    def run(track: bool) -> Engine:
        eng = Engine(model, max_batch=S, max_len=len(prompts[0]) + new, static=static, buckets=buckets, compile=compile)
        for p in prompts:
            eng.submit(p, new)
        peak = 0
        while not eng.idle():
            eng.step()
            if track:
                peak = max(peak, eng.cache.nbytes())
        eng.peak_bytes = peak  # type: ignore[attr-defined]
        return eng

    first = run(track=True)
    holder: dict = {}
    times = [_timed(lambda: holder.update(eng=run(track=False)), device) for _ in range(repeats)]
    eng = holder["eng"]
    fed = S * new  # decoding feeds each prompt's last token, then every new token but the last
    extra: dict = {}
    shares = [round(n / max(1, fed), 2) for n in first.tokens_per_step_total.tolist()]
    if shares:
        extra["decoded share per recursion"] = shares
    if static:
        extra["buckets"] = buckets
        extra["overflow steps"] = f"{eng.overflow_steps}/{eng.static_steps}"
    return _result(S * new, times, kv_held_mb=first.peak_bytes / 2**20, kv_reserved_mb=eng.cache.reserved_bytes() / 2**20,
                   extra=extra)


def bench_generate(model: MoRLM, prompts: list[list[int]], new: int, repeats: int = 1) -> Result:
    device = model.embed_tokens.weight.device
    generate(model, prompts, 4)
    return _result(len(prompts) * new, [_timed(lambda: generate(model, prompts, new), device) for _ in range(repeats)])


def bench_hf(model: MoRLM, prompts: list[list[int]], new: int, cache: str | None, repeats: int = 1) -> Result:
    from transformers import LlamaForCausalLM  # lazy: only the Hugging Face baseline needs it

    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    hf_cfg = llama_config(model.cfg)
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(to_llama_state_dict(model.cfg, model.state_dict()), strict=False)
    hf = hf.to(device=device, dtype=dtype).eval()
    ids = torch.tensor(prompts, device=device)
    kw = {"do_sample": False, "min_new_tokens": new, "max_new_tokens": new, "attention_mask": torch.ones_like(ids),
          "pad_token_id": 0}
    if cache:
        kw["cache_implementation"] = cache
    with torch.no_grad():
        hf.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        times = [_timed(lambda: hf.generate(ids, **kw), device) for _ in range(repeats)]
    return _result(len(prompts) * new, times)


def run_all(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    cfg0 = load_model_config(Path(args.size) / "vanilla.yaml")
    prompts = torch.randint(1, cfg0.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    # Routers are calibrated on the measured prompts' own decoding (greedy decoding is
    # deterministic), so the timed runs route at the capacities; --calibrate-on other uses fresh
    # prompts instead (a random model's shares then drift, see the notes column).
    calib = prompts if args.calibrate_on == "same" else torch.randint(1, cfg0.vocab_size, (2 * args.batch, args.prompt_len),
                                                                          generator=g).tolist()
    rows: list[Result] = []
    started = time.perf_counter()

    def part(name: str, fn: Callable[[], Result]) -> None:
        left = args.total_timeout - (time.perf_counter() - started)
        if left <= 5:
            rows.append(Result(name, note="skipped: total time limit reached"))
            return
        try:
            with time_limit(min(args.part_timeout, left)):
                res = fn()
            res.name = name
        except PartTimeout:
            res = Result(name, note=f"timed out after {min(args.part_timeout, left):g} s")
        except Exception as e:  # noqa: BLE001 -- one broken part (a CUDA graph capture, say) must not lose the rest
            msg = str(e).splitlines()[0][:160] if str(e) else ""
            res = Result(name, note=f"failed: {type(e).__name__}: {msg}".replace("|", "/"))
        rows.append(res)
        print(f"  {name}: {res.tokens_per_s and round(res.tokens_per_s, 1)} tokens/s {res.note}", file=sys.stderr, flush=True)

    models: dict[str, MoRLM] = {}
    for v in args.variants:
        left = args.total_timeout - (time.perf_counter() - started)
        try:  # building and calibrating count against the limits too
            if left <= 5:
                raise PartTimeout()
            with time_limit(min(args.part_timeout, left)):
                models[v] = build(args.size, v, device, dtype, calib, args.new_tokens, seed=1)
        except PartTimeout:
            rows.append(Result(f"engine {v}", note="skipped: building/calibrating ran out of time"))
            continue
        except Exception as e:  # noqa: BLE001 -- report it, measure the other variants
            rows.append(Result(f"engine {v}", note=f"failed to build: {type(e).__name__}: {str(e)[:160]}".replace("|", "/")))
            continue
        params = models[v].num_params() / 1e6
        for mode in args.modes:
            part(f"engine {mode} {v} ({params:.1f}M unique params)",
                 lambda v=v, mode=mode: bench_engine(models[v], prompts, args.new_tokens, mode == "static", args.compile,
                                                     args.bucket_slack, args.repeats))
    if "vanilla" in models:
        van = models["vanilla"]
        if not args.no_hf:
            part("HF generate, dynamic cache (vanilla)", lambda: bench_hf(van, prompts, args.new_tokens, None, args.repeats))
            part("HF generate, static cache (vanilla)", lambda: bench_hf(van, prompts, args.new_tokens, "static", args.repeats))
        part("megamor generate() (vanilla)", lambda: bench_generate(van, prompts, args.new_tokens, args.repeats))
    return report(args, rows, device, time.perf_counter() - started)


def report(args: argparse.Namespace, rows: list[Result], device: torch.device, wall: float) -> str:
    # Ratios: per CPU second on a CPU (shared machines: wall time mostly measures the neighbours),
    # per wall second on a GPU.
    on_cpu = device.type == "cpu"

    def metric(r: Result) -> float | None:
        return r.tokens_per_cpu_s if on_cpu else r.tokens_per_s

    def find(prefix: str) -> float | None:
        return next((metric(r) for r in rows if r.name.startswith(prefix) and metric(r)), None)

    def base_of(name: str) -> float | None:  # engine vanilla in the same mode
        mode = name.split()[1] if name.startswith("engine ") else args.modes[0]
        return find(f"engine {mode} vanilla")

    hf = find("HF generate, dynamic")
    hf_static = find("HF generate, static")
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        (f"device: {dev}; torch {torch.__version__}; {args.dtype}; size {args.size}; batch {args.batch}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, greedy; median of {args.repeats}; routers calibrated on {args.calibrate_on} prompts; "
        f"wall {wall:.0f} s"),
        f"command: python evals/bench_decode.py {' '.join(sys.argv[1:])}",
        "",
        f"ratios from {'tokens per CPU second' if on_cpu else 'tokens per second'}",
        "",
        ("| run | tokens/s | tokens/CPU-s | vs engine vanilla (same mode) | vs HF dynamic | vs HF static | KV held (peak) MiB "
        "| KV reserved MiB | notes |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def ratio(r: Result, b: float | None) -> str:
        m = metric(r)
        return f"{m / b:.2f}x" if (m and b) else "-"

    for r in rows:
        tps = f"{r.tokens_per_s:.1f}" if r.tokens_per_s else "-"
        tpc = f"{r.tokens_per_cpu_s:.1f}" if r.tokens_per_cpu_s else "-"
        held = f"{r.kv_held_mb:.1f}" if r.kv_held_mb is not None else "-"
        res = f"{r.kv_reserved_mb:.1f}" if r.kv_reserved_mb is not None else "-"
        note = "; ".join([r.note] + [f"{k} {v}" for k, v in r.extra.items()]).strip("; ")
        lines.append(f"| {r.name} | {tps} | {tpc} | {ratio(r, base_of(r.name))} | {ratio(r, hf)} | {ratio(r, hf_static)} | {held} | {res} | {note} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments (megamor.benchmarks.cli.decode_args) with --device and --dtype resolved."""
    return resolve(decode_args(argv))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The benchmark on parsed arguments (evals/bench_decode.py parses before importing this module)."""
    args = resolve(args)
    if args.protocol == "paper":
        from megamor.benchmarks.decode_paper import run_paper

        try:
            text = run_paper(args)
        except (ValueError, FileNotFoundError) as e:  # a bad variant name or config: one line, exit 2
            print(f"bench_decode: {e}", file=sys.stderr)
            return 2
    else:
        text = run_all(args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(args.out, "w") as f:
            f.write(text)
    return 0
