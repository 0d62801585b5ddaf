"""TensorBoard event files (`logging.tensorboard: true`, rank 0; the callback is train.callbacks.tensorboard): the run's metrics as event files in
RUN/tensorboard/, for the TensorBoard many clusters run beside the job.

Every scalar W&B gets goes in under its own name (train/, perf/, time/, router/, the router
health series train/router_health/r{r}/*, val/), and `router/depth_hist` as a histogram with one
bucket per recursion depth.

Resuming: each (re)start opens a new event file whose first record is a restart marker at the
step after the checkpoint (SummaryWriter's `purge_step`). TensorBoard's reader drops every
point at or after that step from the earlier files, so the steps a killed run logged after its
last checkpoint, which the resumed run computes again, appear once.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from megamor.config import ConfigError

TENSORBOARD_DIR = "tensorboard"


def check_available(enabled: bool) -> None:
    """Preflight: `logging.tensorboard: true` needs the tensorboard package (one line, exit 2)."""
    if not enabled:
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("logging.tensorboard", "is true but the tensorboard package is not installed: "
                                                 "pip install 'megamor[tensorboard]' (or set logging.tensorboard=false)") from None


def histogram_summary(counts: Sequence[float], edges: Sequence[float]) -> dict[str, Any] | None:
    """add_histogram_raw's arguments for a histogram given as counts and bin edges (len + 1);
    min/max/sum are over the bin centres (the depths). None when the histogram is empty."""
    centres = [(a + b) / 2 for a, b in pairwise(edges)]
    used = [c for c, n in zip(centres, counts) if n]
    if not used:
        return None
    return {
        "min": min(used),
        "max": max(used),
        "num": float(sum(counts)),
        "sum": float(sum(c * n for c, n in zip(centres, counts))),
        "sum_squares": float(sum(c * c * n for c, n in zip(centres, counts))),
        "bucket_limits": [float(e) for e in edges[1:]],
        "bucket_counts": [float(n) for n in counts],
    }


def _scalar(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None  # None (not measured this window) and anything not a number: W&B skips them too


class TensorBoardSink:
    """The event-file writer of the TensorBoard callback (train.callbacks.tensorboard): what W&B
    gets, at the same steps."""

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / TENSORBOARD_DIR
        # The resumed run logs steps > start_step again: hide the earlier files' points there.
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None = None) -> None:
        for k, v in metrics.items():
            x = _scalar(v)
            if x is not None:
                self.writer.add_scalar(k, x, global_step=step)
        for k, (counts, edges) in (histograms or {}).items():
            h = histogram_summary(counts, edges)
            if h is not None:
                self.writer.add_histogram_raw(k, global_step=step, **h)
        self.writer.flush()  # at the log cadence: a TensorBoard watching the job sees each window at once

    def close(self) -> None:
        self.writer.close()

