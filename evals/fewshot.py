#!/usr/bin/env python
"""Few-shot evaluation on local task files (HellaSwag, PIQA, ARC-e/c, WinoGrande, LAMBADA, BoolQ, OpenBookQA, MMLU).

    python evals/fewshot.py --checkpoint run/ --tokenizer tok.model --tasks hellaswag,piqa \
        --num-fewshot 0 --limit 500 --out results/fewshot.json      # also writes results/fewshot.md
    python evals/fewshot.py --checkpoint run/ --tasks paper --mmlu-dir data/mmlu --routing topk
        # the paper's table (megamor.eval.paper), causal and, beside it, top-k routing (non-causal)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megamor.cli import ArgumentParser, nonneg_int, pairs, positive_int
from megamor.eval.cli import add_model_args, build_scorer, run_main, set_threads, write_json, write_text
from megamor.eval.paper import ROUTINGS, paper_summary, paper_table, routing_label
from megamor.eval.tasks import PAPER_TASKS, SUITES, TASKS, check_task_names, expand_suites, get_task


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help=f"comma-separated, from {', '.join(TASKS)}, or a suite ({', '.join(SUITES)}: the paper's six columns, "
                   "MMLU included, full sets) (default: the paper's tasks without MMLU)")
    p.add_argument("--task-file", action="append", default=[], metavar="TASK=PATH", help="read TASK from PATH (same format)")
    p.add_argument("--data-dir", type=Path, default=None, help="datasets folder (default $MEGAMOR_DATA_DIR)")
    p.add_argument("--num-fewshot", type=nonneg_int, default=0)
    p.add_argument("--seed", type=int, default=1234, help="k-shot sampling seed")
    p.add_argument("--limit", type=positive_int, default=None, help="first N examples of each task")
    p.add_argument("--mmlu-dir", type=Path, default=None, help="MMLU folder in the standard CSV layout (test/<subject>_test.csv; "
                   "default $MEGAMOR_MMLU_DIR, else mmlu/ under the data dir)")
    p.add_argument("--routing", default="causal", choices=ROUTINGS,
                   help="topk: also score with expert choice's top-k over the whole sequence, as the paper's eval did "
                   "(non-causal), reported beside the causal numbers")
    p.add_argument("--no-prefix", action="store_true", help="do not start each request with EOS (as lm-eval's hf model on an export)")
    p.add_argument("--log-samples", action="store_true", help="per-example log-likelihoods in the JSON")
    p.add_argument("--out", help="results JSON (a markdown table is written beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    files = pairs(args.task_file, "--task-file", "TASK=PATH")
    names = check_task_names(expand_suites(t.strip() for t in args.tasks.split(",") if t.strip()))
    check_task_names(files, "--task-file")
    if args.mmlu_dir is not None:
        files.setdefault("mmlu", str(args.mmlu_dir))
    tasks = [get_task(t, path=files.get(t)) for t in names]
    for t in tasks:
        t.check_available(args.data_dir)  # missing data: one line before the model loads
    from megamor.eval.harness import evaluate, markdown_table  # torch: after the arguments are checked

    set_threads()
    scorer, tok, meta = build_scorer(args)
    kw = {"num_fewshot": args.num_fewshot, "seed": args.seed, "limit": args.limit, "data_dir": args.data_dir, "add_prefix": not args.no_prefix}
    results = evaluate(scorer, tok, tasks, **kw)
    runs = {"causal": results}
    if args.routing == "topk":
        scorer.routing = "topk"
        runs["topk"] = evaluate(scorer, tok, tasks, **kw)
    summaries = {routing_label(r): paper_summary(res) for r, res in runs.items()}
    payload = {
        "results": {k: v.to_dict(args.log_samples) for k, v in results.items()},
        **({"results_topk": {k: v.to_dict(args.log_samples) for k, v in runs["topk"].items()}} if "topk" in runs else {}),
        "paper": summaries,
        "checkpoint": str(args.checkpoint),
        "meta": meta,
        "config": {k: v for k, v in vars(args).items() if k != "checkpoint"},
    }
    write_json(args.out, payload)
    table = "\n".join(markdown_table(res) for res in runs.values())
    if any(s["columns"] for s in summaries.values()):
        table += "\nThe paper's columns (%; ARC = mean of Easy and Challenge):\n\n" + paper_table(summaries)
    if args.out:
        write_text(Path(args.out).with_suffix(".md"), table)
    print(table, file=sys.stderr)
    return payload


if __name__ == "__main__":
    run_main(main)
