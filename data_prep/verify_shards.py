"""Check shard folders against their manifests (sizes, sha256, token ids < vocab, document
index); print the first problem with its file and offset and exit 1, or OK.

  python data_prep/verify_shards.py out/demo/shards
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
    p.add_argument("folders", nargs="+")
    p.add_argument("--no-hash", action="store_true", help="skip sha256 (faster; still checks sizes, ids, index)")
    a = p.parse_args()
    from megamor.data.verify import verify_shards

    for folder in a.folders:
        print(verify_shards(folder, check_hashes=not a.no_hash).summary())
    return 0


if __name__ == "__main__":
    main_guard(main, code=1)  # exit 1: a shard failed the check (bad arguments: 2)
