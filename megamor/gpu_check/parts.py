"""The parts of the check, in run order, with their time limits and the checks each must write.

Pure Python (no torch): the parent process validates arguments and fills in the checks of a part
that was cut or crashed from these lists, without importing the models. The part functions
build their check names from the same helpers, and a test holds the two to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PARITY_VARIANTS = ("vanilla", "MoR expert", "MoR token")
SIZE_LABEL = {"135m": "135M", "360m": "360M", "1_7b": "1.7B"}
# size -> the training-speed rows it measures, in priority order
TRAIN_ROWS = {
    "135m": ("vanilla", "mor_expert", "mor_expert_off", "mor_token"),
    "360m": ("vanilla", "mor_expert", "mor_expert_off", "mor_token"),
    "1_7b": ("vanilla", "mor_expert", "mor_expert_off"),
}


def flash_names(on_gpu: bool) -> list[str]:
    return [f"flash-attn vs sdpa logits: {v}" for v in PARITY_VARIANTS[:2]]


def compile_names(on_gpu: bool) -> list[str]:
    return [f"compiled vs eager loss+grads: {v}" for v in PARITY_VARIANTS]


def docmask_names(on_gpu: bool) -> list[str]:
    """Issue 30.5 on a GPU: FlexAttention's compiled kernel, backward included, against the dense
    mask. A CPU has no FlexAttention backward: there one model's loss only."""
    if on_gpu:
        return [f"FlexAttention document mask vs dense, loss+grads: {v}" for v in PARITY_VARIANTS]
    return [f"FlexAttention document mask vs dense, loss (no CPU backward): {PARITY_VARIANTS[1]}"]


def engine_checks(on_gpu: bool) -> list[tuple[str, str, bool, str]]:
    """(variant, check name, static, schedule) of the engine part, in run order. The depth-wise
    schedule only for MoR (vanilla has no block: it runs lockstep's step). On a CPU the
    CUDA-graph checks are listed (and skipped) and the static steps run without graphs."""
    out = []
    for v in PARITY_VARIANTS:
        out.append((v, f"CUDA-graph static engine vs generate(): {v}", True, "lockstep"))
        if not on_gpu:
            out.append((v, f"static engine (no CUDA graph) vs generate(): {v}", True, "lockstep"))
        out.append((v, f"dynamic engine vs generate(): {v}", False, "lockstep"))
        if v != "vanilla":
            out.append((v, f"CUDA-graph depth-wise engine vs generate(): {v}", True, "depthwise"))
            if not on_gpu:
                out.append((v, f"depth-wise static engine (no CUDA graph) vs generate(): {v}", True, "depthwise"))
    return out


def engine_names(on_gpu: bool) -> list[str]:
    return [name for _, name, _, _ in engine_checks(on_gpu)]


BF16_STEPS = 30


def bf16_names(on_gpu: bool) -> list[str]:
    return [f"bf16 training loss finite and falling ({BF16_STEPS} steps)"]


def train_names(size: str) -> list[str]:
    s, rows = SIZE_LABEL[size], TRAIN_ROWS[size]
    names = [f"MFU {s} vanilla", f"MFU {s} MoR expert"]
    if "mor_expert_off" in rows:
        names.append(f"MoR realised FLOP saving {s}")
    if "mor_token" in rows:
        names.append(f"token / expert step time {s}")
    return names


DECODE_NAMES = ["decode engine vs HF dynamic-cache generate", "decode MoR expert-3 vs vanilla engine"]
# The paper's decoding protocol (issue 29): depth-wise MoR at the relative maximum batch against
# vanilla (MoR-4 against a vanilla of as many layers), and the shared block's occupancy.
DECODE_PAPER_NAMES = ["paper decode: depth-wise MoR expert-2 vs vanilla", "paper decode: depth-wise MoR expert-3 vs vanilla",
                      "paper decode: depth-wise MoR expert-4 vs vanilla of as many layers",
                      "paper decode: shared-block occupancy, depth-wise MoR expert-3"]


@dataclass(frozen=True)
class Part:
    name: str
    kind: str  # parity | speed
    target: str  # "module:function" (called with the Context), or "module:function:arg"
    names: Callable[[bool], list[str]]  # on_gpu -> the checks this part writes
    limit_gpu: float  # seconds, full form on a GPU
    limit_tiny: float  # seconds, --tiny (generous: CI machines are shared and slow)


def _train(size: str, limit: float) -> Part:
    return Part(f"train_{size}", "speed", f"megamor.gpu_check.speed:train:{size}", lambda g: train_names(size), limit, 150)


# The GPU limits add up to 530 s, inside the 9 minutes the whole run may take; a part may also
# use what earlier parts left unused (runner). Compiling is most of the parity and training
# parts' time (bf16 compiles the 135M graphs that train_135m then reuses).
PARTS = [
    Part("flash", "parity", "megamor.gpu_check.parity:flash", flash_names, 15, 60),
    Part("compile", "parity", "megamor.gpu_check.parity:compile_parity", compile_names, 85, 240),
    Part("engine", "parity", "megamor.gpu_check.parity:engine", engine_names, 45, 120),
    Part("docmask", "parity", "megamor.gpu_check.parity:docmask", docmask_names, 30, 120),
    Part("bf16", "parity", "megamor.gpu_check.parity:bf16_training", bf16_names, 55, 120),
    _train("135m", 55),
    _train("360m", 65),
    _train("1_7b", 75),
    Part("decode", "speed", "megamor.gpu_check.speed:decode", lambda g: list(DECODE_NAMES), 45, 150),
    Part("decode_paper", "speed", "megamor.gpu_check.speed:decode_paper", lambda g: list(DECODE_PAPER_NAMES), 60, 150),
]
BY_NAME = {p.name: p for p in PARTS}
