"""`trainer.init_from`: a run starts at step 0 from megamor.convert's weights."""

from __future__ import annotations

import pytest
import torch

from megamor.convert import convert, target_config
from megamor.model import MoRLM

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)


def test_trainer_starts_from_converted_weights(tiny_config, tmp_path):
    """`trainer.init_from` loads megamor.convert's output at step 0 (lr ~0: the weights stay)."""
    from megamor.convert import save
    from megamor.model import ModelConfig
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
