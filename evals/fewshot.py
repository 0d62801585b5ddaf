#!/usr/bin/env python
"""Few-shot evaluation on local task files (HellaSwag, PIQA, ARC-e/c, WinoGrande, LAMBADA, BoolQ, OpenBookQA).

    python evals/fewshot.py --checkpoint run/ --tokenizer tok.model --tasks hellaswag,piqa \
        --num-fewshot 0 --limit 500 --out results/fewshot.json      # also writes results/fewshot.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megamor.cli import ArgumentParser, pairs
from megamor.eval.cli import add_model_args, build_scorer, run_main, set_threads, write_json, write_text
from megamor.eval.tasks import PAPER_TASKS, TASKS, check_task_names, get_task


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help=f"comma-separated, from {', '.join(TASKS)} (default: the paper's)")
    p.add_argument("--task-file", action="append", default=[], metavar="TASK=PATH", help="read TASK from PATH (same format)")
    p.add_argument("--data-dir", type=Path, default=None, help="datasets folder (default $MEGAMOR_DATA_DIR)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--seed", type=int, default=1234, help="k-shot sampling seed")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--no-prefix", action="store_true", help="do not start each request with EOS (as lm-eval's hf model on an export)")
    p.add_argument("--log-samples", action="store_true", help="per-example log-likelihoods in the JSON")
    p.add_argument("--out", help="results JSON (a markdown table is written beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    files = pairs(args.task_file, "--task-file", "TASK=PATH")
    names = check_task_names([t.strip() for t in args.tasks.split(",") if t.strip()])
    check_task_names(files, "--task-file")
    tasks = [get_task(t, path=files.get(t)) for t in names]
    from megamor.eval.harness import evaluate, markdown_table  # torch: after the arguments are checked

    set_threads()
    scorer, tok, meta = build_scorer(args)
    results = evaluate(scorer, tok, tasks, num_fewshot=args.num_fewshot, seed=args.seed, limit=args.limit, data_dir=args.data_dir, add_prefix=not args.no_prefix)
    payload = {
        "results": {k: v.to_dict(args.log_samples) for k, v in results.items()},
        "checkpoint": str(args.checkpoint),
        "meta": meta,
        "config": {k: v for k, v in vars(args).items() if k != "checkpoint"},
    }
    write_json(args.out, payload)
    table = markdown_table(results)
    if args.out:
        write_text(Path(args.out).with_suffix(".md"), table)
    print(table, file=sys.stderr)
    return payload


if __name__ == "__main__":
    run_main(main)
