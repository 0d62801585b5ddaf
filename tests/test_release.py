"""The release metadata agrees with itself: one version (megamor.__version__, which setup.py
reads) that is CHANGELOG.md's newest release, and an MIT licence declared where pip sees it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import megamor

ROOT = Path(__file__).resolve().parents[1]


def test_the_changelogs_newest_release_is_the_package_version():
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert releases, "CHANGELOG.md lists no release as '## [X.Y.Z] - YYYY-MM-DD'"
    assert releases[0] == megamor.__version__
    # Newest first, each version once, strictly decreasing.
    as_tuples = [tuple(map(int, v.split("."))) for v in releases]
    assert as_tuples == sorted(set(as_tuples), reverse=True)


def test_setup_py_declares_the_package_version_and_the_mit_licence():
    out = subprocess.run([sys.executable, "setup.py", "--version", "--license"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == [megamor.__version__, "MIT"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
