"""W&B (rank 0; `wandb.mode`: online, offline under RUN/wandb for `wandb sync` later, or
disabled): every metric that has a value, and the histograms.

The run id is created once and kept in RUN/wandb_id (and in every checkpoint): a resumed run
continues the same W&B run (`resume="allow"`). Online failing to reach the server falls back to
offline with a warning (megamor.train.wandb_setup.init_run). A resumed run first sends the
rows of metrics.jsonl up to its checkpoint that W&B never got (a killed run's file loses its
tail; megamor.train.wandb_offline)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megamor.train.callbacks.base import Callback
from megamor.train.wandb_setup import init_run
from megamor.utils.atomic import atomic_open

WANDB_ID_FILE = "wandb_id"


def wandb_run_id(run_dir: Path, from_checkpoint: str | None) -> str:
    path = run_dir / WANDB_ID_FILE
    if from_checkpoint:
        run_id = from_checkpoint
    elif path.is_file() and path.read_text().strip():
        run_id = path.read_text().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)
    if not path.is_file() or path.read_text().strip() != run_id:
        with atomic_open(path, "w") as f:
            f.write(run_id + "\n")
    return run_id


class WandB(Callback):
    def __init__(self) -> None:
        self.run: Any = None

    def setup(self) -> None:
        from megamor.train.config import to_container  # train.config imports this package

        t = self.trainer
        cfg = t.cfg
        mode = cfg.wandb.resolved_mode()
        if not t.is_main or mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = init_run(
            mode,
            cfg.wandb.init_timeout,
            t.console.print,
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.name or cfg.name,
            group=cfg.wandb.group,
            tags=list(cfg.wandb.tags) or None,
            id=t.wandb_id,
            resume="allow",
            dir=str(t.run_dir),
            config=to_container(cfg),
        )
        if t.resumed:
            self._send_owed_rows()

    def _send_owed_rows(self) -> None:
        from megamor.runs.layout import METRICS_FILE
        from megamor.train.wandb_offline import last_offline_step, rows_owed

        t = self.trainer
        if self.run.offline:
            last = last_offline_step(t.run_dir / "wandb", t.wandb_id, skip=Path(self.run.dir).parent)
        else:  # the server's history ends before the run's starting step
            last = int(self.run.starting_step) - 1
        owed = rows_owed(t.run_dir / METRICS_FILE, last, t.step)
        for step, metrics in owed:
            self.run.log(metrics, step=step)
        if owed:
            t.console.print(f"megamor: W&B: {len(owed)} rows of metrics.jsonl up to step {t.step} sent again "
                            f"(W&B's record of this run ends at step {max(last, 0)})")

    def log_metrics(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None) -> None:
        if self.run is None:
            return
        import numpy as np
        import wandb

        payload: dict[str, Any] = {k: v for k, v in metrics.items() if v is not None}
        for k, (counts, edges) in (histograms or {}).items():
            payload[k] = wandb.Histogram(np_histogram=(np.asarray(counts, dtype=float), np.asarray(edges, dtype=float)))
        self.run.log(payload, step=step)

    def on_stop(self, step: int, signum: int | None) -> None:
        if self.run is not None:
            self.run.mark_preempting()  # online: the server shows the run as preempted, not crashed

    def close(self) -> None:
        if self.run is not None:
            code = self.trainer.exit_code
            self.run.finish(exit_code=1 if code is None else code)  # an error: failed, not finished
            self.run = None
