"""Checkpoint and evaluation cadence: `checkpoint.every_steps`, `eval.every_steps`, and at the
end `eval.at_end` then `checkpoint.save_final`. A due checkpoint waits while the last steps
were non-finite (a state the streak left is not saved on a timer). The final save and a stop's
are made anyway; like every save during a streak they keep the newest tag from before it beyond
keep_last (Trainer._save, CheckpointManager.prune)."""

from __future__ import annotations

from typing import Any

from megamor.train.callbacks.base import Callback


class Cadence(Callback):
    def step_end(self, step: int, result: Any) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            if t.consecutive_nonfinite:
                t.console.print(f"step {step}: checkpoint deferred ({t.consecutive_nonfinite} non-finite steps in a row)")
            else:
                t.save()
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            t.log_eval()

    def fit_end(self, step: int) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        if cfg.eval.at_end and (not cfg.eval.every_steps or step % cfg.eval.every_steps):
            t.log_eval()
        if cfg.checkpoint.save_final and t.last_saved_step != step:
            t.save()
