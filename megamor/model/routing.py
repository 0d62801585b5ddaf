"""The MoR routing policy: which tokens run recursion step r, and with what gate.

This module is the one place the routing rule lives. `MoRLM.forward` (training and
evaluation), both decoding steps (`megamor.inference.step`, `megamor.inference.graph_step`)
and the exported Hugging Face model (`modeling_megamor.py`, which ships this file beside it)
all route through `RoutingPolicy`. It imports only torch, so it also runs as a standalone
remote-code file; change a routing rule here and every path follows.

Modes:
  TOPK    training's rule (expert choice: the top-k_r tokens of each sequence at step r); in
          training it also returns the auxiliary losses and router health statistics and
          updates the routers' running state (learned threshold, loss-free balancing load).
  CAUSAL  evaluation and decoding: a token's decision depends on its own hidden state only
          (expert choice: router logit > the router's `threshold`).
Token choice is causal in both modes: each token picks its depth once, at the first step.

The gate scales a selected token's residual update, h <- h + g * (step(h) - h); expert choice's
`expert_update: paper` is the paper's Eq. 1 instead (its official code's too), h <- h + g *
step(h): step(h) includes the block's own residual, so the stream itself grows by (1 + g).
`gate_fn` computes the gate (replace it to try another gate: every path uses the policy's). Token choice's
`token_update: paper` is the paper's Eq. 2 as its official code runs it: the steps before a
token's chosen depth are ungated (h <- step(h)), and at its chosen depth i its output is
H^1 + g * step(h), H^1 the first recursion's input. `RoutingPolicy.update` applies the rule:
every path gathers the step's tensors the same way and calls it.

The official code's other router knobs (RoutingSettings below; RouterConfig documents each)
live here too: capacity and balancing warmups (they read `RoutingPolicy.train_step`, which the
trainer sets every optimizer step), router temperature, router functions, unweighted gating,
the random router (`position_uniform`: the same draw on every path) and the auxiliary router.

Regularisers (training only, off by default): `entropy_coef` subtracts entropy_coef times the
routing entropy from the loss (expert choice: the Bernoulli entropy of each step's gate
probability, `gate_entropy`; token choice: the entropy of the depth distribution,
`depth_entropy`); token choice's `target_depth_coef` adds (mean expected depth -
target_depth)^2 (`expected_depth`). Temperature acts through the router's input, so both see
the temperature-scaled logits the routing uses.

Routers are modules owned by the model (their layers are `Fp32Linear`, defined here so the
exported model shares them), used through a small interface:
  expert choice (`model.routers[r]`): `router(h)` -> logits [..., T] fp32; `router.threshold`;
    `router.aux` (None, or the auxiliary router's network: h -> [..., T, 1]);
    `router.scale` (None, or a module alpha * activation for a learned alpha); in training
    `router.track_boundary(boundary, has)`.
  token choice (`model.depth_router`): `router(h)` -> logits [..., T, N_r] fp32; `router.bias`;
    in training with loss-free balancing `router.track_load(choice, valid)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TOPK = "topk"
CAUSAL = "causal"
EXPERT, TOKEN = "expert_choice", "token_choice"
HEALTH_PREFIX = "router_health"
SATURATION_EPS = 1e-3
GATED_RESIDUAL, PAPER = "gated_residual", "paper"  # token choice's update rules


@dataclass
class RoutingSettings:
    """What the rule needs from the model config, as plain values (an export's config.json
    carries them as `routing`). capacities: expert choice's kept fraction per step;
    gate_scale: alpha (a learned alpha lives in the router instead)."""

    type: str = "none"  # none | expert_choice | token_choice
    capacities: list[float] = field(default_factory=list)
    gate_scale: float = 1.0
    activation: str = "sigmoid"  # sigmoid | tanh
    straight_through: bool = False
    bce_coef: float = 0.0
    z_coef: float = 0.0
    balance_coef: float = 0.0  # token choice's balancing loss (0 under loss-free balancing)
    bce_smoothing: float = 0.0
    bce_full_capacity_steps: bool = True
    learn_threshold: bool = False
    loss_free: bool = False
    token_update: str = GATED_RESIDUAL  # token choice: gated_residual | paper (Eq. 2)
    expert_update: str = GATED_RESIDUAL  # expert choice: gated_residual | paper (Eq. 1)
    # The official code's router knobs (megamor/model/config.py RouterConfig says what each does).
    weighted: bool = True  # gating: False = the gate is 1 (no router weight)
    temperature: float = 1.0  # the router sees h / temperature
    token_func: str = "softmax"  # token choice's depth probabilities: softmax | sigmoid
    cap_warmup_steps: int = 0  # expert choice: capacity from 1 to its target on a cosine
    bal_warmup_steps: int = 0  # token choice: every token at full depth before this step
    bce_reduction: str = "mean"  # the expert-choice BCE over recursion steps: mean | sum
    aux_router: bool = False  # expert choice: causal routing by a separate router (`router.aux`)
    rand_router: bool = False  # random routing baseline: scores from `position_uniform`, no router
    # Regularisers (training only; RouterConfig documents each): loss - entropy_coef * the
    # routing entropy; token choice: + target_depth_coef * (expected depth - target_depth)^2.
    entropy_coef: float = 0.0
    target_depth: float = 0.0  # in recursion steps, 1..N_r; used when target_depth_coef > 0
    target_depth_coef: float = 0.0


# -- the rule's pieces (pure functions) ----------------------------------------------------
def top_k_size(capacity: float, seq_len: int) -> int:
    """Tokens per sequence that expert choice keeps in training at this capacity."""
    return seq_len if capacity >= 1.0 else max(1, int(capacity * seq_len))


def activation(s: RoutingSettings, logits: Tensor) -> Tensor:
    """The gate's shape: sigmoid or tanh of the logit; straight-through: forward value 1
    (the gradient stays the activation's)."""
    if s.activation == "none":
        act = logits
    else:
        act = torch.sigmoid(logits) if s.activation == "sigmoid" else torch.tanh(logits)
    if s.straight_through:
        return act + (1.0 - act).detach()
    return act


def standard_gate(s: RoutingSettings, kind: str, x: Tensor, scale: Any) -> Tensor:
    """The gate of a selected token. Expert choice: x = router logits, g = alpha *
    activation(x); token choice: x = the chosen depth's probability, g = alpha * x. scale is
    alpha: a float, or a module (learned alpha) called on the activation. Unweighted gating
    (the official `gating`): g = 1. Activation none: g = the raw logit (no alpha), as the
    official code's `router_func: null`."""
    if not s.weighted:
        return torch.ones_like(x)
    if kind == TOKEN:
        return scale * x
    act = activation(s, x)
    if s.activation == "none":
        return act
    return scale(act) if callable(scale) else scale * act


GateFn = Callable[[RoutingSettings, str, Tensor, Any], Tensor]


def update(x: Tensor, y: Tensor, gate: Tensor | None, exits: Tensor | None = None,
           base: Tensor | None = None, gate_residual: bool = True) -> Tensor:
    """The new hidden state of the tokens that ran a step: x [..., n, D] their input, y the
    step's output, gate [..., n] (None: ungated, y). gate_residual: x + gate * (y - x), the
    gate scales the step's residual update; otherwise the paper's Eq. 1, x + gate * y (y holds
    the block's own residual). exits/base (token choice's paper rule): the tokens whose chosen
    depth this is leave with base + gate * y (base = H^1, the first recursion's input); the
    others continue with y, ungated."""
    if gate is None:
        return y
    g = gate.unsqueeze(-1).to(x.dtype)
    if exits is None:
        return x + g * (y - x) if gate_residual else x + g * y
    return torch.where(exits.unsqueeze(-1), base + g * y, y)


class _Fp32Matmul(torch.autograd.Function):
    """x @ w.T in fp32 that saves x and w as they are (a bf16 input is not kept again as an fp32
    copy: the activations the planner counts stay what they were)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), w.float())

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            gx = (g.float() @ w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
            gw = (g.reshape(-1, g.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype) \
                if ctx.needs_input_grad[1] else None
        return gx, gw


class Fp32Linear(nn.Linear):
    """A router layer (no bias; megamor's routers and the exported model's) computed in fp32 whatever the model's dtype (bf16 weights,
    autocast): bf16 logits carry 8 bits of mantissa, and top-k boundaries tie (half of 2,048
    logits were distinct at 360M width in bf16; 39% of rows tied at the capacity-1/3 boundary)."""

    def forward(self, x: Tensor) -> Tensor:
        return _Fp32Matmul.apply(x, self.weight)


_M31 = 0x7FFFFFFF


def position_uniform(key: Tensor, *salt: int) -> Tensor:
    """A deterministic uniform in [0, 1) per element of the integer tensor `key` (a token's
    position, with its row and the step in training) and the ints `salt`: an integer hash in
    31-bit arithmetic (products stay below 2**62: exact in int64 on every device), so every
    path that sees the same position draws the same number (the random router's scores)."""
    x = key.long() & _M31
    for v in (*salt, 0x5BD1E995):
        x = ((x ^ (int(v) & _M31)) * 0x2C1B3C6D) & _M31
        x = x ^ (x >> 15)
        x = (x * 0x297A2D39) & _M31
        x = x ^ (x >> 12)
    return x.to(torch.float32) / float(_M31 + 1)


def warm_capacity(capacity: float, step: int, warmup: int) -> float:
    """Expert choice's training capacity at optimizer step `step` (1-based) under capacity
    warmup: from 1.0 down to `capacity` on a half cosine over the first `warmup` steps (the
    official `cap_warmup_step`, counted there in forward calls: the same at accumulation 1)."""
    if warmup <= 0:
        return capacity
    decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / warmup)))
    return capacity + (1.0 - capacity) * decay


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


