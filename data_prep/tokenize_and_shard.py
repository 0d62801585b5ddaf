"""Tokenize documents with N worker processes into memory-mappable token shards + a manifest.

Rerunning an interrupted run keeps finished work; the same inputs give byte-identical output
whatever --workers, --num-tasks or --unit-mb. On a SLURM array, run every task with
--num-tasks N --task-index $SLURM_ARRAY_TASK_ID into one shared --out, then merge_shards.py.

  python data_prep/tokenize_and_shard.py out/demo/demo_corpus.jsonl \\
      --tokenizer out/demo/tokenizer --out out/demo/shards --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megamor.cli import ArgumentParser
from megamor.data.cli import add_input_args, main_guard, read_options


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer.model (sentencepiece), tokenizer.json (Hugging Face) or their folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default 64Mi)")
    p.add_argument("--valid-fraction", type=float, default=None,
                   help="share of documents (chosen by a hash of their text) in the valid split (default 0.005)")
    p.add_argument("--valid-files", default="", metavar="A.txt,B.txt",
                   help="comma-separated input files (or folders) held out whole as the valid split, "
                        "instead of --valid-fraction; each must also be given as an input")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/valid split by document")
    p.add_argument("--unit-mb", type=float, default=64, help="work unit size for splittable files (no effect on output)")
    p.add_argument("--unit-rows", type=int, default=100_000, help="work unit size for HF datasets (no effect on output)")
    p.add_argument("--num-tasks", type=int, default=1, help="number of tasks sharing the work (job array)")
    p.add_argument("--task-index", type=int, default=0, help="this task, in [0, num_tasks)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's output in --out (an identical finished run is kept)")
    p.add_argument("--keep-parts", action="store_true", help="keep the per-unit intermediate files")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    from megamor.data.pipeline import ShardSettings, tokenize_and_shard

    valid_files = tuple(f for f in a.valid_files.split(",") if f)
    if valid_files and a.valid_fraction is not None:
        p.error("give --valid-fraction or --valid-files, not both")
    valid_fraction = 0.0 if valid_files else (0.005 if a.valid_fraction is None else a.valid_fraction)
    settings = ShardSettings(shard_tokens=a.shard_tokens, valid_fraction=valid_fraction, split_seed=a.split_seed,
                             read=read_options(a), unit_bytes=max(1, int(a.unit_mb * 2**20)), unit_rows=a.unit_rows,
                             valid_files=valid_files)
    tokenize_and_shard(a.inputs, a.out, a.tokenizer, settings, workers=a.workers, num_tasks=a.num_tasks,
                       task_index=a.task_index, overwrite=a.overwrite, allow_empty_inputs=a.allow_empty_inputs,
                       hf_split=a.hf_split, keep_parts=a.keep_parts, progress=not a.no_progress)
    return 0


if __name__ == "__main__":
    main_guard(main)
