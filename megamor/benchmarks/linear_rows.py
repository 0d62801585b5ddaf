"""What a linear costs against its rows on this CPU, torch's kernel against oneDNN's on a packed
weight (`python evals/bench_linear_rows.py`): the part of the decode step the FLOP model does
not count. Weights cycle through more than fit in the caches (a decode step reads each layer's
weights once), one thread, CPU time per call, best of `--repeats`; ratios against 32 rows."""

from __future__ import annotations

import os
import sys
import time

from megamor.cli import ArgumentParser
from megamor.utils.atomic import atomic_open

ROWS = (1, 11, 21, 32, 43)


def _time(fn, x, n_weights: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        c = time.process_time()
        for _ in range(4):
            for i in range(n_weights):
                fn(x, i)
        best = min(best, (time.process_time() - c) / (4 * n_weights))
    return best


def run(d_in: int, d_out: int, n_weights: int, repeats: int) -> list[str]:
    import torch
    import torch.nn.functional as F

    ws = [torch.randn(d_out, d_in) for _ in range(n_weights)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in ws]
    kernels = {"torch linear": lambda x, i: F.linear(x, ws[i]),
               "oneDNN packed": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")}
    t = {(k, m): _time(f, torch.randn(m, d_in), n_weights, repeats) for k, f in kernels.items() for m in ROWS}
    lines = []
    for k in kernels:
        cells = [f"{t[k, m] * 1e6:.0f} us ({t[k, m] / t[k, 32]:.2f}x)" for m in ROWS]
        lines.append(f"| {d_in}x{d_out} | {k} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="bench_linear_rows.py", description=__doc__)
    p.add_argument("--shapes", nargs="+", default=["512x1664", "1664x512", "512x512"], help="in x out (33m: d 512, d_ff 1664)")
    p.add_argument("--weights", type=int, default=24, help="distinct weights cycled (more than the caches hold)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for shape in args.shapes:
        parts = shape.split("x")
        if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
            p.error(f"--shapes: {shape!r} must look like IN x OUT, e.g. 512x1664")
    import torch  # after parsing: --help and bad arguments answer at once

    torch.set_num_threads(1)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"CPU, 1 thread, torch {torch.__version__}, fp32; load average {load}",
             f"command: python evals/bench_linear_rows.py {' '.join(sys.argv[1:] if argv is None else argv)}", "",
             "| shape | kernel | " + " | ".join(f"{m} rows" for m in ROWS) + " |", "|---|---|" + "---:|" * len(ROWS)]
    for s in args.shapes:
        d_in, d_out = (int(x) for x in s.split("x"))
        lines += run(d_in, d_out, args.weights, args.repeats)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with atomic_open(args.out, "w") as f:
            f.write(text)
    return 0