def gate_entropy(s: RoutingSettings, logits: Tensor) -> Tensor:
    """Expert choice's per-token Bernoulli entropy (nats) of the gate probability p: sigmoid of
    the logit (activation sigmoid, and none, whose logit the BCE and the causal rule read as a
    sigmoid logit too); tanh's gate in (-1, 1) read as p = (1 + tanh(x)) / 2 = sigmoid(2x).
    H = -p log p - (1-p) log(1-p) = softplus(x) - p x: finite for every logit."""
    x = logits.float()
    if s.activation == "tanh":
        x = 2.0 * x
    return F.softplus(x) - torch.sigmoid(x) * x


def depth_distribution(logits: Tensor) -> Tensor:
    """Token choice's depth distribution [..., N_r] for the regularisers: softmax over the depth
    logits (also under `token_func: sigmoid`, whose argmax over the logits is the same depth)."""
    return logits.float().softmax(-1)


def depth_entropy(logits: Tensor) -> Tensor:
    """Token choice's per-token entropy (nats) of the depth distribution."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def expected_depth(logits: Tensor) -> Tensor:
    """Token choice's per-token expected depth in recursion steps (1..N_r) under the depth
    distribution: differentiable, unlike the chosen (argmax) depth it steers."""
    p = depth_distribution(logits)
    return (p * torch.arange(1, p.shape[-1] + 1, device=p.device, dtype=p.dtype)).sum(-1)


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of x [..., T] over the valid tokens (0 if none); fixed shapes, no host sync."""
    w = valid.float()
    return (x * w).sum() / w.sum().clamp(min=1.0)


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


