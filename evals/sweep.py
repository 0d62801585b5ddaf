#!/usr/bin/env python
"""Evaluate every checkpoint of some runs on some tasks; cached, so a rerun only does new work.

    python evals/sweep.py runs/mor_a runs/vanilla_b --tasks hellaswag,piqa --limit 500 \
        --ppl wikitext2=../shared/data/wikitext-2-raw/wiki.test.raw --ppl-split wikitext \
        --tokenizer tok.model --out sweeps/s1
    # -> sweeps/s1/results.csv, results.md, plots/<task>_<metric>.png (vs step, tokens, FLOPs)

Job arrays (slurm/eval_sweep.sbatch): `--list` prints the checkpoints (one per line, index
first); `--index I` evaluates only checkpoint I and writes no report; `--report-only` builds
the table and plots from the cache without loading any model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megamor.cli import ArgumentParser, BadInput, pairs, results
from megamor.eval.cli import add_identity_arg, run_main, set_threads
from megamor.eval.paper import ROUTINGS
from megamor.eval.tasks import PAPER_TASKS, check_task_names, expand_suites, get_task


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="run folders (every checkpoint) and/or checkpoint files")
    p.add_argument("--out", required=True, help="sweep folder: cache/, results.csv, results.md, plots/")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated few-shot tasks, or 'paper' (the paper's six columns, MMLU included) ('' for none)")
    p.add_argument("--ppl", action="append", default=[], metavar="NAME=FILE", help="perplexity on a text file")
    p.add_argument("--ppl-split", default="file", choices=["file", "wikitext", "blank"])
    p.add_argument("--ppl-max-docs", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--mmlu-dir", default=None, help="MMLU folder, standard CSV layout (default $MEGAMOR_MMLU_DIR, else mmlu/ under the data dir)")
    p.add_argument("--routing", default="causal", choices=ROUTINGS,
                   help="topk: each task also as <task>@topk, expert choice's top-k routing as the paper's eval (non-causal)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model's max_seq_len)")
    add_identity_arg(p)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--tokens-per-step", type=int, default=None, help="tokens per optimizer step, when checkpoints do not record tokens")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the checkpoints and exit")
    mode.add_argument("--index", type=int, default=None, help="evaluate only this checkpoint (job-array task id)")
    mode.add_argument("--report-only", action="store_true", help="table and plots from the cache; load no model")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    tasks = check_task_names(expand_suites(t.strip() for t in a.tasks.split(",") if t.strip()))
    for t in tasks:
        get_task(t, path=a.mmlu_dir if t == "mmlu" else None).check_available(a.data_dir and Path(a.data_dir))
    ppl = pairs(a.ppl, "--ppl", "NAME=FILE")
    from megamor.eval.sweep import Sweep, SweepConfig, discover  # torch: after the arguments are checked

    set_threads()
    ckpts = discover(a.sources)
    if a.list:
        for i, c in enumerate(ckpts):
            print(i, c.path, file=results())
        return {"checkpoints": len(ckpts)}
    cfg = SweepConfig(
        tasks=tasks, ppl=ppl,
        ppl_split=a.ppl_split, ppl_max_docs=a.ppl_max_docs, stride=a.stride, num_fewshot=a.num_fewshot, limit=a.limit,
        seed=a.seed, tokenizer=a.tokenizer, data_dir=a.data_dir, batch_size=a.batch_size, max_batch_tokens=a.max_batch_tokens,
        max_length=a.max_length, device=a.device, dtype=a.dtype, tokens_per_step=a.tokens_per_step,
        allow_tokenizer_mismatch=a.allow_tokenizer_mismatch, mmlu_dir=a.mmlu_dir, routing=a.routing,
    )
    sweep = Sweep(cfg, a.out)
    summary: dict = {}
    if a.index is not None:
        if not 0 <= a.index < len(ckpts):
            raise BadInput(f"--index {a.index} out of range: {len(ckpts)} checkpoints")
        ckpts = [ckpts[a.index]]
    if not a.report_only:
        sweep.run(ckpts, progress=not a.no_progress)
        summary.update(computed=sweep.computed, reused=sweep.reused, models_loaded=sweep.models_loaded)
    if a.index is None:
        summary.update(sweep.report(ckpts, plots=not a.no_plots))
    print(json.dumps(summary, indent=2), file=results(), flush=True)
    return summary


if __name__ == "__main__":
    run_main(main)
