"""The depth-histogram CSV (`logging.depth_hist_csv`, rank 0; megamor.runs.depth_csv): each
step's depth histogram summed until `logging.depth_hist_every` says the rows are due. A due
step first checks the run folder's lock (one small all-reduce, on every rank), then writes."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks.base import Callback


class DepthCsv(Callback):
    def __init__(self) -> None:
        self.sink: Any = None

    def setup(self) -> None:
        t = self.trainer
        path = t.cfg.logging.depth_hist_path(t.run_dir)
        if t.is_main and path is not None:
            from megamor.runs.depth_csv import DepthCsvSink

            self.sink = DepthCsvSink(path, lambda step: t.cfg.logging.depth_hist_due(step, t.max_steps), t.step)

    def after_step(self, step: int, result: Any) -> None:
        t = self.trainer
        if t.cfg.logging.depth_hist_due(step, t.max_steps):
            t._check_lock()  # the CSV is written to now
        if self.sink is not None:
            # None for a skipped step or a model without routing: nothing to add
            self.sink.on_step(step, None if result.skipped or not result.tokens_per_step else result.depth_hist)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