def step_health(r: int, logits: Tensor, candidates: Tensor, selected: Tensor) -> dict[str, Tensor]:
    """Expert choice's health at step r (0-based; named r+1) over its candidate tokens: logit
    mean/std/max |.|, the share whose sigmoid is within 1e-3 of 0 or 1 (a saturated gate passes
    no LM gradient), and this step's BCE against the top-k selection. Keys
    `router_health/r{r+1}/<stat>`; masked reductions: fixed shapes, no host sync."""
    x = logits.detach().float()
    w = candidates.float()
    n = w.sum().clamp(min=1.0)
    mean = (x * w).sum() / n
    var = (((x - mean) ** 2) * w).sum() / n
    s = torch.sigmoid(x)
    sat = ((s < SATURATION_EPS) | (s > 1 - SATURATION_EPS)).float()
    name = f"{HEALTH_PREFIX}/r{r + 1}"
    return {
        f"{name}/logit_mean": mean,
        f"{name}/logit_std": var.sqrt(),
        f"{name}/logit_max_abs": (x.abs() * w).amax(),
        f"{name}/saturated": (sat * w).sum() / n,
        f"{name}/bce": F.binary_cross_entropy_with_logits(x, selected.float(), weight=w, reduction="sum") / n,
    }


# -- router agreement: the causal rule against training's top-k ------------------------------
def agreement_counts(logits: Tensor, candidates: Tensor, topk: Tensor, threshold: Tensor | float) -> Tensor:
    """[causal & topk, causal, topk] token counts (float64) of one routed step: the causal
    choice is candidates & logit > threshold (the router's `threshold`, a logit), compared
    with the top-k selection."""
    causal = candidates & (logits.float() > threshold)
    top = topk & candidates
    return torch.stack([(causal & top).sum(), causal.sum(), top.sum()]).double()


