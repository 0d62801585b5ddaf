"""SLURM node lists -> hosts and hostfiles, and the launcher variables -> ranks (no cluster needed)."""

import os
import subprocess

import pytest

from megamor.parallel.env import peek_local_world_size, resolve_launch_env
from megamor.parallel.launch import expand_nodelist, write_hostfile

CASES = {
    "gpu[01-03,07]": ["gpu01", "gpu02", "gpu03", "gpu07"],
    "a[1-2],b3": ["a1", "a2", "b3"],
    "node[098-101]": ["node098", "node099", "node100", "node101"],
    "n7": ["n7"],
    "r[1-2]n[08-09],login": ["r1n08", "r1n09", "r2n08", "r2n09", "login"],
}


@pytest.mark.parametrize("nodelist", sorted(CASES))
def test_expand_nodelist(nodelist):
    assert expand_nodelist(nodelist) == CASES[nodelist]


@pytest.mark.launch
def test_expand_nodelist_agrees_with_scontrol(slurm_cluster):
    for nodelist, want in CASES.items():
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             env=slurm_cluster.env, check=True)
        assert out.stdout.split() == want == expand_nodelist(nodelist)


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu]1[", "gpu[a-b]", "gpu[5-2]"])
def test_bad_nodelist_is_refused(bad):
    with pytest.raises(ValueError, match="SLURM node list"):
        expand_nodelist(bad)


def test_hostfile(tmp_path):
    path = write_hostfile(tmp_path / "hostfile", expand_nodelist("gpu[01-02]"), slots=8)
    assert path.read_text() == "gpu01 slots=8\ngpu02 slots=8\n"


def test_srun_variables_become_ranks_and_local_world():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[01-03,07]", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
           "PATH": "/nonexistent"}  # no scontrol: the built-in parser answers
    le = resolve_launch_env(env)
    assert (le.rank, le.local_rank, le.world_size, le.launcher) == (5, 1, 8, "slurm")
    assert le.master_addr == "gpu01" and le.master_port == 20000 + 1234
    assert peek_local_world_size(env) == 2
    assert peek_local_world_size({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}) == 4
    assert peek_local_world_size({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "2,1"}) is None


def test_srun_steps_of_one_job_get_different_ports_and_ranks_of_one_step_the_same():
    """Two srun steps side by side in one allocation must not both bind one port (EADDRINUSE)."""
    def port(rank: int, step: int) -> int:
        env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "4", "SLURM_STEP_ID": str(step), "SLURM_JOB_ID": "1234",
               "SLURM_STEP_NODELIST": "gpu01", "PATH": "/nonexistent"}
        return resolve_launch_env(env).master_port

    assert {port(r, 3) for r in range(4)} == {port(0, 3)}
    ports = [port(0, step) for step in range(50)]
    assert len(set(ports)) == 50 and ports[0] == 20000 + 1234
    assert all(20000 <= p < 30000 for p in ports)


def test_deepspeed_env_file_carries_what_the_runner_would_not_forward(tmp_path, monkeypatch):
    """Multi-node deepspeed: the runner forwards only its EXPORT_ENVS (PYTHON*, NCCL*, ...) to the
    other nodes, plus the lines of DS_ENV_FILE; the trainer's settings must be in that file."""
    import importlib

    import deepspeed.launcher.runner as runner

    from megamor.parallel.launch import deepspeed_env_lines

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_IB_DISABLE=1\nOMP_NUM_THREADS=4\n")
    env = {"OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu", "MEGAMOR_DATA_DIR": "/data", "WANDB_PROJECT": "p q",
           "HF_HUB_OFFLINE": "1", "PATH": "/bin", "HOME": "/root", "DS_ENV_FILE": "x", "MEGAMOR_BAD": "a\nb"}
    lines = deepspeed_env_lines(env, home=home, cwd=cwd)
    assert lines == ["DS_ACCELERATOR=cpu", "HF_HUB_OFFLINE=1", "MEGAMOR_DATA_DIR=/data", "OMP_NUM_THREADS=2",
                     "WANDB_PROJECT=p q", "NCCL_IB_DISABLE=1", "OMP_NUM_THREADS=4"]  # the user's file last: it wins
    assert not any(ln.startswith(tuple(runner.EXPORT_ENVS)) for ln in lines[:5])  # none the runner forwards anyway
    # An absolute DS_ENV_FILE is the one file the runner reads (it joins the name to ~ and .).
    f = tmp_path / "ds_env"
    monkeypatch.setenv("DS_ENV_FILE", str(f))
    try:
        importlib.reload(runner)
        assert {os.path.join(p, runner.DEEPSPEED_ENVIRONMENT_NAME) for p in runner.DEEPSPEED_ENVIRONMENT_PATHS} == {str(f)}
    finally:
        monkeypatch.delenv("DS_ENV_FILE")
        importlib.reload(runner)


def test_hostfile_script_writes_a_relative_path_where_it_was_called(tmp_path):
    """launch/hostfile_from_slurm.sh changes to the repository to run Python: a relative output
    path still means the caller's folder."""
    import sys

    from megamor.env import repo_root

    env = {**os.environ, "PYTHON": sys.executable, "SLURM_JOB_NODELIST": "gpu[01-02]", "PATH": "/usr/bin:/bin"}
    env.pop("SLURM_CONF", None)  # no cluster: the built-in node-list parser answers
    subprocess.run(["bash", str(repo_root() / "launch" / "hostfile_from_slurm.sh"), "hf", "4"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    assert (tmp_path / "hf").read_text() == "gpu01 slots=4\ngpu02 slots=4\n"
    assert not (repo_root() / "hf").exists()
