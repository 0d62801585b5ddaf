"""Changing the run's length or schedule on resume is refused unless schedule.allow_change."""

from __future__ import annotations

import pytest

from megamor.config import ConfigError
from megamor.train.config import load_experiment
from megamor.train.preflight import preflight
from megamor.train.schedule import LRSchedule
from megamor.train.schedule_change import check_schedule_change
from tests.train.helpers import assert_ok, launch

BASE = ["data.train=[x]", "optim.lr=3e-3"]


def test_extending_a_finished_wsd_run_says_what_the_lr_does():
    then = load_experiment([], BASE + ["trainer.max_steps=40"])
    now = load_experiment([], BASE + ["trainer.max_steps=50"])
    with pytest.raises(ConfigError) as e:
        check_schedule_change(now, then, 40, "RUN/checkpoints/step_40")
    msg = str(e.value)
    assert e.value.key == "trainer.max_steps" and "trainer.max_steps 40 -> 50" in msg
    assert "from 0 at step 40 to 0.0027 at step 41" in msg and "schedule.allow_change=true" in msg
    allowed = load_experiment([], BASE + ["trainer.max_steps=50", "schedule.allow_change=true"])
    assert "0.0027 at step 41" in check_schedule_change(allowed, then, 40, "x")
    same = load_experiment([], BASE + ["trainer.max_steps=40", "optim.lr=1e-3"])  # peak lr alone: not the shape
    assert check_schedule_change(same, then, 40, "x") is None
    other = load_experiment([], BASE + ["trainer.max_steps=40", "schedule.decay_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"schedule\.decay_fraction 0\.2 -> 0\.5"):
        check_schedule_change(other, then, 20, "x")


@pytest.mark.launch
def test_real_resume_refused_then_allowed(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    common = ["deepspeed.zero_stage=0", "checkpoint.every_steps=0", "eval.at_end=false"]
    assert_ok(launch(tiny_config, run_dir, common + ["trainer.max_steps=4"]))
    longer = load_experiment([tiny_config], [f"run_dir={run_dir}", *common, "trainer.max_steps=6"])
    with pytest.raises(ConfigError) as e:
        preflight(longer, 1)
    assert e.value.key == "trainer.max_steps" and "step 4" in str(e.value)

    run = launch(tiny_config, run_dir, common + ["trainer.max_steps=6", "schedule.allow_change=true"])
    assert_ok(run)
    assert "schedule changed on resume (trainer.max_steps 4 -> 6)" in run.output
    lr = {r["step"]: r["train/lr"] for r in run.records() if "train/lr" in r}
    new = LRSchedule.from_config(longer.schedule, longer.optim.lr, 6)
    assert lr[5] == pytest.approx(new.lr_at(5)) and lr[6] == pytest.approx(new.lr_at(6))
