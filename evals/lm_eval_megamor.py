#!/usr/bin/env python
"""lm-eval's command line with the `megamor` model registered (lm-eval has no plugin discovery).

    python evals/lm_eval_megamor.py --model megamor \
        --model_args checkpoint=runs/mor/,tokenizer=tok.model,dtype=bf16 --batch_size 32 \
        --include_path evals/tasks --tasks megamor_hellaswag,megamor_piqa --num_fewshot 0

Every lm-eval option works as usual. The local task YAMLs (evals/tasks/megamor_*.yaml) read
the datasets from $MEGAMOR_DATA_DIR; `--metadata '{"data_dir": "/path"}'` overrides it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.__main__ import cli_evaluate

import megamor.eval.lm_eval_adapter  # noqa: F401 - registers "megamor"
from megamor.eval.cli import run_main

if __name__ == "__main__":
    run_main(cli_evaluate)  # bad input (a tokenizer mismatch, a continuation longer than the context): one line, exit 2
