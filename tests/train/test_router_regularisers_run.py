"""The router regularisers at the trainer's door: a bad value is one line naming the key (exit 2),
and a short real run logs them to metrics.jsonl."""

from __future__ import annotations

import math

import pytest

from megamor.env import repo_root
from tests.train.helpers import assert_ok, launch

DEMO = str(repo_root() / "configs" / "experiments" / "demo.yaml")


@pytest.mark.parametrize("args, key", [
    (["model.router.target_depth=2", "model.router.target_depth_coef=0.1"], "model.router.target_depth"),
    (["model.router.entropy_coef=inf"], "model.router.entropy_coef"),
])
def test_bad_regulariser_values_are_one_line_exit_2(args, key, capsys):
    from megamor.train.__main__ import main

    assert main(["--config", DEMO, *args, "--print-config"]) == 2  # the demo is expert choice
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"config key '{key}'" in err[0], err


@pytest.mark.launch
def test_regularisers_reach_metrics_jsonl(tiny_config, tmp_path):
    run = launch(tiny_config, tmp_path / "run", [
        "model.router.type=token_choice", "model.router.entropy_coef=0.01", "model.router.target_depth=1.5",
        "model.router.target_depth_coef=0.1", "trainer.max_steps=2", "trainer.activation_checkpointing=false",
        "deepspeed.zero_stage=0", "checkpoint.every_steps=0", "checkpoint.save_final=false", "eval.at_end=false"])
    assert_ok(run)
    rows = [r for r in run.records() if "train/loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert 0 < r["train/router_entropy"] <= math.log(2) + 1e-6  # 2 depths
        assert 1.0 <= r["train/router_expected_depth"] <= 2.0
        want = (r["train/router_expected_depth"] - 1.5) ** 2  # a mean of squares >= the square of the mean
        assert r["train/router_target_depth"] >= want - 1e-6 and math.isfinite(r["router/mean_depth"])
