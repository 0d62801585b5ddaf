"""megamor.env's thread defaults: the cores a process may use (affinity, cgroup v1/v2 quota,
read from fake cgroup files) and the OpenMP settings filled in only where the user set none."""

from __future__ import annotations

import os
import subprocess
import sys

from megamor.env import SPIN_COUNT, cgroup_cpu_limit, repo_root, thread_defaults, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _v2(tmp_path, quotas: dict[str, str], rel: str = "user.slice/job"):
    root = tmp_path / "cgroup"
    for folder, text in quotas.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(text + "\n")
    (root / rel).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::/{rel}\n")
    return root, proc


def test_cgroup_v2_takes_the_tightest_quota_up_the_tree(tmp_path):
    root, proc = _v2(tmp_path, {"user.slice": "150000 100000", "user.slice/job": "max 100000"})
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert usable_cpus(root, proc) == 1  # whole cores: 1.5 cores' quota runs one thread without throttling
    root, proc = _v2(tmp_path / "b", {"user.slice/job": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None and usable_cpus(root, proc) == AFFINITY


def test_cgroup_v1_quota_and_no_limit(tmp_path):
    root = tmp_path / "cgroup"
    (root / "cpu,cpuacct").mkdir(parents=True)
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/\n")
    assert cgroup_cpu_limit(root, proc) == 1.0 and usable_cpus(root, proc) == 1
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, proc) is None
    assert usable_cpus(root, tmp_path / "missing") == AFFINITY  # no cgroup files at all: affinity


def test_a_quota_above_the_affinity_does_not_raise_it(tmp_path):
    root, proc = _v2(tmp_path, {"user.slice/job": f"{(AFFINITY + 8) * 100000} 100000"})
    assert usable_cpus(root, proc) == AFFINITY


def test_thread_defaults_fill_only_what_is_unset(tmp_path):
    root, proc = _v2(tmp_path, {"user.slice/job": "400000 100000"})
    want = min(4, AFFINITY)
    env: dict[str, str] = {}
    assert thread_defaults(env, root=root, proc_cgroup=proc) == want
    assert env == {"GOMP_SPINCOUNT": SPIN_COUNT, "OMP_NUM_THREADS": str(want)}
    env = {}
    assert thread_defaults(env, local_processes=want * 2, root=root, proc_cgroup=proc) == 1  # never 0
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert thread_defaults(env, root=root, proc_cgroup=proc) == 3
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice stands
    env = {"OMP_WAIT_POLICY": "PASSIVE"}  # a wait policy given: no spin count added (it would override it)
    thread_defaults(env, root=root, proc_cgroup=proc)
    assert "GOMP_SPINCOUNT" not in env
    env = {"GOMP_SPINCOUNT": "0"}
    thread_defaults(env, root=root, proc_cgroup=proc)
    assert env["GOMP_SPINCOUNT"] == "0" and "OMP_WAIT_POLICY" not in env
    env = {"OMP_NUM_THREADS": ""}
    assert thread_defaults(env, root=root, proc_cgroup=proc) == want and env["OMP_NUM_THREADS"] == str(want)
    env = {"MEGAMOR_THREAD_DEFAULTS": "off"}  # OpenMP's own behaviour (the benchmark's baseline)
    assert thread_defaults(env, root=root, proc_cgroup=proc) == want and env == {"MEGAMOR_THREAD_DEFAULTS": "off"}


def test_the_trainer_sets_them_before_torch_starts_its_threads():
    """megamor.train fills the defaults before it imports torch: torch's pool takes the count."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import os\nfrom megamor.train.__main__ import main\nrc = main(['--config', 'missing.yaml'])\n"
            "import torch\nprint(rc, os.environ['GOMP_SPINCOUNT'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    r = subprocess.run([sys.executable, "-c", code], cwd=repo_root(), env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.stdout.split() == ["2", SPIN_COUNT, str(usable_cpus()), str(usable_cpus())], r.stderr[-2000:]
