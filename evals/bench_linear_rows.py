"""A linear's CPU cost against its rows, torch's kernel against oneDNN's packed one.

    python evals/bench_linear_rows.py --out evals/results/linear_rows.md
"""

import sys

from megamor.benchmarks.linear_rows import main

if __name__ == "__main__":
    sys.exit(main())