def causal_cut(router: Any) -> Tensor | float:
    """The logit above which the causal rule keeps a token: the router's threshold, or 0
    (sigmoid > 0.5) for an auxiliary router."""
    return 0.0 if getattr(router, "aux", None) is not None else router.threshold


def aux_logits(router: Any, h: Tensor) -> Tensor:
    """The auxiliary router's logits [..., T] (fp32)."""
    return router.aux(h).squeeze(-1).float()


def trace_agreement(routers: Any, trace: list) -> dict[int, Tensor]:
    """Agreement counts per routed step (0-based) of a top-k forward's `router_trace` (its
    logits are the causal rule's: the auxiliary router's where there is one)."""
    return {r: agreement_counts(logits, cand, sel, causal_cut(routers[r])) for r, logits, cand, sel in trace}


def precision_recall(counts: Any) -> tuple[float, float]:
    """(precision, recall) of the causal choice against top-k from summed agreement counts
    (nan where undefined)."""
    both, causal, top = (float(v) for v in (counts.tolist() if isinstance(counts, Tensor) else counts))
    return (both / causal if causal else float("nan")), (both / top if top else float("nan"))


# -- the policy ------------------------------------------------------------------------------
@dataclass
class StepRouting:
    """One recursion step's decision. selected: [..., T] bool, the tokens that run it (a subset
    of the candidates); gate: [..., T] fp32 scale of their update, or None (ungated);
    keeps_all: selected is the candidates by construction (nothing to count); fixed: the
    tokens per row known from shapes alone (training top-k); counted: the largest row's count,
    already read from the device (token choice reads every step's at once). exits, base: set
    by token choice's paper rule (see `update`): [..., T] bool, the tokens whose chosen depth
    is this step, and H^1 [..., T, D]; gather them like the gate and pass them to `update`."""

    selected: Tensor
    gate: Tensor | None
    keeps_all: bool
    fixed: int | None = None
    counted: int | None = None
    exits: Tensor | None = None
    base: Tensor | None = None


