import pytest

from megamor.config import ConfigError, load_config
from megamor.env import repo_root
from megamor.model import ModelConfig, load_model_config


def _expect(key: str, text: str, **overrides):
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, overrides=[f"{k}={v}" for k, v in overrides.items()])
    assert e.value.key == key, str(e.value)
    assert text in str(e.value)


def test_layers_not_divisible_for_strategy():
    _expect("n_layers", "multiple of num_recursions", sharing="cycle", num_recursions=3, n_layers=8)
    _expect("n_layers", "n_layers - 2", sharing="middle_cycle", num_recursions=4, n_layers=8)


def test_heads_not_divisible():
    _expect("n_kv_heads", "not divisible", n_heads=8, n_kv_heads=3)
    _expect("n_heads", "not divisible", d_model=100, n_heads=8)


def test_increasing_capacities():
    _expect(
        "router.capacity",
        "non-increasing",
        sharing="cycle",
        num_recursions=2,
        n_layers=8,
        **{"router.type": "expert_choice", "router.capacity": "[0.5,1.0]"},
    )


def test_unknown_key_names_full_path():
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, overrides=["router.capacty=[1.0]"])
    assert e.value.key == "router.capacty"


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, overrides=["d_model=wide"])
    assert e.value.key == "d_model"


def test_bad_enums_and_combinations():
    _expect("sharing", "must be one of", sharing="spiral")
    _expect("router.type", "must be one of", **{"router.type": "random"})
    _expect("router.type", "needs a sharing strategy", **{"router.type": "expert_choice"})
    _expect("num_recursions", "sharing 'none'", num_recursions=2)
    _expect("kv_mode", "cycle or middle_cycle", sharing="sequence", num_recursions=2, kv_mode="shared")
    _expect(
        "router.capacity",
        "needs 3 entries",
        sharing="middle_cycle",
        num_recursions=3,
        **{"router.type": "expert_choice", "router.capacity": "[1.0,0.5]"},
    )


def test_every_shipped_config_loads():
    paths = sorted((repo_root() / "configs" / "model").rglob("*.yaml"))
    assert len(paths) >= 50
    for p in paths:
        cfg = load_model_config(p)
        assert cfg.num_unique_layers <= cfg.n_layers, p


def test_layer_plans_follow_the_paper():
    cyc = ModelConfig(n_layers=6, sharing="cycle", num_recursions=3)
    assert cyc.layer_plan() == ([], [[0, 1], [0, 1], [0, 1]], [])
    seq = ModelConfig(n_layers=6, sharing="sequence", num_recursions=3)
    assert seq.layer_plan() == ([], [[0, 0], [0, 1], [1, 1]], [])  # each layer 3x in a row
    mc = ModelConfig(n_layers=8, sharing="middle_cycle", num_recursions=3)
    assert mc.layer_plan() == ([0], [[1, 2], [1, 2], [1, 2]], [3])
    ms = ModelConfig(n_layers=8, sharing="middle_sequence", num_recursions=2)
    assert ms.layer_plan() == ([0], [[1, 1, 2], [2, 3, 3]], [4])


def test_gate_straight_through_defaults_to_what_the_shipped_configs_use():
    from megamor.model.config import RouterConfig

    assert RouterConfig().gate_straight_through is True
    expert = load_config(ModelConfig, overrides=["sharing=cycle", "num_recursions=2", "router.type=expert_choice"])
    assert expert.router.gate_straight_through is True
    for router in ("none", "token_choice"):  # expert choice only: one value (false) for every other router
        sharing = ["sharing=cycle", "num_recursions=2"] if router != "none" else []
        assert load_config(ModelConfig, overrides=[*sharing, f"router.type={router}"]).router.gate_straight_through is False
    shipped = list((repo_root() / "configs" / "model").rglob("mor_expert_*.yaml"))
    assert shipped and all(load_model_config(p).router.gate_straight_through == (not p.stem.endswith("_paper"))
                           for p in shipped)


def test_a_stored_config_without_the_key_keeps_the_soft_gate():
    """A megamor.pt / export / run config written before the default changed has no
    gate_straight_through: it loads with false, the behaviour it was trained with."""
    import dataclasses

    from megamor.model.config import with_stored_defaults
    from megamor.runs.load import _model_config

    cfg = load_config(ModelConfig, overrides=["sharing=cycle", "num_recursions=2", "router.type=expert_choice"])
    old = dataclasses.asdict(cfg)
    del old["router"]["gate_straight_through"]
    assert _model_config(old, repo_root()).router.gate_straight_through is False
    assert _model_config(dataclasses.asdict(cfg), repo_root()).router.gate_straight_through is True  # a new save
    old_without_router = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "router"}
    assert with_stored_defaults(old_without_router).router.gate_straight_through is False
