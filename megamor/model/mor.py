"""The Mixture-of-Recursions language model, top to bottom.

    tokens -> embedding -> prelude layers -> recursion step 1..N_r -> coda layers -> norm -> logits

Vanilla (no sharing) is all prelude. With sharing, the middle of the virtual stack is cut into
N_r recursion steps whose layers are the same module objects (`ModelConfig.layer_plan`).

A recursion step runs only on the tokens routed to it: their hidden states are gathered into a
left-aligned [B, n] batch in positional order, the step's layers run on that (causal attention
among them, RoPE at their original positions), and the results are scattered back. Tokens not
selected keep their hidden state. With a router, a selected token's update is gated:

    h <- h + g * (step(h) - h),      g = alpha * sigmoid(router logit)   (expert choice)

i.e. g scales the step's residual update (not the step's whole output). This is how the
router receives the language-model gradient. (Expert choice with `expert_update: paper`: the
paper's Eq. 1, h <- h + g * step(h). Token choice with `token_update: paper`: the paper's
Eq. 2, steps before the chosen depth ungated, H^1 + g * step(h) at it. The rule is
`RoutingPolicy.update`.)

Which tokens run each step, and their gate, is decided by the routing policy
(`self.routing`, `megamor.model.routing`: the one place the rule lives, shared with the
decoding steps and the exported model). Training uses expert choice's top-k over each
sequence (the paper's); with `causal_routing=True` (evaluation, decoding) it thresholds the
router instead (each router's `threshold`, learned from training's top-k boundary by default),
so no token's computation depends on later tokens, on padding or on other rows of the batch.

The gathered length n is taken from shapes where routing fixes it (all tokens; k_r in expert
choice's training top-k), so a training forward never waits for the device and compiles
whole; token choice and causal routing read it from the device (`bucket_length`). Router
statistics stay on the device. With targets and `return_logits=False`, the loss is
`self.lm_loss` (chunked: no [B, T, V] logits; `megamor.model.loss`).

No parallelism and no decoding loop live here (decoding: `megamor.inference`). The trainer
may install an activation-checkpoint function (`enable_activation_checkpointing`) that wraps
every layer application, and sequence parallelism replaces `seq_layout` (how the residual
stream is laid out along the sequence).

Public structure for code outside the model: `sites` (the site plan: attention-site ids of
every layer application, `SitePlan`), and the hook point `recursion_hook`: when set, it is
called with the 0-based step r and returns a context manager entered around that recursion
step's computation (gather, the step's layers, scatter); the profiler names its trace ranges
with it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megamor.model.config import ModelConfig
from megamor.model.flex import block_mask_for, wants_flex
from megamor.model.kv_cache import KVCache
from megamor.model.layers import Block, KVBlock, RMSNorm, RotaryEmbedding, TokenMeta
from megamor.model.loss import chunked_cross_entropy, cross_entropy_from_logits
from megamor.model.routers import ExpertChoiceRouter, TokenChoiceRouter, routing_settings
from megamor.model.routing import CAUSAL, TOPK, RoutingPolicy, StepRouting

CheckpointFn = Callable[..., object]
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
RecursionHook = Callable[[int], AbstractContextManager]


@dataclass(frozen=True)
class SitePlan:
    """Attention-site (virtual layer) ids of every layer application, in stack order: a
    decoding cache keeps one entry per site. kv_source: under recursive KV sharing, the site
    whose keys/values a later recursion reuses (the first application of the same layer)."""

    prelude: list[int]
    steps: list[list[int]]
    coda: list[int]
    kv_source: dict[int, int] = field(default_factory=dict)


class _AttrDict(dict):
    """A dict with attribute access. Model outputs are dicts so that DeepSpeed ZeRO-3 (which
    hooks the tensors of a module's outputs) can see every tensor inside them."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class RouterStats(_AttrDict):
    """Router statistics of one forward pass, as device tensors (reading them is the caller's
    choice; the forward pass never waits for the device).

    routed: [N_r] valid tokens that ran each recursion step (whole batch); depth: [B, T]
    recursion steps each token ran (0 for padding); valid_tokens: scalar, valid tokens.
    `tokens_per_step` / `total_tokens` give the same as Python numbers (they synchronise)."""

    def __init__(self, routed: Tensor, depth: Tensor, valid_tokens: Tensor):
        super().__init__(routed=routed, depth=depth, valid_tokens=valid_tokens)

    @property
    def tokens_per_step(self) -> list[int]:
        return [int(n) for n in self["routed"].tolist()]

    @property
    def total_tokens(self) -> int:
        return int(self["valid_tokens"])

    @property
    def mean_depth(self) -> float:
        return sum(self.tokens_per_step) / max(1, self.total_tokens)

    @property
    def selected_fraction(self) -> list[float]:
        return [n / max(1, self.total_tokens) for n in self.tokens_per_step]


class LMOutput(_AttrDict):
    """logits [B, T, V] or None; loss: LM cross-entropy, mean over targets != -100 (or None);
    aux_loss: router losses times their coefficients (add to loss for training); aux_losses:
    unweighted, detached, for logging; stats: RouterStats."""

    def __init__(
        self,
        logits: Tensor | None,
        loss: Tensor | None,
        aux_loss: Tensor,
        aux_losses: dict[str, Tensor] | None = None,
        stats: RouterStats | None = None,
    ):
        super().__init__(logits=logits, loss=loss, aux_loss=aux_loss, aux_losses=aux_losses or {}, stats=stats)


class SequenceLayout:
    """Where the residual stream's tokens live. This default: every token on this process.
    Sequence parallelism (`megamor.parallel.sequence_parallel`) installs one whose residual
    stream holds a contiguous 1/N of every sequence: `take` then gathers routed tokens from the
    whole stream into this process's share of the slots, `put` writes slots back, `local` takes
    this process's share of a tensor every process holds whole; gathered lengths are rounded up
    to a multiple of `multiple` so that the slots split evenly."""

    multiple = 1

    def take(self, h: Tensor, idx: Tensor) -> Tensor:
        """Rows idx [B, n] of the stream h -> slots [B, n_local, D]."""
        return h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))

    def put(self, h: Tensor, idx: Tensor, y: Tensor) -> Tensor:
        """The stream h with rows idx replaced by the slots y."""
        return h.scatter(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]), y)

    def local(self, x: Tensor) -> Tensor:
        """[B, n, ...] (the same on every process) -> this process's [B, n_local, ...]."""
        return x


