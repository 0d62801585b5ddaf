"""The adapter's wrapped model computes the Hugging Face model's logits (routing off), for
each architecture, and routes (skips layers) when routing is on."""

from __future__ import annotations

import pytest
import torch

from megamor.adapt import SUPPORTED, AdaptError, adapt_config, read_source, wrap
from tests.adapt.checkpoints import make_checkpoint

pytest.importorskip("transformers")


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("kind", SUPPORTED)
@pytest.mark.parametrize("num_recursions", [2, 4])
def test_no_skip_logits_equal_hf(tmp_path, kind, num_recursions):
    folder = make_checkpoint(kind, tmp_path / kind)
    src, state, _ = read_source(folder)
    model = wrap(src, state, adapt_config(src, num_recursions, no_skip=True)).eval()
    ids = torch.randint(0, src.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    want = hf_logits(folder, ids)
    with torch.no_grad():
        for causal in (False, True):
            out = model(ids, causal_routing=causal)
            assert (out.logits - want).abs().max().item() <= 1e-4
            assert out.stats.depth.eq(num_recursions).all()  # every token ran every step


def test_features_reach_the_config(tmp_path):
    """Qwen2's q/k/v biases, Qwen3's QK-norm and head width, tying, Mistral's window."""
    cfgs = {k: read_source(make_checkpoint(k, tmp_path / k))[0] for k in SUPPORTED}
    assert cfgs["qwen2"].qkv_bias and not cfgs["llama"].qkv_bias
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 16 and cfgs["qwen3"].attn_head_dim == 16
    assert cfgs["qwen2"].tie_embeddings and not cfgs["llama"].tie_embeddings
    assert cfgs["mistral"].max_seq_len == 16  # capped at the sliding window


def test_a_missing_feature_breaks_parity(tmp_path):
    """The parity test can fail: Qwen3 without its QK-norm is not the source model."""
    folder = make_checkpoint("qwen3", tmp_path / "q3")
    src, state, _ = read_source(folder)
    src.qk_norm = False
    state = {k: v for k, v in state.items() if "_norm." not in k or "layernorm" in k}
    model = wrap(src, state, adapt_config(src, 2, no_skip=True)).eval()
    ids = torch.randint(0, src.vocab_size, (1, 10))
    with torch.no_grad():
        assert (model(ids).logits - hf_logits(folder, ids)).abs().max().item() > 1e-3


def test_mistral_beyond_the_window_differs(tmp_path):
    """Within the sliding window the logits match; beyond it megamor attends to the whole
    context (documented): positions past the window differ, earlier ones still match."""
    folder = make_checkpoint("mistral", tmp_path / "m", sliding_window=6)
    src, state, _ = read_source(folder)
    model = wrap(src, state, adapt_config(src, 2, no_skip=True)).eval()
    ids = torch.randint(0, src.vocab_size, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(ids).logits - hf_logits(folder, ids)).abs().amax(-1)[0]
    assert diff[:6].max().item() <= 1e-4
    assert diff[6:].max().item() > 1e-3


def test_routing_on_skips_layers(tmp_path):
    folder = make_checkpoint("llama", tmp_path / "l")
    src, state, _ = read_source(folder)
    model = wrap(src, state, adapt_config(src, 4)).eval()  # capacities 1, .75, .5, .25
    ids = torch.randint(0, src.vocab_size, (2, 16))
    with torch.no_grad():
        out = model(ids)
    assert out.stats.tokens_per_step == [32, 24, 16, 8]
    assert model.cfg.sharing == "none" and model.cfg.num_unique_layers == 4


def test_weights_untouched(tmp_path):
    folder = make_checkpoint("qwen2", tmp_path / "q2")
    src, state, _ = read_source(folder)
    model = wrap(src, state, adapt_config(src, 2))
    mine = model.state_dict()
    for k, v in state.items():
        assert torch.equal(mine[k], v), k


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(AdaptError, match="model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        read_source(tmp_path)


def test_num_recursions_must_divide(tmp_path):
    src, _, _ = read_source(make_checkpoint("llama", tmp_path / "l"))
    with pytest.raises(AdaptError, match="divide"):
        adapt_config(src, 3)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_decoding_paths_agree_with_bias_and_qk_norm(tmp_path, kind):
    """The KV-cache decode, the engine's decode step (which computes queries apart from the
    forward: Attention.project_q) and a full recomputation give the same tokens and depths."""
    from megamor.inference.calibrate import calibrate_routers
    from megamor.inference.engine import engine_generate
    from megamor.inference.generate import generate

    src, state, _ = read_source(make_checkpoint(kind, tmp_path / kind))
    model = wrap(src, state, adapt_config(src, 4)).eval()
    calibrate_routers(model, torch.randint(0, src.vocab_size, (4, 24), generator=torch.Generator().manual_seed(3)))
    prompts = [[5, 9, 13, 2], [7, 1]]
    ref = generate(model, prompts, 6, use_cache=False)
    for out in (generate(model, prompts, 6), engine_generate(model, prompts, 6),
                engine_generate(model, prompts, 6, static=True)):
        assert out.tokens == ref.tokens and out.depths == ref.depths
    assert len({d for row in ref.depths for d in row}) > 1  # routing really varies the depth


@pytest.mark.parametrize(("kind", "change", "needle"), [
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None},
     "rope_scaling 'llama3' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}},
     "rope_scaling 'yarn' is not supported"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ("llama", {"attention_bias": True}, "attention_bias true is not supported for llama"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window true is not supported"),
])
def test_features_that_would_change_the_function_are_refused(tmp_path, kind, change, needle):
    import json

    folder = make_checkpoint(kind, tmp_path / kind)
    info = json.loads((folder / "config.json").read_text())
    info.update(change)
    (folder / "config.json").write_text(json.dumps(info))
    with pytest.raises(AdaptError, match=needle):
        read_source(folder)


def test_tensor_parallelism_refuses_the_qwen_attention_keys():
    from megamor.model import ModelConfig
    from megamor.parallel.tensor_parallel import layout_errors

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, qkv_bias=True, qk_norm=True)
    assert [k for k, _ in layout_errors(cfg, 2)] == ["model.qkv_bias", "model.qk_norm"]
    assert layout_errors(cfg, 1) == []


def test_attn_head_dim_is_validated():
    from megamor.config import ConfigError
    from megamor.model import ModelConfig

    with pytest.raises(ConfigError, match="attn_head_dim"):
        ModelConfig(attn_head_dim=7).validate()
    cfg = ModelConfig(vocab_size=64, d_model=96, n_layers=2, n_heads=5, n_kv_heads=5, d_ff=64, attn_head_dim=16)
    cfg.validate()  # d_model / n_heads need not divide with a head width of its own
    from megamor.model import MoRLM

    assert cfg.head_dim == 16 and MoRLM(cfg)(torch.randint(0, 64, (1, 5))).logits.shape == (1, 5, 64)


def test_the_hf_export_names_the_keys_it_cannot_write(tmp_path):
    from megamor.model.hf import unexportable_keys

    src, _, _ = read_source(make_checkpoint("qwen3", tmp_path / "q3"))
    assert unexportable_keys(src) == ["model.qk_norm", "model.attn_head_dim"]
    assert unexportable_keys(read_source(make_checkpoint("llama", tmp_path / "l"))[0]) == []
