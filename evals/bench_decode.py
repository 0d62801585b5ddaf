"""Decoding throughput and KV memory: megamor's engine (vanilla, recursive, MoR-expert,
MoR-token; routers calibrated to their capacities) against Hugging Face generate.

    python evals/bench_decode.py --size 33m --out evals/results/decode.md           # CPU
    python evals/bench_decode.py --size 360m --batch 32 --prompt-len 128 --new-tokens 128   # GPU, bf16
"""

import sys

from megamor.benchmarks.cli import decode_args

if __name__ == "__main__":
    args = decode_args()  # before the benchmark (and torch) loads: --help answers at once
    from megamor.benchmarks.decode import run

    sys.exit(run(args))
