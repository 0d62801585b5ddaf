"""`trainer.init_from`: a run starts at step 0 from megamor.convert's weights; the router
section need not match (routers are fresh after conversion), other differences are named."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import yaml

from megamor.config import ConfigError
from megamor.convert import convert, save, target_config
from megamor.env import repo_root
from megamor.model import ModelConfig, MoRLM
from megamor.model.config import load_model_config
from megamor.train.init_from import check_init_from, config_differences, load_init_weights

SHAPE = {"vocab_size": 512, "d_model": 64, "n_layers": 5, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "max_seq_len": 64}
RECIPE = ["sharing=middle_cycle", "num_recursions=3", "router.type=expert_choice"]  # the README's convert overrides
MOR_EXPERT_3 = "configs/model/33m/mor_expert_3.yaml"


def _vanilla(**kw) -> MoRLM:
    torch.manual_seed(0)
    return MoRLM(ModelConfig(**{**SHAPE, **kw}))


def _shipped(**kw) -> ModelConfig:
    """configs/model/33m/mor_expert_3.yaml at the tiny shape, as an experiment's `model:` keys make it."""
    return load_model_config(repo_root() / MOR_EXPERT_3, overrides=[f"{k}={v}" for k, v in {**SHAPE, **kw}.items()])


def test_router_settings_need_not_match():
    conv = target_config(_vanilla().cfg, RECIPE)  # dataclass router defaults: alpha None, soft gate
    run = _shipped()
    assert conv.router != run.router and run.router.gate_straight_through
    assert config_differences(conv, run) == []
    assert config_differences(conv, _shipped(max_seq_len=256)) == []  # RoPE keeps no table


def test_mismatch_names_only_the_differing_keys_with_both_values(tmp_path):
    path = save(convert(_vanilla(), target_config(_vanilla().cfg, RECIPE), "stepwise"), tmp_path / "conv")
    with pytest.raises(ConfigError) as e:
        check_init_from(str(path), _shipped(d_ff=256))
    assert e.value.key == "trainer.init_from"
    assert e.value.reason == f"{path} holds a different model: model.d_ff: 128 in the file, 256 in this run"


def test_loads_every_tensor_and_keeps_the_run_settings(tmp_path):
    src = _vanilla()
    conv = convert(src, target_config(src.cfg, RECIPE), "stepwise")
    path = save(conv, tmp_path / "conv")
    torch.manual_seed(1)
    model = MoRLM(_shipped())
    report = load_init_weights(model, str(path))
    assert report.tensors == len(conv.state_dict()) and not report.routers_fresh
    assert report.line() == f"initialised from {path} ({len(conv.state_dict())} tensors)"
    for name, t in conv.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    assert model.cfg.router.gate_straight_through  # the run's router settings, not the file's


def test_routers_of_another_form_start_fresh(tmp_path):
    src = _vanilla()
    recursive = convert(src, target_config(src.cfg, ["sharing=middle_cycle", "num_recursions=3"]), "average")
    path = save(recursive, tmp_path / "conv")
    torch.manual_seed(1)
    model = MoRLM(_shipped())
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("routers.")}
    report = load_init_weights(model, str(path))
    assert report.routers_fresh == "router type 'none' -> 'expert_choice'"
    assert report.tensors == len(recursive.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.items())
    assert torch.equal(model.layers[1].mlp.up_proj.weight, recursive.layers[1].mlp.up_proj.weight)
    assert "routers start fresh (router type 'none' -> 'expert_choice')" in report.line()


@pytest.mark.launch
def test_trainer_starts_from_converted_weights(tiny_config, tmp_path):
    """`trainer.init_from` loads megamor.convert's output at step 0 (lr ~0: the weights stay)."""
    from megamor.runs.load import load_model_from_run
    from tests.train.helpers import assert_ok, launch

    torch.manual_seed(0)
    src = MoRLM(ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64))
    cfg = target_config(src.cfg, ["sharing=middle_cycle", "num_recursions=2", "router.type=expert_choice"])
    path = save(convert(src, cfg, "average"), tmp_path / "conv")
    run = launch(tiny_config, tmp_path / "run", [f"trainer.init_from={path}", "trainer.max_steps=2", "optim.lr=1e-12"])
    assert_ok(run)
    trained, _ = load_model_from_run(run.run_dir)
    want = (src.layers[1].self_attn.q_proj.weight + src.layers[2].self_attn.q_proj.weight) / 2
    assert torch.allclose(trained.layers[1].self_attn.q_proj.weight, want, atol=1e-6)
    bad = launch(tiny_config, tmp_path / "bad", [f"trainer.init_from={path}", "model.num_recursions=1", "model.sharing=none",
                                                 "model.router.type=none", "trainer.max_steps=1"])
    assert bad.rc == 2 and "trainer.init_from" in bad.output


@pytest.mark.launch
def test_newcomer_recipe_from_hf_llama_trains_with_the_shipped_router(tiny_config, tmp_path):
    """Issue 27: convert an HF Llama with the README's overrides, then train with
    model_config=configs/model/33m/mor_expert_3.yaml: it trains with the straight-through gate
    and says what it loaded."""
    transformers = pytest.importorskip("transformers")
    from megamor.model.hf import llama_config, to_llama_state_dict
    from tests.train.helpers import assert_ok, launch

    src = _vanilla()
    hf = transformers.LlamaForCausalLM(llama_config(src.cfg))
    hf.load_state_dict(to_llama_state_dict(src.cfg, src.state_dict()), strict=False)
    hf.save_pretrained(tmp_path / "llama")
    conv = tmp_path / "conv"
    r = subprocess.run([sys.executable, "-m", "megamor.convert", str(tmp_path / "llama"), "--out", str(conv),
                        "--init", "stepwise", *RECIPE], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    # tiny_config's model keys (its shape) on top of the shipped MoR config, as an experiment's `model:` does
    run = launch(tiny_config, tmp_path / "run", [f"model_config={MOR_EXPERT_3}", "model.n_layers=5",
                                                 "model.num_recursions=3", f"trainer.init_from={conv}/megamor.pt",
                                                 "trainer.max_steps=2"])
    assert_ok(run)
    n = len(torch.load(conv / "megamor.pt", weights_only=True)["model"]) + 1  # + the tied head
    assert f"initialised from {conv}/megamor.pt ({n} tensors)" in run.output
    resolved = yaml.safe_load((run.run_dir / "config.yaml").read_text())["model"]["router"]
    assert resolved["gate_straight_through"] is True and resolved["alpha"] == 0.1
    assert dataclasses.asdict(_shipped().router) == resolved
