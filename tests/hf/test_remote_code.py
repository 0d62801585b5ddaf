"""Exported MoR models load in transformers (trust_remote_code) with megamor's logits and
greedy tokens, for every variant and KV mode."""

from __future__ import annotations

import pytest
import torch

from megamor.hf.remote_code import save_model_folder
from tests.inference.test_engine import CASES, _model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("variant,kv", [c for c in CASES if c[0] != "vanilla"])
@torch.no_grad()
def test_hf_loaded_mor_equals_megamor(variant, kv, tmp_path):
    ours = _model(variant, kv)
    save_model_folder(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf).__module__.startswith("transformers_modules")  # megamor's code, run by transformers
    x = torch.randint(1, 200, (3, 40), generator=torch.Generator().manual_seed(0))
    a = ours(x, causal_routing=True).logits
    assert (hf(x).logits - a).abs().max().item() <= 1e-5
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :15] = False  # left padding, as generate() batches prompts
    a = ours(x, attention_mask=mask, causal_routing=True).logits
    b = hf(x, attention_mask=mask.long()).logits
    assert (a[mask] - b[mask]).abs().max().item() <= 1e-5
    prompt = [5, 6, 7, 8, 9, 10, 11]
    want = ours.generate([prompt], 10).tokens[0]
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, attention_mask=torch.ones(1, 7, dtype=torch.long))
    assert got[0, len(prompt):].tolist() == want
