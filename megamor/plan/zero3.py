"""ZeRO-3's parameter traffic for one micro-batch, replayed as DeepSpeed's coordinator runs it.

DeepSpeed 0.19 (`deepspeed/runtime/zero/partitioned_param_coordinator.py`) gathers a module's
partitioned parameters in the module's pre-forward hook (again in its pre-backward hook, and in
the forward of an activation-checkpoint recompute) unless they are still gathered, and after
each use releases those that `__params_to_release` lets go: a parameter stays gathered when it is
used again within the next `stage3_max_reuse_distance` elements of parameters in the recorded
module trace (default 1e9; the trace spans one forward and backward, `reset_step`, so nothing
stays gathered from one micro-batch to the next). Parameters below
`stage3_param_persistence_threshold` elements (1e5) are never partitioned, hence never gathered.
The trainer registers the LM head's weight as an external parameter of the model itself
(`megamor/train/engine.py`), so the model's own hooks gather it first in each pass and hold it
while the pass runs (and the embedding, the same tensor when tied, with it).

For MoR this decides whether the shared block is gathered once per micro-batch or once per
recursion: consecutive applications of a physical layer are one block's parameters apart, so the
block is reused when it has fewer elements than the reuse distance (the 1.7B MoR-2's 738M-element
block is, under the default) and gathered again per recursion when not
(`deepspeed.config.zero_optimization.stage3_max_reuse_distance=0` is that switch). The same rule
decides how much of the end of the forward is still gathered when the backward starts.

Replayed at the granularity of modules with parameters (norms, projections, routers), in the
order `MoRLM.forward` calls them. Not replayed: the prefetcher's own retention (a parameter the
prefetch scan passes while it is gathered is kept to that use; the scan reaches at most
`stage3_prefetch_bucket_size` elements of not-gathered parameters ahead), and key/value
projections a shared-KV layer skips (counted as called). tests/plan/test_zero3.py holds the replay
equal to the elements a real ZeRO-3 engine (2 gloo ranks, prefetching off) gathers per
micro-batch, forward and backward, with the block reused, not reused and partly reused, with and
without checkpointing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from megamor.model.config import ModelConfig
from megamor.plan.memory import ZeroSettings, meta_model


@dataclass(frozen=True)
class Zero3Traffic:
    """Parameter elements one micro-batch gathers in the forward, in the checkpoint recompute
    (during the backward pass; DeepSpeed counts it as forward fetches) and in the backward, the
    first gathers of the forward (nothing runs before them to hide them), the elements whose
    gradients are reduce-scattered, and the most elements gathered at once."""

    forward_elements: float
    recompute_elements: float
    backward_elements: float
    first_elements: float
    reduced_elements: float
    peak_gathered_elements: float

    @property
    def gathered_elements(self) -> float:
        return self.forward_elements + self.recompute_elements + self.backward_elements


@dataclass(frozen=True)
class _Call:
    params: tuple[str, ...]
    backward: bool
    recompute: bool = False


def _module_params(cfg: ModelConfig) -> tuple[dict[str, tuple[str, ...]], dict[str, int], str | None]:
    """Parameter keys (one per distinct tensor) of every module with parameters of its own,
    their element counts, and the key of the LM head's weight."""
    model = meta_model(cfg)
    key_of: dict[int, str] = {}
    numel: dict[str, int] = {}
    modules: dict[str, tuple[str, ...]] = {}
    for mname, module in model.named_modules():
        keys = []
        for pname, p in module.named_parameters(recurse=False):
            k = key_of.setdefault(id(p), f"{mname}.{pname}")  # a tied weight keeps its first name
            numel[k] = p.numel()
            keys.append(k)
        if keys:
            modules[mname] = tuple(keys)
    head = key_of.get(id(model.lm_head.weight))
    return modules, numel, head


def _under(modules: dict[str, tuple[str, ...]], prefix: str) -> list[tuple[str, ...]]:
    return [keys for name, keys in modules.items() if name == prefix or name.startswith(prefix + ".")]


def _forward(cfg: ModelConfig, modules: dict[str, tuple[str, ...]]) -> Iterator[tuple[int | None, tuple[str, ...]]]:
    """(layer application index or None outside one, module parameters) in forward order."""
    prelude, steps, coda = cfg.layer_plan()
    app = 0
    yield None, modules.get("embed_tokens", ())
    for phys in prelude:
        for keys in _under(modules, f"layers.{phys}"):
            yield app, keys
        app += 1
    for r, layer_ids in enumerate(steps):
        rtype = cfg.router.type
        routers = f"routers.{r}" if rtype == "expert_choice" else "depth_router" if rtype == "token_choice" and r == 0 else None
        if routers:
            for keys in _under(modules, routers):
                yield None, keys
        for phys in layer_ids:
            for keys in _under(modules, f"layers.{phys}"):
                yield app, keys
            app += 1
    for phys in coda:
        for keys in _under(modules, f"layers.{phys}"):
            yield app, keys
        app += 1
    yield None, modules.get("norm", ())


