"""What a real trainer does when it meets an existing run folder with other settings: other
training data, checkpoint.resume=false, another ZeRO stage (a universal conversion), and what
its saves keep. One tiny trained run (`base`, a few steps, `python -m megamor.train`) is copied
for each test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.train.helpers import assert_ok, launch

pytestmark = pytest.mark.launch

COMMON = ["trainer.max_steps=2", "checkpoint.every_steps=2", "eval.at_end=false"]


@pytest.fixture(scope="module")
def base(tiny_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume_runs") / "base"
    run = launch(tiny_config, run_dir, COMMON)
    assert_ok(run)
    return run_dir


def copy_run(base: Path, name: str) -> Path:
    dst = base.parent / name
    shutil.copytree(base, dst)
    return dst


def test_other_training_data_on_resume_is_one_line_and_exit_2(base, tiny_config, tiny_data):
    """data.train changed on an existing run: refused by the preflight, before the engine is
    built, naming the key and the documented way to change the data (trainer.continue_from)."""
    run_dir = copy_run(base, "other_data")
    shards = tiny_data / "shards"
    run = launch(tiny_config, run_dir, [*COMMON, f"data.train=[{shards},{shards}]"])
    assert run.rc == 2, run.output[-3000:]
    assert "Traceback" not in run.output
    errors = [ln for ln in run.output.splitlines() if "error" in ln]
    assert len(errors) == 1 and "config key 'data.train'" in errors[0], run.output[-3000:]
    assert "1 train sources then, 2 now" in errors[0] and "trainer.continue_from=" in errors[0]
    assert "megamor: tiny |" not in run.output  # the engine was never built
