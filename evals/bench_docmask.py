"""Document masking: FlexAttention block masks against the dense mask (megamor.benchmarks.docmask).

    python evals/bench_docmask.py [--seq-lens 2048,8192] [--modes eval,train] [--mean-doc 512]
"""

from __future__ import annotations

import sys

from megamor.benchmarks.cli import docmask_parser

if __name__ == "__main__":
    args = docmask_parser().parse_args()  # before the benchmark (and torch) loads: --help answers at once
    from megamor.benchmarks.docmask import run

    sys.exit(run(args))