class RoutingPolicy:
    """The routing rule of one model (see the module docstring). `start` opens one forward
    pass's routing; its `step(r, h, candidates)` decides step r."""

    def __init__(self, settings: RoutingSettings, gate_fn: GateFn = standard_gate):
        self.settings = settings
        self.gate_fn = gate_fn
        # The optimizer step being trained (1-based), set by the trainer before each step
        # (`MoRLM.set_train_step`): capacity and balancing warmups read it. Derived from the
        # trainer's own step, so a resumed run sees the same values.
        self.train_step = 0

    def gate(self, kind: str, x: Tensor, scale: Any) -> Tensor:
        return self.gate_fn(self.settings, kind, x, scale)

    def update(self, x: Tensor, y: Tensor, gate: Tensor | None, exits: Tensor | None = None,
               base: Tensor | None = None) -> Tensor:
        """This model's update rule (`update`): every path calls it with the step's gathered
        tensors."""
        return update(x, y, gate, exits, base, gate_residual=self.settings.expert_update != PAPER)

    def start(self, model: Any, mode: str, training: bool = False, record: bool = False,
              count: bool = False, positions: Tensor | None = None) -> RoutingPass:
        """model: holds `routers` (expert choice) or `depth_router` (token choice), None where
        absent. training (with TOPK): losses, health and router state updates. record: keep
        each routed expert-choice step's (step, logits, candidates, selected) in `trace`.
        count: token choice reads its per-step lengths from the device (one read per forward).
        positions [..., T]: the tokens' positions (the random router draws from them)."""
        rp = RoutingPass(self, getattr(model, "routers", None), getattr(model, "depth_router", None), mode,
                         training and mode == TOPK, record, count)
        rp.positions = positions
        return rp


