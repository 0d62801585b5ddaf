"""slurm/train.sbatch on a real (local) SLURM cluster: srun starts one task per rank, USR1
makes every rank save and exit 75, the script requeues the job, the rerun resumes; a rank that
fails ends the job FAILED, not requeued."""

from __future__ import annotations

import time

import pytest

from megamor.env import repo_root
from megamor.runs.tags import list_complete, newest_complete
from tests.train.helpers import slurm_status, train_env, wait_for_step

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)


def test_sbatch_requeues_on_usr1_and_resumes(slurm_cluster, tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    env = train_env(tmp_path, {"PYTHON": __import__("sys").executable, "MEGAMOR_ROOT": str(repo_root()),
                               "WANDB_MODE": "disabled"})
    job = slurm_cluster.sbatch(
        ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", f"--output={log}",
         "slurm/train.sbatch", str(tiny_config), f"run_dir={run_dir}", "trainer.max_steps=40",
         "checkpoint.every_steps=0", "deepspeed.zero_stage=2"],
        env=env, cwd=repo_root())
    wait_for_step(run_dir, 3, timeout=180, status=slurm_status(slurm_cluster, job, log))
    slurm_cluster.signal(job, "USR1", batch_only=False)  # to every task, as --signal=USR1@300 does
    state = slurm_cluster.wait(job, timeout=300)
    out = log.read_text()
    assert state == "COMPLETED", out[-3000:]
    assert slurm_cluster.job_state(job).get("Restarts") == "1"
    assert "2 tasks" in out and "world 2" in out  # srun tasks became the ranks
    assert "stop requested (signal 10)" in out and "requeueing job" in out
    stopped_at = int(out.split("stop requested (signal 10) at step ")[1].split(":")[0])
    assert f"resumed from step {stopped_at}" in out
    assert newest_complete(run_dir).step == 40
    assert [c.step for c in list_complete(run_dir)] == [stopped_at, 40]


def test_a_failing_rank_ends_the_job_failed_not_requeued(slurm_cluster, tiny_config, tmp_path):
    """Rank 1 raises: rank 0's collective fails with "Connection closed by peer". That must not
    read as a stop (75, requeue): the job would rerun into the same error forever."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    env = train_env(tmp_path, {"PYTHON": __import__("sys").executable, "MEGAMOR_ROOT": str(repo_root()),
                               "WANDB_MODE": "disabled"})
    raise_on_rank_1 = "trainer.callbacks=[{target: 'tests.train.raise_on_rank:RaiseOnRank', kwargs: {rank: 1, step: 2}}]"
    job = slurm_cluster.sbatch(
        ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", f"--output={log}",
         "slurm/train.sbatch", str(tiny_config), f"run_dir={run_dir}", "trainer.max_steps=40",
         "checkpoint.every_steps=0", raise_on_rank_1],
        env=env, cwd=repo_root())
    # Ends, or is requeued (the bug): either way no need to wait for a second attempt.
    deadline = time.time() + 300
    while time.time() < deadline:
        st = slurm_cluster.job_state(job)
        if st.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") or st.get("Restarts", "0") != "0":
            break
        time.sleep(0.5)
    out = log.read_text()
    assert st.get("Restarts") == "0" and "requeueing" not in out, out[-3000:]
    assert st.get("JobState") == "FAILED" and st.get("ExitCode", "").startswith("1:"), (st, out[-3000:])
    assert "injected failure on rank 1 at step 2" in out
    assert "rank 0: at step 2 (" in out and "rank 1 failed (its traceback is above); exiting 1" in out, out[-3000:]
    assert f"megamor: job {job} failed (exit 1); not requeued" in out



def test_deepspeed_sh_in_a_one_node_job_starts_its_ranks_without_ssh(slurm_cluster, tiny_config, tmp_path):
    """launch/deepspeed.sh inside sbatch on one node: no hostfile (the runner would ssh to this
    host), GPUS_PER_NODE processes here."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    env = train_env(tmp_path, {"PYTHON": __import__("sys").executable, "GPUS_PER_NODE": "2", "WANDB_MODE": "disabled"})
    cmd = f"launch/deepspeed.sh --config {tiny_config} run_dir={run_dir} trainer.max_steps=2 checkpoint.every_steps=0"
    job = slurm_cluster.sbatch(
        ["--nodes=1", "--ntasks=1", "--cpus-per-task=2", f"--output={log}", "--wrap", f"{cmd} eval.at_end=false"],
        env=env, cwd=repo_root())
    state = slurm_cluster.wait(job, timeout=300)
    out = log.read_text()
    assert state == "COMPLETED", out[-3000:]
    assert "world 2" in out and "ssh" not in out
    assert newest_complete(run_dir).step == 2
