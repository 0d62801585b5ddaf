"""Router knobs in real runs: the trainer passes its step to the routing policy (capacity
warmup shows in the logged routing; a run resumed inside the warmup equals an uninterrupted
one), and the auxiliary router trains under ZeRO-2 with its precision/recall logged."""

from __future__ import annotations

import math

import pytest

from tests.train.helpers import assert_ok, launch

WARM = ["model.router.cap_warmup_step=4", "trainer.max_steps=5", "checkpoint.every_steps=2", "eval.at_end=false",
        "trainer.activation_checkpointing=false"]


@pytest.mark.launch
def test_capacity_warmup_in_a_run_and_resume_is_exact(tiny_config, tmp_path):
    whole = launch(tiny_config, tmp_path / "whole", WARM)
    assert_ok(whole)
    frac = {r["step"]: r["router/selected_frac_r2"] for r in whole.records() if "router/selected_frac_r2" in r}
    # tiny: 2 recursions, capacity [1, 0.5], seq 32: k = int(c * 32) of 32 tokens at step 2
    for step in range(1, 6):
        c = 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / 4)))
        assert frac[step] == pytest.approx(int(c * 32) / 32), step
    cut = launch(tiny_config, tmp_path / "cut", WARM, env={"MEGAMOR_FAULTS": "sigkill_after_step=3"})
    assert cut.rc != 0  # killed after step 3; its newest checkpoint is step 2's
    resumed = launch(tiny_config, tmp_path / "cut", WARM)
    assert_ok(resumed)
    assert resumed.losses()[5] == whole.losses()[5] and resumed.losses()[3] == whole.losses()[3]


@pytest.mark.launch
def test_aux_router_trains_under_zero2_and_its_precision_recall_are_logged(tiny_config, tmp_path):
    run = launch(tiny_config, tmp_path / "aux", ["model.router.aux_router=true", "trainer.max_steps=3",
                                                 "eval.at_end=true", "checkpoint.every_steps=0", "deepspeed.zero_stage=2"])
    assert_ok(run)
    recs = run.records()
    assert all("train/router_aux_bce" in r and "train/router_bce" not in r for r in recs if "train/loss" in r)
    val = [r for r in recs if "val/router_recall_r2" in r]
    assert val and all(0.0 <= r[k] <= 1.0 for r in val for k in ("val/router_precision_r2", "val/router_recall_r2"))
