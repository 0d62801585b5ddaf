"""A megamor Mixture-of-Recursions model as a transformers `PreTrainedModel`.

Written by megamor into every MoR export folder and loaded with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. It never imports megamor,
so a user needs only torch and transformers. Parameter names are megamor's.

It runs megamor's evaluation/decoding forward with megamor's own routing policy: `routing.py`
beside this file is a copy of `megamor/model/routing.py`, configured by config.json's `routing`
(causal routing: expert choice keeps a token at step r when its router logit exceeds the
router's `threshold`, trained with the model; token choice picks each token's depth once), so
its logits equal megamor's. A recursion step runs only on the tokens routed to it,
gathered left-aligned at their original positions. `generate()` works; it recomputes the
prefix each step (megamor.inference holds the routing-aware KV caches).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megamor import MegamorConfig
from .routing import CAUSAL, Fp32Linear, RoutingPolicy, RoutingSettings


def _get(m: dict, key: str, default):
    v = m.get(key, default)
    return default if v is None else v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    f = positions.float().unsqueeze(-1) * inv
    e = torch.cat((f, f), -1)
    return e.cos(), e.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat((-b, a), -1) * sin


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv: int):
        super().__init__()
        self.h, self.kv, self.hd = n_heads, n_kv, d // n_heads
        self.q_proj = nn.Linear(d, n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(n_heads * self.hd, d, bias=False)

    def forward(self, x: Tensor, pos: Tensor, valid: Tensor, rope, context=None):
        """context: (k, v, positions, valid) to attend to instead of x's own (KV sharing)."""
        B, n, _ = x.shape
        cos, sin = rope
        q = rotate(self.q_proj(x).view(B, n, self.h, self.hd).transpose(1, 2), cos, sin)
        if context is None:
            k = rotate(self.k_proj(x).view(B, n, self.kv, self.hd).transpose(1, 2), cos, sin)
            v = self.v_proj(x).view(B, n, self.kv, self.hd).transpose(1, 2)
            context = (k, v, pos, valid)
        k, v, kpos, kvalid = context
        allowed = (kpos.unsqueeze(1) <= pos.unsqueeze(2)) & kvalid.unsqueeze(1)
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries: any finite output
        if self.kv != self.h:
            k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))
        return self.o_proj(out.transpose(1, 2).reshape(B, n, self.h * self.hd)), context


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv: int, d_ff: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(d, n_heads, n_kv)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(d, d_ff)

    def forward(self, x, pos, valid, rope, context=None):
        a, kv = self.self_attn(self.input_layernorm(x), pos, valid, rope, context)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


def router_net(d: int, out: int, r: dict) -> nn.Module:
    if _get(r, "network", "linear") == "linear":
        return Fp32Linear(d, out, bias=False)
    hidden = _get(r, "mlp_hidden", 0) or d // 4
    return nn.Sequential(Fp32Linear(d, hidden, bias=False), nn.GELU(), Fp32Linear(hidden, out, bias=False))


class GateScale(nn.Module):
    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))

    def forward(self, act: Tensor) -> Tensor:
        return self.alpha.float() * act


class ExpertRouter(nn.Module):
    def __init__(self, d: int, r: dict):
        super().__init__()
        self.net = router_net(d, 1, r)
        # router.learn_alpha: a learned gate scale per step (megamor's routers.N.scale.alpha)
        alpha = r.get("alpha")
        self.scale = GateScale(alpha if alpha is not None else 0.1) if _get(r, "learn_alpha", False) else None
        # The causal rule's cut on the logit (megamor's routers.N.threshold; exports from before
        # it was learned keep the fixed logit(causal_threshold), set by _init_weights).
        self.register_buffer("threshold", torch.full((1,), causal_logit(r)))
        # router.aux_router: the causal rule's own router (megamor's routers.N.aux)
        self.aux = router_net(d, 1, r) if _get(r, "aux_router", False) else None

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h).squeeze(-1).float()  # logits [B, T]; the routing policy decides


def causal_logit(r: dict) -> float:
    p = _get(r, "causal_threshold", 0.5)
    return math.log(p / (1.0 - p))


class TokenRouter(nn.Module):
    def __init__(self, d: int, n: int, r: dict):
        super().__init__()
        self.net = router_net(d, n, r)
        self.register_buffer("bias", torch.zeros(n))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h).float()  # logits [B, T, N_r]; the routing policy picks the depth


