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
