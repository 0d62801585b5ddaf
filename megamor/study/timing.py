"""Run-time estimates for `--plan`: finished runs' measured time (training + evaluation),
and for the others the median seconds per FLOP of finished runs, from the same budget when
there are some (a wider model runs at a different speed), else from every finished run."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence

from megamor.study.plan import RunSpec


def measured_seconds(run: RunSpec) -> float | None:
    """Training + evaluation seconds of a finished run (None: not finished, or trained by an
    earlier call whose time was not recorded)."""
    path = run.result_path if run.result_path.is_file() else run.kept_path
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    train = float(res.get("train_seconds") or 0.0)
    return train + float(res.get("eval_seconds") or 0.0) if train > 0 else None


def estimate_minutes(runs: Sequence[RunSpec]) -> list[float | None]:
    seconds = {r.index: measured_seconds(r) for r in runs}
    rate_all: list[float] = []
    rate_budget: dict[str, list[float]] = {}
    for r in runs:
        s = seconds[r.index]
        if s is not None:
            rate_all.append(s / r.budget.flops)
            rate_budget.setdefault(r.budget_name, []).append(s / r.budget.flops)
    out: list[float | None] = []
    for r in runs:
        s = seconds[r.index]
        rates = rate_budget.get(r.budget_name) or rate_all
        if s is None and rates:
            s = statistics.median(rates) * r.budget.flops  # median: a run paused for hours does not count
        out.append(None if s is None else s / 60.0)
    return out
