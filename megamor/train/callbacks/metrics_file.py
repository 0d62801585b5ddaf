"""metrics.jsonl in the run folder (rank 0): one JSON object per metrics record, `step` and
`time` first, then the metrics as they came (non-finite floats as null) and each histogram's
counts as `<name>/counts`.

Resuming: the file is first cut back to the checkpoint's step (atomically; a torn last line
goes too), so the steps the resumed run computes again appear once."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from megamor.runs.layout import METRICS_FILE
from megamor.runs.metrics_log import iter_rows
from megamor.train.callbacks.base import Callback
from megamor.utils.atomic import atomic_open


def cut_back_metrics(path: Path, step: int) -> int:
    """Drop the rows of steps after `step` (the checkpoint this run resumes from; 0 for a fresh
    start): those steps are about to be run again, and a plot must not show them twice. A torn
    last line (a killed writer) goes too. Atomic; returns the number of rows dropped."""
    if not path.is_file():
        return 0
    keep: list[str] = []
    dropped = 0
    with open(path) as f:
        for line in f:
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if row_step <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with atomic_open(path, "w") as f:
            f.writelines(keep)
    return dropped


EVAL_PREFIXES = ("val/", "eval/")  # an evaluation's record (validation, eval.tasks)


def eval_logged_at(path: Path, step: int) -> bool:
    """Whether metrics.jsonl holds an evaluation's record at `step` (a torn line is skipped)."""
    return any(row.get("step") == step and any(k.startswith(EVAL_PREFIXES) for k in row) for row in iter_rows(path))


class MetricsFile(Callback):
    def __init__(self) -> None:
        self.file: Any = None

    def setup(self) -> None:
        t = self.trainer
        if not t.is_main:
            return
        t.run_dir.mkdir(parents=True, exist_ok=True)
        cut_back_metrics(t.run_dir / METRICS_FILE, t.step)
        self.file = open(t.run_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115  appended to until close()

    def log_metrics(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None) -> None:
        if self.file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **clean}
        if histograms:
            record.update({f"{k}/counts": list(c) for k, (c, _) in histograms.items()})
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
