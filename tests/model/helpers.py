"""Small model configs shared by the model tests."""

from __future__ import annotations

import torch

from megamor.model import ModelConfig, MoRLM, RouterConfig


def tiny_config(**kw) -> ModelConfig:
    router = kw.pop("router", None)
    base = {"vocab_size": 211, "d_model": 64, "n_layers": 8, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
            "max_seq_len": 128}
    base.update(kw)
    cfg = ModelConfig(**base)
    if router is not None:
        cfg.router = router if isinstance(router, RouterConfig) else RouterConfig(**router)
    cfg.validate()
    return cfg


def mor(router_type: str = "expert_choice", sharing: str = "middle_cycle", nr: int = 3, seed: int = 0, **kw) -> MoRLM:
    torch.manual_seed(seed)
    router = kw.pop("router", {"type": router_type})
    n_layers = kw.pop("n_layers", 8 if sharing.startswith("middle") else 6)
    return MoRLM(tiny_config(sharing=sharing, num_recursions=nr, n_layers=n_layers, router=router, **kw))


def refused(key: str, **overrides) -> None:
    """Loading a ModelConfig with these overrides raises ConfigError naming `key`."""
    import pytest

    from megamor.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, overrides=[f"{k}={v}" for k, v in overrides.items()])
    assert e.value.key == key, str(e.value)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], [40, 41, 42, 43]]


def assert_decoding_and_export_agree(model: MoRLM, next_logits, tmp_path, new: int = 6):
    """Greedy decoding with caches equals greedy over `next_logits(ids) -> [vocab]` (the full causal
    forward of a reference); both engine schedules, dynamic and static, equal it token for token
    and depth for depth; the Hugging Face export gives the same logits and the same greedy text.
    Returns the generation."""
    import pytest

    transformers = pytest.importorskip("transformers")
    from megamor.hf.remote_code import save_model_folder
    from megamor.inference import engine_generate, generate

    gen = generate(model, PROMPTS, new)
    for p, toks in zip(PROMPTS, gen.tokens):
        seq = list(p)
        for _ in range(new):
            seq.append(int(next_logits(torch.tensor([seq])).argmax()))
        assert toks == seq[len(p):]
    for schedule in ("lockstep", "depthwise"):
        for static in (False, True):
            got = engine_generate(model, PROMPTS, new, max_batch=2, schedule=schedule, static=static)
            assert got.tokens == gen.tokens and got.depths == gen.depths, (schedule, static)
    save_model_folder(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                           dtype=torch.float32).eval()
    x = torch.randint(1, 200, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x, causal_routing=True).logits, atol=1e-5, rtol=0)
    for p, toks in zip(PROMPTS, gen.tokens):
        got = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert got[0, len(p):].tolist() == toks
    return gen
