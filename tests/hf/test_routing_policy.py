"""One routing policy: a gate function injected through the policy changes the training forward,
the causal forward, generate(), both engine decoding steps (dynamic and static) and the
exported transformers model together, and the decoding paths and the export still equal
each other."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from megamor.hf.remote_code import save_model_folder
from megamor.inference import engine_generate, generate
from megamor.model import routing
from megamor.model.routing import standard_gate
from tests.model.helpers import mor

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], [40, 41, 42, 43]]


def inverted_gate(s, kind, x, scale):
    """A deliberately different gate: 1 - the standard one."""
    return 1.0 - standard_gate(s, kind, x, scale)


def _outputs(model, hf) -> dict:
    x = torch.randint(1, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = copy.deepcopy(model).train()  # a copy: training's forward moves the learned thresholds
        train = trained(x).logits
        causal = model(x, causal_routing=True).logits
        hf_logits = hf(x).logits
    out = {"train": train, "causal": causal, "hf": hf_logits}
    for name, run in {
        "generate": lambda: generate(model, PROMPTS, 6),
        "dynamic": lambda: engine_generate(model, PROMPTS, 6, max_batch=2),
        "static": lambda: engine_generate(model, PROMPTS, 6, max_batch=2, static=True),
    }.items():
        gen = run()
        out[name] = (gen.tokens, gen.depths)
    tokens = []
    for p in PROMPTS:
        got = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        tokens.append(got[0, len(p):].tolist())
    out["hf_generate"] = tokens
    return out


@pytest.mark.parametrize("variant", ["expert_choice", "token_choice"])
def test_an_injected_gate_changes_every_path_together(variant, tmp_path):
    kw = {"sharing": "cycle", "kv_mode": "shared"} if variant == "token_choice" else {}
    model = mor(variant, seed=2, init_std=0.5, **kw).eval()  # a large init: the gate decides the tokens
    save_model_folder(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "routing.py").read_bytes() == Path(routing.__file__).read_bytes()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf.routing).__module__.startswith("transformers_modules")  # the shipped copy, not megamor's

    before = _outputs(model, hf)
    model.routing.gate_fn = inverted_gate
    hf.routing.gate_fn = inverted_gate
    after = _outputs(model, hf)

    for key in ("train", "causal", "hf"):  # every forward changed
        assert (before[key] - after[key]).abs().max().item() > 1e-2, key
    assert before["generate"][0] != after["generate"][0]
    for state in (before, after):  # and the paths still agree
        assert (state["causal"] - state["hf"]).abs().max().item() <= 1e-5
        assert state["dynamic"] == state["generate"] and state["static"] == state["generate"]
        assert state["hf_generate"] == state["generate"][0]
