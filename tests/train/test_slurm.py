"""slurm/train.sbatch on a real (local) SLURM cluster: srun starts one task per rank, USR1
makes every rank save and exit 75, the script requeues the job, the rerun resumes."""

from __future__ import annotations

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
