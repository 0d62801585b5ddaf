"""The throughput grid (megamor.observe.throughput): every cell measured for every model, the
first model the baseline, peak memory really measured (it grows with the batch), CSV round trip,
and the benchmark's CLI writing CSV and markdown."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamor.model import MoRLM
from megamor.observe.throughput import GridRow, throughput_grid, write_grid_csv
from tests.model.helpers import mor

ROOT = Path(__file__).resolve().parents[2]


def _models():
    routed = mor("expert_choice", max_seq_len=256)
    dense_cfg = copy.deepcopy(routed.cfg)
    dense_cfg.router.capacity = [1.0] * dense_cfg.num_recursions
    return {"routing off": MoRLM(dense_cfg), "MoR": routed}


@pytest.mark.parametrize("mode", ["train", "forward"])
def test_every_cell_for_every_model_with_the_first_model_as_baseline(mode):
    rows = throughput_grid(_models(), [32, 64], [1, 2], mode=mode, repeats=1)
    assert [(r.seq_len, r.batch, r.model) for r in rows] == [
        (s, b, m) for s in (32, 64) for b in (1, 2) for m in ("routing off", "MoR")]
    for r in rows:
        assert r.mode == mode and r.tokens_per_s > 0
        assert r.ms_per_token == pytest.approx(1e3 / r.tokens_per_s)
        assert r.peak_mem_source == "cpu_rss_high_water"
    for base, routed in zip(rows[::2], rows[1::2]):
        assert base.vs_baseline == 1.0
        assert routed.vs_baseline == pytest.approx(routed.tokens_per_s / base.tokens_per_s)


def test_peak_memory_is_measured_and_grows_with_the_batch():
    # Batch 1 runs first, so batch 32 needs memory that is not yet resident: a figure that does
    # not grow means the measurement reads nothing.
    rows = throughput_grid({"MoR": mor("expert_choice")}, [128], [1, 32], mode="train", repeats=1)
    small, large = rows
    assert large.peak_mem_mb > small.peak_mem_mb + 5  # 4,096 tokens x 9 layer applications: tens of MiB


def test_a_second_model_in_a_cell_shows_its_own_peak():
    # The first model's freed activations stay with the allocator; without handing them back, the
    # second model's step fits in them and reads as a 0 MiB peak.
    routed = mor("expert_choice")
    rows = throughput_grid({"a": routed, "b": routed}, [128], [32], mode="train", repeats=1)
    assert rows[1].peak_mem_mb > 0.5 * rows[0].peak_mem_mb > 0


def test_csv_round_trip(tmp_path):
    rows = [GridRow("a", "train", 128, 4, 1000.0, 1.0, 0.9, 12.5, "cpu_rss_high_water", 1.0)]
    out = write_grid_csv(rows, tmp_path / "sub" / "grid.csv")
    with open(out) as f:
        got = list(csv.DictReader(f))
    assert got == [{"model": "a", "mode": "train", "seq_len": "128", "batch": "4", "tokens_per_s": "1000",
                    "ms_per_token": "1", "cpu_ms_per_token": "0.9", "peak_mem_mb": "12.5",
                    "peak_mem_source": "cpu_rss_high_water", "vs_baseline": "1"}]
    assert [p.name for p in out.parent.iterdir()] == ["grid.csv"]  # no temp file left


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="mode"):
        throughput_grid(_models(), [32], [1], mode="backward")
    with pytest.raises(ValueError, match="at least one"):
        throughput_grid(_models(), [], [1])


def test_bench_model_grid_cli_writes_csv_and_markdown(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "grid.csv"
    cmd = [sys.executable, "evals/bench_model.py", "--config", "configs/model/33m/mor_expert_3.yaml",
           "--seq-lens", "32", "--batch-sizes", "1,2", "--grid-mode", "forward", "--repeats", "1", "--csv", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300)
    with open(out) as f:
        assert [(r["model"], r["batch"]) for r in csv.DictReader(f)] == [
            ("routing off", "1"), ("MoR expert choice", "1"), ("routing off", "2"), ("MoR expert choice", "2")]
    assert "| MoR expert choice | forward | 32 | 2 |" in out.with_suffix(".md").read_text()
    bad = subprocess.run(cmd[:4] + ["--seq-lens", "0,x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "bench_model.py: error: --seq-lens must be a comma list of positive integers, not '0,x'"]
