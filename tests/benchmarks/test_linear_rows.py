"""`evals/bench_linear_rows.py`: one row per kernel and shape, ratios against 32 rows."""

from __future__ import annotations

import pytest
from torch import nn

from megamor.benchmarks.linear_rows import main
from megamor.inference.packed_linear import available


@pytest.mark.skipif(not available(nn.Linear(4, 4)), reason="needs oneDNN's linear ops (CPU torch)")
def test_table(tmp_path):
    out = tmp_path / "rows.md"
    assert main(["--shapes", "16x24", "--weights", "2", "--repeats", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 16x24")]
    assert [r.split(" | ")[1] for r in rows] == ["torch linear", "oneDNN packed"]
    assert all("(1.00x)" in r for r in rows)  # the 32-row column is the reference
