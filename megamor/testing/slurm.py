"""A real SLURM cluster on one machine (munge + slurmctld + two slurmd "nodes"), for testing
the project's sbatch scripts with real daemons. Needs root and Debian's slurm packages
(`apt-get install slurmctld slurmd slurm-client munge`; .ci/run installs them).

    with LocalSlurm(workdir) as cluster:
        job = cluster.sbatch(["slurm/train.sbatch", ...], env={...})
        cluster.wait(job)

The two virtual nodes are named after names that resolve here (the short hostname and
`localhost`), so scripts can use `scontrol show hostnames` for MASTER_ADDR as on a real cluster.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def available() -> str | None:
    """None when a local cluster can start here, else the reason it cannot."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"SLURM/munge binaries not installed: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, root: Path, cpus_per_node: int = 2, cred_expire: int = 5, first_job_id: int = 1):
        self.root = Path(root)
        # Jobs derive MASTER_PORT from their id (slurm/train.sbatch): clusters side by side (one
        # per pytest-xdist worker) start their ids apart so their ports differ.
        self.first_job_id = first_job_id
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host, "localhost"]
        self.cpus = cpus_per_node
        self.cred_expire = cred_expire
        self.conf = self.root / "slurm.conf"
        self._pids: list[Path] = []

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        reason = available()
        if reason:
            raise RuntimeError(reason)
        d = self.root
        for sub in ("munge", "state", "spool", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o755)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = d / "munge" / "munge.sock"
        subprocess.run(
            [_bin("munged"), f"--socket={sock}", f"--key-file={key}", f"--pid-file={d}/run/munged.pid",
             f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge/munge.seed", "--force"],
            check=True,
        )
        self._pids.append(d / "run" / "munged.pid")
        ctl_port, node_ports = _free_port(), [_free_port() for _ in self.nodes]
        self.conf.write_text(self._conf(sock, ctl_port, node_ports))
        subprocess.run([_bin("slurmctld"), "-f", str(self.conf), "-c", "-i"], check=True, env=self.env)
        self._pids.append(d / "run" / "slurmctld.pid")
        for n in self.nodes:
            subprocess.run([_bin("slurmd"), "-f", str(self.conf), "-N", n], check=True, env=self.env)
            self._pids.append(d / "run" / f"slurmd-{n}.pid")
        self._wait_idle()

    def stop(self) -> None:
        for pid_file in reversed(self._pids):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass
        self._pids.clear()

    def _conf(self, sock: Path, ctl_port: int, node_ports: list[int]) -> str:
        d = self.root
        lines = [
            "ClusterName=megamorlocal",
            f"FirstJobId={self.first_job_id}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={sock},cred_expire={self.cred_expire}",
            "MailProg=/bin/true",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=0",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=600",
            "JobRequeue=1",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "SlurmctldParameters=preempt_send_user_signal",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
        ]
        for n, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
            )
        nodes = ",".join(self.nodes)
        lines.append(f"PartitionName=debug Nodes={nodes} Default=YES DefaultTime=01:00:00 MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30")
        lines.append(f"PartitionName=high Nodes={nodes} Default=NO DefaultTime=01:00:00 MaxTime=INFINITE State=UP PriorityTier=10")
        return "\n".join(lines) + "\n"

    def _wait_idle(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env, check=False)
            states = r.stdout.split()
            if r.returncode == 0 and states and all(s == "idle" for s in states):
                return
            time.sleep(0.2)
        raise RuntimeError(f"local SLURM nodes did not become idle: {self.log_tail()}")

    # -- jobs -------------------------------------------------------------------------
    def sbatch(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        r = subprocess.run(
            ["sbatch", "--parsable", *args], capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=cwd,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job_state(self, job: int) -> dict[str, str]:
        r = subprocess.run(["scontrol", "-o", "show", "job", str(job)], capture_output=True, text=True, env=self.env,
                           check=False)
        fields = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait(self, job: int, states: Sequence[str] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.job_state(job).get("JobState", "")
            if st in states:
                return st
            time.sleep(0.5)
        raise TimeoutError(f"job {job} not in {states} after {timeout}s: {self.job_state(job)}")

    def signal(self, job: int, sig: str = "USR1", batch_only: bool = True) -> None:
        args = ["scancel", f"--signal={sig}"] + (["--batch"] if batch_only else []) + [str(job)]
        subprocess.run(args, check=True, env=self.env)

    def queued(self) -> list[str]:
        """Ids of the jobs still pending, running or completing (array tasks as `job_task`)."""
        r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env, check=True)
        return r.stdout.split()

    def drain(self, timeout: float = 120) -> None:
        """Cancels every queued job and waits until none is left and the nodes are idle, so that
        one cluster serves test after test (each starts on an empty queue)."""
        if self.queued():
            subprocess.run(["scancel", "--user", pwd.getpwuid(os.getuid()).pw_name], check=True, env=self.env)
        deadline = time.time() + timeout
        while self.queued():
            if time.time() > deadline:
                raise RuntimeError(f"SLURM jobs {self.queued()} still queued {timeout}s after scancel: {self.log_tail()}")
            time.sleep(0.5)
        self._wait_idle(timeout=max(deadline - time.time(), 1))

    def log_tail(self, n: int = 20) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)
