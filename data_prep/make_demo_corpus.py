"""Write the synthetic demo corpus (deterministic; no download): template prose, facts about an
invented world, questions on them, arithmetic and sequences, as jsonl ({"text", "kind",
"answers"}: answers are the character spans of looked-up or computed tokens).

  python data_prep/make_demo_corpus.py --out out/demo/demo_corpus.jsonl --mb 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megamor.cli import ArgumentParser
from megamor.data.cli import main_guard


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument("--mb", type=float, default=4.0, help="size of the text in MB (1e6 bytes)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from megamor.data.demo_corpus import write_demo_corpus

    counts = write_demo_corpus(a.out, seed=a.seed, target_bytes=int(a.mb * 1e6))
    print(f"wrote {a.out}: {sum(counts.values())} documents ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


if __name__ == "__main__":
    main_guard(main)
