"""The README's claims that code can check: a test count it states is the suite's."""

from __future__ import annotations

import re
import subprocess
import sys

from megamor.env import repo_root

COUNT = re.compile(r"\b(\d[\d,]*) tests\b")


def test_a_stated_test_count_is_the_collected_one():
    claims = {int(n.replace(",", "")) for n in COUNT.findall((repo_root() / "README.md").read_text())}
    if not claims:  # the README states no number (it drifted: issue 27); nothing to compare
        return
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"], cwd=repo_root(),
                       capture_output=True, text=True, timeout=600, check=False)
    found = re.search(r"(\d+) tests? collected", r.stdout)
    assert found, r.stdout[-2000:] + r.stderr[-2000:]
    assert claims == {int(found.group(1))}, f"README says {sorted(claims)} tests; pytest collects {found.group(1)}"
