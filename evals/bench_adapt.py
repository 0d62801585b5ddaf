"""The speed adapter (megamor.adapt): validation loss against mean depth, routers tuned against
untuned, on a small Llama trained here (megamor/benchmarks/adapt.py says how).

    python evals/bench_adapt.py [--steps 400] [--tune-steps 200] [--tune-lr 1e-3,1e-2]
"""

import sys

from megamor.benchmarks.adapt import main

if __name__ == "__main__":
    sys.exit(main())
