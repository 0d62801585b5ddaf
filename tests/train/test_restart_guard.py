"""Automatic restarts without progress end the job (megamor/train/callbacks/restart_guard.py):
the count's rules, and real one-process runs killed before their first checkpoint and restarted
as SLURM restarts them (SLURM_RESTART_COUNT in the environment)."""

from __future__ import annotations

import json

import pytest

from megamor.train.callbacks.restart_guard import (
    RESTARTS_FILE,
    is_automatic_restart,
    record_attempt,
    refusal,
    uncount_attempt,
)
from megamor.train.signals import EXIT_FAILED
from tests.train.helpers import assert_ok, launch


def test_attempts_count_restarts_from_one_checkpoint_and_reset_on_progress_or_by_hand(tmp_path):
    assert record_attempt(tmp_path, 0, restarted=False) == 1
    assert record_attempt(tmp_path, 0, restarted=True) == 2
    assert record_attempt(tmp_path, 0, restarted=True) == 3
    assert record_attempt(tmp_path, 8, restarted=True) == 1  # a newer checkpoint: progress
    assert record_attempt(tmp_path, 8, restarted=True) == 2
    assert record_attempt(tmp_path, 8, restarted=False) == 1  # started by hand
    assert json.loads((tmp_path / RESTARTS_FILE).read_text()) == {"step": 8, "attempts": 1}


def test_an_attempt_a_stop_signal_ended_does_not_count(tmp_path):
    record_attempt(tmp_path, 4, restarted=False)
    assert record_attempt(tmp_path, 4, restarted=True) == 2
    uncount_attempt(tmp_path, 4)  # preempted before saving anything newer
    assert record_attempt(tmp_path, 4, restarted=True) == 2
    uncount_attempt(tmp_path, 0)  # another step's record: untouched
    assert json.loads((tmp_path / RESTARTS_FILE).read_text()) == {"step": 4, "attempts": 2}


def test_an_unreadable_record_starts_the_count_again(tmp_path):
    (tmp_path / RESTARTS_FILE).write_text("{not json")
    assert record_attempt(tmp_path, 0, restarted=True) == 1
    (tmp_path / RESTARTS_FILE).write_text('{"step": 0, "attempts": "3"}')
    assert record_attempt(tmp_path, 0, restarted=True) == 1


@pytest.mark.parametrize("env, auto", [({}, False), ({"SLURM_RESTART_COUNT": "0"}, False),
                                       ({"SLURM_RESTART_COUNT": "2"}, True),
                                       ({"TORCHELASTIC_RESTART_COUNT": "1"}, True)])
def test_automatic_restarts_are_the_schedulers(env, auto):
    assert is_automatic_restart(env) is auto


def test_refusal_only_past_the_limit():
    assert refusal(0, attempts=3, limit=2) is None  # 2 restarts: within the limit
    line = refusal(12, attempts=4, limit=2)
    assert line is not None and line.startswith("3 automatic restarts in a row resumed from the checkpoint of step 12")
    assert "trainer.max_restarts_without_progress=2" in line
    assert refusal(0, attempts=100, limit=0) is None  # 0: no limit


@pytest.mark.launch
def test_a_restart_loop_before_the_first_checkpoint_ends_with_exit_1(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    common = ["trainer.max_steps=6", "checkpoint.every_steps=4", "eval.at_end=false",
              "trainer.max_restarts_without_progress=1"]
    killed = {"MEGAMOR_FAULTS": "sigkill_after_step=1"}  # every attempt dies before step 4's checkpoint
    first = launch(tiny_config, run_dir, common, env=killed)
    assert first.rc == -9, first.output[-3000:]
    again = launch(tiny_config, run_dir, common, env={**killed, "SLURM_RESTART_COUNT": "1"})
    assert again.rc == -9, again.output[-3000:]  # one restart: within the limit, it trains (and dies)
    rows = again.records()
    refused = launch(tiny_config, run_dir, common, env={**killed, "SLURM_RESTART_COUNT": "2"})
    assert refused.rc == EXIT_FAILED, refused.output[-3000:]
    assert ("megamor.train: 2 automatic restarts in a row resumed from the start (no checkpoint of this run folder "
            "yet) and none saved a newer one: not retrying") in refused.output
    assert refused.records() == rows  # refused before training or logging anything
    assert json.loads((run_dir / RESTARTS_FILE).read_text()) == {"step": 0, "attempts": 0}  # cleared
    fixed = launch(tiny_config, run_dir, common, env={"SLURM_RESTART_COUNT": "3"})  # `scontrol requeue` after a fix
    assert_ok(fixed)
    assert json.loads((run_dir / RESTARTS_FILE).read_text()) == {"step": 0, "attempts": 1}
    rerun = launch(tiny_config, run_dir, common, env={"SLURM_RESTART_COUNT": "4"})  # complete: nothing counted
    assert_ok(rerun)
    assert json.loads((run_dir / RESTARTS_FILE).read_text()) == {"step": 0, "attempts": 1}
