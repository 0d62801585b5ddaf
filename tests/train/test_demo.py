"""`make demo` end to end, shortened to a few training steps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megamor.env import repo_root
from megamor.runs.tags import newest_complete
from tests.train.helpers import train_env

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)


def test_demo_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = train_env(tmp_path, {"OMP_NUM_THREADS": "2"})
    r = subprocess.run([sys.executable, "-m", "megamor.demo", "--out", str(out), "--steps", "4"], cwd=repo_root(),
                       env=env, capture_output=True, text=True, check=False, timeout=600)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    for what in ("1/4 demo corpus", "2/4 tokenizer", "3/4 tokenize and shard", "4/4 train", "validation loss",
                 "== samples", "== written"):
        assert what in text, what
    assert newest_complete(out / "run").step == 4
    assert (out / "run" / "tokenizer" / "tokenizer.model").is_file()  # kept with the run for eval/export
    sample_lines = text.split("== samples")[1].split("== written")[0].strip().splitlines()[1:]
    assert len(sample_lines) == 3 and all(any(c in line for c in "₀₁₂₃") for line in sample_lines)
    # A second run reuses everything and only re-samples.
    r2 = subprocess.run([sys.executable, "-m", "megamor.demo", "--out", str(out), "--steps", "4"], cwd=repo_root(),
                        env=env, capture_output=True, text=True, check=False, timeout=600)
    assert r2.returncode == 0 and "1/4 demo corpus" not in r2.stdout and "nothing to do" in r2.stdout + r2.stderr
    # Another length keeps the finished run and trains beside it (issue 27: was a schedule refusal).
    r3 = subprocess.run([sys.executable, "-m", "megamor.demo", "--out", str(out), "--steps", "2"], cwd=repo_root(),
                        env=env, capture_output=True, text=True, check=False, timeout=600)
    assert r3.returncode == 0, (r3.stdout + r3.stderr)[-4000:]
    assert "1/4 demo corpus" not in r3.stdout and f"this 2-step run trains in {out / 'run-2'}" in r3.stdout
    assert newest_complete(out / "run-2").step == 2 and newest_complete(out / "run").step == 4
