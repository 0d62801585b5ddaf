"""Routers that decide which tokens run each recursion step.

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
import torch.nn.functional as F
from torch import Tensor, nn

from megamor.model.config import ModelConfig, RouterConfig


def router_network(cfg: ModelConfig, out_dim: int) -> nn.Module:
    r = cfg.router
    if r.network == "linear":
        return nn.Linear(cfg.d_model, out_dim, bias=False)
    hidden = r.mlp_hidden or cfg.d_model // 4
    return nn.Sequential(nn.Linear(cfg.d_model, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_dim, bias=False))


def activation(r: RouterConfig, logits: Tensor) -> Tensor:
    """The gate's shape: sigmoid or tanh of the logit; with router.gate_straight_through its
    forward value is 1 (the gradient stays the activation's)."""
    act = torch.sigmoid(logits) if r.activation == "sigmoid" else torch.tanh(logits)
    if r.gate_straight_through:
        return act + (1.0 - act).detach()
    return act


def gate_activation(r: RouterConfig, logits: Tensor) -> Tensor:
    return r.gate_scale * activation(r, logits)


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
        # The causal rule's cut on the logit, and how many top-k boundaries it has averaged.
        self.register_buffer("threshold", torch.full((1,), logit(cfg.router.causal_threshold)))
        self.register_buffer("threshold_updates", torch.zeros(1))

    def gate(self, logits: Tensor) -> Tensor:
        """g = alpha * activation(logit), alpha fixed (router.alpha) or learned."""
        if self.scale is None:
            return gate_activation(self.cfg, logits)
        return self.scale(activation(self.cfg, logits))

    def forward(self, h: Tensor) -> Tensor:
        """Router logits [B, T] (fp32)."""
        return self.net(h).squeeze(-1).float()

    def select(self, logits: Tensor, candidates: Tensor, capacity: float, causal: bool, track: bool) -> Tensor:
        """Tokens [B, T] (bool) that run this step, chosen among `candidates`: top-k per row
        (training) or logit > threshold (causal). `track`: fold this top-k boundary into the
        learned threshold."""
        if capacity >= 1.0:
            return candidates
        if causal:
            return candidates & (logits > self.threshold)
        selected, boundary, has = expert_choice_top_k(logits, candidates, top_k_size(capacity, logits.shape[1]))
        if track and self.cfg.learn_threshold:
            self.track_boundary(boundary, has)
        return selected

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


def top_k_size(capacity: float, seq_len: int) -> int:
    """Tokens per sequence that expert choice keeps in training at this capacity."""
    return seq_len if capacity >= 1.0 else max(1, int(capacity * seq_len))


def expert_choice_top_k(logits: Tensor, candidates: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(selected [B, T] bool, boundary [B], has_boundary [B] bool): the top-k candidates of each
    row, and the logit midway between the k-th and the (k+1)-th candidate, where top-k cut the
    row (the k-th itself when nothing follows; none when a row has fewer than k candidates)."""
    masked = logits.masked_fill(~candidates, float("-inf"))
    vals, idx = masked.topk(min(k + 1, logits.shape[1]), dim=1)
    chosen = torch.zeros_like(candidates).scatter_(1, idx[:, :k], True)
    kth = vals[:, k - 1]
    nxt = vals[:, k] if vals.shape[1] > k else kth
    nxt = torch.where(torch.isfinite(nxt), nxt, kth)
    has = torch.isfinite(kth)
    boundary = torch.where(has, (kth + nxt) / 2, torch.zeros_like(kth))
    return chosen & candidates, boundary, has  # rows with fewer than k candidates keep all of them


def expert_choice_aux_losses(
    logits: Tensor, candidates: Tensor, selected: Tensor, smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(BCE towards the selection, z-loss), both means over candidate tokens (0 if none).
    Masked means rather than boolean indexing: no data-dependent shapes, no host sync. With
    smoothing eps the targets are eps / 1-eps: the BCE's minimum sits at |logit| =
    log((1-eps)/eps) instead of at infinity (see evals/results/router.md)."""
    w = candidates.float()
    n = w.sum().clamp(min=1.0)
    target = selected.float()
    if smoothing:
        target = target * (1.0 - 2.0 * smoothing) + smoothing
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=w, reduction="sum") / n
    return bce, (logits.pow(2) * w).sum() / n


class TokenChoiceRouter(Fp32Buffers):
    fp32_buffers = ("bias", "load")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_depths = cfg.num_recursions
        self.net = router_network(cfg, cfg.num_recursions)
        # Loss-free balancing: a bias used only for the depth choice, updated outside autograd.
        self.register_buffer("bias", torch.zeros(cfg.num_recursions))
        self.register_buffer("load", torch.zeros(cfg.num_recursions), persistent=False)

    def forward(self, h: Tensor, valid: Tensor, track_load: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(depth index [B, T] in 0..N_r-1, probabilities [B, T, N_r], logits [B, T, N_r])."""
        logits = self.net(h).float()
        probs = logits.softmax(-1)
        choice = (probs + self.bias).argmax(-1)
        if track_load:
            with torch.no_grad():
                self.load += depth_counts(choice, valid, self.num_depths).to(self.load.dtype)
        return choice, probs, logits

    @torch.no_grad()
    def update_bias(self, load: Tensor | None, rate: float) -> None:
        """b_i += u * sign(mean_load - load_i); `load` may be all-reduced over data parallel."""
        load = self.load if load is None else load.to(self.load)
        self.bias += rate * torch.sign(load.mean() - load)
        self.load.zero_()


def depth_counts(choice: Tensor, valid: Tensor, num_depths: int) -> Tensor:
    """Valid tokens [num_depths] that chose each depth (fixed shapes: no host sync, unlike
    boolean indexing or F.one_hot, which checks its input's range on the host)."""
    hits = choice.unsqueeze(-1) == torch.arange(num_depths, device=choice.device)
    return (hits & valid.unsqueeze(-1)).flatten(0, -2).sum(0)


def token_choice_aux_losses(choice: Tensor, probs: Tensor, logits: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(Switch-style balancing loss N * sum_i f_i P_i, router z-loss), over valid tokens."""
    n = probs.shape[-1]
    w = valid.float().unsqueeze(-1)
    count = w.sum().clamp(min=1.0)
    f = depth_counts(choice, valid, n).float() / count
    p_mean = (probs * w).flatten(0, -2).sum(0) / count
    balance = n * (f * p_mean).sum()
    z = (torch.logsumexp(logits, -1).pow(2) * w.squeeze(-1)).sum() / count
    return balance, z
