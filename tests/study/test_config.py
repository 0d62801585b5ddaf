"""A bad study file stops before anything runs: one line naming the key, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megamor.env import repo_root
from tests.study.conftest import write_study


@pytest.mark.parametrize("override,key", [
    ("budget.flop=1e9", "budget.flop"),  # unknown key
    ("budget.tokens=1000", "budget.flops"),  # both budgets
    ("seeds=[1,1]", "seeds"),
    ("model_config: configs/model/33m/vanilla.yaml", "model_config"),  # (edited in the file: a missing file)
    ("variants=5", "variants"),  # an override of the wrong shape
    ("reference=nope", "reference"),  # not a variant
])
def test_bad_study_config_exits_2_naming_the_key(tmp_path, override, key):
    cfg = write_study(tmp_path, tmp_path / "text.raw")
    (tmp_path / "text.raw").write_text("Some text.\n\nMore text here.\n" * 200)
    if override.startswith("model_config:"):
        cfg.write_text(cfg.read_text().replace(override.split(": ")[1], "configs/model/33m/nope.yaml"))
        override = "seeds=[7]"
    r = subprocess.run([sys.executable, "-m", "megamor.study", str(cfg), override, "--plan"], cwd=repo_root(),
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("megamor.study: configuration error") and key in lines[0], r.stderr
