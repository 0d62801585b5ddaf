"""The `launch` marker's guard: an unmarked test that would start a trainer, a launcher, a SLURM
cluster or a process group fails before anything starts; a marked one starts it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from megamor.env import repo_root
from megamor.parallel.launch import deepspeed_command, torchrun_command
from megamor.testing.launches import launch_kind


def test_launch_kind_names_trainers_launchers_and_slurm():
    py = sys.executable
    assert launch_kind([py, "-m", "megamor.train", "--config", "x.yaml"]) == "megamor.train"
    assert launch_kind(torchrun_command(2, ["--config", "x.yaml"])) == "torch.distributed.run"
    assert launch_kind(deepspeed_command(2, ["--config", "x.yaml"])) == "deepspeed.launcher.runner"
    assert launch_kind(["sbatch", "--parsable", "slurm/train.sbatch"]) == "sbatch"
    assert launch_kind("/usr/bin/srun -N2 hostname") == "srun"
    assert launch_kind([py, "-m", "megamor.study", "s.yaml"]) == "megamor.study"
    assert launch_kind([py, "-m", "megamor.study", "s.yaml", "--plan"]) is None  # only plans
    assert launch_kind([py, "-m", "megamor.export", "run"]) is None
    assert launch_kind([py, "-m", "megamor.train", "--help"]) is None  # argparse prints and exits
    assert launch_kind([py, "-m", "megamor.demo", "-h"]) is None
    assert launch_kind(["torchrun", "--help"]) == "torchrun"  # programs: not ours to reason about
    assert launch_kind(["bash", "slurm/tokenize_array.sbatch", "merge"]) is None  # a script named .sbatch, run by bash
    assert launch_kind([py, "-m", "megamor.training_notes"]) is None  # a prefix is not the module


INNER = '''
import subprocess, sys
import pytest
from megamor.testing.distributed import run_distributed

# Harmless commands the guard takes for launches (a word names megamor.train); each leaves a file when it runs.
def _start(name):
    subprocess.run([sys.executable, "-c", f"open({name!r}, 'w')", "megamor.train"], check=True)

def test_unmarked_subprocess():
    _start("unmarked")

def test_unmarked_catches_the_error():
    try:
        _start("caught")
    except Exception:
        pass

@pytest.mark.launch
def test_marked_subprocess():
    _start("marked")

def _rank(rank, world):
    open(f"rank{rank}", "w")

def test_unmarked_process_group():
    run_distributed(_rank, world_size=2)

def test_unmarked_slurm(slurm_cluster):
    pass
'''


def test_unmarked_launches_fail_before_starting_and_marked_ones_run(tmp_path):
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder alone, with the repo's conftest as a plugin
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                        "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_inner.py")],
                       cwd=tmp_path, env={**_env(), "MEGAMOR_REQUIRE_SLURM": "0"}, capture_output=True, text=True,
                       timeout=300, check=False)
    out = r.stdout + r.stderr
    assert "1 passed" in out and "3 failed" in out and "1 error" in out, out[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file() and not p.suffix) == ["marked"], out[-4000:]  # nothing else ran
    for what in ("a subprocess running megamor.train but is not marked @pytest.mark.launch",
                 "a process group (torch.multiprocessing, nprocs=2) but is not marked",
                 "a local SLURM cluster (slurm_cluster) but is not marked"):
        assert what in out, (what, out[-4000:])
    assert "test_unmarked_catches_the_error starts a subprocess running megamor.train but is not marked" in out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo_root())}
