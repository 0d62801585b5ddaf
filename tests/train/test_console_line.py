"""The console's log line says which clock each number uses: tok/s (and MFU) count the optimizer
steps' own time, s/step the window's wall clock; when they disagree the wall throughput is
printed beside tok/s (a new user read `7.8k tok/s | 0.28s/step` for 1,024-token steps)."""

from __future__ import annotations

from megamor.train.callbacks.console import format_line


def test_the_wall_throughput_is_printed_when_the_clocks_disagree():
    m = {"train/loss": 5.0, "perf/tokens_per_s": 7800.0, "perf/wall_tokens_per_s": 3700.0, "time/step": 0.28,
         "time/forward": 0.04, "time/backward": 0.09, "time/other": 0.15}
    line = format_line(3, 10, m)
    assert "7.8k tok/s (wall 3.7k)" in line and "0.28s/step (fwd 0.04 bwd 0.09 other 0.15)" in line
    m["perf/wall_tokens_per_s"] = 7700.0  # within 5%: one number
    assert "7.8k tok/s |" in format_line(3, 10, m)
