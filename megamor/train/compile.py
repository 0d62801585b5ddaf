"""torch.compile applied from outside the model, one layer at a time (as torchtitan compiles
each transformer block).

Every physical layer (`model.layers[i]`, a Block) is compiled in place with `Module.compile`:
state-dict keys do not change (checkpoints and exports are unaffected); DeepSpeed's ZeRO-3
parameter hooks, which DeepSpeed marks `torch.compiler.disable`, stay outside the compiled
code; activation checkpointing wraps the layer call, so the recompute runs the compiled layer
again; a layer shared by several recursion steps is one module and compiles once per input
shape. Routing, gathering and the loss stay eager: they hold no data-dependent host reads in
training (`megamor.model.mor`), so the compiled layers are fed without waiting for the device.

Tensor and sequence parallelism: their collectives are functional c10d ops inside autograd
Functions and module hooks (`megamor.parallel.collectives`), which dynamo traces into the
layer's graph (no graph break), so a TP(+SP) layer compiles whole, gradients included; `auto`
compiles TP runs on CUDA as any other (tested equal to eager on CPU gloo, tests/train/test_compile.py).

Composes with ZeRO 0-3 and with activation checkpointing, but not with both ZeRO-3 and
checkpointing at once (tested on CPU: dynamo traces ZeRO-3's release hook inside the recompute
and fails), so `auto` leaves that combination eager.

Shapes, hence compile counts. A layer sees [B, n, D] with n = the sequence length for
unrouted layers, and for recursion steps:
  - expert choice in training: n = k_r = max(1, int(c_r * T)), fixed by the config: exactly
    one shape per distinct capacity;
  - token choice, and expert choice with causal routing (evaluation): n = the largest row's
    count rounded up to a multiple of ceil(T / 32) (`mor.bucket_length`): at most 32 lengths
    per sequence length T.
torch.compile's default dynamic-shape policy compiles the first shape statically and, at the
first different n, recompiles once with n symbolic; so a layer compiles at most twice per
(sequence length class, train/eval, grad mode), whatever the routing. The recompile limit is
raised to 64 as a safety margin for the worst case of one static graph per bucket.
"""

from __future__ import annotations

import torch
from torch import nn

RECOMPILE_LIMIT = 64


def compile_wanted(setting: str, device: torch.device, zero_stage: int = 0, checkpointing: bool = False) -> bool:
    """`trainer.compile`: auto = on for CUDA, off elsewhere (inductor on CPU compiles slowly
    and gains little for small models) and off for ZeRO-3 with activation checkpointing
    (dynamo then traces into ZeRO-3's parameter-release hook and fails; the config check
    refuses `true` there); true / false force it."""
    if setting == "auto":
        return device.type == "cuda" and not (zero_stage == 3 and checkpointing)
    return setting == "true"


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):  # torch >= 2.7 / older name
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), limit))


def compile_layers(model: nn.Module, **compile_kwargs) -> int:
    """Compile every layer of `model.layers` in place; returns how many were compiled."""
    raise_recompile_limit()
    layers = model.layers
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)
