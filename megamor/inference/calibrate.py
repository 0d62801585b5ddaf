"""Calibrate a model's routers so causal routing keeps each step's capacity share.

A randomly initialised (or briefly trained) router sends nearly every token one way under the
causal rule, which makes MoR's decoding look like a vanilla or a one-layer model. Benchmarks
therefore calibrate on sample tokens first:

- expert choice: router r gets an additive logit bias so that, among the tokens that ran step
  r-1, the share with sigmoid(logit) > causal_threshold is c_r / c_{r-1} (overall share c_r);
- token choice: the router's depth-choice bias (the loss-free balancing bias) is set so the
  share of tokens choosing depth >= r+1 is c_r.

Expert-choice calibration replaces each router's last linear map with one that has a bias, so
the calibrated model is for benchmarking; its state dict no longer matches the config.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from megamor.model.mor import MoRLM


def _last_linear(router_net: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    if isinstance(router_net, nn.Linear):
        raise TypeError("pass the router module, not its net")
    net = router_net.net
    if isinstance(net, nn.Linear):
        return router_net, "net", net
    return net, str(len(net) - 1), net[-1]


def _with_bias(router: nn.Module, bias: float) -> None:
    parent, name, lin = _last_linear(router)
    new = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight)
        new.bias.fill_(bias if lin.bias is None else float(lin.bias[0]) + bias)
    setattr(parent, name, new)


@torch.no_grad()
def calibrate_routers(model: MoRLM, tokens: Tensor, capacities: Optional[list[float]] = None) -> list[float]:
    """Calibrate in place on tokens [B, T]; returns the share of tokens that runs each step
    afterwards (measured with causal routing on the same tokens)."""
    cfg = model.cfg
    caps = capacities or cfg.capacities
    was_training = model.training
    model.eval()
    try:
        if model.routers is not None:
            thr_logit = math.log(cfg.router.causal_threshold / (1 - cfg.router.causal_threshold))
            for r, router in enumerate(model.routers):
                if caps[r] >= 1.0:
                    continue
                seen: list[Tensor] = []
                handle = router.register_forward_hook(lambda m, i, o: seen.append(o))
                depth = model(tokens, causal_routing=True).stats.depth
                handle.remove()
                candidates = depth >= r  # a token reached step r's router iff it ran step r-1
                prev = caps[r - 1] if r > 0 else 1.0
                share = min(1.0, caps[r] / prev)
                logits = seen[0][candidates].float()
                cut = torch.quantile(logits, 1.0 - share).item() if logits.numel() else 0.0
                _with_bias(router, thr_logit - cut)
        elif model.depth_router is not None:
            seen = []
            handle = model.depth_router.net.register_forward_hook(lambda m, i, o: seen.append(o))
            model(tokens, causal_routing=True)
            handle.remove()
            probs = seen[0].float().softmax(-1).reshape(-1, cfg.num_recursions)
            target = torch.tensor([caps[k] - (caps[k + 1] if k + 1 < len(caps) else 0.0) for k in range(len(caps))])
            bias = torch.zeros(cfg.num_recursions)
            step = 0.1
            for _ in range(400):  # sign updates with a shrinking step (loss-free balancing's rule)
                got = torch.bincount((probs + bias).argmax(-1), minlength=cfg.num_recursions).float() / probs.shape[0]
                bias += step * torch.sign(target - got)
                step *= 0.985
            model.depth_router.bias.copy_(bias.to(model.depth_router.bias))
        stats = model(tokens, causal_routing=True).stats
        return [n / max(1, stats.total_tokens) for n in stats.tokens_per_step]
    finally:
        model.train(was_training)
