"""What a real trainer does when it meets an existing run folder with other settings: other
training data, checkpoint.resume=false, another ZeRO stage (a universal conversion), and what
its saves keep. One tiny trained run (`base`, a few steps, `python -m megamor.train`) is copied
for each test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from megamor.env import repo_root
from megamor.runs.tags import list_complete
from tests.train.helpers import Run, assert_ok, launch, train_command, train_env

pytestmark = pytest.mark.launch

COMMON = ["trainer.max_steps=3", "checkpoint.every_steps=2", "checkpoint.keep_last=1", "eval.at_end=false"]


@pytest.fixture(scope="module")
def base_run(tiny_config, tmp_path_factory) -> Run:
    """3 steps, step 3's gradients non-finite (skipped): step_2 saved on the timer, step_3 by the
    final save, made during the non-finite streak."""
    run = launch(tiny_config, tmp_path_factory.mktemp("resume_runs") / "base", COMMON,
                 env={"MEGAMOR_FAULTS": "inf_grad_at_step=3"})
    assert_ok(run)
    return run


@pytest.fixture(scope="module")
def base(base_run) -> Path:
    return base_run.run_dir


def copy_run(base: Path, name: str) -> Path:
    dst = base.parent / name
    shutil.copytree(base, dst)
    return dst


def test_a_save_during_a_nonfinite_streak_never_prunes_the_last_good_tag(base_run):
    """keep_last=1: the final save of step 3 (a skipped step) keeps step_2, the newest tag from
    before the streak, and says so."""
    assert "step 3: " in base_run.output and "step skipped" in base_run.output, base_run.output[-3000:]
    assert [c.step for c in list_complete(base_run.run_dir)] == [2, 3], base_run.output[-3000:]
    assert "checkpoint step_00000002 kept beyond checkpoint.keep_last=1" in base_run.output


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


def test_resume_false_keeps_the_old_runs_logs_beside_its_tags_and_starts_a_new_wandb_run(base, tiny_config):
    """checkpoint.resume=false: the old metrics.jsonl (cut back to step 0 before) and W&B id
    (reused before) are moved beside the set-aside tags; the new run gets its own."""
    run_dir = copy_run(base, "restart")
    old_metrics, old_id = (run_dir / "metrics.jsonl").read_text(), (run_dir / "wandb_id").read_text()
    run = launch(tiny_config, run_dir, [*COMMON, "checkpoint.resume=false"])
    assert_ok(run)
    kept = run_dir / "checkpoints" / "quarantine" / "run_logs"
    assert kept.is_dir(), run.output[-3000:]
    assert (kept / "metrics.jsonl").read_text() == old_metrics and (kept / "wandb_id").read_text() == old_id
    assert (run_dir / "wandb_id").read_text().strip() not in ("", old_id.strip())
    assert [r["step"] for r in run.records() if "train/loss" in r] == [1, 2, 3]
    assert sorted(p.name for p in kept.parent.iterdir() if p.is_dir()) == ["run_logs", "step_00000002", "step_00000003"]


def test_a_stop_signal_during_the_universal_conversion_exits_75(base, tiny_config):
    """Resuming at another ZeRO stage converts the tag first (a subprocess): SIGTERM to the
    trainer's process group then (what Ctrl-C or `kill -- -PGID` does) reaches only the trainer,
    which ends the conversion, removes its partial output and exits 75 with its stop line."""
    run_dir = copy_run(base, "stop_in_conversion")
    tmp = run_dir.parent / ".tmp-stop"
    tmp.mkdir()
    cmd = train_command(tiny_config, run_dir, [*COMMON, "deepspeed.zero_stage=2"], 1, "python", tmp)
    with subprocess.Popen(cmd, cwd=repo_root(), env=train_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as p:
        seen = []
        for line in p.stdout:
            seen.append(line)
            if "converting to a universal checkpoint" in line:
                os.killpg(p.pid, signal.SIGTERM)
                break
        out = "".join(seen) + p.stdout.read()
        rc = p.wait(timeout=120)
    assert rc == 75, out[-3000:]
    assert "stop requested (signal 15)" in out and "exiting with 75" in out, out[-3000:]
    assert "Traceback" not in out and "failed" not in out
    universal = run_dir / "checkpoints" / "universal"
    assert not universal.exists() or not any(universal.iterdir()), list(universal.iterdir())
