"""The study end to end at a tiny size (two variants x one seed, a few steps each; real
`python -m megamor.train` runs): killed mid-study it resumes without redoing finished runs;
two study processes share out a two-budget study; as a SLURM job array on the local cluster
it produces the same report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamor.env import repo_root
from megamor.runs.tags import newest_complete
from megamor.train.runlock import RunLock
from tests.study.conftest import write_study
from tests.train.helpers import train_env

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)


def study_cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megamor.study", str(cfg), *extra]


def _env(tmp: Path) -> dict[str, str]:
    return train_env(tmp, {"WANDB_MODE": "disabled"})


def _check_report(out: Path) -> None:
    report = (out / "report.md").read_text()
    assert "Pending" not in report
    for v in ("| vanilla | 1 |", "| mor2 | 1 |"):
        assert v in report
    assert (out / "val_loss_vs_flops.png").stat().st_size > 0 and (out / "depth.png").stat().st_size > 0
    results = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    mor = results["mor2"]
    assert mor["router_agreement"] and 0.0 <= mor["router_recall_min"] <= 1.0
    assert mor["val_loss_causal"] > 0 and mor["mean_depth"] > 1.0 and "corr_depth_loss" in mor
    assert results["vanilla"]["tokens"] < mor["tokens"]  # MoR is cheaper per token: more tokens
    assert "piqa" in mor["fewshot"] and len(mor["val_curve"]) >= 2
    logged = [max(v for k, v in row.items() if k.startswith("train/router_health/") and k.endswith("logit_max_abs"))
              for row in map(json.loads, (out / "runs" / "mor2-s7" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in row]
    assert mor["router_max_abs_logit_run"] == max(logged) > 0  # the run's maximum, from the training log
    assert 0.0 <= mor["router_saturated_final"] <= 1.0 and "router_max_abs_logit_run" not in results["vanilla"]
    assert "max \\|logit\\| (training)" in report  # escaped: a bare | would split the table's column


def test_killed_study_resumes_without_redoing_finished_runs(tiny_text, tmp_path):
    cfg = write_study(tmp_path, tiny_text)
    out = tmp_path / "out"
    first, second = out / "runs" / "vanilla-s7", out / "runs" / "mor2-s7"
    proc = subprocess.Popen(study_cmd(cfg), cwd=repo_root(), env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while newest_complete(second) is None:  # the second run has a checkpoint: kill the lot
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "the study made no progress"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert (first / "study_result.json").is_file() and not (second / "study_result.json").is_file()
    killed_at = newest_complete(second).step
    kept = {p: p.stat().st_mtime_ns for p in (first / "study_result.json", first / "metrics.jsonl")}

    r = subprocess.run(study_cmd(cfg), cwd=repo_root(), env=_env(tmp_path), capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "== vanilla-s7" not in r.stdout  # the finished run was neither trained nor evaluated again
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert f"resumed from step {killed_at}" in r.stdout + r.stderr
    _check_report(out)

    # A third call recomputes nothing: no training process, same results.
    before = (out / "results.json").read_text()
    r = subprocess.run(study_cmd(cfg), cwd=repo_root(), env=_env(tmp_path), capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0 and "megamor.train" not in r.stdout and "2/2 runs done" in r.stdout
    assert json.loads((out / "results.json").read_text())["results"] == json.loads(before)["results"]

    # The run folders gone (another session, another machine): the results kept beside the
    # report still count, nothing is trained again and the report is the same.
    assert sorted(p.name for p in (out / "run_results").iterdir()) == ["mor2-s7.json", "vanilla-s7.json"]
    (out / "runs").rename(tmp_path / "runs_elsewhere")
    r = subprocess.run(study_cmd(cfg), cwd=repo_root(), env=_env(tmp_path), capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0 and "megamor.train" not in r.stdout and "2/2 runs done" in r.stdout, r.stdout + r.stderr
    assert not (out / "runs").exists()
    assert json.loads((out / "results.json").read_text())["results"] == json.loads(before)["results"]


def test_two_study_processes_share_out_a_two_budget_study_each_budget_at_its_width(tiny_text, tmp_path):
    """Started together, each run is trained by exactly one of them (RUN/study.lock), each walking
    the plan in order (budget by budget); the big budget trains the wider model; the report has
    both budgets' paired differences, and --report alone rebuilds it from the finished runs."""
    cfg = write_study(tmp_path, tiny_text, budgets=8.0e9)
    out = tmp_path / "out"
    procs = [subprocess.Popen(study_cmd(cfg), cwd=repo_root(), env=_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    plan = ["vanilla@small-s7", "mor2@small-s7", "vanilla@big-s7", "mor2@big-s7"]
    started = [[ln.split(":")[0][3:] for ln in o.splitlines() if ln.startswith("== ") and " steps, " in ln] for o in outs]
    assert sorted(started[0] + started[1]) == sorted(plan), started  # each run trained once
    for mine in started:  # each process in plan order, skipping what the other one holds
        assert mine == [r for r in plan if r in mine], started
    assert "skipped: another study process has it" in "\n".join(outs)  # they met each other's locks
    assert not list((out / "runs").glob("*/*/study.lock"))  # released

    res = {(x["budget"], x["variant"]): x for x in json.loads((out / "results.json").read_text())["results"]}
    assert set(res) == {(b, v) for b in ("small", "big") for v in ("vanilla", "mor2")}
    for (b, v), x in res.items():
        run = out / "runs" / b / f"{v}-s7"
        assert (run / "study_result.json").is_file() and x["run"] == f"{v}@{b}-s7"
        assert abs(x["flops"] - {"small": 4.0e9, "big": 8.0e9}[b]) / x["flops"] < 0.5  # within a step
        assert x["flops"] == pytest.approx(x["budget_flops_per_token"] * x["tokens"], rel=1e-12)  # one convention (flops_per_token: exact forward)
    for v in ("vanilla", "mor2"):  # the big budget trains the wider model (d_model 96 against 64)
        assert res[("big", v)]["params_non_embedding"] > 2 * res[("small", v)]["params_non_embedding"]

    # --report alone (training nothing) writes the report from the finished runs
    r = subprocess.run(study_cmd(cfg, "--report"), cwd=repo_root(), env=_env(tmp_path), capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0 and "4/4 runs done" in r.stdout and "megamor.train" not in r.stdout, r.stdout + r.stderr
    report = (out / "report.md").read_text()
    for b in ("small", "big"):
        gap = res[(b, "mor2")]["val_loss"] - res[(b, "vanilla")]["val_loss"]
        assert f"{gap:+.4f}" in _row(report.split("## Paired differences")[1], "mor2")[("small", "big").index(b)]
        assert f"## Budget {b}:" in report and (out / b / "val_loss_vs_flops.png").stat().st_size > 0
    assert (out / "val_loss_vs_flops.png").stat().st_size > 0 and "Pending" not in report
    assert res[("small", "mor2")]["corr_curve"] and not res[("small", "vanilla")]["corr_curve"]
    assert _row(report.split("during training")[1], "mor2")[0] == "small"


def _row(text: str, name: str) -> list[str]:
    """The cells after the name of the table row that starts with `| name |`."""
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_study_as_slurm_job_array(slurm_cluster, tiny_text, tmp_path):
    cfg = write_study(tmp_path, tiny_text, flops=2.5e8)
    out = tmp_path / "out"
    # submitted from outside the repository, with no PYTHON / MEGAMOR_ROOT and a relative out_dir:
    # the jobs find the script, the study file and this interpreter, and the trainers write where
    # the study looks (relative to the submit folder)
    env = {k: v for k, v in {**_env(tmp_path), **slurm_cluster.env}.items() if k not in ("PYTHON", "MEGAMOR_ROOT")}
    r = subprocess.run(study_cmd(cfg, "out_dir=out", "--submit", "--sbatch", "--ntasks=1", "--cpus-per-task=1", "--gpus-per-node=0",
                                 f"--output={tmp_path}/slurm-%A_%a.out"),
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    report_job = int(r.stdout.strip().split("report as job ")[1].split(";")[0])
    state = slurm_cluster.wait(report_job, timeout=900)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    assert state == "COMPLETED", logs[-4000:]
    assert "run 0" in logs and "run 1" in logs  # one array task per run
    _check_report(out)


def _plant_lock(run_dir: Path, host: str) -> None:
    """A study lock as a process on `host` writes it, with a fresh heartbeat."""
    run_dir.mkdir(parents=True)
    now = time.time()
    (run_dir / "study.lock").write_text(json.dumps({"host": host, "pid": 1, "started": now, "heartbeat": now,
                                                    "token": "planted"}))


def test_a_run_held_by_another_node_is_skipped_but_index_waits_for_the_lock_to_go_stale(tiny_text, tmp_path):
    """A requeued SLURM array task may land on another node while its killed predecessor's lock
    is fresh: `--index` waits until the lock is stale and trains; the study loop skips the run."""
    cfg = write_study(tmp_path, tiny_text, flops=2.5e8)
    held = tmp_path / "out" / "runs" / "vanilla-s7"
    _plant_lock(held, "another-node")
    env = {**_env(tmp_path), "MEGAMOR_LOCK_STALE_S": "600"}
    r = subprocess.run(study_cmd(cfg), cwd=repo_root(), env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "vanilla-s7 skipped" in r.stdout and "another-node" in r.stdout and "1/2 runs done" in r.stdout
    assert not (held / "study_result.json").exists() and (tmp_path / "out" / "runs" / "mor2-s7" / "study_result.json").is_file()

    env["MEGAMOR_LOCK_STALE_S"] = "4"  # the planted holder's heartbeat stops: stale after 4 s
    t0 = time.time()
    r = subprocess.run(study_cmd(cfg, "--index", "0"), cwd=repo_root(), env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "replaced a stale lock" in r.stderr and (held / "study_result.json").is_file() and time.time() - t0 > 4
    assert not (held / "study.lock").exists()


def test_index_gives_up_with_75_while_a_live_process_holds_the_run(tiny_text, tmp_path):
    cfg = write_study(tmp_path, tiny_text, flops=2.5e8)
    run_dir = tmp_path / "out" / "runs" / "vanilla-s7"
    env = {**_env(tmp_path), "MEGAMOR_LOCK_STALE_S": "1"}
    subprocess.run(study_cmd(cfg, "--plan"), cwd=repo_root(), env=env, capture_output=True, timeout=300, check=True)
    with RunLock(run_dir, heartbeat_s=0.2, stale_s=1, file="study.lock", owner="study process"):  # this live process
        r = subprocess.run(study_cmd(cfg, "--index", "0"), cwd=repo_root(), env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert r.returncode == 75, (r.stdout + r.stderr)[-3000:]
    assert f"pid {os.getpid()}" in r.stderr and not (run_dir / "study_result.json").exists()
    assert "megamor.train" not in r.stdout  # nothing was trained


def test_study_task_stopped_by_usr1_saves_and_is_requeued(slurm_cluster, tiny_text, tmp_path):
    """What --signal=B:USR1@300 does before the time limit: the batch shell gets USR1, the study
    passes it to its trainer (save, 75), the script requeues the task and the rerun finishes the run."""
    cfg = write_study(tmp_path, tiny_text, flops=1.6e10)
    env = {**_env(tmp_path), **slurm_cluster.env, "PYTHON": sys.executable, "MEGAMOR_ROOT": str(repo_root())}
    subprocess.run(study_cmd(cfg, "--plan"), cwd=repo_root(), env=env, capture_output=True, timeout=300, check=True)
    log = tmp_path / "task.out"
    job = slurm_cluster.sbatch(["--array=0-0", "--ntasks=1", "--cpus-per-task=1", "--gpus-per-node=0", f"--output={log}",
                                "slurm/study.sbatch", str(cfg)], env=env, cwd=repo_root())
    run_dir = tmp_path / "out" / "runs" / "vanilla-s7"
    from tests.train.helpers import slurm_status, wait_for_step

    wait_for_step(run_dir, 3, timeout=240, status=slurm_status(slurm_cluster, f"{job}_0", log))
    slurm_cluster.signal(f"{job}_0", "USR1", batch_only=True)  # the batch shell alone, as B: does
    state = slurm_cluster.wait(f"{job}_0", timeout=400)
    out = log.read_text()
    assert state == "COMPLETED", out[-3000:]
    assert "stop requested (signal 10)" in out and "requeueing job" in out, out[-3000:]
    assert slurm_cluster.job_state(f"{job}_0").get("Restarts") == "1"
    assert "resumed from step " in out and newest_complete(run_dir) is not None
