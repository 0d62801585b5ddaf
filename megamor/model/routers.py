"""Routers that decide which tokens run each recursion step.

Expert choice (one router per step): at step r every candidate token gets a score; training
keeps the top-k_r per sequence (k_r = max(1, int(c_r * T))), evaluation and decoding keep the
tokens whose sigmoid(logit) exceeds a threshold, which the auxiliary BCE loss trains the router
to reproduce, so a decision depends on the token's own hidden state only (causal).

Token choice (one router at the first shared step): each token picks its depth once, as the
argmax over N_r depths; causal by construction.
"""

from __future__ import annotations

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


def gate_activation(r: RouterConfig, logits: Tensor) -> Tensor:
    act = torch.sigmoid(logits) if r.activation == "sigmoid" else torch.tanh(logits)
    return r.gate_scale * act


class GateScale(nn.Module):
    """A learned gate scale (router.learn_alpha), shape [1]: 1-D, so no weight decay; a module
    of its own so that ZeRO-3 gathers it when called (DeepSpeed cannot broadcast 0-dim bf16)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))

    def forward(self, act: Tensor) -> Tensor:
        return self.alpha.float() * act


class ExpertChoiceRouter(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = router_network(cfg, 1)
        self.cfg = cfg.router
        self.scale = GateScale(cfg.router.gate_scale) if cfg.router.learn_alpha else None

    def gate(self, logits: Tensor) -> Tensor:
        """g = alpha * activation(logit), alpha fixed (router.alpha) or learned."""
        if self.scale is None:
            return gate_activation(self.cfg, logits)
        return self.scale(torch.sigmoid(logits) if self.cfg.activation == "sigmoid" else torch.tanh(logits))

    def forward(self, h: Tensor) -> Tensor:
        """Router logits [B, T] (fp32)."""
        return self.net(h).squeeze(-1).float()


def top_k_size(capacity: float, seq_len: int) -> int:
    """Tokens per sequence that expert choice keeps in training at this capacity."""
    return seq_len if capacity >= 1.0 else max(1, int(capacity * seq_len))


def expert_choice_select(
    logits: Tensor, candidates: Tensor, capacity: float, causal: bool, threshold: float
) -> Tensor:
    """Tokens [B, T] (bool) that run this step, chosen among `candidates`."""
    if capacity >= 1.0:
        return candidates
    if causal:
        return candidates & (torch.sigmoid(logits) > threshold)
    k = top_k_size(capacity, logits.shape[1])
    masked = logits.masked_fill(~candidates, float("-inf"))
    top = masked.topk(k, dim=1).indices
    chosen = torch.zeros_like(candidates).scatter_(1, top, True)
    return chosen & candidates  # rows with fewer than k candidates keep all of them


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


class TokenChoiceRouter(nn.Module):
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

    def _apply(self, fn, recurse: bool = True):
        # Keep the balancing bias and load counts in fp32 when the model is cast to bf16:
        # updates of +-0.001 vanish in bf16 once the bias reaches ~0.25.
        kept = {name: self._buffers[name] for name in ("bias", "load")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        return self

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
