"""Calibrate a model's routers so causal routing keeps each step's capacity share.

A randomly initialised (or briefly trained) router sends nearly every token one way under the
causal rule, which makes MoR's decoding look like a vanilla or a one-layer model. Benchmarks
therefore calibrate on sample tokens first:

- expert choice: router r's causal threshold (its `threshold` buffer, a logit) is set so that,
  among the tokens that ran step r-1, the share with logit > threshold is c_r / c_{r-1}
  (overall share c_r);
- token choice: the router's depth-choice bias (the loss-free balancing bias) is set so the
  share of tokens choosing depth >= r+1 is c_r.

`calibrate_routers` calibrates on whole sequences (a forward pass); `calibrate_decoding` on
what the routers see while the engine decodes (generated tokens differ from sample text, and a
random model's greedy continuations differ most), a few rounds so each step's candidates
reflect the earlier steps' calibration.

Calibration changes only buffers (thresholds, the depth-choice bias): the state dict keeps its
keys, and a trained model's own thresholds are overwritten (benchmarking only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megamor.inference.engine import Engine
from megamor.model.mor import MoRLM


@torch.no_grad()
def calibrate_routers(model: MoRLM, tokens: Tensor, capacities: list[float] | None = None) -> list[float]:
    """Calibrate in place on tokens [B, T]; returns the share of tokens that runs each step
    afterwards (measured with causal routing on the same tokens)."""
    cfg = model.cfg
    caps = capacities or cfg.capacities
    was_training = model.training
    model.eval()
    try:
        if model.routers is not None:
            for r, router in enumerate(model.routers):
                if caps[r] >= 1.0:
                    continue
                seen: list[Tensor] = []
                handle = router.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
                depth = model(tokens, causal_routing=True).stats.depth
                handle.remove()
                candidates = depth >= r  # a token reached step r's router iff it ran step r-1
                prev = caps[r - 1] if r > 0 else 1.0
                share = min(1.0, caps[r] / prev)
                logits = seen[0][candidates].float()
                if logits.numel():
                    router.threshold.fill_(torch.quantile(logits, 1.0 - share).item())
        elif model.depth_router is not None:
            seen = []
            handle = model.depth_router.net.register_forward_hook(lambda m, i, o: seen.append(o))
            model(tokens, causal_routing=True)
            handle.remove()
            probs = seen[0].float().softmax(-1).reshape(-1, cfg.num_recursions)
            model.depth_router.bias.copy_(_token_choice_bias(probs, caps).to(model.depth_router.bias))
        stats = model(tokens, causal_routing=True).stats
        return [n / max(1, stats.total_tokens) for n in stats.tokens_per_step]
    finally:
        model.train(was_training)


def _token_choice_bias(probs: Tensor, caps: list[float]) -> Tensor:
    """The depth-choice bias that gives share caps[k] of tokens depth >= k+1 (sign updates
    with a shrinking step, loss-free balancing's rule)."""
    n = probs.shape[-1]
    target = torch.tensor([caps[k] - (caps[k + 1] if k + 1 < n else 0.0) for k in range(n)])
    bias, step = torch.zeros(n), 0.1
    for _ in range(400):
        got = torch.bincount((probs + bias).argmax(-1), minlength=n).float() / probs.shape[0]
        bias += step * torch.sign(target - got)
        step *= 0.985
    return bias


@torch.no_grad()
def calibrate_decoding(model: MoRLM, prompts: list[list[int]], new_tokens: int, rounds: int = 3,
                       capacities: list[float] | None = None) -> list[float]:
    """Calibrate in place on the engine's decoding of `prompts`; returns the share of decoded
    tokens that ran each step in a final run."""
    cfg = model.cfg
    caps = capacities or cfg.capacities

    def decode(hook_target: nn.Module | None = None, seen: list | None = None) -> list[float]:
        handles = []
        if hook_target is not None:
            modules = hook_target if isinstance(hook_target, nn.ModuleList) else [hook_target]
            for i, mod in enumerate(modules):
                def hook(m, inp, out, i=i):
                    if out.dim() >= 2 and out.shape[1] == 1:  # decoding steps (one token per row), not prefill
                        seen[i].append(out.detach().float().reshape(out.shape[0], -1))
                handles.append(mod.register_forward_hook(hook))
        try:
            eng = Engine(model, max_batch=len(prompts), max_len=max(map(len, prompts)) + new_tokens)
            for p in prompts:
                eng.submit(p, new_tokens)
            eng.run()
        finally:
            for h in handles:
                h.remove()
        fed = max(1, len(prompts) * new_tokens)  # decoding feeds each prompt's last token, then new ones but the last
        return [n / fed for n in eng.tokens_per_step_total.tolist()]

    if model.routers is not None:
        for _ in range(rounds):
            seen: list[list[Tensor]] = [[] for _ in model.routers]
            decode(model.routers, seen)
            for r, router in enumerate(model.routers):
                if caps[r] >= 1.0 or not seen[r]:
                    continue
                logits = torch.cat(seen[r]).flatten()
                share = min(1.0, caps[r] / (caps[r - 1] if r > 0 else 1.0))
                router.threshold.fill_(torch.quantile(logits, 1.0 - share).item())
    elif model.depth_router is not None:
        for _ in range(rounds):
            seen = [[]]
            decode(model.depth_router.net, seen)
            probs = torch.cat(seen[0]).softmax(-1)
            model.depth_router.bias.copy_(_token_choice_bias(probs, caps).to(model.depth_router.bias))
    return decode()