def micro_batch_trace(cfg: ModelConfig, checkpointing: bool) -> list[_Call]:
    """Module calls of one forward and backward in the coordinator's order: the backward in
    reverse, and with checkpointing each layer application recomputed (forward order) right
    before its backward. torch's non-reentrant checkpoint stops the recompute once every tensor
    the backward needs is back: the application's last projection (down_proj, whose output
    nothing saves) is not run again (measured against DeepSpeed in tests/plan/test_zero3.py)."""
    modules, _numel, _head = _module_params(cfg)
    fwd = list(_forward(cfg, modules))
    calls = [_Call(keys, False) for _app, keys in fwd]
    i = len(fwd) - 1
    while i >= 0:
        app, keys = fwd[i]
        if app is None or not checkpointing:
            calls.append(_Call(keys, True))
            i -= 1
            continue
        j = i
        while j > 0 and fwd[j - 1][0] == app:
            j -= 1
        region = [k for _a, k in fwd[j : i + 1]]
        calls += [_Call(k, True, recompute=True) for k in region[:-1]]
        calls += [_Call(k, True) for k in reversed(region)]
        i = j - 1
    return calls


def zero3_traffic(cfg: ModelConfig, checkpointing: bool, zero: ZeroSettings | None = None) -> Zero3Traffic:
    """Replay one micro-batch's module trace under DeepSpeed's gather / release rule."""
    zero = zero or ZeroSettings()
    key = (repr(cfg), checkpointing, zero)
    cached = _CACHE.get(key)
    if cached is None:
        cached = _CACHE[key] = _replay(cfg, checkpointing, zero)
    return cached


_CACHE: dict[tuple[str, bool, ZeroSettings], Zero3Traffic] = {}


def _replay(cfg: ModelConfig, checkpointing: bool, zero: ZeroSettings) -> Zero3Traffic:
    _modules, numel, head = _module_params(cfg)
    partitioned = {k for k, n in numel.items() if n >= zero.persistence_threshold}
    trace = micro_batch_trace(cfg, checkpointing)
    n_fwd = sum(not c.backward for c in trace)
    # The model itself is a module of the trace, first in each pass, holding the LM head's
    # weight (an external parameter) while the pass runs; at the end of the forward its release
    # looks ahead from its own backward calls: one per output with a gradient (the loss, and the
    # routers' auxiliary loss), each a fetch of the trace.
    root = (head,) if head is not None else ()
    outputs = 2 if cfg.router.type != "none" else 1
    calls = [_Call(root, False), *trace[:n_fwd], *[_Call(root, True)] * outputs, *trace[n_fwd:]]
    root_bwd = n_fwd + 1
    call_numel = [sum(numel[k] for k in c.params) for c in calls]
    live: set[str] = set()
    held: set[str] = set()
    fwd = rec = bwd = first = 0.0
    peak = 0.0
    for i, call in enumerate(calls):
        if i == root_bwd:  # the model's post-forward release
            live -= {k for k in held if not _reused(k, calls, call_numel, i, zero.max_reuse_distance)}
        gathered = [k for k in call.params if k in partitioned and k not in live]
        n = sum(numel[k] for k in gathered)
        if call.recompute:
            rec += n
        elif call.backward:
            bwd += n
        else:
            fwd += n
        if i <= 1:  # the model's and the first module's gathers: nothing runs before them
            first += n
        live.update(gathered)
        peak = max(peak, sum(numel[k] for k in live))
        if i == 0 or root_bwd <= i < root_bwd + outputs:
            held = set(call.params) & live
            continue
        for k in call.params:
            if k in live and k not in held and not _reused(k, calls, call_numel, i + 1, zero.max_reuse_distance):
                live.discard(k)
    return Zero3Traffic(fwd, rec, bwd, first, float(sum(numel.values())), peak)


def _reused(key: str, calls: list[_Call], call_numel: list[int], start: int, distance: int) -> bool:
    """DeepSpeed's `__params_to_release` test: is `key` used again before `distance` elements
    of parameters have been traversed from `start`?"""
    traversed = 0
    for j in range(start, len(calls)):
        if traversed >= distance:
            return False
        if key in calls[j].params:
            return True
        traversed += call_numel[j]
    return False
