"""The vanilla model equals Hugging Face LlamaForCausalLM holding the same weights."""

from pathlib import Path

import pytest
import torch

from megamor.model import MoRLM
from megamor.model.hf import llama_config, to_llama_state_dict
from megamor.model.hf_source import model_config

from .helpers import tiny_config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied", [True, False])
def test_vanilla_logits_match_llama(tied):
    torch.manual_seed(0)
    cfg = tiny_config(n_layers=3, n_heads=4, n_kv_heads=2, tie_embeddings=tied, rope_theta=500.0)
    ours = MoRLM(cfg).eval()
    ref = transformers.LlamaForCausalLM(llama_config(cfg)).eval()
    result = ref.load_state_dict(to_llama_state_dict(cfg, ours.state_dict()), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= ({"lm_head.weight"} if tied else set())
    x = torch.randint(0, cfg.vocab_size, (3, 50))
    with torch.no_grad():
        a = ours(x).logits
        b = ref(x).logits
    assert (a - b).abs().max().item() <= 1e-4
    # And the padded-batch path (explicit masks) agrees with HF's attention_mask handling.
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 40:] = False
    with torch.no_grad():
        a = ours(x, attention_mask=mask).logits
        b = ref(x, attention_mask=mask.long()).logits
    assert (a[mask] - b[mask]).abs().max().item() <= 1e-4
    back = model_config(ref.config.to_dict(), Path('.'))  # the reader megamor.runs.load and adapt use
    assert (back.d_model, back.n_kv_heads, back.rope_theta, back.tie_embeddings) == \
        (cfg.d_model, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings)
