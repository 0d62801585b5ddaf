"""Shared test settings: offline, CPU-only, deterministic, and the shared datasets folder."""

from __future__ import annotations

import os

# Before anything imports torch/deepspeed/wandb/datasets.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from megamor.env import shared_data_dir

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture
def data_dir():
    """The shared offline datasets; tests needing them skip (never in CI: .ci/run checks)."""
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared datasets not found at {d} (set MEGAMOR_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def tinyshakespeare():
    """Path of the shared Tiny Shakespeare text (skips, as `data_dir`, where the datasets are absent)."""
    src = shared_data_dir() / "tinyshakespeare" / "input.txt"
    if not src.is_file():
        pytest.skip(f"shared datasets not found at {shared_data_dir()} (set MEGAMOR_DATA_DIR)")
    return src


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    """A real local SLURM cluster (munge, slurmctld, two slurmd). CI installs the packages
    and sets MEGAMOR_REQUIRE_SLURM=1, so there a missing install fails instead of skipping."""
    from megamor.testing.slurm import LocalSlurm, available

    reason = available()
    if reason:
        if os.environ.get("MEGAMOR_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "launch: starts processes")
