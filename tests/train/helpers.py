"""Launching real training runs from tests, and reading what they logged."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megamor.env import repo_root
from megamor.parallel.env import free_port
from megamor.parallel.launch import deepspeed_command, torchrun_command

if TYPE_CHECKING:
    import psutil


def train_env(tmp: Path, extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TMPDIR=str(tmp),
        WANDB_MODE=env.get("WANDB_MODE", "offline"),
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(repo_root() / ".cache" / "torch_extensions")),
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT", "MEGAMOR_FAULTS"):
        env.pop(k, None)
    env.update(extra or {})
    return env


@dataclass
class Run:
    run_dir: Path
    proc: subprocess.CompletedProcess

    @property
    def rc(self) -> int:
        return self.proc.returncode

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def losses(self) -> dict[int, float]:
        """step -> train loss; a step logged twice (rerun after a crash) keeps the last value."""
        return {r["step"]: r["train/loss"] for r in self.records() if "train/loss" in r}


def train_command(config: Path, run_dir: Path, overrides: Sequence[str], nproc: int, launcher: str, tmp: Path) -> list[str]:
    args = ["--config", str(config), f"run_dir={run_dir}", *overrides]
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, "-m", "megamor.train", *args]
    if launcher == "deepspeed":
        return deepspeed_command(nproc, args, master_port=free_port())
    return torchrun_command(nproc, args, log_dir=tmp / "torchrun-logs")


def launch(config: Path, run_dir: Path, overrides: Sequence[str] = (), nproc: int = 1, launcher: str = "torchrun",
           env: dict | None = None, timeout: float = 300) -> Run:
    tmp = run_dir.parent / f".tmp-{run_dir.name}"
    tmp.mkdir(parents=True, exist_ok=True)
    if launcher == "torchrun" and nproc == 1:
        launcher = "python"
    cmd = train_command(config, run_dir, overrides, nproc, launcher, tmp)
    with subprocess.Popen(cmd, cwd=repo_root(), env=train_env(tmp, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang (a collective some rank never joins): fail, leave no rank behind
            out, err = _stop(p)
            raise AssertionError(f"training did not finish in {timeout:.0f}s (stopped):\n{(out + err)[-4000:]}") from None
    return Run(run_dir, subprocess.CompletedProcess(cmd, p.returncode, out, err))


def _stop(p: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM to the launcher (torchrun stops its ranks, which run in sessions of their own), then
    SIGKILL to the launcher's session (the python and deepspeed launchers' ranks)."""
    p.terminate()
    try:
        return p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        return p.communicate()


def assert_ok(run: Run) -> None:
    assert run.rc == 0, f"training failed (rc {run.rc}):\n{run.output[-4000:]}"


def assert_logged_activation_bytes_match_the_plan(run: Run, config: Path, overrides: Sequence[str]) -> None:
    """The run's logged `mem/activation_bytes` are within 15% of what megamor.plan predicts for
    its config (the issue's bound)."""
    import pytest

    from megamor.plan.activations import ActivationSpec, activation_bytes
    from megamor.train.config import load_experiment

    logged = [r["mem/activation_bytes"] for r in run.records() if "mem/activation_bytes" in r]
    assert logged, "no record has mem/activation_bytes"
    exp = load_experiment([config], list(overrides))
    spec = ActivationSpec(exp.batch.micro_batch_size, exp.data.seq_len, exp.deepspeed.precision,
                          exp.trainer.activation_checkpointing, document_masking=exp.data.document_masking)
    planned = activation_bytes(exp.model, spec)["total"]
    assert planned == pytest.approx(max(logged), rel=0.15), (logged, planned)


def rel_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


@contextlib.contextmanager
def started(cmd: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A launcher in a session of its own, output piped; on the way out (a failed assertion too)
    its whole process group is killed: a failing test leaves no trainer running for the rest of
    the session on a 2-core machine."""
    proc = subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def gone(p: psutil.Process) -> bool:
    """The process has ended (reaped, or a zombie), asked without racing its reaping."""
    import psutil

    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def workers_by_rank(launcher_pid: int) -> dict[int, psutil.Process]:
    """RANK -> the trainer process of that rank under a launcher. A worker's own short-lived
    children (a fork before its exec, a zombie) carry its command line and RANK too: a process
    whose parent is itself a trainer is not a worker."""
    import psutil

    candidates: dict[int, tuple[psutil.Process, int, int]] = {}  # pid -> (process, rank, parent pid)
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "megamor.train" in " ".join(p.cmdline()) and "RANK" in (env := p.environ()):
                candidates[p.pid] = (p, int(env["RANK"]), p.ppid())
        except psutil.Error:  # ended, or a zombie, while we looked
            continue
    return {rank: p for p, rank, parent in candidates.values() if parent not in candidates}


def wait_for_step(run_dir: Path, step: int, proc=None, timeout: float = 180, status=None) -> None:
    """Until metrics.jsonl holds `step`; fails if the process `proc` ends first or at the
    timeout, with `status()` (e.g. a SLURM job's state and log) in the message."""
    import time

    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and f'"step": {step},' in metrics.read_text():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode})")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s" + (f": {status()}" if status else ""))


def slurm_status(cluster, job: str, log: Path):
    """For wait_for_step: the job's state and its output so far."""
    return lambda: f"{cluster.job_state(job)}\n{log.read_text() if log.exists() else ''}"
