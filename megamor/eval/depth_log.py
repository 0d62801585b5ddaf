"""The depth distribution over training: per-step depth histograms as CSV, and a plot.

    python -m megamor.eval.depth_log runs/demo                      # plot: runs/demo/depth_hist.png
    python -m megamor.eval.depth_log runs/demo --csv depth.csv --plot depth.png
    python -m megamor.eval.depth_log runs/demo/depth_hist.csv       # the run's logging.depth_hist_csv

From a run folder it reads `router/depth_hist/counts` of metrics.jsonl (one histogram per log
window, rows after a resume once: the trainer cuts the file back); from a CSV written by
`logging.depth_hist_csv`, that file (its own cadence). The CSV it writes has that format too
(megamor/runs/depth_csv.py). The plot stacks each depth's share of the tokens over the steps.
Bad input (no such run, no depth histograms: a model without routing) is one line, exit 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megamor.cli import ArgumentParser, BadInput, run_main
from megamor.runs.depth_csv import read_csv, write_csv
from megamor.runs.metrics_log import iter_rows

TOOL = "megamor.eval.depth_log"
HIST_KEY = "router/depth_hist/counts"
PLOT_FILE = "depth_hist.png"


def from_metrics(path: Path) -> dict[int, list[float]]:
    """step -> token counts by depth, from metrics.jsonl (a torn or repeated row: the last complete one wins)."""
    out: dict[int, list[float]] = {}
    for row in iter_rows(path):
        if isinstance(row.get(HIST_KEY), list) and "step" in row:
            out[int(row["step"])] = [float(x) for x in row[HIST_KEY]]
    return dict(sorted(out.items()))


def load(source: Path) -> dict[int, list[float]]:
    from megamor.runs.layout import METRICS_FILE

    if source.is_dir():
        path = source / METRICS_FILE
        if not path.is_file():
            raise BadInput(f"{source}: no {METRICS_FILE} (not a run folder, or the run has not logged yet)")
        hists = from_metrics(path)
    elif source.is_file():
        path = source
        hists = read_csv(path)
    else:
        raise BadInput(f"{source}: no such run folder or depth CSV")
    if not hists:
        raise BadInput(f"{path}: no depth histograms (a model without routing logs none)")
    if len({len(c) for c in hists.values()}) != 1:
        raise BadInput(f"{path}: the depth histograms have different numbers of depths (two models in one file?)")
    return hists


def plot(hists: dict[int, list[float]], out: Path, title: str) -> None:
    """Stacked areas: each depth's share of the tokens at each written step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megamor.utils.atomic import atomic_open

    from .depth import HTML_COLOURS

    steps = list(hists)
    depths = len(next(iter(hists.values())))
    shares = [[c[d] / (sum(c) or 1.0) for c in hists.values()] for d in range(depths)]
    mean = [sum(d * n for d, n in enumerate(c)) / (sum(c) or 1.0) for c in hists.values()]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colours = [HTML_COLOURS[min(d, len(HTML_COLOURS) - 1)] for d in range(depths)]
    ax.stackplot(steps, shares, labels=[f"depth {d}" for d in range(depths)], colors=colours, edgecolor="k", linewidth=0.3)
    ax.set_xlim(steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("share of tokens")
    ax.set_title(title)
    right = ax.twinx()  # the mean depth on its own axis: 0..num_recursions
    right.plot(steps, mean, color="k", linewidth=1.2, label="mean depth")
    right.set_ylim(0, depths - 1)
    right.set_ylabel("mean depth")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.1, 1.0), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Raises BadInput for bad input (run_main: one line, exit 2)."""
    p = ArgumentParser(prog=f"python -m {TOOL}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="run folder (its metrics.jsonl) or a depth CSV (logging.depth_hist_csv)")
    p.add_argument("--csv", type=Path, help="write the histograms here as CSV (step,depth,count,fraction)")
    p.add_argument("--plot", type=Path, help=f"write the plot here (default: {PLOT_FILE} in the run folder, or beside the CSV)")
    args = p.parse_args(argv)
    hists = load(args.source)
    if args.csv:
        write_csv(args.csv, hists.items())
    out = args.plot or (args.source / PLOT_FILE if args.source.is_dir() else args.source.with_suffix(".png"))
    name = args.source.name if args.source.is_dir() else args.source.parent.name
    plot(hists, out, f"{name}: depth distribution over training")
    steps = list(hists)
    print(f"{len(steps)} histograms (steps {steps[0]}..{steps[-1]}, depths 0..{len(hists[steps[0]]) - 1})"
          + (f" -> {args.csv}" if args.csv else "") + f" -> {out}")
    return 0


if __name__ == "__main__":
    run_main(lambda: main(), tool=TOOL, results_on_stdout=False)
