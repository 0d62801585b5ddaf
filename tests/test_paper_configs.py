"""configs/experiments/paper/ and configs/studies/paper_360m.yaml: the paper's runs as its
released configs (the official code's conf/pretrain/250720_pretrain_smollm-360m_*.yaml) and its
text (Appendix D, Tables 3 and the 1.7B table) set them. Every config loads and validates; the
facts are checked against numbers taken from those sources, or recomputed here by the paper's
rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from megamor.config import ConfigError
from megamor.env import repo_root
from megamor.model.config import load_model_config
from megamor.model.flops import paper_flops_per_token
from megamor.study.config import load_study
from megamor.study.plan import plan_runs
from megamor.train.config import load_experiment

PAPER = repo_root() / "configs" / "experiments" / "paper"
SIZES = {  # size: (FLOP budget, variants)
    "135m": (16.5e18, ["vanilla", "recursive_3", "mor_expert_3", "mor_token_3"]),
    "360m": (16.5e18, ["vanilla", "recursive_2", "recursive_3", "recursive_4", "mor_expert_2", "mor_expert_3",
                       "mor_expert_4", "mor_token_3", "mor_expert_3_kv_share"]),
    "1_7b": (68.5e18, ["vanilla", "recursive_2", "recursive_3", "mor_expert_2", "mor_expert_3", "mor_token_3"]),
    "730m": (16.5e18, ["vanilla", "recursive_3", "mor_expert_3"]),  # the isoFLOP study's fourth size
}
TOKENS_PER_STEP = 1024 * 2048
# The released 360M configs: num_warmup_steps and num_train_steps
RELEASED_WARMUP = {"vanilla": 57, "mor": 86}
RELEASED_STEPS = {"vanilla": 9438, "recursive_2": 9438, "recursive_3": 9438, "recursive_4": 8883, "mor_expert_2": 12619,
                  "mor_expert_3": 14161, "mor_expert_4": 14216, "mor_token_3": 14161, "mor_expert_3_kv_share": 14672}
CONFIGS = [(size, v) for size, (_, variants) in SIZES.items() for v in variants]


def _warmup_by_the_papers_rule(size: str, mor: bool) -> int:
    """5% of the steps at the smallest isoFLOP budget (2e18) of the family's reference model,
    as the released 360M configs apply it: vanilla for vanilla/recursive, MoR-expert-3 for MoR."""
    ref = load_model_config(repo_root() / "configs" / "model" / size / ("mor_expert_3.yaml" if mor else "vanilla.yaml"))
    return round(0.05 * 2e18 / paper_flops_per_token(ref, 2048) / TOKENS_PER_STEP)


def test_the_folder_holds_exactly_the_paper_configs():
    found = sorted((p.parent.name, p.stem) for p in PAPER.glob("*/*.yaml"))
    assert found == sorted(CONFIGS)


@pytest.mark.parametrize("size,variant", CONFIGS)
def test_each_config_is_the_papers_run(size, variant):
    cfg = load_experiment([PAPER / size / f"{variant}.yaml"])
    m, r = cfg.model, cfg.model.router
    mor = variant.startswith("mor")
    # recipe: batch and sequence, AdamW, WSD with a 20% linear cool-down, bf16, ZeRO-2, SmolLM's eps
    assert (cfg.batch.global_batch_size, cfg.data.seq_len, m.max_seq_len) == (1024, 2048, 2048)
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.weight_decay, cfg.optim.grad_clip) == (3e-3, [0.9, 0.95], 0.1, 1.0)
    assert cfg.optim.decay_embeddings
    assert (cfg.schedule.type, cfg.schedule.decay_fraction, cfg.schedule.decay_shape, cfg.schedule.min_lr_ratio) == \
        ("wsd", 0.2, "linear", 0.0)
    assert (cfg.deepspeed.precision, cfg.deepspeed.zero_stage, m.norm_eps, m.vocab_size) == ("bf16", 2, 1e-5, 49152)
    # the length: the FLOP budget in the paper's convention
    flops = SIZES[size][0]
    assert (cfg.budget.flops, cfg.budget.count, cfg.flops.convention) == (flops, "forward", "paper")
    assert (cfg.trainer.max_steps, cfg.trainer.max_tokens) == (None, None)
    steps = round(flops / paper_flops_per_token(m, 2048) / TOKENS_PER_STEP)
    assert cfg.max_steps == steps
    # warmup: the paper's rule; at 360M the released value
    assert cfg.schedule.warmup_steps == _warmup_by_the_papers_rule(size, mor)
    if size == "360m":
        assert cfg.schedule.warmup_steps == RELEASED_WARMUP["mor" if mor else "vanilla"]
        assert abs(steps - RELEASED_STEPS[variant]) <= 1
        assert round(0.2 * steps) == round(0.2 * RELEASED_STEPS[variant])  # num_decay_steps
    # the tokenizer: SmolLM's, a placeholder path
    assert "SmolLM" in cfg.data.tokenizer
    # model and router as released
    nr = 1 if variant == "vanilla" else int(variant.split("_")[-1] if not variant.endswith("kv_share") else 3)
    assert m.num_recursions == nr and m.sharing == ("none" if nr == 1 else "middle_cycle")
    layers = {"135m": 30, "360m": 32, "730m": 26, "1_7b": 24}[size]
    if nr > 1 and (layers - 2) % nr:  # the paper adds layers so the middle splits: 1 + base x N_r + 1
        layers = 2 + -(-(layers - 2) // nr) * nr
    assert m.n_layers == layers
    assert m.kv_mode == ("shared" if variant.endswith("kv_share") else "recursion_wise")
    assert not m.init_scaled_residual  # Hugging Face Llama's init: every Linear N(0, 0.02)
    assert m.init_std == 0.02
    if variant.startswith("mor_expert"):
        assert (r.type, r.activation, r.alpha, r.network, r.temperature, r.gating, r.expert_choice_update) == \
            ("expert_choice", "sigmoid", 0.1, "linear", 1.0, "weighted", "paper")  # Eq. 1
        assert (r.aux_bce_coef, r.bce_reduction, r.bce_label_smoothing, r.z_loss_coef) == (0.001, "sum", 0.0, 0.0)
        assert not (r.learn_threshold or r.gate_straight_through or r.learn_alpha or r.aux_router or r.rand_router)
        assert r.cap_warmup_step == 0 and list(m.capacities) == pytest.approx([(nr - i) / nr for i in range(nr)])
    elif variant.startswith("mor_token"):
        assert (r.type, r.token_choice_update, r.token_func, r.alpha, r.network) == \
            ("token_choice", "paper", "softmax", 1.0, "linear")
        assert (r.balancing, r.balance_coef, r.z_loss_coef, r.bal_warmup_step, r.temperature, r.gating) == \
            ("loss", 0.1, 1e-5, 0, 1.0, "weighted")
        assert not r.rand_router
    else:
        assert r.type == "none"


def test_warmups_by_the_rule():
    got = {size: (_warmup_by_the_papers_rule(size, False), _warmup_by_the_papers_rule(size, True)) for size in SIZES}
    assert got == {"135m": (154, 220), "360m": (57, 86), "730m": (29, 43), "1_7b": (14, 19)}


def test_a_missing_tokenizer_placeholder_is_one_line_naming_the_key():
    cfg = load_experiment([PAPER / "360m" / "vanilla.yaml"])
    assert not Path(cfg.data.tokenizer).exists()  # not shipped
    with pytest.raises(ConfigError) as e:
        cfg.data.check_paths("data")  # the trainer's preflight; before the shards (placeholders too)
    assert e.value.key == "data.tokenizer" and "\n" not in str(e.value)
    assert str(e.value).startswith(f"config key 'data.tokenizer': tokenizer not found: {cfg.data.tokenizer}: put the tokenizer")


def test_paper_360m_runs_the_paper_configs_at_the_papers_token_counts(tmp_path):
    study = load_study(repo_root() / "configs" / "studies" / "paper_360m.yaml")
    assert (study.budget.flops, study.budget.count, study.flops.convention) == (16.5e18, "forward", "paper")
    assert "SmolLM" in study.data.tokenizer
    runs = {r.variant: r for r in plan_runs(study, tmp_path / "shards", tmp_path / "tok")}
    assert set(SIZES["360m"][1]) <= set(runs)
    for variant in SIZES["360m"][1]:
        run = runs[variant]
        assert run.config == Path(f"configs/experiments/paper/360m/{variant}.yaml")
        exp = load_experiment([run.config], run.overrides)
        paper = load_experiment([PAPER / "360m" / f"{variant}.yaml"])
        assert exp.max_steps == run.budget.steps == paper.max_steps  # the study trains the config's own length
        assert exp.schedule.warmup_steps == paper.schedule.warmup_steps and exp.model == paper.model
    for variant, tokens in (("vanilla", 19.79e9), ("mor_expert_2", 26.46e9), ("mor_expert_3", 29.70e9)):
        assert runs[variant].budget.tokens == pytest.approx(tokens, rel=0.005), variant
    default = runs["mor_expert_3_default"]  # megamor's router in the paper's recipe
    exp = load_experiment([default.config], default.overrides)
    assert exp.model.router.learn_threshold and exp.schedule.warmup_steps == 86


def test_a_variant_needs_a_model_config_or_its_own_experiment(tmp_path):
    text = (repo_root() / "configs" / "studies" / "paper_360m.yaml").read_text()
    bad = text.replace("{name: vanilla, experiment: configs/experiments/paper/360m/vanilla.yaml}", "{name: vanilla}")
    assert bad != text
    (tmp_path / "s.yaml").write_text(bad)
    with pytest.raises(ConfigError) as e:
        load_study(tmp_path / "s.yaml")
    assert e.value.key == "variants[0].model_config" and "or an `experiment`" in str(e.value)
