"""The speed parts, each figure beside its target (GPU; bf16, dense datasheet peak).

- train_<size> (135m, 360m, 1_7b): a plain training loop, as the trainer runs on one GPU without
  DeepSpeed (per-layer torch.compile, bf16 autocast over fp32 weights, fused AdamW), on random
  tokens at seq 2048: MFU of vanilla and MoR expert choice; the same MoR model with routing off
  (capacity 1.0 at every step), whose time ratio against the FLOP ratio gives the realised share
  of the FLOP saving; token choice against expert choice. FLOPs per step are 3 x forward from
  the tokens each recursion step really ran (`megamor.model.flops`, `megamor.train.metrics`).
- decode_paper: the paper's decoding protocol (megamor.benchmarks.decode_paper; Bae et al. 2025,
  Appendix E) at 360M: requests without prefix, generation lengths ~ N(64, 16) (the paper: 256,
  cut to fit the part's minute), MoR-expert-2/3/4 on the depth-wise schedule at the relative
  maximum batch (32 x the ratio of maximum batches from H100 memory, as the paper) against
  vanilla at 32 on the lockstep schedule (MoR-4 against a vanilla of as many layers), tokens/s
  without the timed KV writes (the paper's figure; the honest one is in the note), and the
  shared block's steady occupancy. On the GPU both schedules run the engine's fixed-shape
  operations as CUDA graphs (`static=True`), whose KV writes are inside the graph: there the
  two figures coincide and include the writes.
- decode: tokens/s of the decoding engine's static step (a CUDA graph on GPU;
  `megamor.benchmarks.decode`) against Hugging Face `generate` with its dynamic cache on the
  vanilla weights, and MoR expert-3 against vanilla, routers calibrated to their capacities.

Under --tiny the same rows run eagerly on toy shapes on the CPU (the compile part checks the
compiled path); MFU is then against a timed matmul and every target reads "n/a on CPU".
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from megamor.benchmarks.decode import bench_engine, bench_hf
from megamor.gpu_check.common import (
    ERROR,
    MEASURE,
    SKIPPED,
    SPEED,
    Context,
    build_model,
    model_config,
    short_error,
    sync,
)
from megamor.gpu_check.parts import DECODE_NAMES, DECODE_PAPER_NAMES, SIZE_LABEL, TRAIN_ROWS
from megamor.inference.calibrate import calibrate_decoding
from megamor.train.compile import compile_layers
from megamor.train.metrics import peak_tflops, step_flops

# size -> (recursions, micro-batch, MFU target). Rows (parts.TRAIN_ROWS) run in priority order:
# a row that would start too close to the part's limit is skipped, and the checks needing it say so.
TRAIN_SIZES = {"135m": (3, 8, 0.35), "360m": (3, 8, 0.45), "1_7b": (2, 4, 0.55)}
LABELS = {"vanilla": "vanilla", "mor_expert": "MoR expert", "mor_expert_off": "MoR expert, routing off",
          "mor_token": "MoR token"}
REALISED_TARGET = 0.90
TOKEN_RATIO_TARGET = 1.1
DECODE_HF_TARGET = 5.0
DECODE_MOR_TARGET = 1.6
DEFAULT_GPU_PEAK = 989.0  # H100/H200 dense bf16, when the device is not in metrics.GPU_PEAK_TFLOPS


def peak(ctx: Context) -> tuple[float, str]:

    tf = peak_tflops(ctx.device, "bf16", ctx.peak_tflops, probe_cpu=True)
    if ctx.peak_tflops:
        return tf, "--peak-tflops"
    if tf is None:
        return DEFAULT_GPU_PEAK, f"{torch.cuda.get_device_name(ctx.device)} not in metrics.GPU_PEAK_TFLOPS: 989 assumed"
    return tf, "datasheet bf16 dense" if ctx.on_gpu else "timed bf16 matmul on this CPU"


def _fresh(device: torch.device) -> None:
    # No torch._dynamo.reset(): rows of one size share the layer's compiled graphs (same shapes).
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _row_config(size: str, row: str, nr: int, tiny: bool, seq: int):
    variant = {"vanilla": "vanilla", "mor_expert": f"mor_expert_{nr}", "mor_expert_off": f"mor_expert_{nr}",
               "mor_token": f"mor_token_{nr}"}[row]
    extra = [f"max_seq_len={max(seq, 256)}"]
    if row == "mor_expert_off":  # the same model with every token through every step
        extra.append(f"router.capacity=[{','.join(['1.0'] * nr)}]")
    return model_config(size, variant, tiny, extra)


def measure_train(ctx: Context, cfg, B: int, T: int, warmup: int, steps: int) -> dict:
    """Median step time of a compiled bf16-autocast AdamW loop, and the step's model FLOPs."""
    dev = ctx.device
    _fresh(dev)
    model = build_model(cfg, dev).train()
    if not ctx.tiny:  # --tiny: eager (the compile part checks the compiled path; CI time is short)
        compile_layers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ctx.on_gpu)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.stats.routed

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(dev)
    warm = time.perf_counter() - t0
    times: list[float] = []
    routed = None
    for i in range(steps):
        if i >= 2 and ctx.left() < 10 + 2 * statistics.median(times):
            break  # keep time to write the row
        sync(dev)
        t = time.perf_counter()
        routed = step()
        sync(dev)
        times.append(time.perf_counter() - t)
    flops = step_flops(cfg, [(B, T)], [routed] if routed is not None and routed.numel() else [])
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    counts = routed.tolist() if routed is not None and routed.numel() else []
    return {"step_s": statistics.median(times), "steps_s": times, "flops": flops, "tokens": B * T, "warmup_s": warm,
            "params_m": params, "peak_mem_gb": mem, "tokens_per_step": counts, "batch": B, "seq": T}


