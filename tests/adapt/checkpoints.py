"""Tiny random Hugging Face checkpoints of each architecture the adapter wraps."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def hf_config(kind: str, **overrides):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind]
    extra: dict = {}
    if kind == "mistral":
        extra = {"sliding_window": 16, "head_dim": 8}
    if kind == "qwen3":
        extra = {"head_dim": 16}  # its own head width (4 heads x 16 != 32), as real Qwen3 has
    if kind in ("qwen2", "qwen3"):
        extra["tie_word_embeddings"] = True
    return cls(**{**TINY, **extra, **overrides})


def make_checkpoint(kind: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """A random checkpoint saved to folder; biases and norms randomised too (so a missing
    bias or QK-norm shows in the logits)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder
