"""Depth histograms as CSV (`logging.depth_hist_csv`, rank 0): how many tokens ran each number
of recursion steps, summed over the steps since the previous rows, every
`logging.depth_hist_every` steps (and at the last step).

    step,depth,count,fraction
    10,0,812,0.396484
    10,1,620,0.302734
    10,2,616,0.300781

One row per depth (0..num_recursions) at each written step, the rows of a step appended in one
write. A resumed run first cuts the file back to the checkpoint's step (atomically, as
metrics.jsonl is), so a step's rows appear once even after a crash. The same format is what
`python -m megamor.eval.depth_log` extracts from metrics.jsonl and plots.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megamor.utils.atomic import atomic_open

if TYPE_CHECKING:  # the depth tool imports this module: its argument errors answer without torch
    import torch

HEADER = "step,depth,count,fraction\n"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def format_rows(step: int, counts: Sequence[float]) -> str:
    """The CSV rows of one step's histogram (no header)."""
    total = float(sum(counts)) or 1.0
    return "".join(f"{step},{d},{_num(n)},{n / total:.6f}\n" for d, n in enumerate(counts))


def write_csv(path: Path, hists: Iterable[tuple[int, Sequence[float]]]) -> None:
    """A whole file at once (atomic): the depth tool's output."""
    with atomic_open(path, "w") as f:
        f.write(HEADER)
        f.writelines(format_rows(step, counts) for step, counts in hists)


def read_csv(path: Path) -> dict[int, list[float]]:
    """step -> counts by depth. Ignores a torn last line (a killed writer) and, if a step was
    somehow written twice, keeps its last rows."""
    out: dict[int, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step, depth, count = int(row["step"]), int(row["depth"]), float(row["count"])
                float(row["fraction"])
            except (TypeError, ValueError, KeyError):
                continue
            if depth == 0:
                out[step] = {}
            out.setdefault(step, {})[depth] = count
    return {s: [d[k] for k in sorted(d)] for s, d in sorted(out.items()) if d and sorted(d) == list(range(len(d)))}


def cut_back_csv(path: Path, step: int) -> int:
    """Drop the rows of steps after `step` (the resumed checkpoint's; 0 for a fresh start) and any
    torn line; atomic. Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for i, line in enumerate(f):
            if i == 0 and line == HEADER:
                continue
            parts = line.rstrip("\n").split(",")
            try:
                ok = line.endswith("\n") and len(parts) == 4 and int(parts[0]) <= step
            except ValueError:
                ok = False
            if ok:
                keep.append(line)
            else:
                dropped += 1
    if dropped:
        with atomic_open(path, "w") as f:
            f.write(HEADER)
            f.writelines(keep)
    return dropped


class DepthCsvSink:
    """The CSV writer of the depth-CSV callback (train.callbacks.depth_csv): it sums the per-step
    histograms itself (on_step) and writes them at its own cadence."""

    def __init__(self, path: Path, due: Callable[[int], bool], start_step: int):
        self.path, self.due = Path(path), due
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_back_csv(self.path, start_step)
        self.hist: torch.Tensor | None = None
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.file = open(self.path, "a")  # noqa: SIM115  closed in close()
        if new:
            self.file.write(HEADER)
            self.file.flush()

    def on_step(self, step: int, depth_hist: torch.Tensor | None) -> None:
        """After every optimizer step; depth_hist None for a skipped step or a model without routing."""
        if depth_hist is not None:
            self.hist = depth_hist.detach().double().cpu() if self.hist is None else self.hist + depth_hist.cpu()
        if self.hist is not None and self.due(step):
            self.file.write(format_rows(step, self.hist.tolist()))  # one write: a step's rows together
            self.file.flush()
            self.hist = None

    def close(self) -> None:
        self.file.close()