def train(ctx: Context, size: str) -> None:
    nr, B, mfu_target = TRAIN_SIZES[size]
    rows = TRAIN_ROWS[size]
    s = SIZE_LABEL[size]
    B, T = (2, 64) if ctx.tiny else (B, 2048)
    warmup, steps = (1, 3) if ctx.tiny else (3, 6)
    tf, peak_src = peak(ctx)
    mode = ("eager (--tiny)" if ctx.tiny else "compiled (inductor)") + ", bf16 autocast" + (", fused AdamW" if ctx.on_gpu else "")
    got: dict[str, dict] = {}
    why: dict[str, str] = {}
    for row in rows:
        name = f"{s} {LABELS[row]}"
        # A row started too late is cut by the parent and reported as timed out, which says as
        # much as a skip; only a row that could not even build its model is skipped here.
        if ctx.left() < 5:
            why[row] = f"skipped: {ctx.left():.0f} s left of the part's limit"
            ctx.check(MEASURE, name, SKIPPED, note=why[row])
            continue
        try:
            m = measure_train(ctx, _row_config(size, row, nr, ctx.tiny, T), B, T, warmup, steps)
        except Exception as e:  # noqa: BLE001 -- an OOM or compile error is this row's, not the part's
            why[row] = f"failed: {short_error(e)}"
            ctx.check(MEASURE, name, ERROR, note=why[row])
            continue
        m["mfu"] = m["flops"] / m["step_s"] / (tf * 1e12)
        got[row] = m
        ctx.check(MEASURE, name, "", f"{m['step_s']:.4f} s/step, MFU {100 * m['mfu']:.1f}%", note=mode, value=m["mfu"],
                  peak_tflops=tf, peak_source=peak_src, **m)

    def need(*names: str) -> str | None:
        missing = [n for n in names if n not in got]
        return "; ".join(f"{LABELS[n]} row {why.get(n, 'missing')}" for n in missing) or None

    for row, check in (("vanilla", f"MFU {s} vanilla"), ("mor_expert", f"MFU {s} MoR expert")):
        target = f">= {100 * mfu_target:.0f}%"
        if (reason := need(row)) is not None:
            ctx.check(SPEED, check, ERROR if "failed" in reason else SKIPPED, target=target, note=reason)
            continue
        m = got[row]
        ctx.speed(check, m["mfu"], f"{100 * m['mfu']:.1f}%", target, m["mfu"] >= mfu_target,
                  f"{m['tokens'] / m['step_s']:,.0f} tokens/s, {m['flops'] / 1e12:.2f} TFLOP/step; peak {tf:.3g} TFLOP/s ({peak_src})")
    if "mor_expert_off" in rows:
        check, target = f"MoR realised FLOP saving {s}", f">= {100 * REALISED_TARGET:.0f}%"
        if (reason := need("mor_expert", "mor_expert_off")) is not None:
            ctx.check(SPEED, check, ERROR if "failed" in reason else SKIPPED, target=target, note=reason)
        else:
            e, off = got["mor_expert"], got["mor_expert_off"]
            tr, fr = e["step_s"] / off["step_s"], e["flops"] / off["flops"]
            real = (1 - tr) / (1 - fr)
            ctx.speed(check, real, f"{100 * real:.0f}%", target, real >= REALISED_TARGET,
                      f"time x{tr:.3f} for FLOPs x{fr:.3f} of the same model with routing off")
    if "mor_token" in rows:
        check, target = f"token / expert step time {s}", f"<= {TOKEN_RATIO_TARGET:g}x"
        if (reason := need("mor_expert", "mor_token")) is not None:
            ctx.check(SPEED, check, ERROR if "failed" in reason else SKIPPED, target=target, note=reason)
        else:
            e, tok = got["mor_expert"], got["mor_token"]
            ratio = tok["step_s"] / e["step_s"]
            per_flop = (tok["step_s"] / tok["flops"]) / (e["step_s"] / e["flops"])
            ctx.speed(check, ratio, f"{ratio:.2f}x", target, ratio <= TOKEN_RATIO_TARGET,
                      f"time per FLOP {per_flop:.2f}x")


