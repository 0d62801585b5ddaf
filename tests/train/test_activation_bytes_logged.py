"""A real training run logs `mem/activation_bytes` (the saved-for-backward bytes of the window's
measured micro-batch, megamor.observe.activation_memory) and the planner's activation bytes
(megamor.plan) stay within 15% of it (the issue's bound): without activation checkpointing
here, with it in tests/train/test_observe_runs.py's phase-timer run."""

from __future__ import annotations

import pytest

from tests.train.helpers import assert_logged_activation_bytes_match_the_plan, assert_ok, launch

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)


def test_logged_activation_bytes_match_the_plan_without_checkpointing(tiny_config, tmp_path):
    """With checkpointing (the tiny config's default) the same check runs on the phase-timer
    run of tests/train/test_observe_runs.py (one launch serves both)."""
    overrides = ["trainer.max_steps=2", "checkpoint.every_steps=0", "checkpoint.save_final=false",
                 "trainer.activation_checkpointing=false"]
    run = launch(tiny_config, tmp_path / "run", overrides)
    assert_ok(run)
    assert_logged_activation_bytes_match_the_plan(run, tiny_config, overrides)