BUCKETS = 32


def bucket_length(n: int, T: int) -> int:
    """A data-dependent gather length rounded up to a multiple of ceil(T / BUCKETS) (at most T):
    at most BUCKETS distinct lengths per sequence length, at most T / BUCKETS padding slots."""
    q = -(-T // BUCKETS)
    return min(T, -(-n // q) * q)


def left_align(selected: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Indices [B, n] of selected tokens, in positional order, padded on the right with
    (distinct) unselected positions; and the slot validity [B, n]. n must be at least every
    row's count of selected tokens (and at most T)."""
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :n]
    slots = torch.arange(n, device=selected.device).unsqueeze(0) < selected.sum(1, keepdim=True)
    return order, slots


class MoRLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.prelude, self.steps, self.coda = cfg.layer_plan()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # One module per physical layer; recursion steps refer to them by index.
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_unique_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        rtype = cfg.router.type
        self.routers = nn.ModuleList(ExpertChoiceRouter(cfg) for _ in self.steps) if rtype == "expert_choice" else None
        self.depth_router = TokenChoiceRouter(cfg) if rtype == "token_choice" else None
        self.routing = RoutingPolicy(routing_settings(cfg))
        # The LM loss, callable(h [B, T, D], weight [V, D], targets [B, T]) -> mean; tensor
        # parallelism replaces it from outside with a vocab-parallel one.
        self.lm_loss: LossFn = chunked_cross_entropy
        self.seq_layout = SequenceLayout()
        self._checkpoint_fn: CheckpointFn | None = None
        # Set from outside (validation, analysis): stats["router_trace"] then holds each routed
        # expert-choice step's (step, logits, candidates, selected).
        self.record_router = False
        self.recursion_hook: RecursionHook | None = None  # see the module docstring
        # How document masking (doc_ids) runs: dense | flex (`megamor.model.flex`); set from
        # outside (trainer.doc_mask_impl), a kernel choice that changes no result.
        self.doc_mask_impl = "dense"
        self.sites = self._number_sites()
        self.reset_parameters()

    # -- construction -----------------------------------------------------------------
    def _number_sites(self) -> SitePlan:
        v = 0
        prelude = list(range(v, v + len(self.prelude)))
        v += len(self.prelude)
        steps = []
        for step in self.steps:
            steps.append(list(range(v, v + len(step))))
            v += len(step)
        coda = list(range(v, v + len(self.coda)))
        source: dict[int, int] = {}
        if self.cfg.kv_mode == "shared":
            first: dict[int, int] = {}
            for layer_ids, site_ids in zip(self.steps, steps):
                for phys, site in zip(layer_ids, site_ids):
                    if phys in first:
                        source[site] = first[phys]
                    else:
                        first[phys] = site
        return SitePlan(prelude, steps, coda, source)

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-branch outputs scaled down by the depth of the unrolled stack (GPT-2 style),
        # unless init_scaled_residual is off (Hugging Face Llama's init, the paper's).
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.init_scaled_residual else std
        for name, p in self.named_parameters():
            if name.startswith("routers.") and name.endswith(".alpha"):  # router.learn_alpha
                nn.init.constant_(p, self.cfg.router.gate_scale)
            elif name.endswith("_proj.bias"):  # model.qkv_bias
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def enable_activation_checkpointing(self, checkpoint_fn: CheckpointFn | None = None) -> None:
        """Recompute each layer application (unique layers and every recursion step) in the
        backward pass. The function is called as fn(layer, x, meta, rope, context) and must
        return layer(x, meta, rope, context); default: torch's non-reentrant checkpoint."""
        self._checkpoint_fn = checkpoint_fn or (lambda f, *a: checkpoint(f, *a, use_reentrant=False))

    def disable_activation_checkpointing(self) -> None:
        self._checkpoint_fn = None

    # -- forward ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        causal_routing: bool = False,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        return_logits: bool = True,
        kv_cache: KVCache | None = None,
    ) -> LMOutput:
        B, T = input_ids.shape
        valid = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            position_ids = self._positions(B, T, valid, kv_cache, input_ids.device)
        meta = TokenMeta(
            position_ids,
            valid,
            doc_ids,
            causal_exact=valid is None and doc_ids is None and kv_cache is None,
            doc_mask_impl=self.doc_mask_impl if kv_cache is None else "dense",
        )
        cos, sin = self.rope(position_ids)
        active = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        shared: dict[int, KVBlock] = {}

        h = self.embed_tokens(input_ids)
        for phys, site in zip(self.prelude, self.sites.prelude):
            h = self._apply_layer(phys, site, h, meta, (cos, sin), kv_cache, shared)

        # Steps run on gathered tokens. `length` is how many slots each row needs: known from
        # shapes alone where routing fixes it (the whole sequence; expert choice's top-k in
        # training), so the forward pass never waits for the device; otherwise read once from
        # the device (token choice: once per forward; causal expert choice: per step).
        routing = self.routing.start(self, CAUSAL if causal_routing else TOPK, training=self.training,
                                     record=self.record_router, count=True, positions=position_ids)
        routed: list[Tensor] = []
        depth = torch.zeros(B, T, dtype=torch.long, device=h.device)
        everyone = valid is None  # every token runs the step: no gather at all
        length = T
        exact = kv_cache is None  # a decoding cache stores exactly the slots that ran
        for r, (layer_ids, site_ids) in enumerate(zip(self.steps, self.sites.steps)):
            step = routing.step(r, h, active)
            selected = step.selected
            if not step.keeps_all:  # a step that keeps all its candidates needs the previous slots
                everyone = False
                if step.fixed is not None and exact:
                    length = step.fixed
                else:  # data-dependent: one read of the device (token choice read them all at r = 0)
                    n = step.counted if step.counted is not None else int(selected.sum(1).max())
                    length = bucket_length(n, T) if exact and n else n
            with self.recursion_hook(r) if self.recursion_hook is not None else nullcontext():
                h = self._run_step(layer_ids, site_ids, h, step, everyone, length, meta, (cos, sin), kv_cache,
                                   shared)
            depth += selected.long()
            routed.append(selected.sum())
            active = selected

        for phys, site in zip(self.coda, self.sites.coda):
            h = self._apply_layer(phys, site, h, meta, (cos, sin), kv_cache, shared)
        h = self.norm(h)

        logits = self.lm_head(h) if return_logits else None
        loss = None
        if targets is not None:
            # Without logits the loss never materialises them (chunked, fp32 accumulation).
            loss = cross_entropy_from_logits(logits, targets) if logits is not None else self.lm_loss(h, self.lm_head.weight, targets)
        n_valid = valid.sum() if valid is not None else torch.full((), B * T, device=h.device)  # no host copy
        routed_t = torch.stack(routed) if routed else torch.zeros(0, dtype=torch.long, device=h.device)
        stats = RouterStats(routed_t, depth if valid is None else depth * valid, n_valid)
        if self.record_router:
            stats["router_trace"] = routing.trace
        aux_loss, aux_losses = routing.losses(h)
        return LMOutput(logits=logits, loss=loss, aux_loss=aux_loss, aux_losses=aux_losses, stats=stats)

    def _positions(
        self, B: int, T: int, valid: Tensor | None, cache: KVCache | None, device: torch.device
    ) -> Tensor:
        if valid is not None:
            start = cache.next_position.unsqueeze(1) if cache is not None else 0
            pos = start + valid.long().cumsum(1) - 1
            pos = pos.clamp(min=0)
            if cache is not None:
                cache.next_position = cache.next_position + valid.long().sum(1)
            return pos
        start = cache.next_position.unsqueeze(1) if cache is not None else torch.zeros(B, 1, dtype=torch.long, device=device)
        if cache is not None:
            cache.next_position = cache.next_position + T
        return start + torch.arange(T, device=device).unsqueeze(0)

    def _run_step(
        self,
        layer_ids: list[int],
        site_ids: list[int],
        h: Tensor,
        step: StepRouting,
        everyone: bool,
        length: int,
        meta: TokenMeta,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        shared: dict[int, KVBlock],
    ) -> Tensor:
        """One recursion step on the selected tokens: gather `length` slots per row, run the
        step's layers, gate the update (`routing.update`), scatter back. everyone: all tokens,
        no gather."""
        if length == 0:
            return h  # nobody runs this step (decoding, or a threshold nobody passed)
        # Under sequence parallelism h is this process's slice of the sequence: the routed
        # tokens are gathered from the full stream and their slots split across processes.
        lay = self.seq_layout
        if everyone:
            x, sub_meta, sub_rope, idx, slots = h, meta, rope, None, None
        else:
            length = min(step.selected.shape[1], -(-length // lay.multiple) * lay.multiple)
            idx, slots = left_align(step.selected, length)
            x = lay.take(h, idx)
            sub_meta = meta.take(idx, slots)
            g = lambda t: t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
            sub_rope = (g(rope[0]), g(rope[1]))
        y = x
        for phys, site in zip(layer_ids, site_ids):
            y = self._apply_layer(phys, site, y, sub_meta, sub_rope, cache, shared)
        if step.gate is not None:
            pick = (lambda t: lay.local(t)) if idx is None else (lambda t: lay.local(t.gather(1, idx)))
            base = None if step.base is None else (step.base if idx is None else lay.take(step.base, idx))
            y = self.routing.update(x, y, pick(step.gate), None if step.exits is None else pick(step.exits), base)
        if idx is None:
            return y
        # Padding slots point at unselected tokens: write their old value back.
        y = torch.where(lay.local(slots).unsqueeze(-1), y, x)
        return lay.put(h, idx, y)

    def _apply_layer(
        self,
        phys: int,
        site: int,
        x: Tensor,
        meta: TokenMeta,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        shared: dict[int, KVBlock],
    ) -> Tensor:
        layer = self.layers[phys]
        source = self.sites.kv_source.get(site)
        context: KVBlock | None = None
        if source is not None:  # recursive KV sharing: reuse the first recursion's keys/values
            context = cache.get(source) if cache is not None else shared[source]
        elif cache is not None:
            k, v = layer.kv_for(x, rope)
            context = cache.append(site, k, v, meta)
        if wants_flex(meta, x.device):  # one block mask per (query set, key set), cached on meta
            meta = dataclasses.replace(meta, block_mask=block_mask_for(meta, meta if context is None else context.meta))
        if self._checkpoint_fn is not None and torch.is_grad_enabled():
            out, kv = self._checkpoint_fn(layer, x, meta, rope, context)
        else:
            out, kv = layer(x, meta, rope, context)
        if cache is None and source is None and self.cfg.kv_mode == "shared":
            shared[site] = kv
        return out

    def set_train_step(self, step: int) -> None:
        """The optimizer step (1-based) about to be trained: the routers' capacity and balancing
        warmups follow it. The trainer sets it from its own (checkpointed) step count."""
        self.routing.train_step = int(step)

    # -- token-choice loss-free balancing ------------------------------------------------
    def loss_free_load(self) -> Tensor | None:
        """Per-depth token counts since the last bias update (all-reduce over DP, then
        `update_loss_free_bias`). None unless token choice with loss-free balancing."""
        if self.depth_router is None or self.cfg.router.balancing != "loss_free":
            return None
        return self.depth_router.load.clone()

    def update_loss_free_bias(self, load: Tensor | None = None) -> None:
        if self.depth_router is not None and self.cfg.router.balancing == "loss_free":
            self.depth_router.update_bias(load, self.cfg.router.bias_update_rate)

    # -- expert choice's learned causal threshold ------------------------------------------
    def router_thresholds(self) -> Tensor | None:
        """Each expert-choice router's threshold [N_r] (fp32; average over data parallel ranks
        and write back with `set_router_thresholds`, so every rank routes alike). None unless
        expert choice with router.learn_threshold."""
        if self.routers is None or not self.cfg.router.learn_threshold:
            return None
        return torch.cat([router.threshold for router in self.routers])

    @torch.no_grad()
    def set_router_thresholds(self, values: Tensor) -> None:
        for router, v in zip(self.routers or [], values.unbind()):
            router.threshold.copy_(v)

    # -- bookkeeping --------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False, unique: bool = True) -> int:
        """Parameter count. unique=False counts shared layers once per application (the
        size of the equivalent unrolled model). Tied embeddings count once."""
        layer_params = [sum(p.numel() for p in layer.parameters()) for layer in self.layers]
        seen = {id(p) for layer in self.layers for p in layer.parameters()}
        rest = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values() if id(p) not in seen)
        if unique:
            layers = sum(layer_params)
        else:
            layers = sum(layer_params[i] for i in self.prelude + [j for s in self.steps for j in s] + self.coda)
        total = layers + rest
        if non_embedding:
            total -= self.embed_tokens.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    # -- decoding -----------------------------------------------------------------------
    def new_kv_cache(self, batch_size: int) -> KVCache:
        return KVCache(batch_size, device=self.embed_tokens.weight.device)