# -- decoding -------------------------------------------------------------------------------------
def _decode_model(ctx: Context, variant: str, dtype: torch.dtype, prompts: list[list[int]], new: int):

    model = build_model(model_config("135m", variant, ctx.tiny), ctx.device, dtype, seed=1).eval()
    if model.routers is not None or model.depth_router is not None:
        # Random routers would send every token one way. Two rounds on the first 32 tokens: the
        # dynamic path it decodes on is the slow one (shares drift a little; the notes show them).
        calibrate_decoding(model, prompts, min(new, 32), rounds=2)
    return model


def decode(ctx: Context) -> None:

    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    batch, plen, new, repeats = (4, 16, 8, 1) if ctx.tiny else (16, 128, 64, 3)
    g = torch.Generator().manual_seed(0)
    vocab = model_config("135m", "vanilla", ctx.tiny).vocab_size
    prompts = torch.randint(1, vocab, (batch, plen), generator=g).tolist()
    # Tokens per wall second on a GPU; per CPU second on a (shared) CPU, as megamor.benchmarks.decode.
    rate = (lambda r: r.tokens_per_s) if ctx.on_gpu else (lambda r: r.tokens_per_cpu_s)
    unit = "tokens/s" if ctx.on_gpu else "tokens/CPU-s"
    step = "static step, CUDA graph" if ctx.on_gpu else "static step, no CUDA graph"
    got: dict[str, float] = {}
    runs = [("engine vanilla", "vanilla", lambda m: bench_engine(m, prompts, new, static=True, repeats=repeats)),
            ("HF generate, dynamic cache (vanilla weights)", "vanilla", lambda m: bench_hf(m, prompts, new, None, repeats)),
            ("engine MoR expert-3", "mor_expert_3", lambda m: bench_engine(m, prompts, new, static=True, repeats=repeats))]
    models: dict[str, torch.nn.Module] = {}
    for name, variant, fn in runs:
        try:
            if variant not in models:
                models.clear()
                gc.collect()
                models[variant] = _decode_model(ctx, variant, dtype, prompts, new)
            res = fn(models[variant])
        except Exception as e:  # noqa: BLE001 -- reported; the other runs still count
            ctx.check(MEASURE, name, ERROR, note=short_error(e))
            continue
        got[name] = rate(res)
        extra = "; ".join(f"{k} {v}" for k, v in res.extra.items())
        ctx.check(MEASURE, name, "", f"{got[name]:,.1f} {unit}", note=f"{step if name.startswith('engine') else 'eager'}"
                  + (f"; {extra}" if extra else ""), value=got[name], tokens_per_s=res.tokens_per_s,
                  tokens_per_cpu_s=res.tokens_per_cpu_s, seconds=res.seconds)
    setup = f"{'toy shape' if ctx.tiny else '135M'}, {batch} x {plen}-token prompts, {new} new tokens, greedy, {str(dtype).split('.')[-1]}, median of {repeats}"
    pairs = ((DECODE_NAMES[0], "engine vanilla", "HF generate, dynamic cache (vanilla weights)", DECODE_HF_TARGET),
             (DECODE_NAMES[1], "engine MoR expert-3", "engine vanilla", DECODE_MOR_TARGET))
    for check, num, den, target in pairs:
        if num not in got or den not in got:
            ctx.check(SPEED, check, ERROR, target=f">= {target:g}x", note=f"needs the runs '{num}' and '{den}'")
            continue
        ratio = got[num] / got[den]
        ctx.speed(check, ratio, f"{ratio:.2f}x", f">= {target:g}x", ratio >= target,
                  f"{got[num]:,.1f} vs {got[den]:,.1f} {unit}; {setup}")


