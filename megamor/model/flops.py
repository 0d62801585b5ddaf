"""FLOPs of a forward pass as a function of how many tokens ran each recursion step.

Counted per sequence of `seq_len` tokens: 2 FLOPs per multiply-add of every matmul a token
actually goes through (so a recursion step costs only for the tokens routed to it), plus the
attention score and value matmuls. Norms, activations and softmax are not counted (the usual
convention; FlopCounterMode does not count them either).

`causal=True` counts only the attention entries a causal mask keeps (the useful work, as the
paper and MFU use); `causal=False` counts the full square the kernels execute, which is what
`torch.utils.flop_counter.FlopCounterMode` reports. Training costs 3x the forward pass;
with activation recomputation the hardware does 4x.

Two conventions (`CONVENTIONS`): `exact` is the count above (what MFU and the trainer's FLOPs
use); `paper` is the MoR paper's (Bae et al. 2025, Appendix D), which its released step and
token counts follow: see `paper_flops_per_token`. Iso-FLOP budgets name the one they use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megamor.config import ConfigError, key
from megamor.model.config import ModelConfig


def _linear_params(cfg: ModelConfig, with_kv: bool = True) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + (2 * d * cfg.n_kv_heads * hd if with_kv else 0)
    return attn + 3 * d * cfg.d_ff


def _attention(cfg: ModelConfig, n_q: float, n_k: float, causal: bool, self_attn: bool) -> float:
    width = cfg.n_heads * cfg.head_dim
    if not causal:
        pairs = n_q * n_k
    elif self_attn:
        pairs = n_q * (n_q + 1) / 2
    else:
        pairs = n_q * n_k / 2
    return 4.0 * width * pairs  # QK^T and AV, 2 FLOPs per multiply-add each


def default_tokens_per_step(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Expected tokens per step: expert choice's capacities; token choice assuming uniform
    depths; recursion without a router: everything."""
    nr = len(cfg.layer_plan()[1])
    if cfg.router.type == "expert_choice":
        return [seq_len if c >= 1 else max(1, int(c * seq_len)) for c in cfg.capacities]
    if cfg.router.type == "token_choice":
        return [seq_len * (nr - r) / nr for r in range(nr)]
    return [float(seq_len)] * nr


def router_flops(cfg: ModelConfig, seq_len: int) -> float:
    r, d, nr = cfg.router, cfg.d_model, cfg.num_recursions
    out = {"expert_choice": 1, "token_choice": nr}.get(r.type, 0)
    if out == 0:
        return 0.0
    hidden = r.mlp_hidden or d // 4
    per_token = 2 * (d * out if r.network == "linear" else d * hidden + hidden * out)
    applications = nr if r.type == "expert_choice" else 1  # expert-choice routers score every token
    return float(applications * per_token * seq_len)


def forward_flops(
    cfg: ModelConfig,
    seq_len: int,
    tokens_per_step: Sequence[float] | None = None,
    causal: bool = True,
) -> float:
    """Forward FLOPs for one sequence of seq_len tokens given the tokens that ran each step."""
    prelude, steps, coda = cfg.layer_plan()
    T = float(seq_len)
    counts = list(tokens_per_step) if tokens_per_step is not None else default_tokens_per_step(cfg, seq_len)
    if len(counts) != len(steps):
        raise ValueError(f"tokens_per_step needs {len(steps)} entries, got {len(counts)}")
    full_layer = 2 * T * _linear_params(cfg) + _attention(cfg, T, T, causal, True)
    total = (len(prelude) + len(coda)) * full_layer
    seen: set[int] = set()
    first_count: dict[int, float] = {}
    for layer_ids, n in zip(steps, counts):
        for phys in layer_ids:
            shared = cfg.kv_mode == "shared" and phys in seen
            if shared:  # queries only, attending to the first recursion's keys/values
                total += 2 * n * _linear_params(cfg, with_kv=False) + _attention(cfg, n, first_count[phys], causal, False)
            else:
                total += 2 * n * _linear_params(cfg) + _attention(cfg, n, n, causal, True)
                first_count.setdefault(phys, n)
            seen.add(phys)
    total += router_flops(cfg, seq_len)
    total += 2 * T * cfg.d_model * cfg.vocab_size  # LM head
    return total


