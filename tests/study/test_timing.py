"""`--plan`'s run-time estimates: measured for finished runs, else the median seconds per FLOP
of the finished runs of the same budget (a wider model runs at its own speed), else of any."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from megamor.env import repo_root
from megamor.study.__main__ import too_late
from megamor.study.config import load_study
from megamor.study.plan import plan_runs
from megamor.study.timing import estimate_minutes


def test_estimates_use_the_same_budgets_finished_runs_first(tmp_path):
    study = load_study("configs/studies/scaling_cpu.yaml", [f"out_dir={tmp_path}", f"report_dir={tmp_path}/report"])
    runs = plan_runs(study, tmp_path / "shards", tmp_path / "tok")
    assert estimate_minutes(runs) == [None] * len(runs)  # nothing finished: nothing to go by
    done = {runs[0].index: (240.0, 15.0), runs[1].index: (300.0, 5.0)}  # two 1x runs: train, eval seconds
    three = next(r for r in runs if r.budget_name == "3x")
    done[three.index] = (0.0, 20.0)  # trained by an earlier call: its time is unknown, not zero
    for r in runs:
        if r.index in done:
            r.run_dir.mkdir(parents=True)
            t, e = done[r.index]
            (r.run_dir / "study_result.json").write_text(json.dumps({"train_seconds": t, "eval_seconds": e}))
    est = estimate_minutes(runs)
    assert est[0] == pytest.approx(255 / 60) and est[1] == pytest.approx(305 / 60)
    rate = (255 / runs[0].budget.flops + 305 / runs[1].budget.flops) / 2
    for r in runs[2:]:  # no timed 3x or 9x run: every budget falls back to the 1x runs' rate
        assert est[r.index] == pytest.approx(rate * r.budget.flops / 60), r.name
    assert est[three.index] > 2.5 * est[0]  # 3x the FLOPs

    timed = next(r for r in runs if r.budget_name == "3x" and r.index != three.index)
    timed.run_dir.mkdir(parents=True)
    (timed.run_dir / "study_result.json").write_text(json.dumps({"train_seconds": 600.0, "eval_seconds": 0.0}))
    est = estimate_minutes(runs)
    rate3 = 600 / timed.budget.flops
    for r in runs:
        if r.budget_name == "3x" and r.index != timed.index:
            assert est[r.index] == pytest.approx(rate3 * r.budget.flops / 60), r.name  # its own budget's rate
        if r.budget_name == "9x":
            all_rate = sorted([255 / runs[0].budget.flops, 305 / runs[1].budget.flops, rate3])[1]  # the median
            assert est[r.index] == pytest.approx(all_rate * r.budget.flops / 60), r.name


def test_a_result_kept_beside_the_report_counts_as_measured(tmp_path):
    """A run whose folder is gone (another session trained it) still times the others."""
    study = load_study("configs/studies/scaling_cpu.yaml", [f"out_dir={tmp_path}", f"report_dir={tmp_path}/report"])
    runs = plan_runs(study, tmp_path / "shards", tmp_path / "tok")
    runs[0].kept_path.parent.mkdir(parents=True)
    runs[0].kept_path.write_text(json.dumps({"train_seconds": 300.0, "eval_seconds": 30.0}))
    assert not runs[0].run_dir.exists()
    est = estimate_minutes(runs)
    assert est[0] == pytest.approx(330 / 60)
    assert est[1] == pytest.approx(330 / runs[0].budget.flops * runs[1].budget.flops / 60)


def test_time_limit_starts_only_runs_whose_estimate_fits(tmp_path):
    study = load_study("configs/studies/scaling_cpu.yaml", [f"out_dir={tmp_path}", f"report_dir={tmp_path}/report"])
    runs = plan_runs(study, tmp_path / "shards", tmp_path / "tok")
    three = next(r for r in runs if r.budget_name == "3x")
    now = time.time()
    assert too_late(runs, three, now + 60) is None  # nothing finished: no estimate, it starts
    runs[0].kept_path.parent.mkdir(parents=True)
    runs[0].kept_path.write_text(json.dumps({"train_seconds": 300.0, "eval_seconds": 30.0}))
    assert too_late(runs, runs[1], now + 10 * 60) is None  # ~5.5 min fit in 10
    why = too_late(runs, three, now + 10 * 60)  # ~16.5 min (3x the FLOPs) do not
    assert why is not None and "estimated 17 min" in why and "10 min left" in why
    assert too_late(runs, three, None) is None  # no limit


@pytest.mark.launch
def test_a_bad_time_limit_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "megamor.study", "configs/studies/scaling_cpu.yaml", "--time-limit", "0"],
                       cwd=repo_root(), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--time-limit" in r.stderr, r.stderr