# -- decoding, the paper's protocol -------------------------------------------------------------
# variant -> (check, baseline, target). Targets: the paper's 2.06x for MoR-4 against the 34-layer
# vanilla (its Figure on throughput); issue 29 sets 1.3x / 1.6x for MoR-2 / MoR-3.
PAPER_DECODE = {"mor_expert_2": (DECODE_PAPER_NAMES[0], "vanilla", 1.3),
                "mor_expert_3": (DECODE_PAPER_NAMES[1], "vanilla", 1.6),
                "mor_expert_4": (DECODE_PAPER_NAMES[2], "vanilla_as_mor_expert_4", 2.06)}
OCCUPANCY_TARGET = 0.95
PAPER_BATCH_GPU = 32  # the paper's fixed batch


def _paper_config(variant: str, tiny: bool):
    from megamor.benchmarks.decode_paper import SAME_LAYERS

    if variant.startswith(SAME_LAYERS):
        layers = _paper_config(variant[len(SAME_LAYERS):], tiny).n_layers
        return model_config("360m", "vanilla", tiny, [f"n_layers={layers}"])
    # the toy shape's 8 layers: 2 unshared + 6 shared, which 4 recursions do not divide
    return model_config("360m", variant, tiny, ["n_layers=10"] if tiny and variant == "mor_expert_4" else [])


