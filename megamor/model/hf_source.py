"""A Hugging Face checkpoint folder -> megamor's ModelConfig and state dict, names unchanged.

Llama, Mistral, Qwen2 and Qwen3 are Llama's block with small differences, each a ModelConfig
key: q/k/v biases (Qwen2: `qkv_bias`), a per-head RMSNorm on queries and keys (Qwen3:
`qk_norm`, with its own head width `attn_head_dim`), tied embeddings (`tie_embeddings`).
Mistral's sliding window is not modelled: megamor attends to the whole context, which equals
the window's attention while a sequence fits in it, so `max_seq_len` is capped at the window.
Anything else that would change what the weights compute (RoPE scaling, other activations,
output/MLP biases, per-layer sliding windows) is refused with the config key that asks for it.
The one reader of Hugging Face folders: `megamor.adapt` wraps what it returns, and
`megamor.runs.load` (convert, evaluation of exports) builds a vanilla model from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megamor.model.config import ModelConfig

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class AdaptError(ValueError):
    """A checkpoint megamor cannot compute exactly (bad input: exit 2)."""


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise AdaptError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdaptError(f"{path}: unreadable: {e}") from None
    kind = info.get("model_type")
    if kind not in SUPPORTED:
        raise AdaptError(f"{path}: model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return info


def _rope_theta(info: dict[str, Any], path: Path) -> float:
    rope = info.get("rope_parameters") or {}
    scaling = info.get("rope_scaling") or {}
    kind = (scaling.get("rope_type") or scaling.get("type")) if scaling else rope.get("rope_type", "default")
    if kind not in (None, "default"):
        raise AdaptError(f"{path}: rope_scaling {kind!r} is not supported (plain RoPE only)")
    theta = info.get("rope_theta", rope.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def model_config(info: dict[str, Any], folder: Path) -> ModelConfig:
    """The vanilla megamor config computing what the checkpoint computes."""
    path = folder / "config.json"
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
               if not isinstance(info.get(k), int)]
    if missing:
        raise AdaptError(f"{path}: {', '.join(missing)} missing or not an integer")
    kind = info["model_type"]
    if info.get("hidden_act", "silu") != "silu":
        raise AdaptError(f"{path}: hidden_act {info['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if info.get("mlp_bias"):
        raise AdaptError(f"{path}: mlp_bias true is not supported")
    if kind != "qwen2" and info.get("attention_bias"):
        raise AdaptError(f"{path}: attention_bias true is not supported for {kind} (it biases o_proj too)")
    if kind in ("qwen2", "qwen3") and info.get("use_sliding_window"):
        raise AdaptError(f"{path}: use_sliding_window true is not supported (per-layer windows)")
    d, heads = info["hidden_size"], info["num_attention_heads"]
    head_dim = info.get("head_dim") or d // heads
    max_len = info.get("max_position_embeddings", 2048)
    if kind == "mistral" and info.get("sliding_window"):
        max_len = min(max_len, int(info["sliding_window"]))  # exact only within the window
    return ModelConfig(
        vocab_size=info["vocab_size"], d_model=d, n_layers=info["num_hidden_layers"], n_heads=heads,
        n_kv_heads=info.get("num_key_value_heads") or heads, d_ff=info["intermediate_size"], max_seq_len=max_len,
        rope_theta=_rope_theta(info, path), norm_eps=float(info.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(info.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2",
        qk_norm=kind == "qwen3", attn_head_dim=head_dim if head_dim * heads != d else 0,
    )


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in fp32 under megamor's names (HF's without `model.`)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per load buries the tool's own lines
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a damaged or incomplete weights file
        raise AdaptError(f"{folder}: cannot load its weights: {' '.join(str(e).split())[:300]}") from None
    return {k.removeprefix("model."): v for k, v in hf.state_dict().items()}


def read_source(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(vanilla ModelConfig, state dict, config.json) of a Hugging Face checkpoint folder."""
    folder = Path(folder)
    info = read_config(folder)
    cfg = model_config(info, folder)
    cfg.validate()
    return cfg, load_weights(folder), info