class RoutingPass:
    """The routing state of one forward pass: token choice's depth choice, auxiliary losses,
    health statistics and the router trace."""

    def __init__(self, policy: RoutingPolicy, routers: Any, depth_router: Any, mode: str, training: bool,
                 record: bool, count: bool):
        self.policy, self.routers, self.depth_router = policy, routers, depth_router
        self.mode, self.training, self.record, self.count = mode, training, record, count
        self.aux: dict[str, Tensor] = {}
        self.health: dict[str, Tensor] = {}
        self.trace: list[tuple[int, Tensor, Tensor, Tensor]] = []
        self._n_bce = 0
        self._n_entropy = 0
        self._choice: Tensor | None = None
        self._gate: Tensor | None = None
        self._reach: list[int] | None = None
        self._base: Tensor | None = None
        self.positions: Tensor | None = None

    def _random_scores(self, r: int, like: Tensor, depths: int = 0) -> Tensor:
        """The random router's scores in [0, 1), shaped like `like` [..., T] (with a trailing
        [N_r] when depths): in training fresh per optimizer step and row (the official code
        draws torch.rand each forward); otherwise a function of the position alone, so
        decoding draws what the causal forward draws."""
        if self.positions is None:
            raise ValueError("the random router needs the tokens' positions (RoutingPolicy.start(positions=...))")
        key = self.positions.expand(like.shape).to(like.device)
        salt: tuple[int, ...] = (r,)
        if self.training:
            rows = torch.arange(key.shape[0], device=key.device).view(-1, *([1] * (key.dim() - 1)))
            key = key + rows * 1_000_003
            salt = (r, self.policy.train_step)
        if depths:
            return torch.stack([position_uniform(key, *salt, d) for d in range(depths)], dim=-1)
        return position_uniform(key, *salt)

    def step(self, r: int, h: Tensor, candidates: Tensor) -> StepRouting:
        """Step r's decision for hidden states h [..., T, D] and candidates [..., T] (bool: the
        tokens that ran step r-1, or every valid token at r = 0)."""
        if self.routers is not None:
            return self._expert(r, h, candidates)
        if self.depth_router is not None:
            return self._token(r, h, candidates)
        return StepRouting(candidates, None, keeps_all=True)

    def _train_capacity(self, capacity: float) -> float:
        """Top-k's capacity: warmed up in training (the step is read only with the warmup on
        and unfinished: a compiled forward guards on what it reads)."""
        s = self.policy.settings
        if self.training and s.cap_warmup_steps and self.policy.train_step < s.cap_warmup_steps:
            return warm_capacity(capacity, self.policy.train_step, s.cap_warmup_steps)
        return capacity

    def _router_input(self, h: Tensor) -> Tensor:
        t = self.policy.settings.temperature
        return h if t == 1.0 else h / t

    def _expert(self, r: int, h: Tensor, candidates: Tensor) -> StepRouting:
        s = self.policy.settings
        if s.rand_router:
            return self._expert_random(r, candidates)
        router = self.routers[r]
        logits = router(self._router_input(h))
        aux = getattr(router, "aux", None)
        capacity = s.capacities[r]
        fixed = None
        if capacity >= 1.0:
            selected = candidates
        elif self.mode == CAUSAL:
            causal = aux_logits(router, h) if aux is not None else logits
            selected = candidates & (causal > causal_cut(router))
        else:
            train_capacity = self._train_capacity(capacity)
            fixed = top_k_size(train_capacity, logits.shape[-1])
            selected, boundary, has = expert_choice_top_k(logits, candidates, fixed)
            if self.training and s.learn_threshold:
                router.track_boundary(boundary, has)
        gate = self.policy.gate(EXPERT, logits, router.scale if router.scale is not None else s.gate_scale)
        predicted = None
        if aux is not None and (self.training or self.record) and self.mode == TOPK:
            predicted = aux_logits(router, h.detach())  # trained on detached inputs: no gradient into the model
        if self.training:
            bce, z = expert_choice_aux_losses(logits, candidates, selected, s.bce_smoothing)
            if s.bce_full_capacity_steps or capacity < 1.0:
                if predicted is not None:  # the auxiliary router learns the selection; the main router gets no BCE
                    aux_bce, _ = expert_choice_aux_losses(predicted, candidates, selected)
                    self.aux["router_aux_bce"] = self.aux.get("router_aux_bce", 0) + aux_bce
                else:
                    self.aux["router_bce"] = self.aux.get("router_bce", 0) + bce
                    self._n_bce += 1
            self.aux["router_z"] = self.aux.get("router_z", 0) + z
            if s.entropy_coef:  # a mean over steps, as the BCE's
                self.aux["router_entropy"] = self.aux.get("router_entropy", 0) + masked_mean(
                    gate_entropy(s, logits), candidates)
                self._n_entropy += 1
            self.health.update(step_health(r, logits, candidates, selected))
        if self.record and capacity < 1.0:
            traced = predicted if predicted is not None else logits
            self.trace.append((r, traced.detach(), candidates, selected))
        return StepRouting(selected, gate, keeps_all=capacity >= 1.0, fixed=fixed)

    def _expert_random(self, r: int, candidates: Tensor) -> StepRouting:
        """The official random-router baseline for expert choice: top-k of uniform scores,
        gate alpha * score, no auxiliary loss. Causal: a token continues with probability
        c_r / c_{r-1}, so each step keeps its capacity in expectation."""
        s = self.policy.settings
        u = self._random_scores(r, candidates)
        capacity = s.capacities[r]
        fixed = None
        if capacity >= 1.0:
            selected = candidates
        elif self.mode == CAUSAL:
            prev = s.capacities[r - 1] if r else 1.0
            selected = candidates & (u < capacity / prev)
        else:
            train_capacity = self._train_capacity(capacity)
            fixed = top_k_size(train_capacity, u.shape[-1])
            selected = expert_choice_top_k(u, candidates, fixed)[0]
        gate = torch.ones_like(u) if not s.weighted else s.gate_scale * u
        return StepRouting(selected, gate, keeps_all=capacity >= 1.0, fixed=fixed)

    def _token(self, r: int, h: Tensor, candidates: Tensor) -> StepRouting:
        s = self.policy.settings
        if r == 0:  # each token picks its depth once, from the first shared step's input
            router = self.depth_router
            logits = router(self._router_input(h))
            if s.rand_router:  # the official random baseline: uniform scores per depth, no router
                probs = self._random_scores(0, candidates, depths=logits.shape[-1])
                choice = probs.argmax(-1)
            elif s.token_func == "sigmoid":  # the official code ranks alpha * sigmoid (+ bias)
                probs = torch.sigmoid(logits)
                choice = (s.gate_scale * probs + router.bias).argmax(-1)
            else:
                probs = logits.softmax(-1)
                choice = (probs + router.bias).argmax(-1)  # the bias (loss-free balancing) steers the choice only
            # balancing warmup: full depth (the step is read only with the knob on: a compiled
            # forward would otherwise guard on its value and recompile every step)
            if self.training and s.bal_warmup_steps and self.policy.train_step < s.bal_warmup_steps:
                choice = torch.full_like(choice, probs.shape[-1] - 1)
                if s.loss_free:
                    router.bias.zero_()  # as the official code: the bias restarts when the warmup ends
            if self.training and s.loss_free:
                router.track_load(choice, candidates)
            self._choice = choice
            self._gate = self.policy.gate(TOKEN, probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1), s.gate_scale)
            if self.training and not s.rand_router:  # the official balancing loss sees alpha * sigmoid
                p_bal = s.gate_scale * probs if s.token_func == "sigmoid" else probs
                self.aux["router_balance"], self.aux["router_z"] = token_choice_aux_losses(choice, p_bal, logits, candidates)
                self._token_regularisers(logits, candidates)
            if self.count:  # one read of the device for every step's length
                self._reach = torch.stack([(candidates & (choice >= q)).sum(-1).max()
                                           for q in range(probs.shape[-1])]).tolist()
            if s.token_update == PAPER:
                self._base = h
            return StepRouting(candidates, self._gate, keeps_all=True, **self._paper_rule(0))
        selected = candidates & (self._choice >= r)
        return StepRouting(selected, self._gate, keeps_all=False,
                           counted=self._reach[r] if self._reach is not None else None, **self._paper_rule(r))

    def carried(self) -> dict[str, Tensor]:
        """The per-token state this pass's later steps read, decided at step 0 (token choice: the
        chosen depth, its gate, and H^1 under the paper rule; expert choice: none). The static
        depth-wise scheduler keeps it per cache slot and hands it to `resume`, so tokens that
        entered in different passes can take a later step together."""
        state = {"choice": self._choice, "gate": self._gate, "base": self._base}
        return {k: v for k, v in state.items() if v is not None}

    def resume(self, carried: dict[str, Tensor]) -> None:
        """Continue from `carried()` state (rows in the order of this pass's tokens): the next
        `step(r)` with r >= 1 decides as the pass that made it would have."""
        self._choice, self._gate, self._base = carried.get("choice"), carried.get("gate"), carried.get("base")

    def _token_regularisers(self, logits: Tensor, valid: Tensor) -> None:
        """Token choice's entropy and target-depth terms (unweighted; `losses` weighs them)."""
        s = self.policy.settings
        if s.entropy_coef:
            self.aux["router_entropy"] = masked_mean(depth_entropy(logits), valid)
        if s.target_depth_coef:
            mean_depth = masked_mean(expected_depth(logits), valid)  # this micro-batch's mean
            self.aux["router_target_depth"] = (mean_depth - s.target_depth) ** 2
            self.health["router_expected_depth"] = mean_depth.detach()

    def _paper_rule(self, r: int) -> dict[str, Tensor]:
        """Token choice's paper rule: the tokens leaving at step r, and H^1."""
        if self._base is None:
            return {}
        return {"exits": self._choice == r, "base": self._base}

    def losses(self, like: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted auxiliary loss, a scalar to add to the LM loss; the unweighted losses,
        detached, and the health statistics, for logging). Call after the last step."""
        s = self.policy.settings
        aux = dict(self.aux)
        if self._n_bce and s.bce_reduction == "mean":
            aux["router_bce"] = aux["router_bce"] / self._n_bce  # a mean over steps: comparable across N_r
        if self._n_entropy:
            aux["router_entropy"] = aux["router_entropy"] / self._n_entropy
        # The auxiliary router's BCE has weight 1 (the official code steps it with an optimizer
        # of its own, unscaled); its detached input keeps it out of the model's gradient.
        coefs = {"router_bce": s.bce_coef, "router_z": s.z_coef, "router_balance": s.balance_coef,
                 "router_aux_bce": 1.0, "router_entropy": -s.entropy_coef,
                 "router_target_depth": s.target_depth_coef}
        total = like.new_zeros((), dtype=torch.float32)
        for name, value in aux.items():
            if coefs[name]:
                total = total + coefs[name] * value
        return total, {**{k: v.detach() for k, v in aux.items()}, **self.health}
