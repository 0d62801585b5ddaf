"""Per-rank memory of a training layout, computed from the model's shape (no GPU needed).

    rank_memory(model_cfg, tp=2, dp=16, zero_stage=1, precision="bf16", micro_batch=8, seq_len=2048,
                activation_checkpointing=True)

Parameters: what `apply_tensor_parallel` leaves on one rank (layer matrices, embedding and LM head
divided by TP; norms and routers whole). Optimizer (mixed precision, DeepSpeed): fp32 master
weights + two Adam moments = 12 bytes per parameter (8 in fp32 runs, whose weights are the master
copy), divided over the DP ranks from ZeRO-1 on; gradients (precision-sized) divided from ZeRO-2
on. Activations follow Korthikanti et al. 2022 with a fused attention kernel (no score matrix):
per layer application and token, 10 d_model bytes replicated plus 24 d_model bytes split over TP
(bf16; doubled in fp32), weighted by the share of tokens that run each application (MoR
capacities). Recursion checkpointing keeps only each application's input (2 d_model bytes per
token) plus one application recomputed. The vocab-parallel loss keeps fp32 logits and softmax of
[tokens, V/TP]. Estimates, not allocator peaks: buffers, fragmentation and communication
buckets come on top.
"""

from __future__ import annotations

from megamor.model.config import ModelConfig

GiB = 2**30


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters TP shards, parameters every TP rank holds whole)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    mlp = 3 * d * cfg.d_ff
    sharded = cfg.num_unique_layers * (attn + mlp) + cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    replicated = cfg.num_unique_layers * 2 * d + d  # RMSNorm weights
    r = cfg.router
    if r.type != "none":
        outs, count = (cfg.num_recursions, 1) if r.type == "token_choice" else (1, cfg.num_recursions)
        hidden = r.mlp_hidden or d // 4
        per = d * outs if r.network == "linear" else d * hidden + hidden * outs
        replicated += count * per
        if r.type == "expert_choice" and r.learn_alpha:
            replicated += count  # one learned gate scale per recursion step
    return sharded, replicated


def _applications(cfg: ModelConfig) -> float:
    """Layer applications per token, weighted by the tokens that run them (capacity per step)."""
    prelude, steps, coda = cfg.layer_plan()
    caps = cfg.capacities if cfg.router.type == "expert_choice" else [1.0] * len(steps)
    return len(prelude) + len(coda) + sum(len(s) * c for s, c in zip(steps, caps))


def rank_memory(cfg: ModelConfig, tp: int, dp: int, zero_stage: int, precision: str, micro_batch: int, seq_len: int,
                activation_checkpointing: bool) -> dict[str, float]:
    """Bytes per rank: params, grads, optimizer, activations, total."""
    sharded, replicated = param_counts(cfg)
    n = sharded / tp + replicated
    w = 2 if precision == "bf16" else 4
    params = n * w
    grads = n * w / (dp if zero_stage >= 2 else 1)
    opt_bytes = 12 if precision == "bf16" else 8
    optimizer = n * opt_bytes / (dp if zero_stage >= 1 else 1)
    tokens = micro_batch * seq_len
    scale = w / 2
    per_app = tokens * cfg.d_model * (10 + 24 / tp) * scale
    apps = _applications(cfg)
    acts = apps * tokens * cfg.d_model * w + per_app if activation_checkpointing else apps * per_app
    acts += 2 * tokens * cfg.vocab_size / tp * 4  # fp32 logits + saved softmax of the vocab-parallel loss
    total = params + grads + optimizer + acts
    return {"params": params, "grads": grads, "optimizer": optimizer, "activations": acts, "total": total,
            "params_per_rank": n}
