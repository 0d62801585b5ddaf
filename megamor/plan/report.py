"""The planner's answer as text (and the JSON document the CLI prints with --json)."""

from __future__ import annotations

from typing import Any

from megamor.plan.hardware import GPU, GiB

# megamor.plan.layouts._tie_key's order in words (here: layouts imports torch), as the --help and
# docs/observability.md say it.
TIE_ORDER = "less traffic, then the larger micro-batch (up to 16k tokens), then less memory"


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def _tokens(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def document(name: str, world: int, gpu: GPU, mfu: float, headroom: float, plan: dict[str, Any],
             layouts: list[dict[str, Any]], overlap: float) -> dict[str, Any]:
    return {
        "config": name, "world": world, "mfu_assumed": mfu, "overlap_assumed": overlap, "headroom": headroom,
        "gpu": {"name": gpu.name, "memory_gib": gpu.memory_gib, "bf16_tflops": gpu.bf16_tflops,
                "fp32_tflops": gpu.fp32_tflops},
        **plan,
        "layouts": layouts,
    }


def render(doc: dict[str, Any], seq_len: int, global_batch: int, params_desc: str, top: int) -> str:
    gpu, pr, sp, lay = doc["gpu"], doc["per_rank"], doc["speed"], doc["layout"]
    parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(pr["activation_parts"].items(), key=lambda kv: -kv[1])
                      if v >= 0.005 * GiB)
    sp_tag = "+SP" if lay["sequence_parallel"] else ""
    lines = [
        (f"megamor.plan: {doc['config']} on {doc['world']} x {gpu['name']} ({gpu['memory_gib']:g} GiB, "
        f"{gpu['bf16_tflops']:g} TFLOP/s bf16), MFU assumed {doc['mfu_assumed']:.0%}, "
        f"overlap assumed {doc['overlap_assumed']:.0%} (speeds: a model until a GPU run measures them)"),
        f"model: {params_desc}; sequences of {seq_len} tokens, global batch {global_batch}",
        (f"layout: TP {lay['tp']}{sp_tag} x DP {lay['dp']}, ZeRO-{lay['zero_stage']}, micro-batch {lay['micro_batch']} "
        f"x {lay['accumulation']} accumulation, checkpointing {'on' if lay['checkpointing'] else 'off'}"),
        "per rank:",
        f"  parameters   {_gib(pr['params_bytes'])}   ({_tokens(pr['params_on_rank'])} on this rank)",
        f"  gradients    {_gib(pr['grads_bytes'])}",
        f"  optimizer    {_gib(pr['optimizer_bytes'])}",
        f"  buffers      {_gib(pr['buffers_bytes'])}   (ZeRO-3 gradient bucket)",
        f"  gathered     {_gib(pr['gathered_bytes'])}   (ZeRO-3 parameters gathered at once, with a prefetch bucket)",
        f"  activations  {_gib(pr['activation_bytes'])}   (saved for backward; GiB: {parts or '-'})",
        f"  recompute    {_gib(pr['recompute_bytes'])}   (one layer application, with checkpointing)",
        (f"  total        {_gib(pr['total_bytes'])}   of {doc['usable_bytes'] / GiB:.1f} GiB usable "
        f"({gpu['memory_gib']:g} GiB less {doc['headroom']:.0%} headroom): {'fits' if doc['fits'] else 'DOES NOT FIT'}"),
        (f"decode KV cache: {doc['kv_cache']['bytes_per_rank'] / GiB:.2f} GiB per rank "
        f"(batch {doc['kv_cache']['batch']} x {doc['kv_cache']['seq_len']} tokens, bf16, expected routed depths)"),
        (f"speed at MFU {doc['mfu_assumed']:.0%}: {sp['step_s']:.3f} s per step "
        f"(compute {sp['compute_s']:.3f} s + exposed communication {sp['exposed_communication_s']:.3f} s of "
        f"{sp['communication_s']:.3f} s), {_tokens(sp['tokens_per_day'])} tokens/day, effective MFU {sp['effective_mfu']:.0%}"),
        (f"traffic per step per rank: data parallel {sp['dp_traffic_bytes'] / GiB:.2f} GiB (parameter all-gathers "
        f"{sp['dp_gather_bytes'] / GiB:.2f}, gradient reductions {sp['dp_reduce_bytes'] / GiB:.2f}), "
        f"tensor parallel {sp['tp_traffic_bytes'] / GiB:.2f} GiB"),
    ]
    layouts = doc["layouts"]
    if not layouts:
        lines.append(f"no layout of {doc['world']} GPUs fits: more GPUs, a larger GPU or a smaller micro-batch / sequence")
    else:
        lines.append(f"layouts that fit ({len(layouts)}), best predicted first (within 1%: {TIE_ORDER}):")
        lines.append(f"  {'#':>2} {'tokens/day':>10} {'step s':>8} {'traffic GiB':>11} {'GiB/rank':>8}  layout")
        for i, p in enumerate(layouts[:top], 1):
            lp = p["layout"]
            desc = (f"TP {lp['tp']}{'+SP' if lp['sequence_parallel'] else ''} x DP {lp['dp']}, ZeRO-{lp['zero_stage']}, "
                    f"micro {lp['micro_batch']}, ckpt {'on' if lp['checkpointing'] else 'off'}")
            traffic = (p['speed']['dp_traffic_bytes'] + p['speed']['tp_traffic_bytes']) / GiB
            lines.append(f"  {i:>2} {_tokens(p['speed']['tokens_per_day']):>10} {p['speed']['step_s']:>8.3f} "
                         f"{traffic:>11.2f} {p['per_rank']['total_bytes'] / GiB:>8.2f}  {desc}")
    return "\n".join(lines)
