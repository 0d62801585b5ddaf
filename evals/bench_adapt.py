"""The speed adapter (megamor.adapt): validation loss against mean depth, routers tuned against
untuned, on a small Llama trained here (megamor/benchmarks/adapt.py says how).

    python evals/bench_adapt.py [--steps 400] [--tune-steps 200] [--tune-lr 1e-3,1e-2]
"""

import sys

from megamor.benchmarks.cli import adapt_parser

if __name__ == "__main__":
    args = adapt_parser().parse_args()  # before the benchmark (and torch) loads: --help answers at once
    from megamor.benchmarks.adapt import run

    sys.exit(run(args))
