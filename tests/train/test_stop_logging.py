"""What a stopped run logs: the steps since its last log line, an evaluation a stop cut short
(run when the run resumes, also when it is already complete), and the exit code W&B records.
Real one-process runs of the tiny model, stopped by real signals (MEGAMOR_FAULTS)."""

from __future__ import annotations

import pytest

from megamor.train.signals import EXIT_FAILED, EXIT_PREEMPTED
from tests.train.helpers import assert_ok, launch
from tests.train.wandb_records import exit_code

pytestmark = pytest.mark.launch

QUIET = ["trainer.activation_checkpointing=false", "eval.max_batches=1"]


def _rows(run, key: str) -> list[int]:
    return [r["step"] for r in run.records() if key in r]


def test_a_stop_logs_the_steps_since_the_last_log_line(tiny_config, tmp_path):
    """Issue: logging every 4, stopped at step 3: steps 1-3 reached no output (the resumed run
    starts at 4), and W&B called the stopped run finished (exit 0)."""
    run_dir = tmp_path / "run"
    common = [*QUIET, "trainer.max_steps=8", "logging.every_steps=4", "checkpoint.every_steps=0",
              "eval.at_end=false", "wandb.mode=offline"]
    stopped = launch(tiny_config, run_dir, common, env={"MEGAMOR_FAULTS": "signal_before_step=3:TERM"})
    assert stopped.rc == EXIT_PREEMPTED, stopped.output[-3000:]
    assert _rows(stopped, "train/loss") == [3]
    assert stopped.records()[0]["train/tokens"] == 3 * 8 * 32  # the window holds all three steps
    resumed = launch(tiny_config, run_dir, common)
    assert_ok(resumed)
    assert _rows(resumed, "train/loss") == [3, 4, 8]
    assert resumed.records()[-1]["train/tokens"] == 8 * 8 * 32
    codes = sorted(exit_code(p) for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert codes == [0, EXIT_PREEMPTED], codes


def test_an_evaluation_a_stop_cut_short_runs_when_the_run_resumes(tiny_config, tmp_path):
    """The checkpoint of step 4 is saved before its evaluation; a stop during that evaluation
    resumed from step 4 and never evaluated it."""
    run_dir = tmp_path / "run"
    common = [*QUIET, "trainer.max_steps=8", "checkpoint.every_steps=4", "eval.every_steps=4", "eval.at_end=false"]
    stopped = launch(tiny_config, run_dir, common, env={"MEGAMOR_FAULTS": "signal_at_eval_batch=1:TERM"})
    assert stopped.rc == EXIT_PREEMPTED, stopped.output[-3000:]
    assert "during validation" in stopped.output and _rows(stopped, "val/loss") == []
    resumed = launch(tiny_config, run_dir, common)
    assert_ok(resumed)
    assert "the evaluation due at this checkpoint was never logged" in resumed.output
    assert _rows(resumed, "val/loss") == [4, 8]
    again = launch(tiny_config, run_dir, [*common, "trainer.max_steps=12", "schedule.allow_change=true"])  # logged: not again
    assert_ok(again)
    assert _rows(again, "val/loss") == [4, 8, 12]


def test_a_final_evaluation_cut_short_runs_when_the_complete_run_is_rerun(tiny_config, tmp_path):
    """eval.at_end stopped by SIGTERM: the stop saved the last step, and the requeued job found
    nothing to do, so the run never had its final val/loss (what sweeps read)."""
    run_dir = tmp_path / "run"
    common = [*QUIET, "trainer.max_steps=6", "checkpoint.every_steps=0", "eval.every_steps=0", "eval.at_end=true"]
    stopped = launch(tiny_config, run_dir, common, env={"MEGAMOR_FAULTS": "signal_at_eval_batch=1:TERM"})
    assert stopped.rc == EXIT_PREEMPTED, stopped.output[-3000:]
    assert _rows(stopped, "val/loss") == []
    rerun = launch(tiny_config, run_dir, common)
    assert_ok(rerun)
    assert "nothing to do" in rerun.output and _rows(rerun, "val/loss") == [6]
    third = launch(tiny_config, run_dir, common)
    assert_ok(third)
    assert _rows(third, "val/loss") == [6]


def test_wandb_records_a_failed_run_as_failed(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    failed = launch(tiny_config, run_dir, [*QUIET, "trainer.max_steps=6", "trainer.max_consecutive_nonfinite=2",
                                           "logging.every_steps=4", "wandb.mode=offline"],
                    env={"MEGAMOR_FAULTS": "nan_loss_at_step=2:6"})
    assert failed.rc == EXIT_FAILED, failed.output[-3000:]
    assert [exit_code(p) for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")] == [EXIT_FAILED]
    assert [r["train/skipped_steps"] for r in failed.records() if "train/loss" in r] == [2]  # steps 1-3 logged


def test_a_resumed_run_sends_wandb_the_rows_a_kill_cut_from_its_file(tiny_config, tmp_path):
    """W&B's service writes its offline file in 32 KiB blocks: a SIGKILL lost every row of this
    short run, and the resumed run logged from step 5 on. Now it sends rows 1-4 first."""
    from tests.train.wandb_records import history

    run_dir = tmp_path / "run"
    common = [*QUIET, "trainer.max_steps=8", "checkpoint.every_steps=4", "eval.at_end=false", "wandb.mode=offline"]
    killed = launch(tiny_config, run_dir, common, env={"MEGAMOR_FAULTS": "sigkill_after_step=7"})
    assert killed.rc != 0 and max(killed.losses()) == 7
    first = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not [r for r in history(first) if "train/loss" in r]  # the tail W&B lost: every row
    resumed = launch(tiny_config, run_dir, common)
    assert_ok(resumed)
    assert "4 rows of metrics.jsonl up to step 4 sent again" in resumed.output
    second = next(p for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb") if p != first)
    logged = {r["_step"]: r["train/loss"] for r in history(second) if "train/loss" in r}
    assert logged == pytest.approx(resumed.losses(), rel=1e-6) and sorted(logged) == list(range(1, 9))
