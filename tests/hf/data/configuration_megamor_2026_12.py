"""Hugging Face config for megamor Mixture-of-Recursions models.

Written by megamor into every MoR export folder and loaded by transformers with
trust_remote_code=True; self-contained (it never imports megamor). The whole megamor model
config rides along in `megamor`; the usual Hugging Face names are filled from it so tools that
read them (hidden_size, num_hidden_layers, ...) see the right numbers.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class MegamorConfig(PreTrainedConfig):
    model_type = "megamor"

    megamor: dict | None = None  # megamor's ModelConfig as a dict (the source of truth)
    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 8  # layers of the unrolled stack
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    use_cache: bool = False  # the modeling file recomputes the prefix (routing-aware caches live in megamor)

    def __post_init__(self, **kwargs):
        m = self.megamor or {}
        names = {"vocab_size": "vocab_size", "hidden_size": "d_model", "intermediate_size": "d_ff",
                 "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                 "num_key_value_heads": "n_kv_heads", "max_position_embeddings": "max_seq_len",
                 "rms_norm_eps": "norm_eps", "tie_word_embeddings": "tie_embeddings"}
        for hf_name, ours in names.items():
            if ours in m:
                setattr(self, hf_name, m[ours])
        super().__post_init__(**kwargs)


__all__ = ["MegamorConfig"]
