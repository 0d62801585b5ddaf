"""A user callback, as a user would write one (tests/train/test_callbacks.py adds it from the
config): rank 0 appends every hook it sees to a JSON-lines file and records a metric. It is a
sink too: the keys of every metrics record go to PATH.records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megamor.train.callbacks import Callback


class HookRecorder(Callback):
    def __init__(self, path: str, tag: str = "seen"):
        self.path, self.tag = Path(path), tag
        self.steps = 0

    def _note(self, hook: str, *args: Any) -> None:
        if self.trainer.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps([hook, *args]) + "\n")

    def setup(self) -> None:
        self._note("setup", self.trainer.step)

    def fit_start(self) -> None:
        self._note("fit_start")

    def before_step(self, step: int) -> None:
        self._note("before_step", step)

    def before_forward(self, step: int, micro: int) -> None:
        self._note("before_forward", step, micro)

    def after_backward(self, step: int, micro: int) -> None:
        self._note("after_backward", step, micro)

    def before_optimizer_step(self, step: int) -> None:
        self._note("before_optimizer_step", step)

    def after_step(self, step: int, result: Any) -> None:
        self.steps += 1
        self._note("after_step", step)

    def log_window(self, step: int, metrics: dict[str, Any]) -> None:
        self._note("log_window", step, "train/loss" in metrics)
        self.trainer.record_metric(f"user/{self.tag}_steps", self.steps)

    def log_metrics(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None) -> None:
        self._note("log_metrics", step, "train" if "train/loss" in metrics else "val")
        if self.trainer.is_main:
            with open(f"{self.path}.records", "a") as f:
                f.write(json.dumps({"step": step, "keys": list(metrics), "histograms": sorted(histograms or {})}) + "\n")

    def step_end(self, step: int, result: Any) -> None:
        self._note("step_end", step)

    def during_save(self, step: int) -> None:
        self._note("during_save", step)

    def after_save(self, step: int, path: Path) -> None:
        self._note("after_save", step, Path(path).name)

    def fit_end(self, step: int) -> None:
        self._note("fit_end", step)

    def on_stop(self, step: int, signum: int | None) -> None:
        self._note("on_stop", step)

    def close(self) -> None:
        self._note("close")


class NotACallback:
    pass
