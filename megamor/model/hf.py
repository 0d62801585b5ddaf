"""Conversion between megamor's vanilla models and Hugging Face `LlamaForCausalLM`.

Only configs without sharing map onto Llama; MoR models are saved in megamor's own format.
`transformers` is imported lazily (it is a dev/export extra, not a training dependency).
"""

from __future__ import annotations

from typing import Any

import torch

from megamor.model.config import ModelConfig


def _check_vanilla(cfg: ModelConfig) -> None:
    if cfg.sharing != "none" or cfg.router.type != "none":
        raise ValueError(
            f"only vanilla configs (sharing 'none', no router) map onto LlamaForCausalLM; got sharing "
            f"{cfg.sharing!r}, router {cfg.router.type!r}: use megamor's own loader"
        )


def unexportable_keys(cfg: ModelConfig) -> list[str]:
    """Model keys the Hugging Face export (Llama config, or megamor's remote code) does not
    implement: the attention variants megamor.adapt reads from Qwen checkpoints."""
    return [f"model.{k}" for k in ("qkv_bias", "qk_norm", "attn_head_dim") if getattr(cfg, k)]


def llama_config(cfg: ModelConfig) -> Any:
    from transformers import LlamaConfig

    _check_vanilla(cfg)
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=cfg.init_std,
        torch_dtype="float32",
    )


def to_llama_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megamor names -> HF Llama names (megamor mirrors them, under `model.`)."""
    _check_vanilla(cfg)
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = t
        else:
            out[f"model.{name}"] = t
    return out