def layer_plan(m: dict) -> tuple[list[int], list[list[int]], list[int]]:
    """Physical layer of every virtual layer as (prelude, recursion steps, coda)."""
    L, nr, sharing = m["n_layers"], _get(m, "num_recursions", 1), _get(m, "sharing", "none")
    if sharing == "none":
        if nr > 1:  # a router over N_r steps of distinct layers
            return [], [list(range(r * L // nr, (r + 1) * L // nr)) for r in range(nr)], []
        return list(range(L)), [], []
    middle = sharing.startswith("middle")
    first, mid = (1, L - 2) if middle else (0, L)
    base = mid // nr
    virtual = [first + (i % base if sharing.endswith("cycle") else i // nr) for i in range(mid)]
    steps = [virtual[r * mid // nr: (r + 1) * mid // nr] for r in range(nr)]
    return ([0], steps, [first + base]) if middle else ([], steps, [])


class MegamorPreTrainedModel(PreTrainedModel):
    config_class = MegamorConfig
    config: MegamorConfig
    base_model_prefix = "megamor_model"
    _supports_sdpa = True

    def _init_weights(self, module):
        std = _get(self.config.megamor or {}, "init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, ExpertRouter):
            module.threshold.fill_(causal_logit(dict((self.config.megamor or {}).get("router") or {})))


class MegamorForCausalLM(MegamorPreTrainedModel, GenerationMixin):
    def __init__(self, config: MegamorConfig):
        super().__init__(config)
        m = dict(config.megamor or {})
        self.m, self.r = m, dict(m.get("router") or {})
        d, nr = m["d_model"], _get(m, "num_recursions", 1)
        self.prelude, self.steps, self.coda = layer_plan(m)
        n_unique = len(set(self.prelude + self.coda) | {i for s in self.steps for i in s})
        self.embed_tokens = nn.Embedding(m["vocab_size"], d)
        self.layers = nn.ModuleList(Block(d, m["n_heads"], m["n_kv_heads"], m["d_ff"], m["norm_eps"]) for _ in range(n_unique))
        self.norm = RMSNorm(d, m["norm_eps"])
        self.lm_head = nn.Linear(d, m["vocab_size"], bias=False)
        rtype = _get(self.r, "type", "none")
        self.routers = nn.ModuleList(ExpertRouter(d, self.r) for _ in self.steps) if rtype == "expert_choice" else None
        self.depth_router = TokenRouter(d, nr, self.r) if rtype == "token_choice" else None
        self.routing = RoutingPolicy(RoutingSettings(**config.routing))
        self.kv_source = self._kv_sources()
        self.post_init()

    def _kv_sources(self) -> dict[int, int]:
        """Recursive KV sharing: virtual site -> the first recursion's site of the same layer."""
        if _get(self.m, "kv_mode", "recursion_wise") != "shared":
            return {}
        v, first, source = len(self.prelude), {}, {}
        for step in self.steps:
            for phys in step:
                if phys in first:
                    source[v] = first[phys]
                else:
                    first[phys] = v
                v += 1
        return source

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def _tied_weights_keys(self):  # transformers reads this to tie lm_head to the embedding
        return {"lm_head.weight": "embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def _run_layers(self, layer_ids, site, h, pos, valid, rope, kv):
        for phys in layer_ids:
            ctx = kv.get(self.kv_source[site]) if site in self.kv_source else None
            h, used = self.layers[phys](h, pos, valid, rope, ctx)
            kv[site] = used
            site += 1
        return h, site

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        hd = self.m["d_model"] // self.m["n_heads"]
        rope = rope_tables(pos, hd, float(self.m["rope_theta"]))
        kv: dict[int, tuple] = {}
        h, site = self._run_layers(self.prelude, 0, self.embed_tokens(input_ids), pos, valid, rope, kv)
        active, routing = valid, self.routing.start(self, CAUSAL, positions=pos)
        for r, layer_ids in enumerate(self.steps):
            step = routing.step(r, h, active)
            h, site = self._routed_step(layer_ids, site, h, step, pos, rope, kv)
            active = step.selected
        h, _ = self._run_layers(self.coda, site, h, pos, valid, rope, kv)
        h = self.norm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _routed_step(self, layer_ids, site, h, step, pos, rope, kv):
        """Run one recursion step on the selected tokens only (gathered left-aligned in
        positional order), gate their update (the routing policy's `update`), scatter them back."""
        selected = step.selected
        n = int(selected.sum(1).max())
        if n == 0:
            return h, site + len(layer_ids)
        idx = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :n]
        slots = torch.arange(n, device=h.device).unsqueeze(0) < selected.sum(1, keepdim=True)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        x = take(h)
        y, site = self._run_layers(layer_ids, site, x, pos.gather(1, idx), slots, (take(rope[0]), take(rope[1])), kv)
        if step.gate is not None:
            exits = None if step.exits is None else step.exits.gather(1, idx)
            y = self.routing.update(x, y, step.gate.gather(1, idx), exits, None if exits is None else take(step.base))
        y = torch.where(slots.unsqueeze(-1), y, x)
        return h.scatter(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]), y), site


__all__ = ["MegamorForCausalLM", "MegamorPreTrainedModel"]
