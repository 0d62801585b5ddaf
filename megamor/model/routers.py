"""The router modules: their parameters and running state. The rule that uses them (who
runs each recursion step, with what gate, and the losses) is `megamor.model.routing`.

Expert choice (one router per step): at step r every candidate token gets a score; training
keeps the top-k_r per sequence (k_r = max(1, int(c_r * T))), evaluation and decoding keep the
tokens whose logit exceeds the router's threshold, so a decision depends on the token's own
hidden state only (causal). The auxiliary BCE trains the logits to separate the top-k tokens;
the threshold is either fixed (logit(causal_threshold); the paper's sigmoid > 0.5) or, with
router.learn_threshold, a running average of where training's top-k cut each sequence, so the
causal rule keeps about what top-k keeps even when the logits drift off 0 (the fixed cut then
misses tokens: evals/results/study_small_cpu/findings.md). The threshold is a buffer, outside
autograd: it cannot change training.

Token choice (one router at the first shared step): each token picks its depth once, as the
argmax over N_r depths; causal by construction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megamor.model.config import ModelConfig
from megamor.model.routing import (  # noqa: F401  (names this module has always offered)
    Fp32Linear,
    RoutingSettings,
    depth_counts,
    expert_choice_aux_losses,
    expert_choice_top_k,
    token_choice_aux_losses,
    top_k_size,
)


def routing_settings(cfg: ModelConfig) -> RoutingSettings:
    """The routing policy's settings from a model config (also what an export ships)."""
    r = cfg.router
    return RoutingSettings(
        type=r.type,
        capacities=list(cfg.capacities),
        gate_scale=r.gate_scale,
        activation=r.activation,
        straight_through=r.gate_straight_through,
        bce_coef=r.aux_bce_coef,
        z_coef=r.z_loss_coef,
        balance_coef=r.balance_coef if r.balancing == "loss" else 0.0,
        bce_smoothing=r.bce_label_smoothing,
        bce_full_capacity_steps=r.bce_full_capacity_steps,
        learn_threshold=r.learn_threshold,
        loss_free=r.balancing == "loss_free",
        token_update=r.token_choice_update,
        expert_update=r.expert_choice_update,
        weighted=r.gating == "weighted",
        temperature=r.temperature,
        token_func=r.token_func,
        cap_warmup_steps=r.cap_warmup_step,
        bal_warmup_steps=r.bal_warmup_step,
        bce_reduction=r.bce_reduction,
        aux_router=r.aux_router,
        rand_router=r.rand_router,
        entropy_coef=r.entropy_coef,
        target_depth=r.target_depth if r.target_depth is not None else 0.0,
        target_depth_coef=r.target_depth_coef,
    )


def router_network(cfg: ModelConfig, out_dim: int) -> nn.Module:
    r = cfg.router
    if r.network == "linear":
        return Fp32Linear(cfg.d_model, out_dim, bias=False)
    hidden = r.mlp_hidden or cfg.d_model // 4
    return nn.Sequential(Fp32Linear(cfg.d_model, hidden, bias=False), nn.GELU(), Fp32Linear(hidden, out_dim, bias=False))


class GateScale(nn.Module):
    """A learned gate scale (router.learn_alpha), shape [1]: 1-D, so no weight decay; a module
    of its own so that ZeRO-3 gathers it when called (DeepSpeed cannot broadcast 0-dim bf16)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))

    def forward(self, act: Tensor) -> Tensor:
        return self.alpha.float() * act


class Fp32Buffers(nn.Module):
    """Keeps the buffers named in `fp32_buffers` in fp32 when the model is cast (bf16): running
    statistics updated in small steps (+-0.001 balancing bias, an EMA) stall in bf16."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        kept = {name: self._buffers[name] for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        return self


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class ExpertChoiceRouter(Fp32Buffers):
    fp32_buffers = ("threshold", "threshold_updates")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = router_network(cfg, 1)
        self.cfg = cfg.router
        self.scale = GateScale(cfg.router.gate_scale) if cfg.router.learn_alpha else None
        # router.aux_router: the causal rule's own router, trained on detached inputs (routing.py).
        self.aux = router_network(cfg, 1) if cfg.router.aux_router else None
        # The causal rule's cut on the logit, and how many top-k boundaries it has averaged.
        self.register_buffer("threshold", torch.full((1,), logit(cfg.router.causal_threshold)))
        self.register_buffer("threshold_updates", torch.zeros(1))

    def forward(self, h: Tensor) -> Tensor:
        """Router logits [B, T] (fp32)."""
        return self.net(h).squeeze(-1).float()

    @torch.no_grad()
    def track_boundary(self, boundary: Tensor, has: Tensor) -> None:
        """threshold <- mean boundary of the rows that have one: a plain running mean over the
        first 1 / (1 - momentum) updates (no lingering start value), an EMA after. Device
        tensors only: no host sync."""
        w = has.float()
        n = w.sum()
        mean = (boundary.float().nan_to_num(0.0, 0.0, 0.0) * w).sum() / n.clamp(min=1.0)
        found = (n > 0).float()
        rate = torch.clamp(1.0 / (self.threshold_updates + 1.0), min=1.0 - self.cfg.threshold_momentum) * found
        self.threshold += rate * (mean - self.threshold)
        self.threshold_updates += found

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints from before the learned threshold: their causal rule was the fixed cut.
        for name in self.fp32_buffers:
            state_dict.setdefault(prefix + name, self._buffers[name].detach().clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class TokenChoiceRouter(Fp32Buffers):
    fp32_buffers = ("bias", "load")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_depths = cfg.num_recursions
        self.net = router_network(cfg, cfg.num_recursions)
        # Loss-free balancing: a bias used only for the depth choice, updated outside autograd.
        self.register_buffer("bias", torch.zeros(cfg.num_recursions))
        self.register_buffer("load", torch.zeros(cfg.num_recursions), persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        """Router logits [B, T, N_r] (fp32); the depth choice is the routing policy's."""
        return self.net(h).float()

    @torch.no_grad()
    def track_load(self, choice: Tensor, valid: Tensor) -> None:
        """Count the depths chosen since the last bias update (loss-free balancing)."""
        self.load += depth_counts(choice, valid, self.num_depths).to(self.load.dtype)

    @torch.no_grad()
    def update_bias(self, load: Tensor | None, rate: float) -> None:
        """b_i += u * sign(mean_load - load_i); `load` may be all-reduced over data parallel."""
        load = self.load if load is None else load.to(self.load)
        self.bias += rate * torch.sign(load.mean() - load)
        self.load.zero_()
