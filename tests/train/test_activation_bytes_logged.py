"""A real training run logs `mem/activation_bytes` (the saved-for-backward bytes of the window's
measured micro-batch, megamor.observe.activation_memory) and the planner's activation bytes
(megamor.plan) stay within 15% of it (the issue's bound), with and without checkpointing."""

from __future__ import annotations

import pytest

from megamor.plan.activations import ActivationSpec, activation_bytes
from megamor.train.config import load_experiment
from tests.train.helpers import assert_ok, launch

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
def test_logged_activation_bytes_match_the_plan(tiny_config, tmp_path, checkpointing):
    overrides = ["trainer.max_steps=2", "checkpoint.every_steps=0", "checkpoint.save_final=false",
                 f"trainer.activation_checkpointing={str(checkpointing).lower()}"]
    run = launch(tiny_config, tmp_path / "run", overrides)
    assert_ok(run)
    logged = [r["mem/activation_bytes"] for r in run.records() if "mem/activation_bytes" in r]
    assert logged, "no record has mem/activation_bytes"
    exp = load_experiment([tiny_config], overrides)
    spec = ActivationSpec(exp.batch.micro_batch_size, exp.data.seq_len, exp.deepspeed.precision, checkpointing,
                          document_masking=exp.data.document_masking)
    planned = activation_bytes(exp.model, spec)["total"]
    assert planned == pytest.approx(max(logged), rel=0.15), (logged, planned)
