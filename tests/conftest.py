"""Shared test settings: offline, CPU-only, deterministic, the shared datasets folder, the
`launch` marker (and the guard that makes it hard to forget) and one SLURM cluster per session."""

from __future__ import annotations

import json
import os
from collections import Counter

# Before anything imports torch/deepspeed/wandb/datasets.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `-n N` workers share the cores: OMP threads per worker
    from megamor.env import thread_defaults
    thread_defaults(local_processes=int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))

import pytest
import torch

from megamor.env import shared_data_dir, usable_cpus
from megamor.testing.launches import MARKER, Guard

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

_GUARD = Guard()


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}: starts a training process, a SLURM daemon or a multi-process "
                                       "group; the fast tier (`make test-fast`, `-m 'not launch'`) leaves it out")
    _GUARD.install()


def pytest_unconfigure(config):
    _GUARD.uninstall()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the Makefile's default): one worker more than the usable cores (affinity and
    cgroup quota), at most 8 (launch tests start up to 4 processes each). A launch test spends
    part of its time waiting (interpreter and DeepSpeed start-up, rendezvous, watchdog and lock
    timeouts, SLURM polling): with one worker per core a quarter of the cores idled in the full
    suite; the extra worker fills those waits."""
    return min(usable_cpus() + 1, 8)


def pytest_collection_modifyitems(config, items):
    """Files with the most launch tests first, the quick files after them (the order within a file
    kept). xdist hands out whole files (`--dist loadfile`) in this order (`--no-loadscope-reorder`:
    its own reorder puts files with many tests first, i.e. the quick parametrized files, leaving a
    long launch file to finish alone on one worker at the end); quick files fill the tail instead."""
    launches = Counter(item.path for item in items if item.get_closest_marker(MARKER))
    first_seen = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (-launches[item.path], first_seen[item.path]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """While a test (and the fixtures it sets up first) runs, a launch from an unmarked test raises."""
    _GUARD.begin(allowed=item.get_closest_marker(MARKER) is not None)
    try:
        yield
    finally:
        seen = _GUARD.end()
        log = os.environ.get("MEGAMOR_LAUNCH_LOG")  # for counting launches (docs/testing.md)
        if log and seen:
            with open(log, "a") as f:
                f.write(json.dumps({"test": item.nodeid, "launches": seen}) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """An unmarked test that launched anyway (it caught the guard's error) still fails."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and report.passed and _GUARD.seen and item.get_closest_marker(MARKER) is None:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} starts {_GUARD.seen[0]} but is not marked @pytest.mark.{MARKER} "
                           "(see docs/testing.md)")


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


@pytest.fixture(scope="session")
def _slurm_daemons(tmp_path_factory):
    """One local SLURM cluster (munge, slurmctld, two slurmd) for the whole session: starting
    the daemons costs seconds, and each test drains its own jobs (see `slurm_cluster`)."""
    from megamor.testing.slurm import LocalSlurm, available

    reason = available()
    if reason:
        if os.environ.get("MEGAMOR_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    # One cluster per pytest-xdist worker (gw0, gw1, ...): job ids 1, 1001, ... keep their ports apart.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    first_job_id = 1 + 1000 * (int(worker[2:]) if worker[2:].isdigit() else 0)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), first_job_id=first_job_id)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_cluster(request):
    """The session's real local SLURM cluster. CI installs the packages and sets
    MEGAMOR_REQUIRE_SLURM=1, so there a missing install fails instead of skipping. A test's jobs
    that are still queued or running when it ends are cancelled, so the next test finds the
    nodes idle; tests keep their own output folders (tmp_path) and job ids."""
    _GUARD.check("a local SLURM cluster (slurm_cluster)")  # before the daemons start
    cluster = request.getfixturevalue("_slurm_daemons")
    try:
        yield cluster
    finally:
        cluster.drain()


def pytest_runtest_logreport(report):
    """MEGAMOR_TEST_TIMELINE=FILE: one JSON line per test phase (worker, phase, start, stop), to
    see how xdist's workers fill the run (idle tails, the files that finish last). Off by default."""
    path = os.environ.get("MEGAMOR_TEST_TIMELINE")
    if not path or not hasattr(report, "start") or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # written by the controller alone, which receives every worker's reports
    node = getattr(report, "node", None)  # xdist: the worker that ran it
    worker = node.gateway.id if node is not None else "-"
    line = json.dumps({"test": report.nodeid, "phase": report.when, "worker": worker, "start": report.start,
                       "stop": report.stop})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
