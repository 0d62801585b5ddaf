"""docs/paper.md names, for each deviation from the paper, the config that gives the paper's
behaviour: every such `key=value` must load (a renamed or mistyped key fails here) and take effect."""

from __future__ import annotations

import re

from omegaconf import OmegaConf

from megamor.env import repo_root
from megamor.model.config import load_model_config
from megamor.study.config import load_study
from megamor.train.config import load_experiment

DOC = repo_root() / "docs" / "paper.md"
EXPERIMENT = "configs/experiments/360m.yaml"
TOKEN_CHOICE_KEYS = ("router.token_choice_update", "router.token_func", "router.bal_warmup_step")  # checked on mor_token_3


def _settings() -> list[str]:
    found = re.findall(r"`([a-z_][a-z_.]*=[^`\s]+)`", DOC.read_text())
    assert len(found) >= 12, found
    return sorted(set(found))


def _value(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_setting_the_page_names_loads_and_takes_effect():
    for setting in _settings():
        k, v = setting.split("=", 1)
        want = OmegaConf.from_dotlist([f"v={v}"]).v  # the value as an override parses it
        if k.startswith(("router.", "norm_eps")):
            model = "mor_token_3" if k.startswith(TOKEN_CHOICE_KEYS) else "mor_expert_3"
            assert _value(load_model_config(f"{repo_root()}/configs/model/360m/{model}.yaml", overrides=[setting]), k) == want
        elif k == "eval.fewshot_limit":  # a study key
            assert _value(load_study(repo_root() / "configs/studies/paper_360m.yaml", [setting]), k) == want
        else:
            exp = load_experiment([repo_root() / EXPERIMENT], [setting])
            if k != "model_config":
                assert _value(exp, k) == want, setting
            else:
                assert exp.model.router.aux_bce_coef == 0.001  # the _paper router
