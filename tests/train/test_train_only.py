"""`trainer.train_only: routers`: only the routers train; every other parameter is frozen
(requires_grad False, not in the optimizer) and stays bit for bit what it was."""

from __future__ import annotations

import pytest
import torch

from megamor.config import ConfigError
from megamor.model import ModelConfig, MoRLM
from megamor.train.config import OptimConfig, load_experiment
from megamor.train.optim import ROUTER_PREFIXES, build_optimizer, freeze_for

ROUTED = {"vocab_size": 64, "d_model": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 32,
          "num_recursions": 2}


def _model() -> MoRLM:
    torch.manual_seed(0)
    cfg = ModelConfig(**ROUTED)
    cfg.router.type, cfg.router.alpha, cfg.router.capacity = "expert_choice", 1.0, [1.0, 0.5]
    return MoRLM(cfg)


def test_only_routers_reach_the_optimizer_and_change():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = freeze_for(model, "routers")
    routers = {k for k, _ in model.named_parameters() if k.startswith(ROUTER_PREFIXES)}
    assert routers and n == sum(p.numel() for k, p in model.named_parameters() if k in routers)
    opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for k, p in model.named_parameters():
        assert p.requires_grad == (k in routers) and (id(p) in in_opt) == (k in routers), k
    model.train()
    for _ in range(3):
        x = torch.randint(0, 64, (4, 16))
        out = model(x, targets=x)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    frozen = [k for k in before if not k.startswith(ROUTER_PREFIXES)]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in routers)


def test_all_trains_everything():
    model = _model()
    assert freeze_for(model, "all") == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("overrides", "key", "reason"), [
    (["trainer.train_only=layers"], "trainer.train_only", "must be one of ('all', 'routers'), got 'layers'"),
    (["trainer.train_only=routers"], "trainer.train_only", "routers: the model has no router (model.router.type none)"),
])
def test_bad_values_name_the_key(overrides, key, reason):
    with pytest.raises(ConfigError) as e:
        load_experiment([], ["data.train=[somewhere]", "trainer.max_steps=2", *overrides])
    assert (e.value.key, e.value.reason) == (key, reason)


@pytest.mark.launch
def test_router_tuning_of_an_adapted_llama(tiny_config, tmp_path):
    """megamor.adapt's output trains with trainer.train_only=routers: the routers move, every
    Llama weight stays bit for bit."""
    pytest.importorskip("transformers")
    from megamor.adapt.cli import main as adapt
    from megamor.runs.load import load_model, load_model_from_run
    from tests.adapt.checkpoints import make_checkpoint
    from tests.train.helpers import assert_ok, launch

    hf = make_checkpoint("llama", tmp_path / "hf", vocab_size=512, hidden_size=64, intermediate_size=128,
                         tie_word_embeddings=True)
    out = tmp_path / "adapted"
    assert adapt(["--model", str(hf), "--out", str(out), "--num-recursions", "2"]) == 0
    run = launch(tiny_config, tmp_path / "run", [f"model_config={out}/model.yaml", "model.sharing=none",
                                                 f"trainer.init_from={out}/megamor.pt", "trainer.train_only=routers",
                                                 "trainer.max_steps=3", "optim.lr=1e-2"])
    assert_ok(run)
    tuned, _ = load_model_from_run(run.run_dir)
    start = load_model(out / "megamor.pt", dtype=torch.float32).state_dict()
    now = tuned.state_dict()
    assert all(torch.equal(now[k], v) for k, v in start.items() if not k.startswith(ROUTER_PREFIXES))
    assert any(not torch.equal(now[k], v) for k, v in start.items() if k.startswith("routers.") and "net" in k)
