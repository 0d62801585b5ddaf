"""Checkpoint and evaluation cadence: `checkpoint.every_steps`, `eval.every_steps`, and at the
end `eval.at_end` then `checkpoint.save_final`. A due checkpoint waits while the last steps
were non-finite (a state the streak left is not saved on a timer). The final save and a stop's
are made anyway; like every save during a streak they keep the newest tag from before it beyond
keep_last (Trainer._save, CheckpointManager.prune).

A resumed run whose checkpoint's step was owed an evaluation that never reached metrics.jsonl
(a stop during it: the checkpoint is saved first; or a kill between the two) runs it before its
first step, or before exiting when the run is already complete (`eval.at_end`)."""

from __future__ import annotations

from typing import Any

from megamor.parallel import dist as pdist
from megamor.runs.layout import METRICS_FILE
from megamor.train.callbacks.base import Callback
from megamor.train.callbacks.metrics_file import eval_logged_at


class Cadence(Callback):
    def _eval_due(self, step: int) -> bool:
        cfg = self.trainer.cfg.eval
        return bool(cfg.every_steps and step % cfg.every_steps == 0) or (cfg.at_end and step >= self.trainer.max_steps)

    def fit_start(self) -> None:
        t = self.trainer
        if not (t.resumed and t.step > 0 and self._eval_due(t.step)):
            return
        logged = pdist.broadcast_object(eval_logged_at(t.run_dir / METRICS_FILE, t.step) if t.is_main else None)
        if not logged:
            t.console.print(f"step {t.step}: the evaluation due at this checkpoint was never logged (cut short): running it")
            t.log_eval()

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
