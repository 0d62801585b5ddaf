#!/usr/bin/env python
"""Benchmark: training speed on one device (megamor/benchmarks/train.py says what is measured).

    python evals/bench_train.py                    # GPU: 135M, 360M, 1.7B within --budget 480 s
    python evals/bench_train.py --tiny             # CPU check of every part at toy sizes (~1-2 min)
    python evals/bench_train.py --parts 135m trainer lm_head --budget 200
"""

import sys

from megamor.benchmarks.cli import train_args

if __name__ == "__main__":
    args = train_args()  # before the benchmark (and torch) loads: --help answers at once
    from megamor.benchmarks.train import report

    sys.exit(report(args))
