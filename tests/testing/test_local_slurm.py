"""The local SLURM harness runs real multi-node jobs and requeues on a signal."""

import time

import pytest

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)


def test_two_node_job_and_hostnames(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH -N2 --ntasks-per-node=1\n"
        "srun bash -c 'echo rank=$SLURM_PROCID head=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -1)'\n"
    )
    job = slurm_cluster.sbatch([f"--output={tmp_path}/out.txt", str(script)], cwd=tmp_path)
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED"
    lines = sorted((tmp_path / "out.txt").read_text().split("\n"))
    ranks = [ln for ln in lines if ln.startswith("rank=")]
    assert [r.split()[0] for r in ranks] == ["rank=0", "rank=1"]
    head = ranks[0].split("head=")[1]
    assert head in slurm_cluster.nodes  # a name that resolves on this machine


def test_usr1_requeue(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --requeue --open-mode=append\n"
        'echo "start restart=${SLURM_RESTART_COUNT:-0}"\n'
        'trap \'echo got-usr1; scontrol requeue $SLURM_JOB_ID; exit 0\' USR1\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then for i in $(seq 600); do sleep 0.1; done; fi\n'
        "echo done\n"
    )
    job = slurm_cluster.sbatch([f"--output={tmp_path}/out.txt", str(script)], cwd=tmp_path)
    slurm_cluster.wait(job, states=("RUNNING",), timeout=60)
    deadline = time.time() + 30
    while "start" not in (tmp_path / "out.txt").read_text() if (tmp_path / "out.txt").exists() else True:
        assert time.time() < deadline
        time.sleep(0.2)
    slurm_cluster.signal(job, "USR1")
    assert slurm_cluster.wait(job, states=("COMPLETED",), timeout=120) == "COMPLETED"
    out = (tmp_path / "out.txt").read_text()
    assert "got-usr1" in out and "start restart=1" in out and "done" in out
