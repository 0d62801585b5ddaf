"""Join the outputs of the tasks of a tokenize_and_shard job array into shards + manifest.

Fails, naming the missing units, unless every task has finished. The result is
byte-identical to a single-task run.

  python data_prep/merge_shards.py OUT_DIR
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
    p.add_argument("out", help="the --out folder shared by all tasks")
    p.add_argument("--keep-parts", action="store_true")
    a = p.parse_args()
    from megamor.data.finalize import finalize

    m = finalize(a.out, keep_parts=a.keep_parts)
    for split, d in m["splits"].items():
        print(f"{split}: {d['tokens']} tokens, {d['documents']} documents, {len(d['shards'])} shards")
    return 0


if __name__ == "__main__":
    main_guard(main)
