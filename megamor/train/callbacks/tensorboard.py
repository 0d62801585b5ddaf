"""TensorBoard (`logging.tensorboard: true`, rank 0): what W&B gets, at the same steps, as event
files in RUN/tensorboard/ (megamor.train.tensorboard_sink.TensorBoardSink; a resumed run's new
event file hides the earlier files' points after the checkpoint with `purge_step`)."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks.base import Callback


class TensorBoard(Callback):
    def __init__(self) -> None:
        self.sink: Any = None

    def setup(self) -> None:
        t = self.trainer
        if t.is_main and t.cfg.logging.tensorboard:
            from megamor.train.tensorboard_sink import TensorBoardSink

            self.sink = TensorBoardSink(t.run_dir, t.step)

    def log_metrics(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None) -> None:
        if self.sink is not None:
            self.sink.log(step, metrics, histograms)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