def recomputed_share(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """The share of a training forward's FLOPs that activation checkpointing runs again in the
    backward pass: the layers' forward, less each layer application's down projection (torch's
    non-reentrant checkpoint stops recomputing once it has the tensors backward saved, and the
    last matmul's output is not one of them); the routers and the LM head are outside."""
    prelude, steps, coda = cfg.layer_plan()
    counts = default_tokens_per_step(cfg, seq_len)
    tokens = (len(prelude) + len(coda)) * seq_len + sum(n * len(ids) for ids, n in zip(steps, counts))
    total = forward_flops(cfg, seq_len, causal=causal)
    outside = router_flops(cfg, seq_len) + 2.0 * seq_len * cfg.d_model * cfg.vocab_size
    return (total - outside - 2.0 * tokens * cfg.d_model * cfg.d_ff) / total


def flops_per_token(cfg: ModelConfig, seq_len: int, tokens_per_step: Sequence[float] | None = None, causal: bool = True) -> float:
    return forward_flops(cfg, seq_len, tokens_per_step, causal) / seq_len


CONVENTIONS = ("exact", "paper")


@dataclass
class FlopsConfig:
    """`flops:` of an experiment (how its budget.flops is counted) and of a study (how each
    budget becomes each variant's tokens): one schema for both."""

    # How a FLOP budget is counted: exact (what a forward pass runs: LM head, routers, K/V at GQA's size; MFU
    # always uses it) / paper (the MoR paper's Appendix D: no LM head, K/V at d x d; its released step counts).
    # The default is exact so that a config written before this key trains what it trained.
    convention: str = "exact"

    def validate(self, path: str) -> None:
        if self.convention not in CONVENTIONS:
            raise ConfigError(key(path, "convention"), f"must be one of {CONVENTIONS}, got {self.convention!r}")


def paper_fractions(cfg: ModelConfig) -> list[float]:
    """The fraction of a sequence's tokens that runs each recursion step, as the paper counts it:
    expert choice's capacities as fractions (not int(c * T)), token choice perfectly balanced
    (step r runs (N_r - r) / N_r), recursion without a router every token."""
    nr = len(cfg.layer_plan()[1])
    if cfg.router.type == "expert_choice":
        return list(cfg.capacities)
    if cfg.router.type == "token_choice":
        return [(nr - r) / nr for r in range(nr)]
    return [1.0] * nr


def paper_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token in the paper's convention (Appendix D, after Kaplan et al. 2020).

    Per layer application at capacity c (the fraction of the sequence that runs it):
    2 (4 d^2 + 3 d d_ff) c for the projections, K and V counted at d x d whatever the number of
    KV heads (GQA ignored), plus 2 d L_ctx c^2 for causal attention (QK^T and AV, 4 d per query-
    key pair, over the L_ctx c (L_ctx c) / 2 pairs a causal mask keeps). No embedding, LM head
    or router FLOPs. With recursive KV sharing a layer's later applications skip the K and V
    projections and attend to the first application's keys, so their attention is 2 d L_ctx c.
    It reproduces the paper's released counts (tests/model/test_flops.py): 360M at 16.5e18,
    vanilla 833.6M FLOPs/token -> 19.79B tokens, MoR-expert-3 29.70B.
    """
    d, d_ff, L = float(cfg.d_model), float(cfg.d_ff), float(seq_len)

    def layer(c: float, kv: bool) -> float:
        proj = (4 if kv else 2) * d * d + 3 * d * d_ff
        return 2 * proj * c + 2 * d * L * (c * c if kv else c)

    prelude, steps, coda = cfg.layer_plan()
    total = (len(prelude) + len(coda)) * layer(1.0, True)
    seen: set[int] = set()
    for layer_ids, c in zip(steps, paper_fractions(cfg)):
        for phys in layer_ids:
            total += layer(c, not (cfg.kv_mode == "shared" and phys in seen))
            seen.add(phys)
    return total


def convention_flops_per_token(cfg: ModelConfig, seq_len: int, convention: str) -> float:
    """Expected forward FLOPs per token in `convention` (one of CONVENTIONS)."""
    if convention == "paper":
        return paper_flops_per_token(cfg, seq_len)
    if convention == "exact":
        return flops_per_token(cfg, seq_len)
    raise ValueError(f"unknown FLOPs convention {convention!r}; one of {CONVENTIONS}")


BUDGET_COUNTS = ("forward", "training")  # how a FLOP budget counts: the forward pass, or 3 x (with backward)
TRAIN_MULTIPLIER = 3.0  # forward + backward


def budget_flops_per_token(cfg: ModelConfig, seq_len: int, count: str, convention: str = "exact") -> float:
    """FLOPs per token a budget of `count` (BUDGET_COUNTS) spends, in `convention`."""
    fpt = convention_flops_per_token(cfg, seq_len, convention)
    return fpt * (TRAIN_MULTIPLIER if count == "training" else 1.0)


def budget_steps(flops: float, flops_per_token: float, tokens_per_step: int) -> int:
    """Optimizer steps that spend `flops`: rounded to the nearest whole step, at least 1 (the
    paper's released 360M step counts are within one step of this)."""
    return max(1, round(float(flops) / flops_per_token / tokens_per_step))


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> float:
    """Expected KV-cache bytes per cached token during decoding (bf16 by default)."""
    prelude, steps, coda = cfg.layer_plan()
    per_site = 2 * cfg.n_kv_heads * cfg.head_dim * bytes_per_value
    fractions = [n / 1024 for n in default_tokens_per_step(cfg, 1024)]
    sites = float(len(prelude) + len(coda))
    seen: set[int] = set()
    for layer_ids, frac in zip(steps, fractions):
        for phys in layer_ids:
            if cfg.kv_mode == "shared" and phys in seen:
                continue  # reads the first recursion's cache
            seen.add(phys)
            sites += frac
    return sites * per_site
