"""Document masking: FlexAttention block masks against the dense mask (megamor.benchmarks.docmask).

    python evals/bench_docmask.py [--seq-lens 2048,8192] [--modes eval,train] [--mean-doc 512]
"""

from __future__ import annotations

import sys

from megamor.benchmarks.docmask import main

if __name__ == "__main__":
    sys.exit(main())
