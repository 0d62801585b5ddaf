"""The speed adapter (megamor.adapt): validation loss against mean depth, routers tuned against
untuned, on a small Llama trained here (megamor/benchmarks/adapt.py says how).

    python evals/bench_adapt.py [--steps 300] [--tune-steps 150]
"""

import sys

from megamor.benchmarks.adapt import main

if __name__ == "__main__":
    sys.exit(main())