def decode_paper(ctx: Context) -> None:
    from megamor.benchmarks.decode_paper import max_batch, measure, paper_requests

    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    n_req, mean, std, batch = (8, 8.0, 2.0, 4) if ctx.tiny else (64, 64.0, 16.0, PAPER_BATCH_GPU)
    key = "tok_s_no_kv" if ctx.on_gpu else "tok_cpu_s_no_kv"  # the paper's figure: KV writes excluded
    honest = "tok_s" if ctx.on_gpu else "tok_cpu_s"
    unit = "tokens/s" if ctx.on_gpu else "tokens/CPU-s"
    cfgs = {v: _paper_config(v, ctx.tiny) for v in
            ("vanilla", "mor_expert_3", "mor_expert_4", "vanilla_as_mor_expert_4", "mor_expert_2")}
    requests = paper_requests(n_req, 1, mean, std, cfgs["vanilla"].vocab_size)
    got: dict[str, dict] = {}
    for variant, cfg in cfgs.items():  # in priority order: a row that cannot finish in time is left out
        mor = variant in PAPER_DECODE
        base = PAPER_DECODE[variant][1] if mor else variant
        rows = batch
        if mor:  # the relative maximum batch, from H100 memory at 2048 tokens (the paper's setting)
            rows = max(1, round(batch * max_batch(cfg, "h100", 2048) / max_batch(cfgs[base], "h100", 2048)))
        schedule = "depthwise" if mor else "lockstep"
        if ctx.left() < (10 if ctx.tiny else 15):
            break
        try:
            _fresh(ctx.device)
            model = build_model(cfg, ctx.device, dtype, seed=1).eval()
            if model.routers is not None or model.depth_router is not None:
                calibrate_decoding(model, [p for p, _ in requests[: 2 * batch]], int(mean))
            # on a GPU the engine's fixed-shape operations, replayed as CUDA graphs (both schedules);
            # if they fail there, the row is measured on the dynamic path and the note says why
            static, fallback = ctx.on_gpu, ""
            try:
                res = measure(model, requests, rows, schedule, warmup=1, repeats=1, static=static)
            except Exception as e:  # reported in the row's note
                if not static:
                    raise
                static, fallback = False, f"; static failed ({short_error(e)}), measured dynamic"
                res = measure(model, requests, rows, schedule, warmup=1, repeats=1, static=False)
            del model
        except Exception as e:  # noqa: BLE001 -- reported; the other rows still count
            ctx.check(MEASURE, f"paper decode {variant}", ERROR, note=short_error(e))
            continue
        got[variant] = {**res, "batch": rows}
        ctx.check(MEASURE, f"paper decode {variant}", "", f"{res[key]:,.1f} {unit}",
                  note=(f"{schedule}{', static' if static else ''}{fallback}, batch {rows}; with KV writes {res[honest]:,.1f}; occupancy (steady) "
                        f"{res['steady_occupancy']:.3f}; depth shares {res['shares']}"),
                  value=res[key], batch=rows, schedule=schedule, **{k: res[k] for k in (
                      "tok_s", "tok_s_no_kv", "tok_cpu_s", "tok_cpu_s_no_kv", "steady_occupancy", "occupancy")})
    if "mor_expert_3" in got and "vanilla" in got and ctx.left() >= (10 if ctx.tiny else 15):
        # The static depth-wise block with per-depth buckets (each depth's attention on its own rows,
        # a depth's overflow deferred): measured beside the unbucketed row, no target of its own.
        try:
            _fresh(ctx.device)
            model = build_model(cfgs["mor_expert_3"], ctx.device, dtype, seed=1).eval()
            calibrate_decoding(model, [p for p, _ in requests[: 2 * batch]], int(mean))
            rows = got["mor_expert_3"]["batch"]
            res = measure(model, requests, rows, "depthwise", warmup=1, repeats=1, static=True, bucket_slack=1.25)
            del model
            ratio = res[key] / got["vanilla"][key]
            ctx.check(MEASURE, "paper decode mor_expert_3, depth buckets x1.25", "", f"{res[key]:,.1f} {unit}",
                      note=(f"depthwise, static, buckets x1.25, batch {rows}: {ratio:.2f}x vanilla (the mor_expert_3 row above: "
                            f"{got['mor_expert_3'][key] / got['vanilla'][key]:.2f}x); occupancy (steady) "
                            f"{res['steady_occupancy']:.3f}"), value=res[key], ratio=ratio, batch=rows)
        except Exception as e:  # noqa: BLE001 -- reported; the part's checks below still count
            ctx.check(MEASURE, "paper decode mor_expert_3, depth buckets x1.25", ERROR, note=short_error(e))
    setup = (f"{'toy shape' if ctx.tiny else '360M'}, {n_req} requests, no prefix, generation ~ N({mean:g}, {std:g}), "
             f"{str(dtype).split('.')[-1]}, greedy")
    for variant, (check, base, target) in PAPER_DECODE.items():
        if variant not in got or base not in got:
            ctx.check(SPEED, check, ERROR, target=f">= {target:g}x", note=f"needs the rows '{variant}' and '{base}'")
            continue
        ratio = got[variant][key] / got[base][key]
        ctx.speed(check, ratio, f"{ratio:.2f}x", f">= {target:g}x", ratio >= target,
                  f"{got[variant][key]:,.1f} vs {got[base][key]:,.1f} {unit} without KV writes "
                  f"({got[variant][honest] / got[base][honest]:.2f}x with them); {setup}")
    occ = got.get("mor_expert_3", {}).get("steady_occupancy")
    if occ is None:
        ctx.check(SPEED, DECODE_PAPER_NAMES[3], ERROR, target=f">= {OCCUPANCY_TARGET:g}", note="needs the row 'mor_expert_3'")
    else:
        ctx.speed(DECODE_PAPER_NAMES[3], occ, f"{occ:.3f}", f">= {OCCUPANCY_TARGET:g}", occ >= OCCUPANCY_TARGET,
                  "items per shared-block call / block batch, while requests were queued")
